"""Greedy picks of an fp32 LM head from a bfloat16 copy, still the fp32 argmax: the batched decode step's head.

On the default model the fp32 head (576 x 49152, 113 MB) is ~15% of a 16-row decode step on CPU. Its bfloat16 copy
reads half the bytes and runs avx512_bf16 kernels; the rounding it adds is bounded per token, so every token whose
bfloat16 logit plus its bound reaches the best lower bound is scored again in fp32 from its own row, and the best of
those is the pick. Only when that leaves more than MAX_CANDIDATES tokens (near-flat logits, e.g. random tiny
models) does the full fp32 head run instead.

Bound, per row x and token row w (unit roundoff u = 2^-8 for bfloat16, 2^-24 for fp32, K = the hidden size):
|x.w - bf16 product| <= |x| |w| (2u + u^2 + K 2^-24) (the rounded inputs, fp32 accumulation), plus u |logit| for
the product's own rounding to bfloat16.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from leantune.decode.woq import dense_linear, prepack

MAX_CANDIDATES = 256
"""More candidates than this in any row: the full fp32 head decides instead (its cost, not a wrong pick)."""


class Bf16Screen:
    """For a plain fp32 nn.Linear head on CPU (`applies`): `argmax(x)` == head(x).argmax(-1), reading bfloat16."""

    def __init__(self, head: nn.Linear) -> None:
        w = head.weight.detach()
        self.weight, self.bias = w, None if head.bias is None else head.bias.detach()
        self.w16 = prepack(w.to(torch.bfloat16))  # (V, C), oneDNN's blocked layout where it runs bfloat16
        K = w.shape[1]
        u = 2.0 ** -8
        self.row_bound = w.norm(dim=1) * (2 * u + u * u + K * 2.0 ** -24)  # (V,) times |x| bounds the input error
        self.u = u

    @staticmethod
    def applies(head: nn.Module) -> bool:
        return (type(head) is nn.Linear and head.weight.dtype == torch.float32 and head.weight.device.type == "cpu"
                and torch.ops.mkldnn._is_mkldnn_bf16_supported())

    def argmax(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C) fp32 -> (B,) the fp32 head's greedy tokens."""
        s = dense_linear(x.to(torch.bfloat16), self.w16).float()  # (B, V)
        if self.bias is not None:
            s += self.bias
        bound = x.norm(dim=1, keepdim=True) * self.row_bound + s.abs() * self.u  # (B, V)
        lower = (s - bound).amax(dim=1, keepdim=True)  # (B, 1): the best token's fp32 logit is at least this
        upper = s.add_(bound)  # (B, V): no fp32 logit exceeds this
        k = int((upper >= lower).sum(dim=1).max())
        if k > MAX_CANDIDATES:
            return F.linear(x, self.weight, self.bias).argmax(-1)
        candidates = upper.topk(k, dim=1).indices  # (B, k): every token that may be the argmax is among them
        exact = torch.bmm(self.weight[candidates], x[:, :, None]).squeeze(-1)  # (B, k) fp32
        if self.bias is not None:
            exact += self.bias[candidates]
        return candidates.gather(1, exact.argmax(1, keepdim=True)).squeeze(1)
