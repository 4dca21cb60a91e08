"""Decoder architectures as data: one `Config` drives the one `GPT` model.

Differences between families (Llama, Mistral, Qwen2, SmolLM2, Falcon, GPT-NeoX/Pythia/StableLM, GPT-2, Phi)
are fields here, never checks on names. `leantune.models.decoder.families.config_from_hf` reads a Hugging Face `config.json`
(each family's translation lives in its record there); `Config.from_name` builds a preset from `leantune.models.decoder.presets`
(facts copied from the upstream config.json files).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

from leantune.models.decoder.presets import find_preset


@dataclass
class Config:
    name: str = ""
    hf_model_type: str = "llama"
    """HF `model_type` of the checkpoint format: selects its `leantune.models.decoder.families` record (names and config.json
    translation only, never behaviour)."""
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
        row = find_preset(name)
        return cls(**{**row, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def replace(self, **changes: Any) -> Config:
        return replace(self, **changes)


def config_field_names() -> list[str]:
    return [f.name for f in fields(Config)]

