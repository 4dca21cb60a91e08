"""IA3's layer: learned vectors that rescale keys, values and the MLP's inner activations (Liu et al. 2022, "(IA)^3").

`IA3Linear` wraps a linear layer (plain or quantized) and owns its base `weight`/`bias` (the same Parameter objects,
so base keys and ties are kept) plus one trained vector `ia3_l`, initialised to ones (step 0 is the base model):
- output mode: y = (x W^T + b) * l over chosen output ranges (`parts`); on GPT's fused qkv the k and v rows get their
  own vectors and the q rows stay unscaled unless "query" is a target. Merge scales W's rows and b.
- feedforward mode: y = (x * l) W^T + b, l over the input features; on the MLP's down projection this scales the
  inner activations (IA3's l_ff). Merge scales W's columns.
This is exactly peft's `IA3Layer`/`Linear` (its `feedforward_modules` scale the input, other targets the output).
On T5 every attention (encoder, decoder, cross) has separate q/k/v/o linears and the feed-forward's down projection is
`wo`, so the targets pick whole layers and the defaults (key, value, mlp input-scaled) are peft's T5 defaults
(`k`, `v`, `wo` with `wo` a feedforward module).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from leantune.models.decoder.model import GPT
from leantune.models.kinds import is_seq2seq
from leantune.models.quantize import compute_dtype_of, dequantize_weight, is_quantized, quantized_linear
from leantune.models.t5.model import T5
from leantune.peft.base import mark_trainable, params_of

TARGETS = ("query", "key", "value", "projection", "mlp")
"""query/key/value: rows of the fused qkv output (T5: the q/k/v linears of every attention); projection: attention
output projection (T5: o); mlp: the MLP's down projection (peft's Llama default `down_proj`; T5: the feed-forward's
wo)."""
FEEDFORWARD_OK = ("projection", "mlp")
"""Targets that may scale their input: each is one whole layer (q/k/v share the fused qkv's input)."""


@dataclass
class IA3Args:
    targets: list[str] | str = field(default_factory=lambda: ["key", "value", "mlp"])
    """Layers to rescale: a list or comma-separated string among query, key, value, projection, mlp (the MLP's down
    projection); or all. Default: peft's Llama default (k_proj, v_proj, down_proj)."""
    feedforward: list[str] | str = field(default_factory=lambda: ["mlp"])
    """Targets whose vector scales the layer's input instead of its output (peft's feedforward_modules), among
    projection, mlp; or none. Default mlp: the down projection's input is the MLP's inner activation. A name that is
    not also a target has no effect."""

    def __post_init__(self) -> None:
        self.targets = _names(self.targets)
        self.feedforward = _names(self.feedforward)
        if self.targets == ["all"]:
            self.targets = list(TARGETS)
        if self.feedforward == ["none"]:
            self.feedforward = []
        bad = sorted(set(self.targets) - set(TARGETS))
        if bad or not self.targets:
            raise ValueError(f"--ia3.targets {bad or '(empty)'}: choose among {', '.join(TARGETS)} or all")
        bad = sorted(set(self.feedforward) - set(FEEDFORWARD_OK))
        if bad:
            raise ValueError(f"--ia3.feedforward {bad}: choose among {', '.join(FEEDFORWARD_OK)} or none (query, key "
                             "and value share the fused qkv layer's input, so only their outputs can be scaled)")
        self.targets = [t for t in TARGETS if t in self.targets]  # canonical order: manifests compare equal
        self.feedforward = [t for t in FEEDFORWARD_OK if t in self.feedforward]


def _names(value: list[str] | str) -> list[str]:
    return [t.strip() for t in value.split(",") if t.strip()] if isinstance(value, str) else list(value)


class IA3Linear(nn.Module):
    """A frozen linear layer with an IA3 vector on its input (`feedforward`) or on output ranges (`parts`)."""

    def __init__(self, base: nn.Module, parts: list[tuple[int, int]] | None, feedforward: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the same Parameter object: ties and base keys are preserved
        self.bias = base.bias
        self.quantized = is_quantized(base.weight)
        self.feedforward = feedforward
        self.parts = None if feedforward else (parts or [(0, self.out_features)])
        n = self.in_features if feedforward else sum(e - s for s, e in self.parts)
        self.ia3_l = nn.Parameter(torch.ones(n, device=base.weight.device, dtype=compute_dtype_of(base.weight)))
        self._full = feedforward or self.parts == [(0, self.out_features)]
        self.merged = False

    def reset_parameters(self) -> None:
        """Back to the identity (ones), e.g. after `to_empty` on a model transformed on the meta device."""
        nn.init.ones_(self.ia3_l)

    def scale(self, weight: float = 1.0) -> torch.Tensor:
        """The full (in,) or (out,) vector, ones outside the adapted ranges; `weight` interpolates from the identity:
        1 + weight * (l - 1) (weight 1: l itself)."""
        vec = self.ia3_l if weight == 1.0 else 1 + weight * (self.ia3_l - 1)
        if self._full:
            return vec
        pieces, off, prev = [], 0, 0
        for s, e in self.parts:  # parts are disjoint and in output order
            if s > prev:
                pieces.append(vec.new_ones(s - prev))
            pieces.append(vec[off:off + e - s])
            off, prev = off + e - s, e
        if prev < self.out_features:
            pieces.append(vec.new_ones(self.out_features - prev))
        return torch.cat(pieces)  # (out,)

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_linear(x, self.weight, self.bias) if self.quantized else F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self._linear(x)
        if self.feedforward:
            return self._linear(x * self.ia3_l.to(x.dtype))  # (..., in) * (in,)
        y = self._linear(x)
        return y * self.scale().to(y.dtype)  # (..., out) * (out,): bias included, as in peft

    @torch.no_grad()
    def scaled_weight(self, weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W, b) with the vector folded in, computed in fp32 (fp64 stays fp64) and cast back: rows (output) or
        columns (input)."""
        w = dequantize_weight(self.weight) if self.quantized else self.weight
        s = _wide(self.scale(weight))
        if self.feedforward:
            return (_wide(w) * s).to(w.dtype), self.bias  # (out, in) * (in,): columns
        b = None if self.bias is None else (_wide(self.bias) * s).to(self.bias.dtype)
        return (_wide(w) * s[:, None]).to(w.dtype), b  # (out, in) * (out, 1): rows

    @torch.no_grad()
    def merge(self) -> None:
        if self.quantized:
            raise ValueError("cannot merge IA3 into a quantized weight in place (that would requantize); use "
                             "merge_ia3, which writes a dequantized float weight")
        if not self.merged:
            w, b = self.scaled_weight()
            _check_finite(w, b)
            self.weight.copy_(w)
            if b is not None and b is not self.bias:
                self.bias.copy_(b)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Divide the vector back out (exact up to rounding; a zero entry makes it impossible)."""
        if not self.merged:
            return
        if (self.ia3_l == 0).any():
            raise ValueError("cannot unmerge IA3: its vector has zero entries, the merged weight lost those rows")
        s = _wide(self.scale())
        if self.feedforward:
            self.weight.copy_((_wide(self.weight) / s).to(self.weight.dtype))
        else:
            self.weight.copy_((_wide(self.weight) / s[:, None]).to(self.weight.dtype))
            if self.bias is not None:
                self.bias.copy_((_wide(self.bias) / s).to(self.bias.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        where = "input" if self.feedforward else f"output parts={self.parts}"
        return f"in={self.in_features}, out={self.out_features}, scales {where}"


def _wide(t: torch.Tensor) -> torch.Tensor:
    """`t` in the dtype the fold computes in: fp32 for half types (no double rounding), fp64 kept as is."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _check_finite(w: torch.Tensor, b: torch.Tensor | None) -> None:
    if not torch.isfinite(w).all() or (b is not None and not torch.isfinite(b).all()):
        raise ValueError("IA3 merge would put non-finite values into the weights; the adapter is broken")


T5_ATTENTION = {"query": "q", "key": "k", "value": "v", "projection": "o"}
"""IA3 target -> T5 attention linear (in encoder self-, decoder self- and cross-attention alike)."""


def t5_target_layers(model: T5, args: IA3Args) -> list[tuple[nn.Module, str, None, bool]]:
    """T5's layers for the targets: q/k/v/o of every attention (encoder, decoder, cross-attention) and the
    feed-forward's wo (its input is the inner activation, gated or not), each a whole layer."""
    chosen = []
    for stack in (model.encoder, model.decoder):
        for block in stack.block:
            for attn in (block.attn, block.cross_attn):
                if attn is not None:
                    chosen += [(attn, name, None, t in args.feedforward) for t, name in T5_ATTENTION.items()
                               if t in args.targets]
            if "mlp" in args.targets:
                chosen.append((block.ff, "wo", None, "mlp" in args.feedforward))
    return chosen


def target_layers(model: GPT | T5, args: IA3Args) -> list[tuple[nn.Module, str, list[tuple[int, int]] | None, bool]]:
    """(parent module, attribute, output ranges or None, feedforward) for every layer the targets select."""
    if is_seq2seq(model):
        return t5_target_layers(model, args)
    q, k, v = model.config.qkv_sizes
    qkv_ranges = {"query": (0, q), "key": (q, q + k), "value": (q + k, q + k + v)}
    chosen = []
    for block in model.transformer.h:
        parts = [qkv_ranges[t] for t in ("query", "key", "value") if t in args.targets]
        if parts:
            chosen.append((block.attn, "qkv", parts, False))  # k and v keep their own vectors; q rows stay 1
        if "projection" in args.targets:
            chosen.append((block.attn, "proj", None, "projection" in args.feedforward))
        if "mlp" in args.targets:
            chosen.append((block.mlp, "proj", None, "mlp" in args.feedforward))  # the down projection
    return chosen


def ia3_layers(model: nn.Module) -> list[IA3Linear]:
    return [m for m in model.modules() if isinstance(m, IA3Linear)]


def ia3_params(model: nn.Module) -> list[nn.Parameter]:
    """IA3's trained tensors: every IA3Linear's vector."""
    return params_of(ia3_layers(model), "ia3_l")


def apply_ia3(model: GPT | T5, args: IA3Args) -> list[str]:
    """Wrap the targeted linears in IA3Linear (vectors at one); freeze everything else. Returns trainable names."""
    for parent, name, parts, feedforward in target_layers(model, args):
        base = getattr(parent, name)
        if isinstance(base, IA3Linear):
            raise ValueError(f"{name} already has IA3 applied")
        setattr(parent, name, IA3Linear(base, parts, feedforward))
    return mark_trainable(model, ia3_params(model))


def merge_ia3(model: GPT | T5, weight: float = 1.0) -> GPT | T5:
    """Fold every IA3 vector into its base weight and put plain nn.Linear layers back.

    `weight` interpolates each vector from the identity, l_w = 1 + weight * (l - 1), so several adapters merged in
    turn multiply, as peft's stacked IA3 adapters do. A quantized base is folded into its dequantized weight (compute
    dtype), never requantized.
    """
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if not isinstance(child, IA3Linear):
                continue
            linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
            with torch.no_grad():
                if child.merged:
                    w, b = child.weight, child.bias
                else:
                    w, b = child.scaled_weight(weight)
                    _check_finite(w, b)
                    if not child.quantized:  # in place: the Parameter object (and any reference to it) stays
                        w = child.weight.copy_(w)
                    if b is not None and b is not child.bias:
                        b = child.bias.copy_(b)
            linear.weight = w if isinstance(w, nn.Parameter) else nn.Parameter(w, requires_grad=False)
            linear.bias = b
            setattr(module, name, linear)
    return model
