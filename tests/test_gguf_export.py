"""GGUF export: a tiny GQA Llama round-trips through the importer exactly (f16) or within Q8_0 error, Q/K rows are
permuted as llama.cpp's converter does, and the real default model generates the same text in transformers' GGUF
loader as in leantune with f16-rounded weights."""

import json
import shutil

import gguf
import numpy as np
import pytest
import torch

from leantune.checkpoint.gguf import gguf_to_hf, read_metadata
from leantune.checkpoint.gguf_export import export_gguf
from leantune.checkpoint.hf import load_hf_checkpoint, ours_to_hf
from leantune.checkpoint.io import load_safetensors
from leantune.models.decoder.config import Config
from leantune.models.decoder.model import GPT

HIDDEN, N_HEAD, N_KV, FFN, LAYERS = 64, 4, 2, 96, 2
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute (HF rotary layout -> GGUF), the independent reference."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def tiny(request, tmp_path_factory, default_checkpoint):
    """A random GQA Llama as an HF folder with the default model's tokenizer, loaded as our GPT."""
    tf = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("tiny")
    vocab = json.loads((default_checkpoint / "config.json").read_text())["vocab_size"]
    cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                         num_attention_heads=N_HEAD, num_key_value_heads=N_KV, max_position_embeddings=256,
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=request.param,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    hf = tf.LlamaForCausalLM(cfg)
    with torch.no_grad():  # norms are ones at init: make them distinguishable
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.copy_(torch.randn_like(p))
    hf.save_pretrained(d)
    for name in TOKENIZER_FILES:
        shutil.copy2(default_checkpoint / name, d / name)
    return d, load_hf_checkpoint(d)


def reference(model: GPT) -> dict[str, torch.Tensor]:
    return {k: v.detach().float() for k, v in ours_to_hf(model.state_dict(), model.config).items()}


def test_f16_roundtrip_exact(tmp_path, tiny):
    folder, model = tiny
    out = export_gguf(model, folder, tmp_path / "m.gguf")
    assert out == tmp_path / "m.gguf" and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # no temp file left
    reader = gguf.GGUFReader(str(out), "r")
    meta = read_metadata(reader)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert ("output.weight" in types) is (not model.config.tie_embeddings)
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F16
    assert types["blk.1.ffn_norm.weight"] == types["output_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert (meta["general.architecture"], meta["llama.block_count"], meta["llama.attention.head_count"],
            meta["llama.attention.head_count_kv"], meta["llama.embedding_length"], meta["llama.feed_forward_length"],
            meta["llama.rope.dimension_count"], meta["general.file_type"]) == (
        "llama", LAYERS, N_HEAD, N_KV, HIDDEN, FFN, HIDDEN // N_HEAD, gguf.LlamaFileType.MOSTLY_F16)
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "smollm"
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (1, 2)
    # Q/K stored in llama.cpp's permuted order, checked against llama.cpp's own permute.
    ref = reference(model)
    stored = {t.name: np.asarray(t.data) for t in reader.tensors}
    for name, hf, n in (("attn_q", "q_proj", N_HEAD), ("attn_k", "k_proj", N_KV)):
        expect = llamacpp_permute(ref[f"model.layers.1.self_attn.{hf}.weight"].half().numpy(), n)
        assert np.array_equal(stored[f"blk.1.{name}.weight"].reshape(expect.shape), expect), name
    # Importer (un-permutes) gives back every tensor, equal to the original rounded to f16.
    sd = load_safetensors(gguf_to_hf(out, tmp_path / "hf") / "model.safetensors")
    assert sd.keys() == ref.keys()
    for k, v in ref.items():
        expected = v if v.ndim == 1 else v.half().float()
        assert torch.equal(sd[k], expected), k


def test_q8_0_within_quantization_error(tmp_path, tiny):
    folder, model = tiny
    out = export_gguf(model, folder, tmp_path / "m.gguf", gguf_type="q8_0")
    reader = gguf.GGUFReader(str(out), "r")
    assert {t.tensor_type for t in reader.tensors if len(t.shape) == 2} == {gguf.GGMLQuantizationType.Q8_0}
    assert read_metadata(reader)["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    sd = load_safetensors(gguf_to_hf(out, tmp_path / "hf") / "model.safetensors")
    for k, v in reference(model).items():
        if v.ndim == 1:
            assert torch.equal(sd[k], v), k
            continue
        blocks = v.reshape(-1, 32)
        scale = blocks.abs().amax(dim=1, keepdim=True) / 127  # Q8_0's per-block scale
        err = (sd[k].reshape(-1, 32) - blocks).abs()
        assert bool((err <= scale * 1.01 + 1e-8).all()), k
        assert not torch.equal(sd[k], v)  # really quantized


def test_refuses_other_architectures_and_types(tmp_path, tiny):
    folder, model = tiny
    with pytest.raises(ValueError, match="q4_k"):
        export_gguf(model, folder, tmp_path / "m.gguf", gguf_type="q4_k")
    with torch.device("meta"):
        neox = GPT(Config(hf_model_type="gpt_neox", n_layer=1, n_embd=32, n_head=2, vocab_size=64, mlp_class="gelu",
                          norm_class="layernorm", bias=True, parallel_residual=True, rotary_percentage=0.25))
    with pytest.raises(ValueError, match="'gpt_neox'"):
        export_gguf(neox, folder, tmp_path / "m.gguf")
    assert not any(tmp_path.iterdir())


def test_llama3_rope_scaling_becomes_rope_freqs(tmp_path, default_checkpoint):
    """Llama 3.1 rope scaling travels as llama.cpp's rope_freqs tensor; the importer recovers the same parameters."""
    rs = dict(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    vocab = json.loads((default_checkpoint / "config.json").read_text())["vocab_size"]
    model = GPT(Config(n_layer=1, n_embd=64, n_head=2, n_query_groups=1, intermediate_size=64, vocab_size=vocab,
                       rope_base=500000.0, rope_scaling=rs, block_size=128))
    out = export_gguf(model, default_checkpoint, tmp_path / "m.gguf", gguf_type="q8_0")
    cfg = json.loads((gguf_to_hf(out, tmp_path / "hf") / "config.json").read_text())
    assert cfg["rope_scaling"] == {"rope_type": "llama3", **{k: v for k, v in rs.items() if k != "type"}}
    assert (cfg["rope_theta"], cfg["num_key_value_heads"], cfg["tie_word_embeddings"]) == (500000.0, 1, False)


def test_sentencepiece_tokenizer(tmp_path):
    """A tokenizer.model-only folder is written as llama.cpp's "llama" (sentencepiece) vocabulary."""
    spm = pytest.importorskip("sentencepiece")
    words = "the quick brown fox jumps over the lazy dog while hello world code runs".split()
    lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(10)) for i in range(300)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(tmp_path / "tokenizer"), vocab_size=300, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    (tmp_path / "tokenizer.vocab").unlink()
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    model = GPT(Config(n_layer=1, n_embd=32, n_head=2, intermediate_size=64, vocab_size=320, bos_token_id=1,
                       eos_token_id=2))
    meta = read_metadata(gguf.GGUFReader(str(export_gguf(model, tmp_path, tmp_path / "m.gguf")), "r"))
    n = sp.get_piece_size()
    assert meta["tokenizer.ggml.model"] == "llama" and meta["llama.vocab_size"] == 320
    assert meta["tokenizer.ggml.tokens"][:n] == [sp.id_to_piece(i) for i in range(n)]
    assert meta["tokenizer.ggml.tokens"][n:] == [f"[PAD{i}]" for i in range(n, 320)]
    assert meta["tokenizer.ggml.token_type"][:4] == [2, 3, 3, 6]  # unk, bos, eos (control), first byte piece
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert meta["tokenizer.ggml.add_bos_token"] is True


# ---- the real default model ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_default_model_f16_generates_same_text_in_transformers(tmp_path, default_checkpoint):
    tf = pytest.importorskip("transformers")
    from tokenizers import Tokenizer as HFTokenizer

    from leantune.decode.generate import generate_tokens
    from leantune.tokenizer import Tokenizer

    model = load_hf_checkpoint(default_checkpoint, dtype=torch.float32).eval()
    out = export_gguf(model, default_checkpoint, tmp_path / "smollm2.f16.gguf")

    meta = read_metadata(gguf.GGUFReader(str(out), "r"))
    tok_cfg = json.loads((default_checkpoint / "tokenizer_config.json").read_text())
    assert meta["tokenizer.chat_template"] == tok_cfg["chat_template"]
    hf_tok = HFTokenizer.from_file(str(default_checkpoint / "tokenizer.json"))
    vocab = hf_tok.get_vocab(with_added_tokens=True)
    assert meta["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)

    tok = Tokenizer(default_checkpoint)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Write a short poem about the sea."}])
    ids = tok.encode(prompt)
    with torch.no_grad():  # our reference: the same weights rounded to f16 and back, run in fp32
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(p.half().float())
    ours = list(generate_tokens(model, torch.tensor(ids), 32))  # no stop ids: always 32 tokens
    del model
    ref = tf.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
    ref.generation_config.eos_token_id = None  # likewise never stop early
    with torch.no_grad():
        # explicit mask: pad id == <|im_end|>, which the prompt contains and generate() would otherwise mask out
        x = torch.tensor([ids])
        gen = ref.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=32, do_sample=False,
                           pad_token_id=tok.pad_id)
    assert len(ours) == 32 and gen[0, len(ids):].tolist() == ours, (tok.decode(ours), tok.decode(gen[0, len(ids):]))
