"""Decoder architectures as data: one `Config` drives the one `GPT` model.

Differences between families (Llama, Mistral, Qwen2, SmolLM2, Falcon, GPT-NeoX/Pythia/StableLM, GPT-2, Phi)
are fields here, never checks on names. `Config.from_hf` reads a Hugging Face `config.json`; `Config.from_name`
builds a preset from `leantune.presets` (facts copied from the upstream config.json files).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

# Checkpoint formats (HF `model_type`) whose key layout `leantune.checkpoint.hf` knows.
HF_FORMATS = ("llama", "mistral", "qwen2", "gpt_neox", "falcon", "gpt2", "phi")


@dataclass
class Config:
    name: str = ""
    hf_model_type: str = "llama"
    """HF `model_type` of the checkpoint format (selects the state-dict key map only, never behaviour)."""
    block_size: int = 4096
    """Longest sequence the positional encoding supports."""
    vocab_size: int = 32000
    padded_vocab_size: int | None = None
    """Rows of the embedding / LM head; defaults to vocab_size."""
    n_layer: int = 12
    n_embd: int = 768
    n_head: int = 12
    n_query_groups: int | None = None
    """Key/value heads: n_head = MHA, 1 = MQA, in between = GQA."""
    head_size: int | None = None
    intermediate_size: int | None = None
    mlp_class: Literal["gelu", "swiglu"] = "swiglu"
    gelu_approximate: Literal["none", "tanh"] = "none"
    norm_class: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    bias: bool = False
    """Bias on every linear layer of attention and MLP."""
    attn_bias: bool = False
    """Bias on the q/k/v projection only (Qwen2)."""
    lm_head_bias: bool = False
    rotary_percentage: float = 1.0
    rope_base: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    """{"type": "llama3", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
    or {"type": "linear", "factor"}."""
    parallel_residual: bool = False
    """x + attn(norm(x)) + mlp(norm(x)) (Falcon, GPT-NeoX, Phi) instead of sequential residuals."""
    shared_attention_norm: bool = False
    """Attention and MLP read the same normed input (Falcon-7B, Phi-2); needs parallel_residual."""
    learned_pos_emb: bool = False
    """Learned absolute positions (GPT-2) instead of RoPE."""
    tie_embeddings: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)
    """HF config fields we do not model but keep for a faithful round trip."""

    def __post_init__(self) -> None:
        if self.padded_vocab_size is None:
            self.padded_vocab_size = self.vocab_size
        if self.n_query_groups is None:
            self.n_query_groups = self.n_head
        if self.head_size is None:
            if self.n_embd % self.n_head:
                raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; set head_size")
            self.head_size = self.n_embd // self.n_head
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.n_embd
        if self.n_head % self.n_query_groups:
            raise ValueError(f"n_head={self.n_head} must be a multiple of n_query_groups={self.n_query_groups}")
        if self.shared_attention_norm and not self.parallel_residual:
            raise ValueError("shared_attention_norm requires parallel_residual")

    @property
    def rope_n_elem(self) -> int:
        """Leading dims of each head that are rotated (partial rotary for NeoX/Phi)."""
        return 0 if self.learned_pos_emb else int(self.rotary_percentage * self.head_size)

    @property
    def qkv_sizes(self) -> tuple[int, int, int]:
        """Output widths of the fused qkv projection, laid out [Q; K; V]."""
        return self.n_head * self.head_size, self.n_query_groups * self.head_size, self.n_query_groups * self.head_size

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> Config:
        from leantune.presets import find_preset

        row = find_preset(name)
        return cls(**{**row, **overrides})

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path, **overrides: Any) -> Config:
        path = Path(checkpoint_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no config.json; is {checkpoint_dir} a Hugging Face model folder?")
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
        return cls.from_hf(hf, name=Path(checkpoint_dir).name, **overrides)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], name: str = "", **overrides: Any) -> Config:
        """Translate a Hugging Face config.json dict into a Config."""
        mt = hf.get("model_type")
        if mt not in HF_FORMATS:
            raise ValueError(f"model_type {mt!r} is not supported; supported: {', '.join(HF_FORMATS)}")
        kw: dict[str, Any] = dict(name=name, hf_model_type=mt, bos_token_id=hf.get("bos_token_id"),
                                  eos_token_id=hf.get("eos_token_id"), tie_embeddings=hf.get("tie_word_embeddings", False))
        if mt in ("llama", "mistral", "qwen2"):
            n_head = hf["num_attention_heads"]
            kw.update(
                block_size=hf.get("max_position_embeddings", 4096), vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"],
                n_embd=hf["hidden_size"], n_head=n_head, n_query_groups=hf.get("num_key_value_heads") or n_head,
                head_size=hf.get("head_dim") or hf["hidden_size"] // n_head, intermediate_size=hf["intermediate_size"],
                mlp_class="swiglu", norm_class="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6),
                attn_bias=mt == "qwen2",
                rope_base=_rope_theta(hf, 10000.0), rope_scaling=_rope_scaling(hf),
                sliding_window=hf.get("sliding_window") if hf.get("use_sliding_window", mt == "mistral") else None,
            )
            if hf.get("attention_bias") or hf.get("mlp_bias"):
                raise ValueError(f"{mt} with attention_bias/mlp_bias is not supported")
            if hf.get("hidden_act", "silu") != "silu":
                raise ValueError(f"hidden_act {hf.get('hidden_act')!r} is not supported for {mt}")
        elif mt == "gpt_neox":
            kw.update(
                block_size=hf.get("max_position_embeddings", 2048), vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"],
                n_embd=hf["hidden_size"], n_head=hf["num_attention_heads"], intermediate_size=hf["intermediate_size"],
                mlp_class="gelu", gelu_approximate=_gelu(hf.get("hidden_act", "gelu")), norm_class="layernorm",
                norm_eps=hf.get("layer_norm_eps", 1e-5), bias=True,
                rotary_percentage=hf.get("rotary_pct", hf.get("partial_rotary_factor", 0.25)),
                rope_base=_rope_theta(hf, hf.get("rotary_emb_base", 10000.0)), rope_scaling=_rope_scaling(hf),
                parallel_residual=hf.get("use_parallel_residual", True),
            )
        elif mt == "falcon":
            new_arch = hf.get("new_decoder_architecture", False)
            n_head = hf.get("num_attention_heads", hf.get("n_head"))
            if hf.get("alibi"):
                raise ValueError("Falcon with alibi positions is not supported")
            groups = hf.get("num_kv_heads") if new_arch else (1 if hf.get("multi_query", True) else n_head)
            n_embd = hf.get("hidden_size")
            kw.update(
                block_size=hf.get("max_position_embeddings", 2048), vocab_size=hf["vocab_size"],
                n_layer=hf.get("num_hidden_layers", hf.get("n_layer")), n_embd=n_embd, n_head=n_head,
                n_query_groups=groups or n_head, intermediate_size=hf.get("ffn_hidden_size") or 4 * n_embd,
                mlp_class="gelu", norm_class="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                bias=hf.get("bias", False), parallel_residual=hf.get("parallel_attn", True),
                shared_attention_norm=hf.get("parallel_attn", True) and not new_arch and not hf.get("num_ln_in_parallel_attn") == 2,
                rope_base=_rope_theta(hf, 10000.0), tie_embeddings=hf.get("tie_word_embeddings", True),
            )
        elif mt == "gpt2":
            n_embd = hf["n_embd"]
            kw.update(
                block_size=hf.get("n_positions", 1024), vocab_size=hf["vocab_size"], n_layer=hf["n_layer"], n_embd=n_embd,
                n_head=hf["n_head"], intermediate_size=hf.get("n_inner") or 4 * n_embd, mlp_class="gelu",
                gelu_approximate=_gelu(hf.get("activation_function", "gelu_new")), norm_class="layernorm",
                norm_eps=hf.get("layer_norm_epsilon", 1e-5), bias=True, learned_pos_emb=True,
                tie_embeddings=hf.get("tie_word_embeddings", True),
            )
        elif mt == "phi":
            if hf.get("qk_layernorm"):
                raise ValueError("phi with qk_layernorm is not supported")
            n_head = hf["num_attention_heads"]
            kw.update(
                block_size=hf.get("max_position_embeddings", 2048), vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"],
                n_embd=hf["hidden_size"], n_head=n_head, n_query_groups=hf.get("num_key_value_heads") or n_head,
                intermediate_size=hf["intermediate_size"], mlp_class="gelu",
                gelu_approximate=_gelu(hf.get("hidden_act", "gelu_new")), norm_class="layernorm",
                norm_eps=hf.get("layer_norm_eps", 1e-5), bias=True, lm_head_bias=True,
                rotary_percentage=hf.get("partial_rotary_factor", 0.5), rope_base=_rope_theta(hf, 10000.0),
                rope_scaling=_rope_scaling(hf), parallel_residual=True, shared_attention_norm=True,
            )
        kw.update(overrides)
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def replace(self, **changes: Any) -> Config:
        return replace(self, **changes)


def config_field_names() -> list[str]:
    return [f.name for f in fields(Config)]


def _gelu(act: str) -> str:
    if act in ("gelu", "gelu_python"):
        return "none"
    if act in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return "tanh"
    raise ValueError(f"activation {act!r} is not supported")


def _rope_theta(hf: dict[str, Any], default: float) -> float:
    params = hf.get("rope_parameters") or {}
    return float(hf.get("rope_theta") or params.get("rope_theta") or default)


def _rope_scaling(hf: dict[str, Any]) -> dict[str, Any] | None:
    rs = hf.get("rope_scaling") or hf.get("rope_parameters")
    if not rs:
        return None
    kind = rs.get("rope_type", rs.get("type"))
    if kind in (None, "default"):
        return None
    if kind == "llama3":
        return dict(type="llama3", factor=rs["factor"], low_freq_factor=rs["low_freq_factor"],
                    high_freq_factor=rs["high_freq_factor"],
                    original_max_position_embeddings=rs["original_max_position_embeddings"])
    if kind == "linear":
        return dict(type="linear", factor=rs["factor"])
    raise ValueError(f"rope scaling {kind!r} is not supported")
