"""DoRA's math for `LoRALinear` (PEFT's `use_dora`): the detached row norms ||W + s B A|| without forming the updated
weight, and the forward that rescales each adapted output row by m / norm."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def squared_row_norms(w: torch.Tensor) -> torch.Tensor:
    """||W_r||^2 for each row of `w` (out, in), accumulated in at least fp32 without an fp32 copy of `w`."""
    return torch.linalg.vector_norm(w, dim=1, dtype=torch.promote_types(w.dtype, torch.float32)).square()


def dora_norms(w: torch.Tensor, wsq: torch.Tensor, a: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """||W_r + (U A)_r|| per row (out,), in fp32, without materialising the (out, in) updated weight.

    ||W_r + U_r A||^2 = ||W_r||^2 + 2 <W_r, U_r A> + ||U_r A||^2, with <W_r, U_r A> = (W A^T)_r . U_r and
    ||U_r A||^2 = U_r (A A^T) U_r^T: one (out, in) x (in, k) product, the rest (out, k) or (k, k) sized. Here
    A (k, in) is the stacked lora_A and U (out, k) = scaling * B, block-structured per part. The sum is clamped
    at 0 (cancellation when the update nearly erases a row) and the norm kept above the smallest fp32 normal, so
    m / norm stays finite on an all-zero row (where PEFT's direct formula divides 0 by 0).
    """
    a32, u32 = a.float(), u.float()
    wa = torch.mm(w, a.t().to(w.dtype)).float()  # (out, k): W A^T
    cross = (wa * u32).sum(1)  # (out,)
    quad = (torch.mm(u32, a32 @ a32.t()) * u32).sum(1)  # (out,): U (A A^T) . U
    return (wsq + 2 * cross + quad).clamp_min(0).sqrt().clamp_min(torch.finfo(torch.float32).tiny)


def spread_rows(v: torch.Tensor, parts: list[tuple[int, int]], out: int, fill: float) -> torch.Tensor:
    """A (sum of part widths,) vector laid out over `out` rows: its pieces at the parts' ranges, `fill` elsewhere."""
    pieces, off, prev = [], 0, 0
    for s, e in parts:  # disjoint, in output order
        if s > prev:
            pieces.append(v.new_full((s - prev,), fill))
        pieces.append(v[off:off + e - s])
        off, prev = off + e - s, e
    if prev < out:
        pieces.append(v.new_full((out - prev,), fill))
    return torch.cat(pieces)  # (out,)


def dora_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """PEFT's DoRA forward: y = W x + b + (g - 1) * W x' + g * s B A x', g = m / ||W + s B A|| (detached) and
    x' = dropout(x). Without active dropout x' = x and that is g * (W x + s B A x) + b: one scale of the sum."""
    g = layer.row_scale().to(x.dtype)  # (out,)
    dropout_active = layer.training and isinstance(layer.dropout, nn.Dropout)
    xd = layer.dropout(x) if dropout_active else x
    a = F.linear(xd, layer.lora_A.to(x.dtype))  # (..., parts * r)
    lora = F.linear(a, layer.update_matrix().to(x.dtype))  # (..., out)
    if not dropout_active:
        y = (layer.base_forward(x, None) + lora) * g
        return y if layer.bias is None else y + layer.bias.to(y.dtype)
    # the dropped input goes through W too, as PEFT does: W x + b keeps the undropped input
    return layer.base_forward(x, layer.bias) + (g - 1) * layer.base_forward(xd, None) + g * lora
