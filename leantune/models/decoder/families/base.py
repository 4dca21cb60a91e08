"""The `Family` record: everything that differs between HF checkpoint formats (`model_type`s), as data.

Conversion code (checkpoint/hf.py, gguf*.py, peft_format.py, data/prompts.py) reads these records and never
branches on a family's name. Helpers here translate the config.json fields several families share.
"""

from __future__ import annotations

import functools
import importlib.metadata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from leantune.models.decoder.config import Config

QKVLayout = Literal["split", "grouped", "blocked"]


@dataclass(frozen=True)
class Family:
    """One HF `model_type`: its config.json <-> `Config` translation and its weight names.

    `GPT` always holds one fused `attn.qkv` laid out [Q; K; V]. HF checkpoints store it three ways (`qkv_layout`):
    "split" as separate q/k/v projections (`qkv_modules`), "grouped" fused per kv head as rows
    (groups, q_per_kv + 2, head_size) (GPT-NeoX, Falcon), "blocked" fused [Q; K; V] like ours (GPT-2).
    """

    model_type: str
    architecture: str
    """HF class named in config.json's `architectures`."""
    config_from_hf: Callable[[dict[str, Any]], dict[str, Any]]
    """config.json -> family-specific `Config` kwargs (raises ValueError for variants GPT cannot express)."""
    config_to_hf: Callable[[Config], dict[str, Any]]
    """`Config` -> family-specific config.json fields (the shared ones are written by `families.config_to_hf`)."""
    layer_prefix: str
    """HF key prefix of block i is f"{layer_prefix}.{i}"."""
    layer_map: Mapping[str, str]
    """HF module within a block -> our module within a block (q/k/v of a "split" layout are in `qkv_modules`)."""
    global_map: Mapping[str, str]
    """HF module outside the blocks -> ours."""
    qkv_layout: QKVLayout
    qkv_modules: tuple[str, ...] = ()
    """"split" layout: the HF q, k, v projection modules within a block, in that order."""
    separate_norms: Mapping[str, str] = field(default_factory=dict)
    """Our norm -> HF name used instead of `layer_map`'s when attention and MLP norms are separate (falcon-40b's
    ln_attn / ln_mlp); with a shared norm these names are not written."""
    transposed_linears: bool = False
    """Block linear weights are stored (in, out) (GPT-2's Conv1D); PEFT calls this `fan_in_fan_out`."""
    head_module: str = "lm_head"
    """HF module name of the LM head (PEFT adapter keys follow module names)."""
    head_module_before_v5: str | None = None
    """The head's module name in transformers < 5 when it differs (GPT-NeoX's `embed_out`)."""
    gguf_arch: str | None = None
    """llama.cpp architecture written and read for this family; None: no GGUF export or import."""
    gguf_layer_names: Mapping[str, str] = field(default_factory=dict)
    """GGUF block tensor stem (`blk.{i}.<stem>`) -> HF module within a block."""
    gguf_global_names: Mapping[str, str] = field(default_factory=dict)
    """GGUF global tensor stem -> HF module."""
    prompt_style: str | None = None
    """Default prompt style (a `leantune.data.prompts.STYLES` name) for a checkpoint without a chat template."""
    vocab_prompt_styles: tuple[tuple[int, str], ...] = ()
    """(smallest vocab_size, style) rules checked before `prompt_style`: Llama 3's 128k vocabulary -> llama3."""
    aliases: tuple[str, ...] = ()
    """Older (remote-code) `model_type` names of this family; recognised only for the default prompt style."""

    def linear_modules(self) -> dict[str, tuple[str, ...]]:
        """Our block linear -> its HF module(s) within a block (three for a split qkv): PEFT target paths."""
        out: dict[str, tuple[str, ...]] = {"attn.qkv": self.qkv_modules} if self.qkv_layout == "split" else {}
        for hf_mod, ours in self.layer_map.items():
            if ours.startswith(("attn.", "mlp.")):
                out.setdefault(ours, (hf_mod,))
        return out

    def peft_target_modules(self) -> dict[str, tuple[str, ...]]:
        """Our block linear -> PEFT `target_modules` names (the last part of each HF module path)."""
        return {ours: tuple(m.rsplit(".", 1)[-1] for m in mods) for ours, mods in self.linear_modules().items()}

    def peft_head_module(self) -> str:
        """The head's module name under the installed transformers (no import of it: read from package metadata)."""
        if self.head_module_before_v5 and transformers_major() < 5:
            return self.head_module_before_v5
        return self.head_module

    def hf_layer_names(self, config: Config) -> dict[str, str]:
        """Our module within a block -> the HF module written for it (the inverse of `layer_map` for `config`)."""
        separate = set(self.separate_norms.values())
        names: dict[str, str] = {}
        for hf_mod, ours in self.layer_map.items():
            if hf_mod not in separate:
                names.setdefault(ours, hf_mod)
        if not config.shared_attention_norm:
            names.update(self.separate_norms)
        return names

    def default_prompt_style(self, hf: Mapping[str, Any]) -> str | None:
        """The prompt style for a config.json of this family, or None (the caller's fallback)."""
        vocab = int(hf.get("vocab_size") or 0)
        for smallest, style in self.vocab_prompt_styles:
            if vocab >= smallest:
                return style
        return self.prompt_style


@functools.cache
def transformers_major() -> int:
    """Major version of the installed transformers, read without importing it; 5 when it is not installed."""
    try:
        return int(importlib.metadata.version("transformers").split(".")[0])
    except importlib.metadata.PackageNotFoundError:
        return 5


# ---- config.json fields several families share ---------------------------------------------------------------
def gelu_from_hf(act: str) -> str:
    """HF activation name -> `Config.gelu_approximate`."""
    if act in ("gelu", "gelu_python"):
        return "none"
    if act in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return "tanh"
    raise ValueError(f"activation {act!r} is not supported")


def gelu_to_hf(config: Config, exact: str = "gelu") -> str:
    return exact if config.gelu_approximate == "none" else "gelu_new"


def rope_theta(hf: Mapping[str, Any], default: float) -> float:
    params = hf.get("rope_parameters") or {}
    return float(hf.get("rope_theta") or params.get("rope_theta") or default)


def rope_scaling_from_hf(hf: Mapping[str, Any]) -> dict[str, Any] | None:
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


def rope_to_hf(config: Config) -> dict[str, Any]:
    """rope_theta, plus rope_scaling when set (HF spells the kind `rope_type`)."""
    out: dict[str, Any] = {"rope_theta": config.rope_base}
    if config.rope_scaling:
        rs = dict(config.rope_scaling)
        out["rope_scaling"] = {"rope_type": rs.pop("type"), **rs}
    return out
