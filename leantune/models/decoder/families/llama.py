"""Llama, Mistral and Qwen2: RMSNorm, SwiGLU, rotary on whole heads, separate q/k/v projections.

They share one layout and differ in a few config.json facts: Qwen2 always has a q/k/v bias, Mistral and Qwen2 know
a sliding window, Llama (only) has `attention_bias`/`mlp_bias` flags, which `Config.bias` (every attention and
MLP linear) expresses when both are set.
"""

from __future__ import annotations

import functools
from typing import Any

from leantune.models.decoder.config import Config
from leantune.models.decoder.families.base import Family, rope_scaling_from_hf, rope_theta, rope_to_hf

LAYER_MAP = {
    "input_layernorm": "norm_1", "post_attention_layernorm": "norm_2", "self_attn.o_proj": "attn.proj",
    "mlp.gate_proj": "mlp.fc_1", "mlp.up_proj": "mlp.fc_2", "mlp.down_proj": "mlp.proj",
}
GLOBAL_MAP = {"model.embed_tokens": "transformer.wte", "model.norm": "transformer.ln_f", "lm_head": "lm_head"}
QKV_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
# llama.cpp's `llama` architecture (Mistral files use it too).
GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
GGUF_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _from_hf(hf: dict[str, Any], *, model_type: str, qkv_bias: bool, bias_flags: bool,
             sliding_by_default: bool) -> dict[str, Any]:
    n_head = hf["num_attention_heads"]
    attention_bias, mlp_bias = bool(hf.get("attention_bias")), bool(hf.get("mlp_bias"))
    if (attention_bias or mlp_bias) and not (bias_flags and attention_bias and mlp_bias):
        raise ValueError(f"{model_type} with attention_bias={attention_bias}, mlp_bias={mlp_bias} is not supported "
                         "(only both together, on llama)")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {hf.get('hidden_act')!r} is not supported for {model_type}")
    return dict(
        block_size=hf.get("max_position_embeddings", 4096), vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"],
        n_embd=hf["hidden_size"], n_head=n_head, n_query_groups=hf.get("num_key_value_heads") or n_head,
        head_size=hf.get("head_dim") or hf["hidden_size"] // n_head, intermediate_size=hf["intermediate_size"],
        mlp_class="swiglu", norm_class="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6),
        bias=attention_bias, attn_bias=qkv_bias,
        rope_base=rope_theta(hf, 10000.0), rope_scaling=rope_scaling_from_hf(hf),
        sliding_window=hf.get("sliding_window") if hf.get("use_sliding_window", sliding_by_default) else None,
    )


def _to_hf(c: Config, *, bias_flags: bool, sliding: bool) -> dict[str, Any]:
    d: dict[str, Any] = dict(
        hidden_size=c.n_embd, intermediate_size=c.intermediate_size, num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head, num_key_value_heads=c.n_query_groups, head_dim=c.head_size,
        rms_norm_eps=c.norm_eps, max_position_embeddings=c.block_size, hidden_act="silu", **rope_to_hf(c))
    if bias_flags:
        d.update(attention_bias=c.bias, mlp_bias=c.bias)
    if sliding:
        d.update(sliding_window=c.sliding_window, use_sliding_window=c.sliding_window is not None)
    return d


def _family(model_type: str, architecture: str, *, qkv_bias: bool = False, bias_flags: bool = False,
            sliding: bool = False, sliding_by_default: bool = False, **rest: Any) -> Family:
    return Family(
        model_type=model_type, architecture=architecture,
        config_from_hf=functools.partial(_from_hf, model_type=model_type, qkv_bias=qkv_bias, bias_flags=bias_flags,
                                         sliding_by_default=sliding_by_default),
        config_to_hf=functools.partial(_to_hf, bias_flags=bias_flags, sliding=sliding),
        layer_prefix="model.layers", layer_map=LAYER_MAP, global_map=GLOBAL_MAP,
        qkv_layout="split", qkv_modules=QKV_MODULES, **rest)


LLAMA = _family("llama", "LlamaForCausalLM", bias_flags=True, gguf_arch="llama", gguf_layer_names=GGUF_LAYER_NAMES,
                gguf_global_names=GGUF_GLOBAL_NAMES, vocab_prompt_styles=((128000, "llama3"),))
MISTRAL = _family("mistral", "MistralForCausalLM", sliding=True, sliding_by_default=True, gguf_arch="llama",
                  gguf_layer_names=GGUF_LAYER_NAMES, gguf_global_names=GGUF_GLOBAL_NAMES)
QWEN2 = _family("qwen2", "Qwen2ForCausalLM", qkv_bias=True, sliding=True, prompt_style="chatml")
