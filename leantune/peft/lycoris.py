"""The layer LoHa and LoKr share (PEFT's LyCORIS family): W x + x dW^T, where dW is built from small factors.

`LycorisLinear` owns the base `weight`/`bias` (the same Parameters, so base keys and ties survive) and one factor
module per adapted output range (`parts`): on GPT's fused qkv each enabled part (q, k, v) gets its own factors over
its rows, as a split-qkv HF model would have one per projection; rows outside the parts get no update. A factor module
(`LoHaFactors`, `LoKrFactors`) holds PEFT's tensor names and builds its (width, in) block of dW; the method decides
which factor type it makes, so trained tensors are found by that module type.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from leantune.models.decoder.model import GPT
from leantune.models.quantize import compute_dtype_of, is_quantized, quantized_linear
from leantune.peft.base import mark_trainable, merge_into_linears
from leantune.peft.lora_layers import TARGETS, target_layers
from leantune.peft.scale import GraphScale


def parse_targets(targets: list[str] | str, flag: str) -> list[str]:
    """LoRA's target vocabulary: a list or comma-separated string among TARGETS, or `all`."""
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    if list(targets) == ["all"]:
        targets = list(TARGETS)
    bad = sorted(set(targets) - set(TARGETS))
    if bad or not targets:
        raise ValueError(f"--{flag}.targets {bad or '(empty)'}: choose among {', '.join(TARGETS)} or all")
    return [t for t in TARGETS if t in targets]


def check_common(flag: str, r: int, alpha: float, rank_dropout: float, module_dropout: float) -> None:
    if r < 1:
        raise ValueError(f"--{flag}.r must be >= 1, got {r}")
    if not 0 < alpha < math.inf:  # `not <` also refuses NaN
        raise ValueError(f"--{flag}.alpha must be a finite number > 0, got {alpha}")
    for name, p in (("rank_dropout", rank_dropout), ("module_dropout", module_dropout)):
        if not 0 <= p < 1:
            raise ValueError(f"--{flag}.{name} must be in [0, 1), got {p}")


def init_kaiming(*params: torch.Tensor) -> None:
    """PEFT's (and nn.Linear's) default init for the non-zero factors."""
    for p in params:
        nn.init.kaiming_uniform_(p, a=math.sqrt(5))


_EXACT_SUM_DTYPES = (torch.float32, torch.float64)


class LycorisLinear(GraphScale, nn.Module):
    """A linear layer plus dW = concat over parts of scaling * factors_i.delta() (zeros between the parts).

    Training-only randomness follows PEFT: `module_dropout` skips a part's update for a whole forward, `rank_dropout`
    zeroes whole rows of dW (LoHa always rescales the kept rows by 1 / their fraction, LoKr only with
    `rank_dropout_scale`)."""

    def __init__(self, base: nn.Module, parts: list[tuple[int, int]], factors: list[nn.Module], scaling: float,
                 rank_dropout: float = 0.0, module_dropout: float = 0.0, rank_dropout_scale: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the same Parameter object: ties and base keys are preserved
        self.bias = base.bias
        self.parts = parts
        self.factors = nn.ModuleList(factors)  # one per part, in output order
        self.quantized = is_quantized(base.weight)  # a frozen 4/8-bit base: never merged in place
        self.scaling = scaling
        self.rank_dropout, self.module_dropout, self.rank_dropout_scale = rank_dropout, module_dropout, rank_dropout_scale
        self.merged = False

    def _part_delta(self, f: nn.Module, training: bool) -> torch.Tensor:
        w = f.delta(self.scale_on(self.weight.device))  # (width, in)
        if training and self.rank_dropout > 0:
            drop = (torch.rand(w.shape[0]) > self.rank_dropout).to(w.dtype)  # (width,) rows kept, as PEFT draws it
            if self.rank_dropout_scale:
                drop = drop / drop.mean()
            w = w * drop.to(w.device)[:, None]
        return w

    def delta_weight(self, training: bool = False) -> torch.Tensor | None:
        """The (out, in) update (zeros outside the parts), or None when module dropout skipped every part."""
        deltas = []
        for f in self.factors:
            keep = not training or self.module_dropout == 0 or bool(torch.rand(1) > self.module_dropout)
            deltas.append(self._part_delta(f, training) if keep else None)
        ref = next((w for w in deltas if w is not None), None)
        if ref is None:
            return None
        if len(deltas) == 1 and self.parts[0] == (0, self.out_features):
            return ref
        rows, prev = [], 0
        for (s, e), w in zip(self.parts, deltas):  # parts are disjoint and in output order
            if s > prev:
                rows.append(ref.new_zeros(s - prev, self.in_features))
            rows.append(w if w is not None else ref.new_zeros(e - s, self.in_features))
            prev = e
        if prev < self.out_features:
            rows.append(ref.new_zeros(self.out_features - prev, self.in_features))
        return torch.cat(rows)  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dw = None if self.merged else self.delta_weight(self.training)
        if dw is not None and not self.quantized and self.weight.dtype in _EXACT_SUM_DTYPES \
                and x.dtype == self.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            # One matmul with W + dW: the sum costs out*in adds where a second product costs tokens*out*in
            # multiply-adds forward and again for the input's gradient (dW's gradient is the same product either way).
            # Only where W + dW keeps dW's digits: a bf16/fp16 sum (or autocast's cast of it) would round a small
            # update away.
            return F.linear(x, self.weight + dw.to(self.weight.dtype), self.bias)  # (..., out)
        y = quantized_linear(x, self.weight, self.bias) if self.quantized else F.linear(x, self.weight, self.bias)
        return y if dw is None else y + F.linear(x, dw.to(x.dtype))  # (..., out)

    @torch.no_grad()
    def merge(self) -> None:
        if self.quantized:
            raise ValueError("cannot merge into a quantized weight in place (that would requantize); use the "
                             "method's merge, which writes a dequantized float weight")
        if not self.merged:
            self.weight.add_(self.delta_weight().to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.sub_(self.delta_weight().to(self.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, parts={self.parts}, scaling={self.scaling:g}"


def layers_of(model: nn.Module, factor_type: type) -> list[LycorisLinear]:
    return [m for m in model.modules() if isinstance(m, LycorisLinear) and isinstance(m.factors[0], factor_type)]


def factor_params(model: nn.Module, factor_type: type) -> list[nn.Parameter]:
    """A method's trained tensors: every parameter of its factor modules."""
    return [p for m in model.modules() if isinstance(m, factor_type) for p in m.parameters()]


def apply_lycoris(model: GPT, targets: list[str], make_factors: Callable[[int, int, dict], nn.Module],
                  factor_type: type, scaling: float, rank_dropout: float, module_dropout: float,
                  rank_dropout_scale: bool) -> list[str]:
    """Swap the targeted linears for LycorisLinear with `make_factors(width, in, factory)` per part; freeze the rest."""
    for parent, name, parts in target_layers(model, targets):
        base = getattr(parent, name)
        if isinstance(base, LycorisLinear):
            raise ValueError(f"{name} already has a LoHa/LoKr adapter applied")
        factory = dict(device=base.weight.device, dtype=compute_dtype_of(base.weight))
        factors = [make_factors(e - s, base.in_features, factory) for s, e in parts]
        setattr(parent, name, LycorisLinear(base, parts, factors, scaling, rank_dropout, module_dropout,
                                            rank_dropout_scale))
    return mark_trainable(model, factor_params(model, factor_type))


def merge_lycoris(model: GPT, weight: float, factor_type: type) -> GPT:
    """Fold every `factor_type` update (times `weight`) into its base weight and put plain nn.Linear layers back (see
    `merge_into_linears`)."""
    return merge_into_linears(model, layers_of(model, factor_type), lambda layer, _w: layer.delta_weight(), weight)
