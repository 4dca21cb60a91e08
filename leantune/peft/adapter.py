"""LLaMA-Adapter (v1): a learned, zero-gated prefix that every query of the upper blocks also attends to.

Each adapted block gets `AdapterPrefix` in its `attn.adapter` hook: a small embedding table (prompt_length x n_embd)
whose keys/values come from the block's own frozen qkv projection (no RoPE: the prefix has no position), and a
per-head gate initialised to zero so the model is exactly the base model at step 0 (Zhang et al. 2023). The base
keeps all its state-dict keys; the new tensors live under `transformer.h.N.attn.adapter.*`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from leantune.models.decoder.config import Config
from leantune.models.decoder.model import GPT
from leantune.models.quantize import compute_dtype_of
from leantune.peft.base import Method, mark_trainable


@dataclass
class AdapterArgs:
    prompt_length: int = 10
    """Learned prefix tokens per adapted block."""
    start_layer: int = 2
    """Index of the first adapted block; the blocks below it keep no prefix (they carry low-level features)."""

    def __post_init__(self) -> None:
        if self.prompt_length < 1:
            raise ValueError(f"--adapter.prompt_length must be >= 1, got {self.prompt_length}")
        if self.start_layer < 0:
            raise ValueError(f"--adapter.start_layer must be >= 0, got {self.start_layer}")


class AdapterPrefix(nn.Module):
    """The gated prefix attention of one block, called by the attention as `adapter(attn, q)`."""

    def __init__(self, config: Config, prompt_length: int, device=None, dtype=None) -> None:
        super().__init__()
        self.wte = nn.Embedding(prompt_length, config.n_embd, device=device, dtype=dtype)
        self.gating_factor = nn.Parameter(torch.zeros(1, config.n_head, 1, 1, device=device, dtype=dtype))
        # Prefix K/V reused across no-grad forwards (generation) until a weight they depend on changes.
        # A plain attribute, not a buffer: it must never reach a state dict.
        self._kv: tuple[tuple, torch.Tensor, torch.Tensor] | None = None

    def reset_parameters(self) -> None:
        """Re-initialise (e.g. after `to_empty` on a model transformed on the meta device)."""
        self.wte.reset_parameters()
        nn.init.zeros_(self.gating_factor)
        self._kv = None

    def train(self, mode: bool = True) -> AdapterPrefix:
        self._kv = None  # switching modes is a cheap moment to drop K/V that writes via `.data` could have staled
        return super().train(mode)

    def forward(self, attn: nn.Module, q: torch.Tensor) -> torch.Tensor:
        """q (B, n_head, T, hs), already rotated -> gated attention over the prefix (B, n_head, T, hs)."""
        cfg = attn.config
        k, v = self.prefix_kv(attn)  # (1, ng, P, hs) each
        B = q.shape[0]
        # No mask: every position may see the whole prefix, which precedes the sequence.
        y = F.scaled_dot_product_attention(
            q, k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1), scale=1.0 / math.sqrt(cfg.head_size),
            enable_gqa=cfg.n_query_groups != cfg.n_head,
        )  # (B, nh, T, hs)
        return y * self.gating_factor.to(y.dtype)

    def prefix_kv(self, attn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefix keys and values (1, ng, P, hs), cached only while autograd is off (never stale in training)."""
        if torch.is_grad_enabled():
            self._kv = None
            return self._compute_kv(attn)
        key = self._cache_key(attn)
        if self._kv is None or self._kv[0] != key:
            self._kv = (key, *self._compute_kv(attn))
        return self._kv[1], self._kv[2]

    def _compute_kv(self, attn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = attn.config
        P = self.wte.weight.shape[0]
        # The block's own qkv (plain, LoRA or adapter-v2 layer alike) projects the prefix; Q is unused.
        _, k, v = attn.qkv(self.wte.weight[None]).split(cfg.qkv_sizes, dim=-1)  # (1, P, ng*hs) each
        k = k.view(1, P, cfg.n_query_groups, cfg.head_size).transpose(1, 2)  # (1, ng, P, hs)
        v = v.view(1, P, cfg.n_query_groups, cfg.head_size).transpose(1, 2)  # (1, ng, P, hs)
        return k, v

    def _cache_key(self, attn: nn.Module) -> tuple:
        """Everything the prefix K/V depend on: each tensor's identity, in-place version, dtype and device (an
        optimizer step or load_state_dict bumps `_version`; `.to()` changes dtype/device), plus autocast state."""
        params = (self.wte.weight, *attn.qkv.parameters())
        device = params[0].device.type
        autocast = None
        if torch.amp.is_autocast_available(device):  # not for e.g. meta
            autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        return autocast, tuple((id(p), p._version, p.dtype, p.device) for p in params)

    def extra_repr(self) -> str:
        return f"prompt_length={self.wte.num_embeddings}, n_head={self.gating_factor.shape[1]}"


def add_prefixes(model: GPT, prompt_length: int, start_layer: int) -> list[nn.Parameter]:
    """Install an `AdapterPrefix` in every block from `start_layer` up; returns the new (trainable) parameters."""
    cfg = model.config
    if prompt_length < 1:
        raise ValueError(f"--adapter.prompt_length must be >= 1, got {prompt_length}")
    if not 0 <= start_layer < cfg.n_layer:
        raise ValueError(f"start_layer (--adapter.start_layer, --adapter_v2.start_layer) must be in "
                         f"[0, {cfg.n_layer}) for a {cfg.n_layer}-layer model, got {start_layer}")
    params = []
    for block in model.transformer.h[start_layer:]:
        attn = block.attn
        if attn.adapter is not None:
            raise ValueError(f"block {attn.index} already has an attention adapter")
        w = attn.qkv.weight
        attn.adapter = AdapterPrefix(cfg, prompt_length, device=w.device, dtype=compute_dtype_of(w))
        params.extend(attn.adapter.parameters())
    return params


def apply_adapter(model: GPT, args: AdapterArgs) -> list[str]:
    """Add the gated prefixes and freeze everything else. Returns the trainable parameter names."""
    return mark_trainable(model, add_prefixes(model, args.prompt_length, args.start_layer))


def prefix_params(model: nn.Module) -> list[nn.Parameter]:
    """Every AdapterPrefix's tensors (prefix embeddings and gates)."""
    return [p for m in model.modules() if isinstance(m, AdapterPrefix) for p in m.parameters()]


METHOD = Method(
    name="adapter",
    summary="LLaMA-Adapter v1: learned zero-gated prefixes attended to by the upper blocks",
    args_class=AdapterArgs,
    apply=apply_adapter,
    adapter_params=prefix_params,
    default_lr=3e-3,
)
