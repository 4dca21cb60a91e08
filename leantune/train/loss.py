"""Cross-entropy only where it is needed: logits are computed for supervised positions, in chunks.

The LM head is ~20% of a small model's FLOPs and its fp32 logits (tokens x vocab) dominate activation memory.
Masked prompt tokens need no logits at all, and chunking with recomputation bounds the logits alive at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def supervised_ce_sum(hidden: torch.Tensor, lm_head: torch.nn.Module, labels: torch.Tensor,
                      chunk_size: int = 2048) -> torch.Tensor:
    """Sum of token cross-entropies. hidden (B, T, C), labels (B, T) pre-shifted with -100 = ignore.

    lm_head is called as a module, so any PEFT layer on the head (LoRA, adapter v2) just works.
    """
    keep = labels != -100  # (B, T)
    h = hidden[keep]  # (N, C): only supervised positions
    y = labels[keep]  # (N,)
    if h.shape[0] == 0:
        return hidden.sum() * 0.0

    def chunk_loss(hc: torch.Tensor, yc: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(lm_head(hc).float(), yc, reduction="sum")  # logits (n, V) live only here

    pieces = list(zip(h.split(chunk_size), y.split(chunk_size)))
    if len(pieces) == 1 or not torch.is_grad_enabled():
        return sum(chunk_loss(hc, yc) for hc, yc in pieces)
    return sum(checkpoint(chunk_loss, hc, yc, use_reentrant=False) for hc, yc in pieces)
