"""Greedy picks of an fp32 LM head from a bfloat16 copy, still the fp32 argmax: the batched decode step's head.

On the default model the fp32 head (576 x 49152, 113 MB) is ~15% of a 16-row decode step on CPU. Its bfloat16 copy
reads half the bytes and runs avx512_bf16 kernels; the rounding it adds is bounded per token, so when every token
outside the CANDIDATES best bfloat16 logits is provably below the best of them, those are scored again in fp32 from
their own rows and the best is the pick; for a row where that is not proven, every token whose bound still reaches the
best candidate's fp32 logit is scored in fp32 too, and with near-flat logits (random tiny models) the full fp32 head
decides.

Bound, per row x and token row w (unit roundoff u = 2^-8 for bfloat16, 2^-24 for fp32, K = the hidden size): the
exact x.w lies within |x| |w| (2u + u^2 + K 2^-24) (the rounded inputs, fp32 accumulation) plus 2u |s| (the product
s's own rounding to bfloat16) of s. s + 2u|s| grows with s, so a token below the k-th best bfloat16 logit s_k is
at most s_k + 2u|s_k| + |x| max|w| (2u + u^2 + K 2^-24).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from leantune.decode.woq import dense_linear, prepack

CANDIDATES = 64
"""Tokens scored again in fp32 per row; on a real model's hidden states the rest is provably below them."""


class Bf16Screen:
    """For a plain fp32 nn.Linear head on CPU (`applies`): `argmax(x)` == head(x).argmax(-1), reading bfloat16."""

    def __init__(self, head: nn.Linear) -> None:
        w = head.weight.detach()
        self.weight, self.bias = w, None if head.bias is None else head.bias.detach()
        self.w16 = prepack(w.to(torch.bfloat16))  # (V, C), oneDNN's blocked layout where it runs bfloat16
        u = 2.0 ** -8
        self.row_bound = w.norm(dim=1) * (2 * u + u * u + w.shape[1] * 2.0 ** -24)  # (V,) times |x|: inputs' error
        self.max_bound = float(self.row_bound.max())
        self.u2 = 2 * u
        self.k = min(CANDIDATES, w.shape[0])

    @staticmethod
    def applies(head: nn.Module) -> bool:
        return (type(head) is nn.Linear and head.weight.dtype == torch.float32 and head.weight.device.type == "cpu"
                and torch.ops.mkldnn._is_mkldnn_bf16_supported())

    def argmax(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C) fp32 -> (B,) the fp32 head's greedy tokens."""
        s = dense_linear(x.to(torch.bfloat16), self.w16)  # (B, V) bfloat16
        if self.bias is not None:
            s = s.float() + self.bias
        top, candidates = s.topk(self.k, dim=1)  # (B, k) each
        top = top.float()
        norm = x.norm(dim=1, keepdim=True)  # (B, 1)
        lower = (top - self.u2 * top.abs() - norm * self.row_bound[candidates]).amax(dim=1)  # (B,) best fp32 >= this
        last = top[:, -1]
        outside = last + self.u2 * last.abs() + norm[:, 0] * self.max_bound  # (B,) no other token's fp32 exceeds this
        exact = torch.bmm(self.weight[candidates], x[:, :, None]).squeeze(-1)  # (B, k) fp32
        if self.bias is not None:
            exact += self.bias[candidates]
        picks = candidates.gather(1, exact.argmax(1, keepdim=True)).squeeze(1)
        unsure = (outside >= lower).nonzero().flatten() if self.k < s.shape[1] else []
        if len(unsure):  # rows whose winner might lie outside their candidates
            picks[unsure] = self._widen(x[unsure], s[unsure], norm[unsure], exact[unsure].amax(1))
        return picks

    def _widen(self, x: torch.Tensor, s: torch.Tensor, norm: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
        """x (n, C), their bfloat16 logits s (n, V), |x| (n, 1) and best (n,), their best candidate's fp32 logit ->
        (n,) picks. A token's fp32 logit is at most s + 2u|s| + |x| row_bound, so only tokens where that reaches `best`
        can win: those are scored in fp32 (typically a few dozen; a 1-row fp32 head took ~15 ms of a ~50 ms 16-row
        step). A row with more than 1/8 of the vocabulary still in the running (near-flat logits) takes the full
        fp32 head."""
        s = s.float()
        upper = s + self.u2 * s.abs() + norm * self.row_bound  # (n, V): no token's fp32 logit exceeds this
        picks = []
        for row, up, b in zip(x, upper, best):
            tokens = (up >= b).nonzero().flatten()  # (m,) the winner among them
            if len(tokens) > self.weight.shape[0] // 8:
                picks.append(F.linear(row, self.weight, self.bias).argmax())
                continue
            scores = self.weight[tokens] @ row  # (m,)
            if self.bias is not None:
                scores += self.bias[tokens]
            picks.append(tokens[scores.argmax()])
        return torch.stack(picks)
