"""Block linears with their weights in oneDNN's blocked layout (CPU), packed once: the served model's, and eager
decoding's in `generate` and `chat` (`inference.pack_for_eager_decoding`).

torch's eager F.linear on CPU multiplies fp32 through MKL's sgemm with the weight as stored; oneDNN's matmul on a
weight reordered once for its kernels measured ~2x faster on the default model's body (150 block matmuls, 2 threads,
AMD EPYC avx512, passive OpenMP waiting): 26 vs 36-43 ms a token at 1 row, 39 vs 79-86 at 16, 165 vs 263 at 128.
Each row's result does not depend on the others in the batch (checked in the tests), so a request decodes to the
same tokens alone or in any batch. The packed copy is extra memory (the plain weights stay: the base model, its
grouped adapters and LoRA loading read them), so packing is skipped past PACK_MAX_BYTES.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from leantune.decode.woq import dense_linear, onednn_packs, prepack

PACK_MAX_BYTES = 2 * 2**30
"""Largest total of block linear weights that the served copy packs (the default model's fp32 body: 0.43 GB)."""


class PackedLinear(nn.Module):
    """y = x W^T + b through oneDNN with W reordered once; W is the plain layer's (shared, never changed)."""

    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.weight = layer.weight  # the plain weight, for anything that reads it (dtype, device, shape)
        self.bias = layer.bias
        with torch.no_grad():
            self.packed = prepack(layer.weight.detach())  # reordered for ~16-row calls (serve's default batch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        bias = None if self.bias is None else self.bias.detach()
        y = dense_linear(x.reshape(-1, self.in_features), self.packed, bias)
        return y.reshape(*lead, self.out_features)  # (..., out)


def packable(layer: nn.Module) -> bool:
    return type(layer) is nn.Linear and onednn_packs(layer.weight)


def pack_block_linears(blocks: nn.Module) -> int:
    """Swap every packable nn.Linear inside `blocks` (the served copy's transformer blocks) for a PackedLinear, when
    their weights total at most PACK_MAX_BYTES; returns how many were swapped."""
    names = [n for n, m in blocks.named_modules() if packable(m)]
    size = sum(blocks.get_submodule(n).weight.nbytes for n in names)
    if not names or size > PACK_MAX_BYTES:
        return 0
    for n in names:
        parent_name, _, attr = n.rpartition(".")
        parent = blocks.get_submodule(parent_name) if parent_name else blocks
        setattr(parent, attr, PackedLinear(getattr(parent, attr)))
    return len(names)
