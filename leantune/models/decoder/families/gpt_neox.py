"""GPT-NeoX (Pythia, StableLM-Alpha): LayerNorm, GELU, partial rotary, fused q/k/v grouped per head."""

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
    return dict(
        block_size=hf.get("max_position_embeddings", 2048), vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"],
        n_embd=hf["hidden_size"], n_head=hf["num_attention_heads"], intermediate_size=hf["intermediate_size"],
        mlp_class="gelu", gelu_approximate=gelu_from_hf(hf.get("hidden_act", "gelu")), norm_class="layernorm",
        norm_eps=hf.get("layer_norm_eps", 1e-5), bias=True,
        rotary_percentage=hf.get("rotary_pct", hf.get("partial_rotary_factor", 0.25)),
        rope_base=rope_theta(hf, hf.get("rotary_emb_base", 10000.0)), rope_scaling=rope_scaling_from_hf(hf),
        parallel_residual=hf.get("use_parallel_residual", True),
    )


def _to_hf(c: Config) -> dict[str, Any]:
    return dict(hidden_size=c.n_embd, intermediate_size=c.intermediate_size, num_hidden_layers=c.n_layer,
                num_attention_heads=c.n_head, layer_norm_eps=c.norm_eps, rotary_pct=c.rotary_percentage,
                max_position_embeddings=c.block_size, use_parallel_residual=c.parallel_residual,
                hidden_act=gelu_to_hf(c), **rope_to_hf(c))


GPT_NEOX = Family(
    model_type="gpt_neox", architecture="GPTNeoXForCausalLM", config_from_hf=_from_hf, config_to_hf=_to_hf,
    layer_prefix="gpt_neox.layers",
    layer_map={"input_layernorm": "norm_1", "post_attention_layernorm": "norm_2",
               "attention.query_key_value": "attn.qkv", "attention.dense": "attn.proj",
               "mlp.dense_h_to_4h": "mlp.fc", "mlp.dense_4h_to_h": "mlp.proj"},
    global_map={"gpt_neox.embed_in": "transformer.wte", "gpt_neox.final_layer_norm": "transformer.ln_f",
                "embed_out": "lm_head"},
    qkv_layout="grouped", head_module="lm_head", head_module_before_v5="embed_out",
)
