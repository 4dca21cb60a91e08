"""Hand-fused training ops for the eager path: fewer passes over activations and fewer saved tensors.

Each op is a `torch.autograd.Function` whose forward and backward are written with in-place and `out=` calls,
so one RMSNorm or RoPE costs a handful of memory passes instead of the ~10 small kernels (and ~3 saved
activations) that the composed PyTorch expression records. On a 2-core CPU, where every kernel launch carries
an OpenMP barrier, that overhead is a visible share of a LoRA step. The math is unchanged; tests compare
forward and gradients with the plain expressions (tests/test_speed_ops.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _RMSNormFn(torch.autograd.Function):
    """y = w * x / sqrt(mean(x^2) + eps) over the last dim; saves x and 1/rms (N, 1), not the normalised x."""

    @staticmethod
    def forward(ctx, x, weight, eps, out_dtype):
        y, x2, rstd = _rms_norm_forward(x, weight, eps, out_dtype)
        ctx.save_for_backward(x2, rstd, weight)
        return y

    @staticmethod
    def backward(ctx, gy):
        x2, rstd, weight = ctx.saved_tensors
        C = x2.shape[-1]
        g = gy.reshape(-1, C).to(x2.dtype)  # (N, C); a bf16 gy (out_dtype) in fp32 once: mixed-dtype ops are slow
        gw = None
        if ctx.needs_input_grad[1]:
            gw = (g * x2 * rstd).sum(0)
        gx = None
        if ctx.needs_input_grad[0]:
            gxhat = g * weight  # (N, C): grad wrt the normalised x
            # d/dx [x * r] with r = (mean(x^2) + eps)^-1/2:  r * gxhat - x * r^3 * mean(gxhat * x)
            dot = (gxhat * x2).sum(-1, keepdim=True)  # (N, 1)
            coef = rstd.pow(3).mul_(dot).div_(C)
            gx = gxhat.mul_(rstd).sub_(x2 * coef).view(gy.shape)
        return gx, gw, None, None


def _rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None):
    C = x.shape[-1]
    x2 = x.reshape(-1, C)  # (N, C)
    rstd = torch.linalg.vector_norm(x2, dim=-1, keepdim=True).square_().div_(C).add_(eps).rsqrt_()  # (N, 1)
    y = torch.mul(x2, rstd)
    y = y.mul_(weight) if out_dtype in (None, y.dtype) else torch.mul(y, weight, out=torch.empty_like(y, dtype=out_dtype))
    return y.view(x.shape), x2, rstd


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Fused fp32 RMSNorm (Llama). Other dtypes should use the reference path, which rounds as transformers.
    Without autograd (decoding, evaluation) the same kernels run without the autograd.Function call, which costs
    about as much as the math for one token: the bits are the training path's. `out_dtype` writes the result in a
    lower precision (the fp32 result rounded once, as a cast after it would)."""
    if not _needs_grad(x, weight):
        return _rms_norm_forward(x, weight, eps, out_dtype)[0]
    return _RMSNormFn.apply(x, weight, eps, out_dtype)


class _RoPEFn(torch.autograd.Function):
    """Rotate-half RoPE on the last dim: out1 = x1 c - x2 s, out2 = x2 c + x1 s, with c, s the first half of the
    cos/sin tables (both halves are equal by construction). The backward is the same rotation by -angle, so
    nothing but the tables is saved."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, sign=1.0)

    @staticmethod
    def backward(ctx, g):
        cos, sin = ctx.saved_tensors
        return _rotate(g, cos, sin, sign=-1.0), None, None


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    h = cos.shape[-1] // 2
    c, s = cos[..., :h], sin[..., :h]  # (..., n/2), broadcast over x's leading dims
    x1, x2 = x[..., :h], x[..., h:2 * h]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    o1, o2 = out[..., :h], out[..., h:2 * h]
    torch.mul(x1, c, out=o1)
    o1.addcmul_(x2, s, value=-sign)
    torch.mul(x2, c, out=o2)
    o2.addcmul_(x1, s, value=sign)
    if x.shape[-1] > 2 * h:  # partial rotary: the remaining dims pass through
        out[..., 2 * h:] = x[..., 2 * h:]
    return out


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., T, hs), cos/sin (..., T, rope_n_elem) broadcastable: RoPE on the first rope_n_elem dims (without
    autograd, the same rotation without the autograd.Function call)."""
    if not _needs_grad(x):
        return _rotate(x, cos, sin, sign=1.0)
    return _RoPEFn.apply(x, cos, sin)


_LEVELS = 1 << 16
"""A CPU dropout mask compares 16-bit random numbers with a threshold: the drop probability is p rounded to a multiple
of 2^-16 (0.05 -> 0.0500031), and the kept values are scaled by the reciprocal of that rounded keep probability, so the
output's expectation is x exactly."""


class _KeepScaleFn(torch.autograd.Function):
    """out = x * keep * scale with a bool `keep` mask; saves the mask (1 byte a value, not a float noise tensor)."""

    @staticmethod
    def forward(ctx, x, keep, scale):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return _keep_scale(x, keep, scale)

    @staticmethod
    def backward(ctx, g):
        (keep,) = ctx.saved_tensors
        return _keep_scale(g, keep, ctx.scale), None, None


def _keep_scale(t: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
    return t.mul(keep).mul_(scale)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Inverted dropout. On the CPU the mask comes from 64-bit random words cut into four 16-bit lanes: torch's
    `bernoulli_` draws one (serial) random number and a float conversion per value, ~3.5x the time of this whole op
    (LoRA's dropout on the default model was ~6% of a bf16-mixed step). Elsewhere, or under torch.compile, F.dropout."""
    if not training or p == 0:
        return x
    drop = round(p * _LEVELS)
    if x.device.type != "cpu" or torch.compiler.is_compiling() or not 0 < drop < _LEVELS:
        return F.dropout(x, p, training)
    n = x.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-(1 << 63), None)  # 64 random bits
    lanes = words.view(torch.int16)[:n].view(x.shape)  # uniform over [-2^15, 2^15)
    keep = lanes >= drop - _LEVELS // 2  # P(drop) = drop / 2^16
    scale = _LEVELS / (_LEVELS - drop)
    if _needs_grad(x):
        return _KeepScaleFn.apply(x, keep, scale)
    return _keep_scale(x, keep, scale)


class Dropout(nn.Dropout):
    """nn.Dropout (same `p`, state and repr) that runs `dropout` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)
