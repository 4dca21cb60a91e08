"""Export a `GPT` to a GGUF file (llama.cpp's format): the reverse of `leantune.checkpoint.gguf`.

Only families whose `leantune.models.decoder.families` record names a GGUF architecture (the Llama layout) are exported; other
families have their own llama.cpp architectures with different tensor sets, and a file llama.cpp mis-reads is worse
than a clear refusal.
Q/K rows are permuted the way llama.cpp's `convert_hf_to_gguf.py` does (its rope kernel wants each head's two
rotary halves interleaved). Tensors are converted and written one at a time, so peak memory stays near one copy
of the model, and the file appears atomically (temporary sibling, then `os.replace`).
"""

from __future__ import annotations

import json
import math
import os
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leantune.checkpoint.gguf import BPE_MODEL, SPLIT_PRETOKENIZERS, SPM_MODEL
from leantune.checkpoint.io import is_disk_full, no_space
from leantune.models.decoder.families import FAMILIES, Family, family_of
from leantune.models.decoder.model import GPT
from leantune.tokenizer import Tokenizer

SUPPORTED_HF_TYPES = tuple(mt for mt, f in FAMILIES.items() if f.gguf_arch)
GGUF_TYPES = ("f16", "q8_0")
# gguf token types (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6



def _layer_names(family: Family) -> dict[str, str]:
    """Our block weight (besides qkv) -> its GGUF tensor stem, through the family's HF module names."""
    to_gguf = {hf: g for g, hf in family.gguf_layer_names.items()}
    return {f"{ours}.weight": to_gguf[hf] for hf, ours in family.layer_map.items() if hf in to_gguf}


def _qkv_names(family: Family) -> tuple[str, ...]:
    """GGUF tensor stems of the q, k, v projections."""
    to_gguf = {hf: g for g, hf in family.gguf_layer_names.items()}
    return tuple(to_gguf[hf] for hf in family.qkv_modules)


def _global_names(family: Family) -> dict[str, str]:
    """Our global tensor module -> its GGUF tensor stem."""
    return {family.global_map[hf]: g for g, hf in family.gguf_global_names.items()}


def permute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half row order -> llama.cpp's interleaved order (inverse of `gguf.unpermute_rotary`)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# ---- checks --------------------------------------------------------------------------------------------------
def _check_architecture(model: GPT) -> None:
    c = model.config
    if family_of(c).gguf_arch is None:
        raise ValueError(f"GGUF export supports the Llama architecture ({', '.join(SUPPORTED_HF_TYPES)}); "
                         f"this model's architecture is {c.hf_model_type!r}")
    odd = {"bias": c.bias, "attn_bias": c.attn_bias, "lm_head_bias": c.lm_head_bias,
           "parallel_residual": c.parallel_residual, "learned_pos_emb": c.learned_pos_emb,
           "partial rotary": c.rope_n_elem != c.head_size, "non-RMSNorm": c.norm_class != "rmsnorm",
           "non-SwiGLU MLP": c.mlp_class != "swiglu"}
    if any(odd.values()):
        raise ValueError(f"{c.hf_model_type} model with {[k for k, v in odd.items() if v]} cannot be written as a "
                         "llama GGUF")
    expected = set(_tensor_plan_keys(model))
    unexpected = sorted(set(model.state_dict()) - expected)
    if unexpected:
        raise ValueError(f"the model has tensors a llama GGUF cannot hold ({unexpected[:5]}, ...); "
                         "merge adapters into the base weights first")


def _tensor_plan_keys(model: GPT) -> Iterator[str]:
    yield "transformer.wte.weight"
    for i in range(model.config.n_layer):
        yield f"transformer.h.{i}.attn.qkv.weight"
        for k in _layer_names(family_of(model.config)):
            yield f"transformer.h.{i}.{k}"
    yield "transformer.ln_f.weight"
    yield "lm_head.weight"


# ---- tensors -------------------------------------------------------------------------------------------------
def _tensors(model: GPT) -> Iterator[tuple[str, Callable[[], torch.Tensor], tuple[int, ...]]]:
    """(gguf name, thunk giving the float tensor, shape): thunks so only one converted tensor lives at a time."""
    c = model.config
    family = family_of(c)
    layer_names, glob, (q_name, k_name, v_name) = _layer_names(family), _global_names(family), _qkv_names(family)
    sd = model.state_dict()  # references, not copies
    wte = "transformer.wte.weight"
    yield f"{glob['transformer.wte']}.weight", lambda: sd[wte], tuple(sd[wte].shape)
    if c.rope_scaling and c.rope_scaling["type"] == "llama3":
        freqs = _llama3_rope_factors(c.rope_scaling, c.rope_base, c.head_size)
        yield "rope_freqs.weight", lambda: freqs, tuple(freqs.shape)
    for i in range(c.n_layer):
        p = f"transformer.h.{i}."
        qkv = sd[p + "attn.qkv.weight"]
        q_rows, kv_rows, _ = c.qkv_sizes
        shape_q, shape_kv = (q_rows, qkv.shape[1]), (kv_rows, qkv.shape[1])

        def part(start: int, rows: int, n_head: int | None, qkv: torch.Tensor = qkv) -> Callable[[], torch.Tensor]:
            def get() -> torch.Tensor:
                w = qkv[start:start + rows]
                return permute_rotary(w, n_head) if n_head else w
            return get

        # the attention norm, then q/k/v, then the rest: the order llama.cpp's converter writes
        yield f"blk.{i}.{layer_names['norm_1.weight']}.weight", (lambda k=p + "norm_1.weight": sd[k]), (c.n_embd,)
        yield f"blk.{i}.{q_name}.weight", part(0, q_rows, c.n_head), shape_q
        yield f"blk.{i}.{k_name}.weight", part(q_rows, kv_rows, c.n_query_groups), shape_kv
        yield f"blk.{i}.{v_name}.weight", part(q_rows + kv_rows, kv_rows, None), shape_kv
        for ours, name in layer_names.items():
            if ours != "norm_1.weight":
                yield f"blk.{i}.{name}.weight", (lambda k=p + ours: sd[k]), tuple(sd[p + ours].shape)
    yield f"{glob['transformer.ln_f']}.weight", lambda: sd["transformer.ln_f.weight"], (c.n_embd,)
    if not _tied(model):
        yield f"{glob['lm_head']}.weight", lambda: sd["lm_head.weight"], tuple(sd["lm_head.weight"].shape)


def _tied(model: GPT) -> bool:
    """Tied in fact (shared storage), not only by config: a merged head LoRA unties the weights."""
    head, wte = model.lm_head.weight, model.transformer.wte.weight
    return head is wte or (head.device.type != "meta" and head.data_ptr() == wte.data_ptr())


def _llama3_rope_factors(rs: dict[str, Any], theta: float, head_dim: int) -> torch.Tensor:
    """llama.cpp stores Llama 3.1 rope scaling as per-frequency divisors (`rope_freqs.weight`), as its converter does."""
    factor, low, high, orig = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"], rs["original_max_position_embeddings"]
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < orig / high:
            out.append(1.0)
        elif wavelen > orig / low:
            out.append(factor)
        else:
            smooth = (orig / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def _storage(shape: tuple[int, ...], gguf_type: str) -> tuple[Any, int, np.dtype, tuple[int, ...]]:
    """(ggml type, nbytes, numpy dtype, numpy shape) of one tensor: norms and 1-D in f32, like llama.cpp."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    n = math.prod(shape)
    if len(shape) == 1:
        return GGMLQuantizationType.F32, 4 * n, np.dtype(np.float32), shape
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0]
    if gguf_type == "q8_0" and shape[-1] % block == 0:
        byte_shape = (*shape[:-1], shape[-1] // block * size)
        return GGMLQuantizationType.Q8_0, math.prod(byte_shape), np.dtype(np.uint8), byte_shape
    return GGMLQuantizationType.F16, 2 * n, np.dtype(np.float16), shape  # llama.cpp also falls back for odd rows


def _encode(t: torch.Tensor, qtype: Any) -> np.ndarray:
    from gguf import GGMLQuantizationType, quants

    t = t.detach().to("cpu")
    if qtype == GGMLQuantizationType.F32:
        return t.float().contiguous().numpy()
    if qtype == GGMLQuantizationType.F16:
        return t.float().to(torch.float16).contiguous().numpy()
    return quants.quantize(t.float().contiguous().numpy(), qtype)


# ---- tokenizer -----------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _pre_name(pre: dict[str, Any] | None) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a tokenizer.json pre-tokenizer (llama.cpp itself hashes test encodings;
    we recognise the structures the importer knows)."""
    parts = (pre or {}).get("pretokenizers", [pre] if pre else [])
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        regex = (parts[0].get("pattern") or {}).get("Regex")
        names = {"llama-bpe": SPLIT_PRETOKENIZERS["llama-bpe"], "qwen2": SPLIT_PRETOKENIZERS["qwen2"]}
        for name, pattern in names.items():
            if regex == pattern:
                return name
    warnings.warn(f"pre-tokenizer {kinds} is not recognised; writing tokenizer.ggml.pre='default', which llama.cpp "
                  "may split differently", stacklevel=3)
    return "default"


def _byte_level_vocab(tj: dict[str, Any], n_vocab: int, tok_cfg: dict[str, Any]) -> tuple[list[str], list[int], list[str]]:
    vocab: dict[str, int] = dict(tj["model"]["vocab"])
    added = {a["content"]: a for a in tj.get("added_tokens", [])}
    for a in added.values():
        vocab[a["content"]] = a["id"]
    special_strings = {v.get("content") for v in tok_cfg.get("added_tokens_decoder", {}).values() if v.get("special")}
    size = max(n_vocab, max(vocab.values()) + 1)
    if size > n_vocab:
        raise ValueError(f"the tokenizer has {size} tokens but the model's embedding only {n_vocab} rows")
    tokens: list[str | None] = [None] * size
    for tok, i in vocab.items():
        tokens[i] = tok
    out_tokens, types = [], []
    for i, tok in enumerate(tokens):
        if tok is None:  # embedding rows beyond the tokenizer (padded vocab): llama.cpp's placeholder
            out_tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif tok in added:
            out_tokens.append(tok)
            types.append(CONTROL if added[tok].get("special") or tok in special_strings else USER_DEFINED)
        else:
            out_tokens.append(tok)
            types.append(NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"].get("merges", [])]
    return out_tokens, types, merges


def _add_tokenizer(w: Any, tokenizer_dir: Path, n_vocab: int) -> None:
    tok = Tokenizer(tokenizer_dir)
    tok_cfg = _read_json(tokenizer_dir / "tokenizer_config.json")
    tj = _read_json(tokenizer_dir / "tokenizer.json")
    model = tj.get("model", {})
    byte_level = model.get("type") == "BPE" and "ByteLevel" in json.dumps(tj.get("pre_tokenizer"))
    if byte_level:
        tokens, types, merges = _byte_level_vocab(tj, n_vocab, tok_cfg)
        w.add_tokenizer_model(BPE_MODEL)
        w.add_tokenizer_pre(_pre_name(tj.get("pre_tokenizer")))
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
    elif (tokenizer_dir / "tokenizer.model").is_file():
        _add_sentencepiece(w, tokenizer_dir, n_vocab)
    else:
        raise ValueError(f"{tokenizer_dir}: only byte-level BPE tokenizer.json or sentencepiece tokenizer.model "
                         f"vocabularies can be written to GGUF (found {model.get('type')!r})")
    if tok.bos_id is not None:
        w.add_bos_token_id(tok.bos_id)
    if tok.eos_id is not None:
        w.add_eos_token_id(tok.eos_id)
        others = [i for i in tok.eos_ids if i != tok.eos_id]
        if others:  # generation_config's extra stop ids (chat end-of-turn)
            w.add_eot_token_id(others[0])
    unk = tok.special_tokens.get("unk_token")
    unk_id = tok.token_to_id(unk) if unk else None
    if unk_id is not None:
        w.add_unk_token_id(unk_id)
    if tok.pad_id is not None:
        w.add_pad_token_id(tok.pad_id)
    w.add_add_bos_token(bool(tok.use_bos))
    w.add_add_eos_token(bool(tok_cfg.get("add_eos_token", False)))
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)


def _add_sentencepiece(w: Any, tokenizer_dir: Path, n_vocab: int) -> None:
    import sentencepiece as spm

    added = _read_json(tokenizer_dir / "added_tokens.json")
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    n = sp.get_piece_size()
    if any(i >= n for i in added.values()) or n > n_vocab:
        raise ValueError(f"{tokenizer_dir}: sentencepiece vocabularies with added tokens or more pieces ({n}) than "
                         f"embedding rows ({n_vocab}) are not supported for GGUF export")
    tokens = [sp.id_to_piece(i) for i in range(n)]
    scores = [sp.get_score(i) for i in range(n)]
    types = [UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i) else BYTE if sp.is_byte(i)
             else UNUSED if sp.is_unused(i) else NORMAL for i in range(n)]
    for i in range(n, n_vocab):
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(UNUSED)
    w.add_tokenizer_model(SPM_MODEL)
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)


# ---- metadata ------------------------------------------------------------------------------------------------
def _add_metadata(w: Any, model: GPT, name: str, gguf_type: str) -> None:
    from gguf import GGML_QUANT_VERSION, LlamaFileType, RopeScalingType

    c = model.config
    w.add_name(name)
    w.add_context_length(c.block_size)
    w.add_embedding_length(c.n_embd)
    w.add_block_count(c.n_layer)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.n_head)
    w.add_head_count_kv(c.n_query_groups)
    if c.head_size != c.n_embd // c.n_head:
        w.add_key_length(c.head_size)
        w.add_value_length(c.head_size)
    w.add_rope_dimension_count(c.rope_n_elem)
    w.add_rope_freq_base(float(c.rope_base))
    w.add_layer_norm_rms_eps(float(c.norm_eps))
    w.add_vocab_size(c.padded_vocab_size)
    w.add_file_type(LlamaFileType.MOSTLY_F16 if gguf_type == "f16" else LlamaFileType.MOSTLY_Q8_0)
    w.add_quantization_version(GGML_QUANT_VERSION)
    rs = c.rope_scaling
    if rs and rs["type"] == "linear":
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rs["factor"]))
    # llama3 scaling travels as the rope_freqs.weight tensor (as llama.cpp's converter writes it)


# ---- entry point ---------------------------------------------------------------------------------------------
def export_gguf(model: GPT, tokenizer_dir: Path, out_path: Path, gguf_type: str = "f16") -> Path:
    """Write `model` plus the tokenizer of `tokenizer_dir` as a llama GGUF at `out_path`; returns `out_path`.

    gguf_type "f16": 2-D weights f16; "q8_0": 2-D weights Q8_0 (rows not a multiple of 32 stay f16). Norms are f32.
    """
    from gguf import GGUFWriter

    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"gguf_type {gguf_type!r} is not supported; choose one of {', '.join(GGUF_TYPES)}")
    _check_architecture(model)
    tokenizer_dir, out_path = Path(tokenizer_dir), Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{uuid.uuid4().hex[:8]}")
    plan = list(_tensors(model))
    w = None
    try:
        w = GGUFWriter(tmp, family_of(model.config).gguf_arch)
        _add_metadata(w, model, model.config.name or tokenizer_dir.name, gguf_type)
        _add_tokenizer(w, tokenizer_dir, model.config.padded_vocab_size)
        storage = {}
        for name, _, shape in plan:
            storage[name] = qtype, nbytes, dtype, np_shape = _storage(shape, gguf_type)
            w.add_tensor_info(name, np_shape, dtype, nbytes, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        with torch.no_grad():
            for name, get, _ in plan:
                arr = _encode(get(), storage[name][0])
                w.write_tensor_data(arr)
                del arr
        for fh in w.fout or []:
            fh.flush()
            os.fsync(fh.fileno())
        w.close()
        os.replace(tmp, out_path)
    except BaseException as e:
        try:
            if w is not None:
                w.close()  # may fail again (a full disk): the temporary goes regardless
        except OSError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
        if is_disk_full(e):
            raise no_space(out_path.parent) from e
        raise
    return out_path
