"""Phi (Phi-1.5, Phi-2): parallel attention and MLP on one shared LayerNorm, partial rotary, biased LM head."""

from __future__ import annotations

from typing import Any

from leantune.models.decoder.config import Config
from leantune.models.decoder.families.base import (
    Family,
    gelu_from_hf,
    gelu_to_hf,
    rope_scaling_from_hf,
    rope_theta,
    rope_to_hf,
)


def _from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    if hf.get("qk_layernorm"):
        raise ValueError("phi with qk_layernorm is not supported")
    n_head = hf["num_attention_heads"]
    return dict(
        block_size=hf.get("max_position_embeddings", 2048), vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"],
        n_embd=hf["hidden_size"], n_head=n_head, n_query_groups=hf.get("num_key_value_heads") or n_head,
        intermediate_size=hf["intermediate_size"], mlp_class="gelu",
        gelu_approximate=gelu_from_hf(hf.get("hidden_act", "gelu_new")), norm_class="layernorm",
        norm_eps=hf.get("layer_norm_eps", 1e-5), bias=True, lm_head_bias=True,
        rotary_percentage=hf.get("partial_rotary_factor", 0.5), rope_base=rope_theta(hf, 10000.0),
        rope_scaling=rope_scaling_from_hf(hf), parallel_residual=True, shared_attention_norm=True,
    )


def _to_hf(c: Config) -> dict[str, Any]:
    return dict(hidden_size=c.n_embd, intermediate_size=c.intermediate_size, num_hidden_layers=c.n_layer,
                num_attention_heads=c.n_head, num_key_value_heads=c.n_query_groups, layer_norm_eps=c.norm_eps,
                partial_rotary_factor=c.rotary_percentage, max_position_embeddings=c.block_size,
                hidden_act=gelu_to_hf(c), **rope_to_hf(c))


PHI = Family(
    model_type="phi", architecture="PhiForCausalLM", config_from_hf=_from_hf, config_to_hf=_to_hf,
    layer_prefix="model.layers",
    layer_map={"input_layernorm": "norm_1", "self_attn.dense": "attn.proj", "mlp.fc1": "mlp.fc", "mlp.fc2": "mlp.proj"},
    global_map={"model.embed_tokens": "transformer.wte", "model.final_layernorm": "transformer.ln_f",
                "lm_head": "lm_head"},
    qkv_layout="split", qkv_modules=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    prompt_style="phi",
)
