"""T5 v1.0 and v1.1 / flan-t5 equal transformers' T5ForConditionalGeneration on tiny random models: logits (fp32,
encoder and decoder padding), the training loss, HF -> ours -> HF bit-identical per tensor (and loadable by
transformers), KV-cached decoding == full recompute, the config.json round trip and the key map."""

import json

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from safetensors.torch import load_file, save_file
from t5_support import VARIANTS, as_transformers_4_folder, padded_batch, random_t5_hf

from leantune.checkpoint.t5_hf import hf_name, load_t5_checkpoint, our_name, save_t5_checkpoint
from leantune.models.t5.model import T5, T5Config, relative_position_bucket

ATOL = 1e-5


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    """(variant, transformers model, its folder, our model loaded from that folder). Perturbations of 0.1 keep the
    model well conditioned (with 1.0, transformers' own cached and full decoding differ by 2e-4)."""
    ref, folder = random_t5_hf(request.param, tmp_path_factory.mktemp(request.param) / "hf", noise=0.1)
    return request.param, ref, folder, load_t5_checkpoint(folder)


def test_config_flags_follow_the_variant(pair):
    variant, _, _, ours = pair
    tied = VARIANTS[variant]["tie_word_embeddings"]
    assert ours.config.tie_word_embeddings is tied and ours.config.scale_decoder_outputs is tied
    assert ours.config.is_gated_act is (variant == "v1.1")
    assert (ours.lm_head.weight is ours.shared.weight) is tied


def test_logits_equal_transformers_with_padding(pair):
    _, ref, _, ours = pair
    ids, mask = padded_batch()
    dec = torch.randint(2, 96, (3, 25), generator=torch.Generator().manual_seed(2))
    dec_mask = torch.ones(3, 25, dtype=torch.long)
    dec_mask[2, 17:] = 0  # right-padded decoder inputs
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask).logits
        got = ours(ids, dec, attention_mask=mask, decoder_attention_mask=dec_mask)
        want_enc = ref.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        got_enc = ours.encode(ids, mask)
    torch.testing.assert_close(got_enc, want_enc, atol=ATOL, rtol=0)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_training_loss_equals_transformers(pair):
    """Teacher forcing from labels with -100 (shift_right as transformers), same cross-entropy."""
    _, ref, _, ours = pair
    ids, mask = padded_batch()
    labels = torch.randint(2, 96, (3, 12), generator=torch.Generator().manual_seed(3))
    labels[1, 8:] = -100
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, labels=labels).loss
        dec = ours.shift_right(labels)
        assert torch.equal(dec, ref._shift_right(labels))
        logits = ours(ids, dec, attention_mask=mask)
    got = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_encoder_padding_is_ignored(pair):
    """A padded row gives the same encoder output and logits as the same input alone, whatever the pad ids."""
    _, _, _, ours = pair
    ids, mask = padded_batch()
    other = ids.masked_fill(mask == 0, 5)
    dec = torch.randint(2, 96, (3, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        batch = ours(ids, dec, attention_mask=mask)
        torch.testing.assert_close(ours(other, dec, attention_mask=mask), batch, atol=ATOL, rtol=0)
        # a shorter key set sums in another order: equal up to float rounding
        alone = ours(ids[2:, :9], dec[2:])
        torch.testing.assert_close(batch[2:], alone, atol=ATOL, rtol=1e-5)
        enc_alone = ours.encode(ids[1:2, :21])
        torch.testing.assert_close(ours.encode(ids, mask)[1:2, :21], enc_alone, atol=ATOL, rtol=1e-5)


def test_cached_decoding_equals_full_recompute(pair):
    """Prefill 4 decoder tokens into the cache, then one at a time: each step's logits equal the full decoder pass
    over the whole prefix (cross-attention keys/values computed once, padding respected)."""
    _, ref, _, ours = pair
    ids, mask = padded_batch()
    dec = torch.randint(2, 96, (3, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        enc = ours.encode(ids, mask)
        full = ours.decode(dec, enc, mask)  # (B, 12, V)
        cache = ours.new_cache(enc, mask, max_length=12)
        steps = [ours.decode(dec[:, :4], cache=cache)]
        for t in range(4, 12):
            steps.append(ours.decode(dec[:, t:t + 1], cache=cache))
    assert cache.length == 12
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=0)
    with torch.no_grad():  # and transformers' own cached decoding
        out = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec[:, :4], use_cache=True)
        want = [out.logits]
        for t in range(4, 12):
            out = ref(encoder_outputs=(enc,), attention_mask=mask, decoder_input_ids=dec[:, t:t + 1],
                      cache=out.cache, use_cache=True)
            want.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), torch.cat(want, dim=1), atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="holds 12 tokens"):
        ours.decode(dec[:, :1], cache=cache)


def test_hf_ours_hf_is_bit_identical(pair, tmp_path):
    _, ref, folder, ours = pair
    out = save_t5_checkpoint(ours, tmp_path / "out", source_dir=folder)
    want, got = load_file(folder / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    # transformers loads the written folder to the same model
    back = tf.T5ForConditionalGeneration.from_pretrained(out).eval()
    ids, mask = padded_batch()
    dec = torch.randint(2, 96, (3, 7), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits,
                           ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits)


def test_folder_without_source_config_loads_in_transformers(pair, tmp_path):
    """With no config.json to copy, T5Config.to_hf describes the model (head tying and rescale included)."""
    _, ref, _, ours = pair
    out = save_t5_checkpoint(ours, tmp_path / "fresh", shard_bytes=20_000)  # several shards + index
    assert (out / "model.safetensors.index.json").is_file()
    back = tf.T5ForConditionalGeneration.from_pretrained(out).eval()
    assert back.config.scale_decoder_outputs == ours.config.scale_decoder_outputs
    ids, mask = padded_batch()
    dec = torch.randint(2, 96, (3, 7), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits,
                                   ours(ids, dec, attention_mask=mask), atol=0, rtol=0)
    assert isinstance(load_t5_checkpoint(out), T5)


def test_transformers_4_style_folder(pair, tmp_path):
    """Older folders: no scale_decoder_outputs key (tie_word_embeddings decides), embedding copies, an unused bias
    table. transformers and leantune load them to the same logits."""
    variant, _, folder, _ = pair
    old = tmp_path / "old"
    old.mkdir()
    for f in folder.iterdir():
        (old / f.name).write_bytes(f.read_bytes())
    as_transformers_4_folder(old)
    ours = load_t5_checkpoint(old)
    assert ours.config.tie_word_embeddings is VARIANTS[variant]["tie_word_embeddings"]
    ref = tf.T5ForConditionalGeneration.from_pretrained(old).eval()
    ids, mask = padded_batch()
    dec = torch.randint(2, 96, (3, 7), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, dec, attention_mask=mask),
                                   ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits,
                                   atol=ATOL, rtol=0)


def test_bad_checkpoints_are_refused(pair, tmp_path):
    _, _, folder, _ = pair
    sd = load_file(folder / "model.safetensors")
    cases = {
        "unknown": ({**sd, "encoder.embed_positions.weight": torch.zeros(1)}, KeyError, "does not know"),
        "unexpected": ({**sd, "encoder.block.0.layer.0.SelfAttention.extra.weight": torch.zeros(1)}, KeyError,
                       r"unexpected \['encoder.block.0.layer.0.SelfAttention.extra.weight'\]"),
        "missing": ({k: v for k, v in sd.items() if k != "decoder.final_layer_norm.weight"}, KeyError,
                    "decoder.final_layer_norm.weight"),
        "own-embeddings": ({**sd, "encoder.embed_tokens.weight": sd["shared.weight"] + 1}, ValueError,
                           "separate encoder/decoder embeddings"),
    }
    for name, (tensors, error, message) in cases.items():
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_bytes((folder / "config.json").read_bytes())
        save_file(tensors, d / "model.safetensors")
        with pytest.raises(error, match=message):
            load_t5_checkpoint(d)


def test_dtype_and_bf16_forward(pair):
    _, _, folder, ours = pair
    half = load_t5_checkpoint(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    ids, mask = padded_batch()
    dec = torch.randint(2, 96, (3, 5), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        low, high = half(ids, dec, attention_mask=mask).float(), ours(ids, dec, attention_mask=mask)
    assert torch.isfinite(low).all()
    assert (low.argmax(-1) == high.argmax(-1)).float().mean() > 0.8


def test_train_mode_backward_reaches_every_parameter(pair):
    variant, _, folder, _ = pair
    model = load_t5_checkpoint(folder).train()
    ids, mask = padded_batch()
    labels = torch.randint(2, 96, (3, 6), generator=torch.Generator().manual_seed(10))
    torch.manual_seed(0)
    logits = model(ids, model.shift_right(labels), attention_mask=mask)
    F.cross_entropy(logits.flatten(0, 1), labels.flatten()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    with torch.no_grad():  # dropout is active in train mode, off in eval mode
        torch.manual_seed(1)
        again = model(ids, model.shift_right(labels), attention_mask=mask)
        assert not torch.equal(again, logits.detach())
        model.eval()
        assert torch.equal(model(ids, model.shift_right(labels), attention_mask=mask),
                           model(ids, model.shift_right(labels), attention_mask=mask))


# ---- config and names -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_config_json_round_trip(variant, tmp_path):
    cfg = T5Config.from_hf({**json.loads(tf.T5Config(**VARIANTS[variant]).to_json_string()), "n_positions": 512})
    assert T5Config.from_hf(cfg.to_hf()) == cfg
    assert cfg.to_hf()["n_positions"] == 512  # unmodeled fields survive
    hf = tf.T5Config.from_dict(cfg.to_hf())
    assert hf.is_gated_act == cfg.is_gated_act and hf.dense_act_fn == cfg.dense_act_fn
    assert hf.scale_decoder_outputs == cfg.scale_decoder_outputs


def test_config_refuses_what_it_cannot_describe():
    with pytest.raises(ValueError, match="feed_forward_proj"):
        T5Config.from_hf({"model_type": "t5", "feed_forward_proj": "relu-gated"})
    with pytest.raises(ValueError, match="not a T5 config"):
        T5Config.from_hf({"model_type": "llama"})
    with pytest.raises(ValueError, match="not supported"):
        T5Config(dense_act_fn="tanh")
    with pytest.raises(ValueError, match="no config.json spelling"):
        T5Config(dense_act_fn="gelu", is_gated_act=True).to_hf()
    assert T5Config.from_hf({"model_type": "t5", "feed_forward_proj": "gated-silu"}).to_hf()["feed_forward_proj"] == \
        "gated-silu"


def test_key_map_is_one_to_one_and_names_are_stable(pair):
    _, ref, _, ours = pair
    tied = ours.config.tie_word_embeddings
    ours_keys = [k for k in ours.state_dict() if not (tied and k == "lm_head.weight")]
    hf_keys = {k for k in ref.state_dict() if not (k.endswith("embed_tokens.weight") or (tied and k == "lm_head.weight"))}
    assert {hf_name(k) for k in ours_keys} == hf_keys
    assert all(our_name(hf_name(k)) == k for k in ours_keys)
    # PEFT targets are plain nn.Linear modules under short names, with the HF module path one call away
    linears = {n for n, m in ours.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {"encoder.block.1.attn.q", "decoder.block.2.cross_attn.v", "decoder.block.0.attn.o"} <= linears
    assert hf_name("decoder.block.2.cross_attn.v") == "decoder.block.2.layer.1.EncDecAttention.v"
    assert hf_name("encoder.block.1.ff.wo") == "encoder.block.1.layer.1.DenseReluDense.wo"
    assert hf_name("decoder.block.1.ff_norm") == "decoder.block.1.layer.2.layer_norm"
    with pytest.raises(KeyError):
        our_name("encoder.block.0.layer.1.EncDecAttention.q")  # the encoder has no cross-attention


def test_relative_position_buckets_equal_transformers():
    rel = torch.arange(-300, 300)[None, :]
    for bidirectional in (True, False):
        for nb, md in ((32, 128), (8, 12)):
            want = tf.models.t5.modeling_t5.T5Attention._relative_position_bucket(rel, bidirectional, nb, md)
            assert torch.equal(relative_position_bucket(rel, bidirectional, nb, md), want)
