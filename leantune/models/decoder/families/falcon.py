"""Falcon: multi-query (7B) or grouped-query (40B, "new decoder architecture") attention, parallel residual."""

from __future__ import annotations

from typing import Any

from leantune.models.decoder.config import Config
from leantune.models.decoder.families.base import Family, rope_theta


def _from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    new_arch = hf.get("new_decoder_architecture", False)
    n_head = hf.get("num_attention_heads", hf.get("n_head"))
    if hf.get("alibi"):
        raise ValueError("Falcon with alibi positions is not supported")
    groups = hf.get("num_kv_heads") if new_arch else (1 if hf.get("multi_query", True) else n_head)
    n_embd = hf.get("hidden_size")
    return dict(
        block_size=hf.get("max_position_embeddings", 2048), vocab_size=hf["vocab_size"],
        n_layer=hf.get("num_hidden_layers", hf.get("n_layer")), n_embd=n_embd, n_head=n_head,
        n_query_groups=groups or n_head, intermediate_size=hf.get("ffn_hidden_size") or 4 * n_embd,
        mlp_class="gelu", norm_class="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        bias=hf.get("bias", False), parallel_residual=hf.get("parallel_attn", True),
        shared_attention_norm=hf.get("parallel_attn", True) and not new_arch and not hf.get("num_ln_in_parallel_attn") == 2,
        rope_base=rope_theta(hf, 10000.0), tie_embeddings=hf.get("tie_word_embeddings", True),
    )


def _to_hf(c: Config) -> dict[str, Any]:
    return dict(hidden_size=c.n_embd, num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
                num_kv_heads=c.n_query_groups, new_decoder_architecture=not c.shared_attention_norm,
                multi_query=c.n_query_groups == 1, parallel_attn=c.parallel_residual, bias=c.bias, alibi=False,
                layer_norm_epsilon=c.norm_eps, ffn_hidden_size=c.intermediate_size,
                max_position_embeddings=c.block_size, rope_theta=c.rope_base)


FALCON = Family(
    model_type="falcon", architecture="FalconForCausalLM", config_from_hf=_from_hf, config_to_hf=_to_hf,
    layer_prefix="transformer.h",
    layer_map={"input_layernorm": "norm_1", "ln_attn": "norm_1", "ln_mlp": "norm_2",
               "self_attention.query_key_value": "attn.qkv", "self_attention.dense": "attn.proj",
               "mlp.dense_h_to_4h": "mlp.fc", "mlp.dense_4h_to_h": "mlp.proj"},
    global_map={"transformer.word_embeddings": "transformer.wte", "transformer.ln_f": "transformer.ln_f",
                "lm_head": "lm_head"},
    qkv_layout="grouped", separate_norms={"norm_1": "ln_attn", "norm_2": "ln_mlp"},
    prompt_style="falcon", aliases=("RefinedWeb", "RefinedWebModel"),
)
