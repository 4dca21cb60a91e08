"""LoHa (PEFT's LOHA, from LyCORIS/FedPara): dW = (w1_a w1_b) * (w2_a w2_b) * alpha / r, a Hadamard product of two
rank-r products, so the update can reach rank r^2 with the parameters of a rank-2r LoRA. Mergeable, PEFT-exportable.

Init, scaling, forward and tensor names follow peft's `tuners/loha` for linear layers: w1_a, w1_b, w2_a kaiming
uniform, w2_b zero (a zero update at step 0).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from leantune.models.decoder.model import GPT
from leantune.models.kinds import PeftSite
from leantune.peft.base import Method
from leantune.peft.lycoris import (
    LycorisLinear,
    apply_lycoris,
    check_common,
    factor_params,
    init_kaiming,
    merge_lycoris,
    parse_targets,
)
from leantune.peft.peft_format import copy_factors, lycoris_record

NAMES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


@dataclass
class LoHaArgs:
    r: int = 8
    """Rank of each of the two products."""
    alpha: float = 8.0
    """Scale numerator: the update is multiplied by alpha / r."""
    rank_dropout: float = 0.0
    """Training only: probability of zeroing each output row of the update (kept rows rescaled), as peft."""
    module_dropout: float = 0.0
    """Training only: probability of skipping a layer's update for a whole step, as peft."""
    targets: list[str] | str = field(default_factory=lambda: ["query", "value"])
    """Layers to adapt: a list or comma-separated string among query, key, value, projection, mlp, head; or all."""

    def __post_init__(self) -> None:
        self.targets = parse_targets(self.targets, "loha")
        check_common("loha", self.r, self.alpha, self.rank_dropout, self.module_dropout)

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


class _HadaWeight(torch.autograd.Function):
    """((w1a @ w1b) * (w2a @ w2b)) * scale, keeping only the factors for backward (peft's HadaWeight): plain
    autograd would keep both (out, in) products of every adapted layer."""

    @staticmethod
    def forward(ctx, w1a, w1b, w2a, w2b, scale: float | torch.Tensor):
        ctx.save_for_backward(w1a, w1b, w2a, w2b)
        ctx.scale = scale
        return ((w1a @ w1b) * (w2a @ w2b)) * scale

    @staticmethod
    def backward(ctx, grad_out):
        w1a, w1b, w2a, w2b = ctx.saved_tensors
        grad_out = (grad_out * ctx.scale).to(w1a.dtype)
        temp = grad_out * (w2a @ w2b)  # (out, in)
        g1a, g1b = temp @ w1b.T, w1a.T @ temp
        temp = grad_out * (w1a @ w1b)
        return g1a, g1b, temp @ w2b.T, w2a.T @ temp, None


class LoHaFactors(nn.Module):
    """One part's LoHa factors: hada_w1_a, hada_w2_a (width, r); hada_w1_b, hada_w2_b (r, in)."""

    def __init__(self, width: int, in_features: int, r: int, factory: dict) -> None:
        super().__init__()
        self.r = r
        self.hada_w1_a = nn.Parameter(torch.empty(width, r, **factory))
        self.hada_w1_b = nn.Parameter(torch.empty(r, in_features, **factory))
        self.hada_w2_a = nn.Parameter(torch.empty(width, r, **factory))
        self.hada_w2_b = nn.Parameter(torch.empty(r, in_features, **factory))
        if not self.hada_w1_a.is_meta:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        init_kaiming(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a)
        nn.init.zeros_(self.hada_w2_b)

    def delta(self, scale: float | torch.Tensor) -> torch.Tensor:
        """This part's (width, in) update, computed in the factors' dtype (outside autocast: backward runs there)."""
        kind = self.hada_w1_a.device.type
        off = kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind)  # (a no-op context is not traced at all)
        with torch.autocast(kind, enabled=False) if off else contextlib.nullcontext():
            return _HadaWeight.apply(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b, scale)


def apply_loha(model: GPT, args: LoHaArgs) -> list[str]:
    make = functools.partial(_make, r=args.r)
    return apply_lycoris(model, args.targets, make, LoHaFactors, args.scaling, args.rank_dropout,
                         args.module_dropout, rank_dropout_scale=True)


def _make(width: int, in_features: int, factory: dict, r: int) -> LoHaFactors:
    return LoHaFactors(width, in_features, r, factory)


def loha_params(model: nn.Module) -> list[nn.Parameter]:
    return factor_params(model, LoHaFactors)


def merge_loha(model: GPT, weight: float = 1.0) -> GPT:
    return merge_lycoris(model, weight, LoHaFactors)


# ---- PEFT format ----------------------------------------------------------------------------------------------
def _fuse(mod: LycorisLinear, site: PeftSite) -> tuple[dict[str, torch.Tensor], int]:
    """Our P rank-r parts of a fused qkv as one rank-(P r) LoHa over the whole HF layer, exactly: part j's w*_a sit
    in its rows and columns j r..(j+1) r (zeros elsewhere), the w*_b are stacked, so each product is block-diagonal
    and the Hadamard product keeps every part's own update (rows permuted to the HF qkv order)."""
    r, P = mod.factors[0].r, len(mod.parts)
    out = {}
    for a, b in (("hada_w1_a", "hada_w1_b"), ("hada_w2_a", "hada_w2_b")):
        wa = torch.zeros(mod.out_features, P * r, dtype=getattr(mod.factors[0], a).dtype)  # (out, P r)
        for j, ((s, e), f) in enumerate(zip(mod.parts, mod.factors)):
            wa[s:e, j * r:(j + 1) * r] = getattr(f, a).detach().cpu()
        out[a] = site.to_hf(wa)
        out[b] = torch.cat([getattr(f, b).detach().cpu() for f in mod.factors])  # (P r, in)
    return out, P * r


def _split(mod: LycorisLinear, tensors: dict[str, torch.Tensor], site: PeftSite, where: str) -> None:
    """One rank-r LoHa over a fused HF qkv as our three parts: rows split, the w*_b shared (copied) by each part."""
    rows = {n: site.from_hf(tensors[n]) for n in ("hada_w1_a", "hada_w2_a")
            if n in tensors and tensors[n].shape[0] == mod.out_features}
    for (s, e), f in zip(mod.parts, mod.factors):
        part = {n: (rows[n][s:e] if n in rows else t) for n, t in tensors.items()}
        copy_factors(f, part, where)


def _config_fields(args: Any) -> dict[str, Any]:
    return {"r": int(args.r), "alpha": float(args.alpha), "rank_dropout": float(args.rank_dropout),
            "module_dropout": float(args.module_dropout)}


def _args_from_config(pcfg: dict[str, Any], targets: list[str]) -> LoHaArgs:
    return LoHaArgs(r=int(pcfg["r"]), alpha=float(pcfg["alpha"]), rank_dropout=float(pcfg.get("rank_dropout") or 0),
                    module_dropout=float(pcfg.get("module_dropout") or 0), targets=targets)


SPEC = lycoris_record(peft_type="LOHA", flag="loha", factor_type=LoHaFactors, tensor_names=NAMES, apply=apply_loha,
                      config_fields=_config_fields, args_from_config=_args_from_config, fuse=_fuse, split=_split)

METHOD = Method(
    name="loha",
    summary="LoHa: Hadamard product of two low-rank products on chosen linear layers (--loha.targets), mergeable, "
            "PEFT-exportable",
    args_class=LoHaArgs,
    apply=apply_loha,
    adapter_params=loha_params,
    default_lr=1e-2,  # 0% -> 59% on Demo in 50 steps; 1e-3 (LoRA's) learned nothing: four small factors
    merge=merge_loha,
    peft=SPEC.format,
)
