"""Encoder-decoder (seq2seq) samples and batches: the source text goes to the encoder, the target to the decoder.

Used instead of `sft.py`'s decoder samples when the recipe connects a data module for an encoder-decoder model
(`DataModule.connect(..., decoder_start_id=...)`). Per record (`seq2seq_pair`): encoder ids = source + EOS (T5's
tokenizers append it to every input), labels = target + EOS, all supervised. There is no prompt to mask and nothing
to pre-shift: the decoder's inputs are the labels shifted right behind the decoder start token, made at collate time
(`shift_right`, T5's teacher forcing), so a label never sees itself.

`max_seq_length` bounds the source and the target separately (HF's max_source_length / max_target_length). The
truncation policy acts as in the decoder path: error (stop, naming file:line), drop (skip, counted), truncate_response
(cut the over-long part, keeping its EOS last, counted). Batches are right-padded; pad labels are -100.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

from leantune.data.collate import Plan, _PlannedBatches
from leantune.data.errors import DataError, Skips
from leantune.data.prompts import user_content
from leantune.data.sft import IGNORE_INDEX, TOO_LONG_FIX, Example, Truncation

Pair = Callable[[dict[str, Any]], tuple[str, str]]
"""record -> (encoder text, decoder target text), e.g. `record_pair` with a module's cue."""


def record_pair(record: dict[str, Any], cue: str = "") -> tuple[str, str]:
    """(encoder input text, decoder target text) of an {instruction, input?, output} record: the instruction and its
    input joined by a blank line, then `cue`; and the output."""
    return user_content(record) + cue, record["output"]


@dataclass
class Seq2SeqSample:
    """A tokenized seq2seq sample. len() is the longer side (what max_seq_length bounds); `full_length` that length
    before truncation (for statistics)."""

    input_ids: torch.Tensor  # (S,) int32 encoder ids, ending in EOS
    labels: torch.Tensor  # (T,) int32 decoder targets, ending in EOS, all supervised
    sample_id: int
    origin: str = ""
    full_length: int = 0

    def __len__(self) -> int:
        return max(int(self.input_ids.numel()), int(self.labels.numel()))

    @property
    def n_supervised(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


def _with_eos(ids: list[int], eos_id: int, limit: int) -> list[int]:
    """ids + EOS, cut to `limit` tokens with the EOS kept last (limit <= 0: no cut)."""
    ids = ids if ids and ids[-1] == eos_id else [*ids, eos_id]
    return ids if limit <= 0 or len(ids) <= limit else [*ids[:limit - 1], eos_id]


def tokenize_seq2seq_example(example: Example, pair: Pair, tokenizer: Any, max_seq_length: int, skips: Skips,
                             truncation: Truncation = "error") -> Seq2SeqSample | None:
    """One Example -> Seq2SeqSample, or None when the policy drops it or the record has no target (counted)."""
    skips.seen += 1
    if tokenizer.eos_id is None:
        raise DataError("the tokenizer has no EOS token: an encoder-decoder target must end in one")
    try:
        source, target = pair(example.record)
    except (KeyError, TypeError) as e:
        skips.invalid(DataError.at(example.path, example.line, f"no source/target pair in this row ({e})",
                                   "An encoder-decoder model needs instruction/input -> output records "
                                   "(conversations are not supported)"))
        return None
    if not target.strip():
        skips.invalid(DataError.at(example.path, example.line, "no supervised tokens in this sample",
                                   "Give the row a non-empty output"))
        return None
    eos = tokenizer.eos_id
    src, tgt = _with_eos(tokenizer.encode(source, bos=False), eos, 0), _with_eos(tokenizer.encode(target, bos=False), eos, 0)
    full = max(len(src), len(tgt))
    if 0 < max_seq_length < full:
        problem = (f"sample is {full} tokens (source {len(src)}, target {len(tgt)}), longer than max_seq_length "
                   f"{max_seq_length}")
        if truncation == "error":
            skips.invalid(DataError.at(example.path, example.line, problem, TOO_LONG_FIX))
            return None
        if truncation == "drop":
            skips.too_long(full, max_seq_length, example.origin, dropped=True)
            return None
        src, tgt = _with_eos(src, eos, max_seq_length), _with_eos(tgt, eos, max_seq_length)
        skips.too_long(full, max_seq_length, example.origin, dropped=False)
    return Seq2SeqSample(torch.tensor(src, dtype=torch.int32), torch.tensor(tgt, dtype=torch.int32),
                         example.sample_id, example.origin, full)


def tokenize_seq2seq(examples: Sequence[Example], pair: Pair, tokenizer: Any, max_seq_length: int, skips: Skips,
                     truncation: Truncation = "error") -> list[Seq2SeqSample]:
    out = []
    for ex in examples:
        sample = tokenize_seq2seq_example(ex, pair, tokenizer, max_seq_length, skips, truncation)
        if sample is not None:
            out.append(sample)
    return out


def shift_right(labels: torch.Tensor, decoder_start_id: int, pad_id: int) -> torch.Tensor:
    """Teacher-forcing decoder inputs (B, T) from labels (B, T): [start, labels[:-1]], -100 replaced by pad (as
    transformers' T5 `_shift_right`)."""
    out = labels.new_full(labels.shape, decoder_start_id)
    out[:, 1:] = labels[:, :-1]
    return out.masked_fill(out == IGNORE_INDEX, pad_id)


def collate_seq2seq(rows: Sequence[Sequence[Seq2SeqSample]], pad_id: int, decoder_start_id: int) -> dict[str, Any]:
    """Right-padded seq2seq batch (one sample per row): input_ids (B, S) and attention_mask (B, S) (1 = real token)
    for the encoder, labels (B, T) (-100 = pad) and decoder_input_ids (B, T) = shift_right(labels), sample_ids."""
    samples = [row[0] for row in rows]
    if any(len(row) != 1 for row in rows):
        raise ValueError("seq2seq batches hold one sample per row (packing is for decoder models)")
    B = len(samples)
    S = max(int(s.input_ids.numel()) for s in samples)
    T = max(int(s.labels.numel()) for s in samples)
    input_ids = torch.full((B, S), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(B, S, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    for b, s in enumerate(samples):
        n, m = int(s.input_ids.numel()), int(s.labels.numel())
        input_ids[b, :n] = s.input_ids
        attention_mask[b, :n] = 1
        labels[b, :m] = s.labels
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "decoder_input_ids": shift_right(labels, decoder_start_id, pad_id),
            "sample_ids": [[s.sample_id] for s in samples]}


def seq2seq_loader(samples: Sequence[Seq2SeqSample], plan: Plan, pad_id: int, decoder_start_id: int) -> DataLoader:
    """A DataLoader over a fixed plan of seq2seq samples (see `collate.planned_loader`)."""
    return DataLoader(_PlannedBatches(samples, plan), batch_size=None, shuffle=False, num_workers=0,
                      collate_fn=lambda rows: collate_seq2seq(rows, pad_id, decoder_start_id))
