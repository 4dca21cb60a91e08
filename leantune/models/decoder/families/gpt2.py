"""GPT-2: learned absolute positions, fused [Q; K; V] in a Conv1D that stores its weight (in, out)."""

from __future__ import annotations

from typing import Any

from leantune.models.decoder.config import Config
from leantune.models.decoder.families.base import Family, gelu_from_hf, gelu_to_hf


def _from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    n_embd = hf["n_embd"]
    return dict(
        block_size=hf.get("n_positions", 1024), vocab_size=hf["vocab_size"], n_layer=hf["n_layer"], n_embd=n_embd,
        n_head=hf["n_head"], intermediate_size=hf.get("n_inner") or 4 * n_embd, mlp_class="gelu",
        gelu_approximate=gelu_from_hf(hf.get("activation_function", "gelu_new")), norm_class="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), bias=True, learned_pos_emb=True,
        tie_embeddings=hf.get("tie_word_embeddings", True),
    )


def _to_hf(c: Config) -> dict[str, Any]:
    return dict(n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head, n_positions=c.block_size,
                n_inner=c.intermediate_size, layer_norm_epsilon=c.norm_eps, activation_function=gelu_to_hf(c))


GPT2 = Family(
    model_type="gpt2", architecture="GPT2LMHeadModel", config_from_hf=_from_hf, config_to_hf=_to_hf,
    layer_prefix="transformer.h",
    layer_map={"ln_1": "norm_1", "ln_2": "norm_2", "attn.c_attn": "attn.qkv", "attn.c_proj": "attn.proj",
               "mlp.c_fc": "mlp.fc", "mlp.c_proj": "mlp.proj"},
    global_map={"transformer.wte": "transformer.wte", "transformer.wpe": "transformer.wpe",
                "transformer.ln_f": "transformer.ln_f", "lm_head": "lm_head"},
    qkv_layout="blocked", transposed_linears=True,
)
