"""Architecture presets: `Config` keyword arguments for known checkpoints, keyed by their Hugging Face repo id.

Every row is plain data copied from the upstream `config.json` (the repo named by the key), spelled in `Config`'s
field names, so `families.config_from_hf(config_json)` and `Config(**row)` agree (tests/test_presets.py checks both
and the parameter counts). `padded_vocab_size` is always the config.json `vocab_size`: our embedding and LM head have
exactly the checkpoint's row count, so weights load without padding or slicing.

Look a preset up with `find_preset` (repo id, the part after the slash, case-insensitive; a trailing "-hf" may be
left off) or build it with `Config.from_name`.
"""

from __future__ import annotations

import copy
import difflib
from typing import Any

# ---- family defaults (what every checkpoint of that config.json format shares) -------------------------------------

_LLAMA: dict[str, Any] = dict(
    hf_model_type="llama", mlp_class="swiglu", norm_class="rmsnorm", bias=False, attn_bias=False, lm_head_bias=False,
    rotary_percentage=1.0, rope_scaling=None, parallel_residual=False, shared_attention_norm=False,
    learned_pos_emb=False, sliding_window=None,
)
_MISTRAL: dict[str, Any] = {**_LLAMA, "hf_model_type": "mistral"}
_QWEN2: dict[str, Any] = {**_LLAMA, "hf_model_type": "qwen2", "attn_bias": True}  # bias on q/k/v only
# GPT-NeoX (Pythia, StableLM-Alpha): fused qkv with bias, exact GELU, LayerNorm, rotary on 25% of each head,
# attention and MLP in parallel on two separate norms, untied `embed_out`.
_NEOX: dict[str, Any] = dict(
    hf_model_type="gpt_neox", mlp_class="gelu", gelu_approximate="none", norm_class="layernorm", norm_eps=1e-5,
    bias=True, attn_bias=False, lm_head_bias=False, rotary_percentage=0.25, rope_base=10000.0, rope_scaling=None,
    parallel_residual=True, shared_attention_norm=False, learned_pos_emb=False, tie_embeddings=False,
    sliding_window=None,
)
# Falcon (RefinedWeb): no linear biases, exact GELU, 4x MLP, parallel attention + MLP. config.json has no
# `tie_word_embeddings` key and transformers' FalconConfig defaults it to True, so the LM head is the embedding.
_FALCON: dict[str, Any] = dict(
    hf_model_type="falcon", block_size=2048, vocab_size=65024, padded_vocab_size=65024, mlp_class="gelu",
    gelu_approximate="none", norm_class="layernorm", norm_eps=1e-5, bias=False, attn_bias=False, lm_head_bias=False,
    rotary_percentage=1.0, rope_base=10000.0, rope_scaling=None, parallel_residual=True, learned_pos_emb=False,
    tie_embeddings=True, sliding_window=None, bos_token_id=11, eos_token_id=11,
)

# Llama 3.1 / 3.2 "llama3" RoPE frequency scaling (config.json `rope_scaling`, rope_type "llama3").
_LLAMA32_ROPE = dict(type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_position_embeddings=8192)


def _pythia(n_layer: int, n_embd: int, n_head: int, vocab_size: int) -> dict[str, Any]:
    return {**_NEOX, "block_size": 2048, "vocab_size": vocab_size, "padded_vocab_size": vocab_size,
            "n_layer": n_layer, "n_embd": n_embd, "n_head": n_head, "n_query_groups": n_head,
            "intermediate_size": 4 * n_embd, "bos_token_id": 0, "eos_token_id": 0}


def _smollm2(n_layer: int, n_embd: int, n_head: int, n_kv: int, intermediate: int, rope_base: float,
             instruct: bool) -> dict[str, Any]:
    # Base checkpoints use <|endoftext|> (0) for both; the -Instruct ones <|im_start|> (1) and <|im_end|> (2).
    return {**_LLAMA, "block_size": 8192, "vocab_size": 49152, "padded_vocab_size": 49152, "n_layer": n_layer,
            "n_embd": n_embd, "n_head": n_head, "n_query_groups": n_kv, "intermediate_size": intermediate,
            "norm_eps": 1e-5, "rope_base": rope_base, "tie_embeddings": True,
            "bos_token_id": 1 if instruct else 0, "eos_token_id": 2 if instruct else 0}


def _qwen25(n_layer: int, n_embd: int, n_head: int, n_kv: int, intermediate: int, vocab_size: int, block_size: int,
            tie: bool, instruct: bool) -> dict[str, Any]:
    # use_sliding_window is false in every Qwen2.5 config.json, so no sliding window.
    return {**_QWEN2, "block_size": block_size, "vocab_size": vocab_size, "padded_vocab_size": vocab_size,
            "n_layer": n_layer, "n_embd": n_embd, "n_head": n_head, "n_query_groups": n_kv,
            "intermediate_size": intermediate, "norm_eps": 1e-6, "rope_base": 1000000.0, "tie_embeddings": tie,
            "bos_token_id": 151643, "eos_token_id": 151645 if instruct else 151643}


def _llama2(n_layer: int, n_embd: int, n_head: int, n_kv: int, intermediate: int) -> dict[str, Any]:
    return {**_LLAMA, "block_size": 4096, "vocab_size": 32000, "padded_vocab_size": 32000, "n_layer": n_layer,
            "n_embd": n_embd, "n_head": n_head, "n_query_groups": n_kv, "intermediate_size": intermediate,
            "norm_eps": 1e-5, "rope_base": 10000.0, "tie_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}


def _llama32(n_layer: int, n_embd: int, n_head: int, instruct: bool) -> dict[str, Any]:
    return {**_LLAMA, "block_size": 131072, "vocab_size": 128256, "padded_vocab_size": 128256, "n_layer": n_layer,
            "n_embd": n_embd, "n_head": n_head, "n_query_groups": 8, "intermediate_size": 8192, "norm_eps": 1e-5,
            "rope_base": 500000.0, "rope_scaling": dict(_LLAMA32_ROPE), "tie_embeddings": True,
            "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009] if instruct else 128001}


PRESETS: dict[str, dict[str, Any]] = {
    # ---- GPT-2 (learned positions, tanh GELU, tied head; config.json has no tie_word_embeddings -> True) --------
    "openai-community/gpt2": dict(
        hf_model_type="gpt2", block_size=1024, vocab_size=50257, padded_vocab_size=50257, n_layer=12, n_embd=768,
        n_head=12, n_query_groups=12, intermediate_size=3072, mlp_class="gelu", gelu_approximate="tanh",
        norm_class="layernorm", norm_eps=1e-5, bias=True, attn_bias=False, lm_head_bias=False, rotary_percentage=1.0,
        rope_base=10000.0, rope_scaling=None, parallel_residual=False, shared_attention_norm=False,
        learned_pos_emb=True, tie_embeddings=True, sliding_window=None, bos_token_id=50256, eos_token_id=50256,
    ),
    # ---- Pythia (GPT-NeoX) ----------------------------------------------------------------------------------------
    "EleutherAI/pythia-70m": _pythia(6, 512, 8, 50304),
    "EleutherAI/pythia-160m": _pythia(12, 768, 12, 50304),
    "EleutherAI/pythia-410m": _pythia(24, 1024, 16, 50304),
    "EleutherAI/pythia-1b": _pythia(16, 2048, 8, 50304),
    "EleutherAI/pythia-1.4b": _pythia(24, 2048, 16, 50304),
    "EleutherAI/pythia-2.8b": _pythia(32, 2560, 32, 50304),
    "EleutherAI/pythia-6.9b": _pythia(32, 4096, 32, 50432),
    "EleutherAI/pythia-12b": _pythia(36, 5120, 40, 50688),
    # ---- StableLM-Alpha (GPT-NeoX format, 4k context) -------------------------------------------------------------
    "stabilityai/stablelm-base-alpha-3b": {
        **_NEOX, "block_size": 4096, "vocab_size": 50688, "padded_vocab_size": 50688, "n_layer": 16, "n_embd": 4096,
        "n_head": 32, "n_query_groups": 32, "intermediate_size": 16384, "bos_token_id": 0, "eos_token_id": 0,
    },
    "stabilityai/stablelm-base-alpha-7b": {
        **_NEOX, "block_size": 4096, "vocab_size": 50432, "padded_vocab_size": 50432, "n_layer": 16, "n_embd": 6144,
        "n_head": 48, "n_query_groups": 48, "intermediate_size": 24576, "bos_token_id": 0, "eos_token_id": 0,
    },
    # ---- Falcon ---------------------------------------------------------------------------------------------------
    # falcon-7b: multi_query (1 kv head), parallel_attn, one input_layernorm shared by attention and MLP.
    "tiiuae/falcon-7b": {
        **_FALCON, "n_layer": 32, "n_embd": 4544, "n_head": 71, "n_query_groups": 1, "intermediate_size": 18176,
        "shared_attention_norm": True,
    },
    # falcon-40b: new_decoder_architecture, 8 kv heads (num_kv_heads), separate ln_attn and ln_mlp.
    "tiiuae/falcon-40b": {
        **_FALCON, "n_layer": 60, "n_embd": 8192, "n_head": 128, "n_query_groups": 8, "intermediate_size": 32768,
        "shared_attention_norm": False,
    },
    # ---- Llama 2 --------------------------------------------------------------------------------------------------
    "meta-llama/Llama-2-7b-hf": _llama2(32, 4096, 32, 32, 11008),
    "meta-llama/Llama-2-13b-hf": _llama2(40, 5120, 40, 40, 13824),
    "meta-llama/Llama-2-70b-hf": _llama2(80, 8192, 64, 8, 28672),
    # ---- Llama 3 / 3.2 --------------------------------------------------------------------------------------------
    "meta-llama/Meta-Llama-3-8B": {
        **_LLAMA, "block_size": 8192, "vocab_size": 128256, "padded_vocab_size": 128256, "n_layer": 32,
        "n_embd": 4096, "n_head": 32, "n_query_groups": 8, "intermediate_size": 14336, "norm_eps": 1e-5,
        "rope_base": 500000.0, "tie_embeddings": False, "bos_token_id": 128000, "eos_token_id": 128001,
    },
    "meta-llama/Llama-3.2-1B": _llama32(16, 2048, 32, instruct=False),
    "meta-llama/Llama-3.2-1B-Instruct": _llama32(16, 2048, 32, instruct=True),
    "meta-llama/Llama-3.2-3B": _llama32(28, 3072, 24, instruct=False),
    "meta-llama/Llama-3.2-3B-Instruct": _llama32(28, 3072, 24, instruct=True),
    # ---- Mistral (sliding_window 4096 in config.json) -------------------------------------------------------------
    "mistralai/Mistral-7B-v0.1": {
        **_MISTRAL, "block_size": 32768, "vocab_size": 32000, "padded_vocab_size": 32000, "n_layer": 32,
        "n_embd": 4096, "n_head": 32, "n_query_groups": 8, "intermediate_size": 14336, "norm_eps": 1e-5,
        "rope_base": 10000.0, "tie_embeddings": False, "sliding_window": 4096, "bos_token_id": 1, "eos_token_id": 2,
    },
    # ---- Qwen2.5 (q/k/v bias; 0.5B and 1.5B tie the LM head; Instruct configs have a 32k context) ------------------
    "Qwen/Qwen2.5-0.5B": _qwen25(24, 896, 14, 2, 4864, 151936, 32768, tie=True, instruct=False),
    "Qwen/Qwen2.5-0.5B-Instruct": _qwen25(24, 896, 14, 2, 4864, 151936, 32768, tie=True, instruct=True),
    "Qwen/Qwen2.5-1.5B": _qwen25(28, 1536, 12, 2, 8960, 151936, 131072, tie=True, instruct=False),
    "Qwen/Qwen2.5-1.5B-Instruct": _qwen25(28, 1536, 12, 2, 8960, 151936, 32768, tie=True, instruct=True),
    "Qwen/Qwen2.5-7B": _qwen25(28, 3584, 28, 4, 18944, 152064, 131072, tie=False, instruct=False),
    "Qwen/Qwen2.5-7B-Instruct": _qwen25(28, 3584, 28, 4, 18944, 152064, 32768, tie=False, instruct=True),
    # ---- SmolLM2 (Llama format, tied embeddings, 8k context) ------------------------------------------------------
    "HuggingFaceTB/SmolLM2-135M": _smollm2(30, 576, 9, 3, 1536, 100000.0, instruct=False),
    "HuggingFaceTB/SmolLM2-135M-Instruct": _smollm2(30, 576, 9, 3, 1536, 100000.0, instruct=True),
    "HuggingFaceTB/SmolLM2-360M": _smollm2(32, 960, 15, 5, 2560, 100000.0, instruct=False),
    "HuggingFaceTB/SmolLM2-360M-Instruct": _smollm2(32, 960, 15, 5, 2560, 100000.0, instruct=True),
    "HuggingFaceTB/SmolLM2-1.7B": _smollm2(24, 2048, 32, 32, 8192, 130000.0, instruct=False),
    "HuggingFaceTB/SmolLM2-1.7B-Instruct": _smollm2(24, 2048, 32, 32, 8192, 130000.0, instruct=True),
    # ---- Phi-2 (partial rotary 0.4 of head 80, parallel block on one shared LayerNorm, biased LM head) ------------
    "microsoft/phi-2": dict(
        hf_model_type="phi", block_size=2048, vocab_size=51200, padded_vocab_size=51200, n_layer=32, n_embd=2560,
        n_head=32, n_query_groups=32, intermediate_size=10240, mlp_class="gelu", gelu_approximate="tanh",
        norm_class="layernorm", norm_eps=1e-5, bias=True, attn_bias=False, lm_head_bias=True, rotary_percentage=0.4,
        rope_base=10000.0, rope_scaling=None, parallel_residual=True, shared_attention_norm=True,
        learned_pos_emb=False, tie_embeddings=False, sliding_window=None, bos_token_id=50256, eos_token_id=50256,
    ),
}


def preset_names() -> list[str]:
    """All preset repo ids, in table order (grouped by family)."""
    return list(PRESETS)


def _aliases(repo_id: str) -> set[str]:
    """Lower-cased spellings that select `repo_id`: the repo id, the part after the slash, either without "-hf"."""
    full = repo_id.lower()
    short = full.split("/", 1)[-1]
    return {full, short, full.removesuffix("-hf"), short.removesuffix("-hf")}


def find_preset(name: str) -> dict[str, Any]:
    """The `Config` keyword arguments of a preset (a fresh copy, with `name` set to the repo id).

    Accepts the exact repo id ("tiiuae/falcon-7b"), the part after the slash ("falcon-7b"), either case-insensitively,
    and either without a trailing "-hf" ("llama-2-7b"). Raises ValueError naming close matches otherwise.
    """
    if name in PRESETS:
        repo_id = name
    else:
        key = name.strip().lower()
        hits = [r for r in PRESETS if key in _aliases(r)]
        if len(hits) != 1:
            candidates = {alias: r for r in PRESETS for alias in _aliases(r)}
            close = difflib.get_close_matches(key, list(candidates), n=8, cutoff=0.5)
            suggestions = list(dict.fromkeys(candidates[c] for c in close)) or hits
            hint = f"; did you mean: {', '.join(suggestions)}" if suggestions else ""
            raise ValueError(f"no preset named {name!r}{hint}. `leantune.models.decoder.presets.preset_names()` lists all of them")
        repo_id = hits[0]
    return {"name": repo_id, **copy.deepcopy(PRESETS[repo_id])}
