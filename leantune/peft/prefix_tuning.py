"""Prefix tuning (Li & Liang 2021): P learned keys and values per layer that every token attends to, reparameterised
through an MLP while training (`--prefix_tuning.projection`, the paper's recipe for stable optimisation).

An exported PEFT folder holds the MLP's output (P, n_layer * 2 * kv width) with `prefix_projection: false`, so the
MLP is dropped after training; such a folder imports as `--prefix_tuning.projection false`. Not mergeable.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from leantune.models.decoder.model import GPT
from leantune.models.kinds import kind_of
from leantune.peft.base import Method, PeftFormat, mark_trainable
from leantune.peft.peft_format import export_prefix, load_into, read_virtual
from leantune.peft.virtual import PrefixKV, install, placement, virtual_params


@dataclass
class PrefixTuningArgs:
    num_virtual_tokens: int = 20
    """Prefix length: keys/values per layer attended to before every sequence."""
    projection: bool = True
    """Train the prefix through a two-layer tanh MLP (dropped at export) instead of directly."""
    hidden_size: int = 512
    """Hidden width of the projection MLP."""

    def __post_init__(self) -> None:
        if self.num_virtual_tokens < 1:
            raise ValueError(f"--prefix_tuning.num_virtual_tokens must be >= 1, got {self.num_virtual_tokens}")
        if self.hidden_size < 1:
            raise ValueError(f"--prefix_tuning.hidden_size must be >= 1, got {self.hidden_size}")


def apply_prefix_tuning(model: GPT, args: PrefixTuningArgs) -> list[str]:
    kind_of(model).check_method("prefix_tuning")  # T5 lacks it (the CLI refuses it from config.json already)
    c = model.config
    prefix = PrefixKV(args.num_virtual_tokens, c.n_layer, c.n_query_groups, c.head_size, projection=args.projection,
                      hidden_size=args.hidden_size, **placement(model))
    return mark_trainable(model, install(model, prefix))


def import_prefix(model: GPT, peft_dir: str | Path) -> PrefixTuningArgs:
    """Apply a PEFT PREFIX_TUNING folder (the flat prefix; a trained projection is not saved by PEFT)."""
    _cfg, t = read_virtual(peft_dir, "PREFIX_TUNING", model)
    args = PrefixTuningArgs(num_virtual_tokens=t.shape[0], projection=False)
    apply_prefix_tuning(model, args)
    load_into(model.virtual, t, peft_dir)
    return args


METHOD = Method(
    name="prefix_tuning",
    summary="prefix tuning: learned per-layer attention keys/values (MLP-reparameterised), PEFT-exportable",
    args_class=PrefixTuningArgs,
    apply=apply_prefix_tuning,
    adapter_params=virtual_params,
    default_lr=3e-3,
    peft=PeftFormat(peft_type="PREFIX_TUNING", export=export_prefix, load=import_prefix),
)
