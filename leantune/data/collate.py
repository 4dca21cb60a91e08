"""Batches: the per-epoch order (shuffled, length-grouped or packed), and the collate that pads or packs rows.

The whole epoch is planned up front from (seed, epoch) only, so the loop can resume at batch k of epoch e by
rebuilding the plan and skipping k batches: no sampler state to save.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from leantune.data.sft import IGNORE_INDEX, Sample

Plan = list[list[list[int]]]  # batches -> rows -> sample indices (one index per row unless packed)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A generator that depends on both seed and epoch (different order every epoch, same on every rerun)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))


def first_fit(order: Sequence[int], lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Greedy first-fit bin packing in the given order: each sample goes to the first row with room.

    A max-segment-tree over rows' remaining capacity finds that row in O(log n).
    """
    n = len(order)
    size = 1
    while size < max(n, 1):
        size *= 2
    tree = [capacity] * (2 * size)  # leaves size..2size-1 = remaining room of row 0..size-1
    rows: list[list[int]] = []
    for i in order:
        need = lengths[i]
        if need > capacity:
            raise ValueError(f"sample of length {need} does not fit max_seq_length {capacity}")
        node = 1
        while node < size:
            node = 2 * node if tree[2 * node] >= need else 2 * node + 1
        row = node - size
        if row == len(rows):
            rows.append([])
        rows[row].append(i)
        tree[node] -= need
        node //= 2
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
    return rows


def plan_epoch(lengths: Sequence[int], batch_size: int, seed: int, epoch: int, shuffle: bool = True,
               packing: bool = False, max_seq_length: int = 2048, length_grouping: bool = False,
               mega_batches: int = 64) -> Plan:
    """The batches of one epoch as lists of rows of sample indices."""
    n = len(lengths)
    g = epoch_generator(seed, epoch)
    order = torch.randperm(n, generator=g).tolist() if shuffle else list(range(n))
    if packing:
        rows = first_fit(order, lengths, max_seq_length)
        return [rows[s:s + batch_size] for s in range(0, len(rows), batch_size)]
    if not (length_grouping and shuffle):
        return [[[i] for i in order[s:s + batch_size]] for s in range(0, n, batch_size)]
    batches = []
    span = batch_size * mega_batches
    for m in range(0, n, span):  # sort by length inside each shuffled mega-batch, then shuffle the batches
        mega = sorted(order[m:m + span], key=lambda i: -lengths[i])
        batches += [[[i] for i in mega[s:s + batch_size]] for s in range(0, len(mega), batch_size)]
    return [batches[k] for k in torch.randperm(len(batches), generator=g).tolist()]


def collate_rows(rows: Sequence[Sequence[Sample]], pad_id: int, packed: bool = False) -> dict[str, Any]:
    """Right-padded batch. Packed rows also get position_ids (reset per sample) and segment_ids (1..k, 0 = pad).

    input_ids (B, T) long, labels (B, T) long, attention_mask (B, T) long (1 = real token), sample_ids list[list].
    """
    T = max(sum(len(s) for s in row) for row in rows)
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(B, T, dtype=torch.long)
    position_ids = torch.zeros(B, T, dtype=torch.long)
    segment_ids = torch.zeros(B, T, dtype=torch.long)
    for b, row in enumerate(rows):
        start = 0
        for k, s in enumerate(row, start=1):
            end = start + len(s)
            input_ids[b, start:end] = s.input_ids
            labels[b, start:end] = s.labels
            position_ids[b, start:end] = torch.arange(len(s))
            segment_ids[b, start:end] = k
            start = end
        attention_mask[b, :start] = 1
    batch: dict[str, Any] = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
                             "sample_ids": [[s.sample_id for s in row] for row in rows]}
    if packed:
        batch["position_ids"], batch["segment_ids"] = position_ids, segment_ids
    return batch


class _PlannedBatches(Dataset):
    """Item k is the k-th planned batch (rows of samples), collated by the loader."""

    def __init__(self, samples: Sequence[Sample], plan: Plan) -> None:
        self.samples, self.plan = samples, plan

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, k: int) -> list[list[Sample]]:
        return [[self.samples[i] for i in row] for row in self.plan[k]]


def planned_loader(samples: Sequence[Sample], plan: Plan, pad_id: int, packed: bool) -> DataLoader:
    """A DataLoader over a fixed plan (no sampler state; num_workers=0 keeps it deterministic and cheap)."""
    return DataLoader(_PlannedBatches(samples, plan), batch_size=None, shuffle=False, num_workers=0,
                      collate_fn=lambda rows: collate_rows(rows, pad_id, packed))


def pad_id_of(tokenizer: Any) -> int:
    """tokenizer.pad_id, else its EOS id, else 0 (pad positions are masked out of attention and loss anyway)."""
    for tid in (getattr(tokenizer, "pad_id", None), getattr(tokenizer, "eos_id", None)):
        if tid is not None:
            return int(tid)
    return 0
