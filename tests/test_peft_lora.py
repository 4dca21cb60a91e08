"""LoRA: parameter counts from the seed documents, merge/unmerge, transformers loads the merged folder."""

import pytest
import torch
import transformers as tf

from leantune.checkpoint.hf import load_hf_checkpoint, save_hf_checkpoint
from leantune.models.decoder.config import Config
from leantune.models.decoder.model import GPT
from leantune.peft.lora import LoRAArgs, LoRALinear, apply_lora, merge_lora

FALCON_7B = dict(n_layer=32, n_embd=4544, n_head=71, n_query_groups=1, vocab_size=65024, intermediate_size=18176,
                 mlp_class="gelu", norm_class="layernorm", parallel_residual=True, shared_attention_norm=True,
                 hf_model_type="falcon")
LLAMA_2_7B = dict(n_layer=32, n_embd=4096, n_head=32, vocab_size=32000, intermediate_size=11008)


def trainable_count(cfg: dict, **lora) -> int:
    with torch.device("meta"):
        model = GPT(Config(**cfg))
    names = apply_lora(model, LoRAArgs(**lora))
    params = dict(model.named_parameters())
    return sum(params[n].numel() for n in names)


@pytest.mark.parametrize("cfg,lora,expected", [
    (FALCON_7B, dict(r=8, targets=["query", "value"]), 3_506_176),  # seed: Falcon-7B LoRA
    (LLAMA_2_7B, dict(r=8, targets=["query", "value"]), 4_194_304),  # seed: Llama-2-7B r=8 q,v
    (LLAMA_2_7B, dict(r=8, targets="all"), 20_277_248),  # seed: Llama-2-7B r=8, all layers incl. head
])
def test_trainable_counts_match_seed_documents(cfg, lora, expected):
    assert trainable_count(cfg, **lora) == expected


def tiny(**kw):
    torch.manual_seed(0)
    return GPT(Config(vocab_size=101, block_size=64, n_layer=2, n_embd=64, n_head=4, n_query_groups=2, **kw))


def randomize_lora(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.2)


@pytest.mark.parametrize("targets", [["query", "value"], ["key"], ["query", "key", "value", "projection", "mlp"]])
def test_merged_equals_unmerged_and_unmerge_restores(targets):
    model = tiny(tie_embeddings=True).eval()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, LoRAArgs(r=4, alpha=8, dropout=0.0, targets=targets))
    randomize_lora(model)
    idx = torch.randint(0, 101, (2, 16))
    with torch.no_grad():
        unmerged = model(idx)
        lora_layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
        for m in lora_layers:
            m.merge()
        merged = model(idx)
        torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(unmerged, GPT_forward_base(base, idx), atol=1e-3), "B != 0 must change the output"
        for m in lora_layers:
            m.unmerge()
    for k, v in model.state_dict().items():
        if k in base:
            torch.testing.assert_close(v, base[k], atol=1e-6, rtol=0)
    assert model.lm_head.weight is model.transformer.wte.weight  # head LoRA keeps the tie


def test_merge_with_tied_head_unties():
    model = tiny(tie_embeddings=True).eval()
    apply_lora(model, LoRAArgs(r=4, dropout=0.0, targets="all"))
    randomize_lora(model)
    idx = torch.randint(0, 101, (2, 16))
    with torch.no_grad():
        expected = model(idx)
        merge_lora(model)
        torch.testing.assert_close(model(idx), expected, atol=1e-4, rtol=1e-4)  # fp32 sum-order differences
    assert model.lm_head.weight is not model.transformer.wte.weight and not model.config.tie_embeddings


def GPT_forward_base(sd, idx):
    model = tiny(tie_embeddings=True).eval()
    model.load_state_dict(sd)
    return model(idx)


def test_merged_folder_loads_in_transformers_with_same_logits(tmp_path):
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "base")
    model = load_hf_checkpoint(tmp_path / "base").eval()
    apply_lora(model, LoRAArgs(r=4, dropout=0.0, targets="all"))
    randomize_lora(model)
    idx = torch.randint(0, 101, (2, 16))
    with torch.no_grad():
        expected = model(idx)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    save_hf_checkpoint(model, tmp_path / "merged", source_dir=tmp_path / "base")
    hf = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, expected, atol=1e-5, rtol=1e-5)


def test_trainability_only_lora_tensors_change():
    model = tiny()
    names = apply_lora(model, LoRAArgs(r=4, targets="all"))
    frozen = {n: p.clone() for n, p in model.named_parameters() if n not in names}
    before = {n: p.clone() for n, p in model.named_parameters() if n in names}
    idx = torch.randint(0, 101, (2, 16))
    model.eval()
    with torch.no_grad():
        model(idx)
    model.train()
    opt = torch.optim.AdamW([p for n, p in model.named_parameters() if n in names], lr=1e-2)
    for _ in range(2):  # B starts at zero, so A gets its first non-zero grad at step 2
        loss = torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), torch.randint(0, 101, (32,)))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if n in names}
        opt.step()
        opt.zero_grad()
    for n in names:
        assert torch.isfinite(grads[n]).all() and grads[n].abs().sum() > 0, n
        assert not torch.equal(dict(model.named_parameters())[n], before[n]), n
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_lora_defaults_and_flag_checks():
    """The documented defaults (r 8, alpha 16, query/value), `all`, and one clear error per bad value."""
    args = LoRAArgs()
    assert (args.r, args.alpha, args.targets, args.scaling) == (8, 16.0, ["query", "value"], 2.0)
    assert LoRAArgs(targets="all").targets == ["query", "key", "value", "projection", "mlp", "head"]
    for bad, flag in ((dict(r=0), "--lora.r"), (dict(targets="qkv"), "--lora.targets"), (dict(dropout=1.0), "--lora.dropout"),
                      (dict(alpha=0), "--lora.alpha")):
        with pytest.raises(ValueError, match=flag):
            LoRAArgs(**bad)
