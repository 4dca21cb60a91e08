"""Many adapters over one base: loading them without copying the base, and per-row LoRA in one batch.

An adapter (leantune or PEFT folder, any method) is loaded onto a *shared copy* of the pristine base: a new module
tree whose large tensors (every weight matrix, quantized or not) are the base's own objects, so loading costs only
the adapter's tensors plus a clone of the small ones (norms, biases, which some methods train in place). Then:

- If the loaded copy differs from the base only by plain `LoRALinear` layers (LoRA, QLoRA, rsLoRA; leantune or PEFT
  LORA folders without DoRA), its factors (A and scaling * B per layer) are kept and the copy is dropped. Such
  adapters are *shared*: the served model carries one `MultiLoRALinear` per adapted layer, holding every shared
  adapter's factors, and each row of a batch gets its own adapter's update (`LoRARows` says which rows use which
  adapter), so requests for different LoRA adapters and for the base decode in one batch.
- Anything else (DoRA, IA3, LoHa, LoKr, AdaLoRA, prompt/P/prefix tuning, LLaMA-Adapter v1/v2) is *grouped*: the
  loaded copy is kept as that adapter's model (still sharing the base weights) and its rows run together, in a
  forward of their own each step.

Per-row update, design choice: a batch of one adapter's rows adds `(x A^T) U^T` with two small matmuls, the
arithmetic of a single `LoRALinear`, so a served adapter gives the same greedy text as `generate --adapter`. A batch
that mixes adapters (and base rows) puts every adapter's factors side by side and zeroes each row's columns of the
other adapters between the two matmuls (`MASKED_RANK`): zero terms add nothing, so each row still sums its own
adapter's products, and a layer costs 2 matmuls whatever the mix. With many installed adapters (ranks summing past
MASKED_RANK) rows are split into segments by adapter (two matmuls, a gather and an `index_copy_` each), and with
many distinct adapters in one batch (>= `BMM_MIN`) one gathered `bmm` over stacked, rank-padded factors
(punica/S-LoRA style) runs, one launch whatever the mix.
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from leantune.methods import load_any_adapter
from leantune.models.decoder.model import GPT
from leantune.peft.lora_layers import LoRALinear

SHARE_MIN = 4096
"""Tensors at least this large are shared by reference in a shared copy; smaller ones (norms, biases) are cloned."""
BMM_MIN = 4
"""Distinct adapters in one batch from which MultiLoRALinear uses the gathered bmm instead of per-adapter segments."""
MASKED_RANK = 256
"""Most ranks of all installed adapters together (per layer) for which a batch mixing adapters (fewer than BMM_MIN)
takes the masked two-matmul update (`MultiLoRALinear._masked`), whose work grows with that sum."""


def shared_copy(model: nn.Module) -> nn.Module:
    """A new module tree over the same large tensors (weights are shared, never copied); small tensors are cloned so
    a method that loads trained norms into them cannot change the base."""
    memo: dict[int, object] = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        if t.numel() >= SHARE_MIN:
            memo[id(t)] = t
    for t in getattr(model, "_rope", None) or ():  # a decoder's rotary tables (an encoder-decoder has none)
        memo[id(t)] = t
    return copy.deepcopy(model, memo)


class LoRARows:
    """Which rows of the current forward use which shared adapter, set by the engine before each forward.

    `segments`: [(adapter id, rows (n,) long tensor or None for every row)], adapters other than the base only.
    `ids`: (B,) adapter id per row (0 = the base), used by the gathered-bmm path.
    """

    def __init__(self) -> None:
        self.segments: list[tuple[int, torch.Tensor | None]] = []
        self.ids: torch.Tensor | None = None

    def set(self, row_ids: list[int], device: torch.device) -> None:
        """row_ids: the adapter id of each row of the next forward (0 for the base and for passenger rows)."""
        distinct = sorted(set(row_ids) - {0})
        if len(distinct) == 1 and all(i == distinct[0] for i in row_ids):
            self.segments, self.ids = [(distinct[0], None)], None
            return
        ids = torch.tensor(row_ids, dtype=torch.long, device=device)
        self.ids = ids
        self.segments = [(a, (ids == a).nonzero().flatten()) for a in distinct]

    def clear(self) -> None:
        self.segments, self.ids = [], None


class MultiLoRALinear(nn.Module):
    """A base linear layer (plain or quantized, untouched) plus the LoRA factors of every shared adapter that adapts
    it; each row gets the update of the adapter `rows` assigns it (none for the base)."""

    def __init__(self, base: nn.Module, rows: LoRARows) -> None:
        super().__init__()
        self.base = base
        self.rows = rows
        self.factors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (A (R, in), U = scaling * B (out, R))
        self._stacks: tuple | None = None  # (ids, A (N+1, R, in), U (N+1, out, R), index of each id) for bmm
        self._cat: tuple | None = None  # (A (sum R, in), U (out, sum R), owner (sum R,)) for the masked update

    def add(self, adapter_id: int, a: torch.Tensor, u: torch.Tensor) -> None:
        self.factors[adapter_id] = (a, u)
        self._stacks = self._cat = None

    def remove(self, adapter_id: int) -> None:
        self.factors.pop(adapter_id, None)
        self._stacks = self._cat = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        segments = [(i, r) for i, r in self.rows.segments if i in self.factors]
        if not segments:
            return y
        if self.rows.ids is not None and len(segments) < BMM_MIN and self._masked_fits():
            return y + self._masked(x)
        if len(segments) >= BMM_MIN and self.rows.ids is not None:
            return y + self._gathered(x)
        for i, r in segments:
            a, u = self.factors[i]
            if r is None:
                y = y + F.linear(F.linear(x, a.to(x.dtype)), u.to(x.dtype))
            else:
                d = F.linear(F.linear(x.index_select(0, r), a.to(x.dtype)), u.to(x.dtype))
                # y[r] += d as a gather, add and copy: r's rows are distinct, so the same single add per element as
                # index_add_, whose CPU kernel (a scatter-add) cost ~15% of a 16-row decode step
                y.index_copy_(0, r, y.index_select(0, r) + d)
        return y

    def _masked_fits(self) -> bool:
        return sum(a.shape[0] for a, _ in self.factors.values()) <= MASKED_RANK

    def _masked(self, x: torch.Tensor) -> torch.Tensor:
        """Every row's update in two matmuls over all adapters' factors side by side: x A_all^T, each row's
        columns of other adapters zeroed (base rows: all), times U_all^T. Zero terms add nothing, so each row gets
        its own adapter's sum, as LoRALinear's own zero-padded update matrix does; 2 matmuls a layer instead of 2
        per adapter with a gather and a copy each (which under passive OpenMP waiting cost ~30 us apiece). Under
        bfloat16/float16 the two small products run in fp32 (a [16, 32] x [32, 960] bfloat16 matmul took ~390 us,
        the fp32 one ~60), then the update is cast back."""
        dtype = torch.float32 if x.dtype in (torch.bfloat16, torch.float16) else x.dtype
        if self._cat is None or self._cat[0].dtype != dtype:
            ids = sorted(self.factors)
            A = torch.cat([self.factors[i][0] for i in ids]).to(dtype)  # (sum R, in)
            U = torch.cat([self.factors[i][1] for i in ids], dim=1).to(dtype)  # (out, sum R)
            owner = torch.cat([torch.full((self.factors[i][0].shape[0],), i, device=A.device) for i in ids])
            self._cat = (A, U, owner)
        A, U, owner = self._cat
        keep = (self.rows.ids[:, None] == owner).to(dtype)  # (B, sum R)
        xa = F.linear(x.to(dtype), A) * (keep if x.dim() == 2 else keep[:, None])  # (B, [T,] sum R)
        return F.linear(xa, U).to(x.dtype)  # (B, [T,] out)

    def _gathered(self, x: torch.Tensor) -> torch.Tensor:
        """Every row's update in one bmm over the rank-padded stacks (row of stack 0 is zeros: base rows)."""
        if self._stacks is None:
            ids = sorted(self.factors)
            R = max(a.shape[0] for a, _ in self.factors.values())
            a0, u0 = next(iter(self.factors.values()))
            A = a0.new_zeros(len(ids) + 1, R, a0.shape[1])  # (N+1, R, in)
            U = u0.new_zeros(len(ids) + 1, u0.shape[0], R)  # (N+1, out, R)
            for k, i in enumerate(ids, start=1):
                a, u = self.factors[i]
                A[k, : a.shape[0]], U[k, :, : u.shape[1]] = a, u
            index = torch.zeros(max(ids) + 1, dtype=torch.long, device=A.device)
            index[torch.tensor(ids, device=A.device)] = torch.arange(1, len(ids) + 1, device=A.device)
            self._stacks = (A, U, index)
        A, U, index = self._stacks
        ids = self.rows.ids.clamp(max=index.shape[0] - 1)
        slot = torch.where(self.rows.ids < index.shape[0], index[ids], 0)  # (B,) stack row of each row
        x3 = x if x.dim() == 3 else x[:, None]  # (B, T, in)
        d = torch.bmm(torch.bmm(x3, A[slot].transpose(1, 2).to(x.dtype)), U[slot].transpose(1, 2).to(x.dtype))
        return d if x.dim() == 3 else d[:, 0]  # (B, T, out) or (B, out)


def lora_factors(base: GPT, loaded: GPT) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
    """{module path: (A, scaling * B)} when `loaded` (a shared copy of `base` with an adapter applied) differs from the
    base only by plain LoRA layers; None when the adapter needs its own forward (any other change)."""
    if loaded.virtual is not None:
        return None
    base_modules = dict(base.named_modules())
    lora = {n: m for n, m in loaded.named_modules() if isinstance(m, LoRALinear)}
    for name, m in loaded.named_modules():
        if name in lora:
            if m.lora_magnitude is not None or m.merged:
                return None
        elif any(name.startswith(p + ".") for p in lora):
            continue  # a LoRALinear's own dropout
        elif name not in base_modules or type(m) is not type(base_modules[name]):
            return None
    base_params = dict(base.named_parameters())
    for name, p in loaded.named_parameters():
        owner = name.rpartition(".")[0]
        if owner in lora and name.rpartition(".")[2] in ("lora_A", "lora_B"):
            continue
        b = base_params.get(name)
        if b is None or (p is not b and not torch.equal(p, b)):  # a new tensor, or a small one loaded in place
            return None
    return {n: (m.lora_A.detach(), m.update_matrix().detach()) for n, m in lora.items()}


def load_onto_copy(pristine: nn.Module, path: Path, checkpoint_dir: Path) -> tuple[nn.Module, dict]:
    """(shared copy of the base with the adapter at `path` applied unmerged, its manifest)."""
    model = shared_copy(pristine)
    manifest = load_any_adapter(model, path, checkpoint_dir)
    return model.eval(), manifest


def install_lora(served: GPT, rows: LoRARows, adapter_id: int,
                 factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Add a shared adapter's factors to the served model, wrapping each adapted layer once in a MultiLoRALinear."""
    for path, (a, u) in factors.items():
        parent_name, _, attr = path.rpartition(".")
        parent = served.get_submodule(parent_name) if parent_name else served
        layer = getattr(parent, attr)
        if not isinstance(layer, MultiLoRALinear):
            layer = MultiLoRALinear(layer, rows)
            setattr(parent, attr, layer)
        layer.add(adapter_id, a, u)


def uninstall_lora(served: GPT, adapter_id: int) -> None:
    for m in served.modules():
        if isinstance(m, MultiLoRALinear):
            m.remove(adapter_id)
