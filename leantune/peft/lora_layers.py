"""LoRA's layer: W x + (alpha / r) * B A x on chosen linear layers, as a module swap that keeps base keys.

`LoRALinear` owns the base `weight`/`bias` (moved, not copied, so tied weights stay tied and a base checkpoint
loads unchanged) plus `lora_A` and `lora_B`. On GPT's fused qkv projection each enabled part (q, k, v) gets its
own rank-r pair, stored stacked: `lora_A` is (parts * r, in) and `lora_B` is (sum of part widths, r).

With `dora` the layer is DoRA (Liu et al. 2024, as PEFT's `use_dora`): each adapted output row r is rescaled to a
learned magnitude, y_r = m_r / ||W_r + s B_r A|| * (W_r x + s B_r A x) + b_r, with the norm detached (the paper's
section 4.3); `lora_magnitude` (sum of part widths,) starts at the row norms of W, so step 0 equals the base.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from leantune.models.decoder.model import GPT
from leantune.models.kinds import is_seq2seq
from leantune.models.ops import Dropout
from leantune.models.quantize import compute_dtype_of, dequantize_weight, is_quantized, quantized_linear
from leantune.models.t5.model import T5
from leantune.peft.base import mark_trainable, merge_into_linears, params_of
from leantune.peft.lora_dora import dora_forward, dora_norms, spread_rows, squared_row_norms
from leantune.peft.scale import GraphScale

TARGETS = ("query", "key", "value", "projection", "mlp", "head")


@dataclass
class LoRAArgs:
    r: int = 8
    """Rank of the update."""
    alpha: float = 16.0
    """Scale numerator: the update is multiplied by alpha / r (alpha / sqrt(r) with rslora)."""
    dropout: float = 0.05
    """Dropout on the LoRA branch input (on CPU, p is applied rounded to a multiple of 2^-16: 0.05 -> 0.0500031)."""
    targets: list[str] | str = field(default_factory=lambda: ["query", "value"])
    """Layers to adapt: a list or comma-separated string among query, key, value, projection, mlp, head; or all."""
    rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r)."""

    flag: ClassVar[str] = "lora"  # the CLI group named in error messages

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        if self.targets == ["all"]:
            self.targets = list(TARGETS)
        bad = sorted(set(self.targets) - set(TARGETS))
        if bad or not self.targets:
            raise ValueError(f"--{self.flag}.targets {bad or '(empty)'}: choose among {', '.join(TARGETS)} or all")
        if self.r < 1:
            raise ValueError(f"--{self.flag}.r must be >= 1, got {self.r}")
        if not 0 < self.alpha < math.inf:  # `not <` also refuses NaN
            raise ValueError(f"--{self.flag}.alpha must be a finite number > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--{self.flag}.dropout must be in [0, 1), got {self.dropout}")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


@dataclass
class DoRAArgs(LoRAArgs):
    """DoRA's hyperparameters are LoRA's: the direction is a rank-r LoRA update; the magnitudes add one trained value
    per adapted output row."""

    flag: ClassVar[str] = "dora"


def parts_matrix(B: torch.Tensor, parts: list[tuple[int, int]], r: int, out: int) -> torch.Tensor:
    """(sum of part widths, r) -> (out, parts * r): part i's rows of B at its output range and columns i*r..(i+1)*r,
    zeros elsewhere, so an update over several parts is one matmul on the stacked A output (no per-part slice writes,
    which cost extra copies in backward). Rows are sliced, not `Tensor.split`: under a compiled decode step's
    `gemv.ReductionLinears` dynamo records that Python-level method as a call AOT autograd's cache refuses."""
    P = len(parts)
    rows, off, prev = [], 0, 0
    for i, (s, e) in enumerate(parts):  # parts are disjoint and in output order
        if s > prev:
            rows.append(B.new_zeros(s - prev, P * r))
        rows.append(F.pad(B[off:off + e - s], (i * r, (P - i - 1) * r)))  # (width_i, P * r)
        off, prev = off + e - s, e
    if prev < out:
        rows.append(B.new_zeros(out - prev, P * r))
    return torch.cat(rows)  # (out, P * r)


class LoRALinear(GraphScale, nn.Module):
    """A linear layer with LoRA updates on one or more contiguous output ranges (`parts`)."""

    def __init__(self, base: nn.Linear, parts: list[tuple[int, int]], r: int, scaling: float, dropout: float,
                 dora: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the same Parameter object: ties and base keys are preserved
        self.bias = base.bias
        self.parts = parts
        self.quantized = is_quantized(base.weight)  # a frozen 4/8-bit base (QLoRA): never merged in place
        self.r = r
        self.scaling = scaling  # a float, and a tensor for compiled graphs (GraphScale)
        self.dropout = Dropout(dropout) if dropout > 0 else nn.Identity()
        widths = sum(e - s for s, e in parts)
        factory = dict(device=base.weight.device, dtype=compute_dtype_of(base.weight))
        self.lora_A = nn.Parameter(torch.empty(len(parts) * r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(widths, r, **factory))
        self.merged = False
        self.adapter_enabled = True  # False: the base layer alone (a preference run's reference forward)
        self._full = len(parts) == 1 and parts[0] == (0, self.out_features)
        self.lora_magnitude = nn.Parameter(torch.empty(widths, **factory)) if dora else None  # DoRA's m
        self._wsq: tuple | None = None  # DoRA: (key of the base weight's storage and version, its squared row norms)
        self._merged_norm: torch.Tensor | None = None  # DoRA: the row norms a merge divided by, for unmerge
        if not self.lora_A.is_meta:
            self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        for i in range(len(self.parts)):  # same init as PEFT, per part
            nn.init.kaiming_uniform_(self.lora_A.data[i * self.r:(i + 1) * self.r], a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        if self.lora_magnitude is not None:  # B = 0: m = ||W_r||, by the forward's own formula, so m / norm is 1
            self.lora_magnitude.data.copy_(self.weight_norm())

    def part_factors(self) -> list[tuple[tuple[int, int], torch.Tensor, torch.Tensor]]:
        """[(output range, A_i (r, in), B_i (width_i, r))] for each adapted part."""
        out, off = [], 0
        for i, (s, e) in enumerate(self.parts):
            out.append(((s, e), self.lora_A[i * self.r:(i + 1) * self.r], self.lora_B[off:off + e - s]))
            off += e - s
        return out

    def delta_weight(self) -> torch.Tensor:
        """The full (out, in) update scaling * B A (zeros outside the adapted ranges), computed in fp32."""
        return (self.update_matrix().float() @ self.lora_A.float()).to(self.lora_A.dtype)

    def update_matrix(self) -> torch.Tensor:
        """scaling * B as one (out, parts * r) matrix (`parts_matrix`)."""
        B = self.lora_B * self.scale_on(self.lora_B.device)  # (sum of part widths, r): scaling the small factor, not the output
        return B if self._full else parts_matrix(B, self.parts, self.r, self.out_features)

    def base_forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return quantized_linear(x, self.weight, bias) if self.quantized else F.linear(x, self.weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self.adapter_enabled:
            return self.base_forward(x, self.bias)
        if self.lora_magnitude is not None:
            return dora_forward(self, x)
        y = self.base_forward(x, self.bias)
        x_ = self.dropout(x) if self.training else x  # eval: not traced, so other dropouts share a graph
        a = F.linear(x_, self.lora_A.to(x.dtype))  # (..., parts * r)
        return y + F.linear(a, self.update_matrix().to(x.dtype))  # (..., out)

    def weight_norm(self) -> torch.Tensor:
        """DoRA: ||W_r + s B_r A|| (fp32, detached) for each adapted row, without forming W + s B A (see dora_norms)."""
        with torch.no_grad():
            w = dequantize_weight(self.weight) if self.quantized else self.weight  # (out, in)
            if torch.compiler.is_compiling() or self.weight.is_inference():  # no Python-side cache in a graph
                wsq = squared_row_norms(w)
            else:  # the frozen base's ||W_r||^2, recomputed whenever the stored weight changes (load, merge, .to)
                p = self.weight
                key = (p.data_ptr(), p._version, p.device, p.dtype, p.shape)
                if self._wsq is None or self._wsq[0] != key:
                    self._wsq = (key, squared_row_norms(w))
                wsq = self._wsq[1]
            norm = dora_norms(w, wsq, self.lora_A.detach(), self.update_matrix().detach())  # (out,)
            return norm if self._full else torch.cat([norm[s:e] for s, e in self.parts])  # (widths,)

    def row_scale(self) -> torch.Tensor:
        """DoRA: m / ||W + s B A|| on adapted rows and 1 on the others, as one (out,) vector (grad flows to m)."""
        g = self.lora_magnitude / self.weight_norm().to(self.lora_magnitude.dtype)  # (widths,)
        return g if self._full else spread_rows(g, self.parts, self.out_features, 1.0)

    def merge_delta(self, w: torch.Tensor) -> torch.Tensor:
        """What merging adds to the float base weight `w` (out, in): s B A, or for DoRA diag(m / norm) (W + s B A) - W."""
        d = self.delta_weight().to(w.dtype)
        if self.lora_magnitude is None:
            return d
        return (w + d) * self.row_scale().detach().to(w.dtype)[:, None] - w

    @torch.no_grad()
    def merge(self) -> None:
        if self.quantized:
            raise ValueError("cannot merge a LoRA into a quantized weight in place (that would requantize); "
                             "use merge_lora, which writes a dequantized float weight")
        if not self.merged:
            if self.lora_magnitude is not None:  # unmerge divides by the norms of the unmerged weight, as PEFT does
                self._merged_norm = self.weight_norm()
            self.weight.add_(self.merge_delta(self.weight))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            if self.lora_magnitude is not None:  # W = W' / (m / norm) - s B A on adapted rows
                g = self.lora_magnitude / self._merged_norm.to(self.lora_magnitude.dtype)
                g = g if self._full else spread_rows(g, self.parts, self.out_features, 1.0)
                self.weight.div_(g.to(self.weight.dtype)[:, None])
                self._merged_norm = None
            self.weight.sub_(self.delta_weight())
            self.merged = False

    def extra_repr(self) -> str:
        dora = ", dora" if self.lora_magnitude is not None else ""
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, parts={self.parts}, scaling={self.scaling:g}{dora}"


T5_ATTENTION = {"query": "q", "key": "k", "value": "v", "projection": "o"}
"""LoRA target -> T5 attention linear (in encoder self-, decoder self- and cross-attention alike)."""


def t5_target_layers(model: T5, targets: list[str]) -> list[tuple[nn.Module, str, list[tuple[int, int]]]]:
    """T5's layers for the targets: query/key/value/projection are q/k/v/o of every attention (encoder, decoder and
    cross-attention: PEFT's default T5 targets ["q", "v"] are query,value), mlp the feed-forward's wi (or wi_0, wi_1)
    and wo, head the LM head."""
    chosen: list[tuple[nn.Module, str]] = []
    for stack in (model.encoder, model.decoder):
        for block in stack.block:
            for attn in (block.attn, block.cross_attn):
                if attn is not None:
                    chosen += [(attn, name) for t, name in T5_ATTENTION.items() if t in targets]
            if "mlp" in targets:
                chosen += [(block.ff, n) for n in (("wi_0", "wi_1", "wo") if block.ff.gated else ("wi", "wo"))]
    if "head" in targets:
        chosen.append((model, "lm_head"))
    return [(p, n, [(0, getattr(p, n).out_features)]) for p, n in chosen]


def target_layers(model: GPT | T5, targets: list[str]) -> list[tuple[nn.Module, str, list[tuple[int, int]]]]:
    """(parent module, attribute name, adapted output ranges) for every layer the targets select."""
    if is_seq2seq(model):
        return t5_target_layers(model, targets)
    cfg = model.config
    q, k, v = cfg.qkv_sizes
    qkv_ranges = {"query": (0, q), "key": (q, q + k), "value": (q + k, q + k + v)}
    chosen = []
    for block in model.transformer.h:
        parts = [qkv_ranges[t] for t in ("query", "key", "value") if t in targets]
        if parts:
            chosen.append((block.attn, "qkv", parts))  # q, k, v each keep their own rank-r pair, in output order
        if "projection" in targets:
            chosen.append((block.attn, "proj", None))
        if "mlp" in targets:
            names = ("fc_1", "fc_2", "proj") if cfg.mlp_class == "swiglu" else ("fc", "proj")
            chosen.extend((block.mlp, n, None) for n in names)
    if "head" in targets:
        chosen.append((model, "lm_head", None))
    return [(p, n, parts or [(0, getattr(p, n).out_features)]) for p, n, parts in chosen]


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def lora_params(model: nn.Module) -> list[nn.Parameter]:
    """LoRA's trained tensors: every LoRALinear's A and B (and DoRA's magnitude)."""
    return params_of(lora_layers(model), "lora_A", "lora_B", "lora_magnitude")


def apply_lora(model: GPT, args: LoRAArgs, dora: bool = False) -> list[str]:
    """Swap the targeted linears for LoRALinear (DoRA with `dora`); freeze everything else. Returns trainable
    parameter names. DoRA's magnitudes start from the base weights: load them first."""
    for parent, name, parts in target_layers(model, args.targets):
        base = getattr(parent, name)
        if isinstance(base, LoRALinear):
            raise ValueError(f"{name} already has LoRA applied")
        setattr(parent, name, LoRALinear(base, parts, args.r, args.scaling, args.dropout, dora))
    return mark_trainable(model, lora_params(model))


def apply_dora(model: GPT, args: LoRAArgs) -> list[str]:
    """Swap the targeted linears for DoRA layers; their magnitudes start at the loaded base weights' row norms."""
    return apply_lora(model, args, dora=True)


def present_targets(model: GPT) -> list[str]:
    """The LoRA targets a model carries (an imported PEFT folder names HF modules, not our targets)."""
    return [t for t in TARGETS
            if any(isinstance(getattr(p, n), LoRALinear) and all(r in getattr(p, n).parts for r in parts)
                   for p, n, parts in target_layers(model, [t]))]


def merge_lora(model: GPT, weight: float = 1.0) -> GPT:
    """Fold every LoRA update (times `weight`) into its base weight and put plain nn.Linear layers back (see
    `merge_into_linears`: tied heads untied, quantized bases dequantized, never requantized).
    DoRA with a weight w moves W that fraction of the way to its merged weight: W + w (diag(m / norm) (W + s B A) - W).
    """
    return merge_into_linears(model, lora_layers(model), lambda layer, w: layer.merge_delta(w), weight)
