"""`DataModule`: the contract between a dataset and the training loop (connect -> setup -> dataloaders).

Subclasses are dataclasses whose typed, documented fields are the `--data.*` CLI options. Runtime state set by
`connect`/`setup` lives in plain attributes, not fields, so it never shows up as an option.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from torch.utils.data import DataLoader

from leantune.data.collate import pad_id_of, plan_epoch, planned_loader
from leantune.data.errors import DataError, RowError, Skips
from leantune.data.prompts import PromptStyle, prompt_style_for_checkpoint
from leantune.data.seq2seq import record_pair, seq2seq_loader, tokenize_seq2seq
from leantune.data.sft import Example, Sample, SFTDataset, Truncation, tokenize_examples

T = TypeVar("T")
__all__ = ["DEFAULT_MAX_SEQ_LENGTH", "DataError", "DataModule", "InstructionDataModule", "RowError",
           "split_examples"]

DEFAULT_MAX_SEQ_LENGTH = 512
"""The one default sequence length: training (TrainArgs), `data preview` and `connect` all use it."""


@dataclass
class DataModule:
    """Base of every dataset module: splitting, batching (padded, length-grouped or packed) and statistics."""

    val_split_fraction: float = 0.05
    """Fraction of the rows held out for validation when there is no separate validation file."""
    split_seed: int = 42
    """Seed of the train/validation split (the batch order follows the training seed instead)."""
    skip_invalid: bool = False
    """Skip invalid rows with a counted warning instead of stopping at the first one."""
    length_grouping: bool = False
    """Batch samples of similar length together (less padding); ignored when packing."""

    supports_seq2seq: ClassVar[bool] = False
    """Whether the module can feed an encoder-decoder model (records with a source and a target)."""

    def __post_init__(self) -> None:
        self.tokenizer: Any = None
        self.prompt_style: PromptStyle | None = None
        self.max_seq_length, self.batch_size, self.seed, self.packing = DEFAULT_MAX_SEQ_LENGTH, 1, 42, False
        self.decoder_start_id: int | None = None
        self.train_dataset: SFTDataset | None = None
        self.val_dataset: SFTDataset | None = None
        self.skips = Skips(self.skip_invalid)

    # ---- the loop's API --------------------------------------------------------------------------------------
    def connect(self, tokenizer: Any = None, prompt_style: str | PromptStyle | None = None,
                max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH, batch_size: int = 1, seed: int = 42,
                packing: bool = False, decoder_start_id: int | None = None) -> None:
        """Bind the tokenizer and batching settings (prompt style: given, else the checkpoint's own).

        `decoder_start_id` is set for an encoder-decoder model (the recipe knows the model; data does not): samples
        are then seq2seq pairs (`leantune.data.seq2seq`) and batches carry encoder inputs plus decoder labels and
        inputs starting with this token. None (the default) keeps the decoder-only samples.
        """
        if decoder_start_id is not None and not self.supports_seq2seq:
            raise DataError(f"--data {type(self).__name__} cannot feed an encoder-decoder model; use instruction or "
                            "summarization data (JSON, Summarization, ...)")
        if decoder_start_id is not None and packing:
            raise ValueError("--train.packing is for decoder models; an encoder-decoder model trains on padded "
                             "batches (try --data.length_grouping true)")
        self.decoder_start_id = decoder_start_id
        self.tokenizer = tokenizer
        if tokenizer is not None or prompt_style is not None:
            self.prompt_style = prompt_style_for_checkpoint(getattr(tokenizer, "checkpoint_dir", None), tokenizer,
                                                            prompt_style)
        self.max_seq_length, self.batch_size, self.seed, self.packing = max_seq_length, batch_size, seed, packing

    def setup(self) -> None:
        """Read, validate, split and tokenize everything now, so bad data fails before training starts."""
        if self.tokenizer is None:
            raise RuntimeError(f"{type(self).__name__}.setup(): call connect(tokenizer, ...) first")
        self.skips = Skips(self.skip_invalid)
        train, val = self.build_samples()
        if not train or (not val and self.val_split_fraction > 0):
            if not self.skips.dropped.n:
                self.skips.report(type(self).__name__)
            self._raise_empty("training" if not train else "validation")
        self.skips.report(type(self).__name__)
        self.train_dataset, self.val_dataset = SFTDataset(train), SFTDataset(val)

    def build_samples(self) -> tuple[list[Sample], list[Sample]]:
        """Train and validation samples; implemented by each kind of module."""
        raise NotImplementedError

    def _raise_empty(self, split: str) -> None:
        """Refuse an empty split, saying what emptied it (over-long samples first: the fix is a flag)."""
        name, dropped = type(self).__name__, self.skips.dropped
        if dropped.n:
            raise DataError(f"{name}: the {split} split is empty: {'; '.join(self.skips.length_lines())}. "
                            f"Raise --train.max_seq_length (to {dropped.longest} to keep every sample), or set "
                            "--data.truncation truncate_response to cut the replies instead of dropping them.")
        if split == "training":
            raise DataError(f"{name}: the training split is empty"
                            + (f" after skipping {self.skips.total} sample(s)" if self.skips.total else "")
                            + ". Give more data, or check --data.truncation and max_seq_length.")
        raise DataError(f"{name}: the validation split is empty. Give more rows or a validation "
                        "file, or set --data.val_split_fraction 0 to train without validation.")

    def train_dataloader(self, epoch: int = 0) -> DataLoader:
        """Batches of one epoch, in an order fixed by (seed, epoch): rebuild and skip k batches to resume."""
        ds = self._ready(self.train_dataset)
        plan = plan_epoch(ds.lengths, self.batch_size, self.seed, epoch, shuffle=True, packing=self.packing,
                          max_seq_length=self.max_seq_length, length_grouping=self.length_grouping)
        return self._loader(ds.samples, plan, self.packing)

    def val_dataloader(self) -> DataLoader:
        """Validation batches in source order, padded (not packed)."""
        ds = self._ready(self.val_dataset)
        plan = plan_epoch(ds.lengths, self.batch_size, self.seed, 0, shuffle=False)
        return self._loader(ds.samples, plan, False)

    def _loader(self, samples, plan, packed: bool) -> DataLoader:
        if self.decoder_start_id is not None:
            return seq2seq_loader(samples, plan, pad_id_of(self.tokenizer), self.decoder_start_id)
        return planned_loader(samples, plan, pad_id_of(self.tokenizer), packed)

    def stats(self) -> dict[str, Any]:
        """Token-length statistics of both splits, skip counts and truncations."""
        out: dict[str, Any] = {"max_seq_length": self.max_seq_length}
        for name, ds in (("train", self.train_dataset), ("val", self.val_dataset)):
            out[name] = length_stats(ds.samples if ds is not None else [], self.max_seq_length)
        out["skipped"] = dict(self.skips.counts)
        return out

    def _ready(self, ds: SFTDataset | None) -> SFTDataset:
        if ds is None:
            raise RuntimeError(f"{type(self).__name__}: call connect(...) and setup() before asking for data")
        return ds


@dataclass
class InstructionDataModule(DataModule):
    """A module of instruction records or conversations, rendered by a prompt style and masked per turn."""

    mask_prompt: bool = True
    """Train only on replies (assistant turns + EOS); false trains on the prompt tokens too."""
    truncation: Truncation = "drop"
    """A sample longer than max_seq_length: drop (skip it; the count and the length that keeps it are reported),
    truncate_response (cut the reply; counted too), or error (stop, naming file:line)."""

    supports_seq2seq: ClassVar[bool] = True
    seq2seq_cue: ClassVar[str] = ""
    """Text ending an encoder input (`seq2seq_pair`'s cue; Summarization's is flan-t5's "Summary: ")."""

    def load_examples(self) -> tuple[list[Example], list[Example] | None]:
        """(train, val) examples; val None means split `val_split_fraction` off train. Needs no tokenizer."""
        raise NotImplementedError

    def seq2seq_pair(self, record: dict[str, Any]) -> tuple[str, str]:
        """(encoder text, decoder target) of a record for an encoder-decoder model."""
        return record_pair(record, self.seq2seq_cue)

    def build_samples(self) -> tuple[list[Sample], list[Sample]]:
        train, val = self.load_examples()
        if val is None:
            train, val = split_examples(train, self.val_split_fraction, self.split_seed)
        if self.decoder_start_id is not None:
            args2 = (self.seq2seq_pair, self.tokenizer, self.max_seq_length, self.skips, self.truncation)
            return tokenize_seq2seq(train, *args2), tokenize_seq2seq(val, *args2)
        style = self.prompt_style or PromptStyle.from_name("alpaca")
        args = (style, self.tokenizer, self.max_seq_length, self.skips, self.mask_prompt, self.truncation)
        return tokenize_examples(train, *args), tokenize_examples(val, *args)


def split_examples(examples: Sequence[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Deterministic random split (of examples or samples); at least one validation row when fraction > 0 and there are two rows."""
    if not 0 <= fraction < 1:
        raise ValueError(f"val_split_fraction must be in [0, 1), got {fraction}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = round(len(examples) * fraction)
    if fraction > 0 and n_val == 0 and len(examples) >= 2:
        n_val = 1
    val_idx = set(order[:n_val])
    train = [e for i, e in enumerate(examples) if i not in val_idx]
    val = [e for i, e in enumerate(examples) if i in val_idx]
    return train, val


def length_stats(samples: Sequence[Sample], max_seq_length: int) -> dict[str, Any]:
    """count, tokens, min/mean/median/p95/max length, how many exceeded max_seq_length, supervised fraction."""
    if not samples:
        return {"count": 0}
    lengths = sorted(len(s) for s in samples)
    tokens = sum(lengths)
    return {
        "count": len(samples), "tokens": tokens, "min": lengths[0], "mean": round(tokens / len(lengths), 1),
        "median": statistics.median(lengths), "p95": lengths[min(len(lengths) - 1, int(0.95 * len(lengths)))],
        "max": lengths[-1], "over_max_seq_length": sum(s.full_length > max_seq_length for s in samples),
        "truncated": sum(s.full_length > len(s) for s in samples),
        "supervised_fraction": round(sum(s.n_supervised for s in samples) / max(tokens, 1), 4),
    }
