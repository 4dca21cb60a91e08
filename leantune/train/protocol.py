"""What the loop needs from a dataset: the typed contract `fit` is written against (leantune.data modules fit it)."""

from __future__ import annotations

from collections.abc import Iterable, Sized
from typing import Protocol, runtime_checkable


class Loader(Iterable[dict], Sized, Protocol):
    """Batches of one pass, each a dict with `input_ids` (B, T) and `labels` (B, T) (-100: not supervised), and
    optionally `attention_mask`, `position_ids`, `segment_ids`, `sample_ids`. A DataLoader or a list fits."""


@runtime_checkable
class TrainingData(Protocol):
    def train_dataloader(self, epoch: int = 0) -> Loader:
        """The batches of `epoch`, in an order fixed by (seed, epoch): resume rebuilds it and skips what was used."""
        ...

    def val_dataloader(self) -> Loader:
        """Validation batches (the same every call)."""
        ...
