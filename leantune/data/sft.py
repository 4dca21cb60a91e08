"""Supervised-finetuning samples: encode rendered segments, mask the prompt, pre-shift the labels, apply the
truncation policy. Every sample that leaves here has at least one supervised token.

Labels contract (the training loop relies on it): `labels[t]` is the target of the logits at position t, i.e.
`input_ids[t + 1]` of the same sample, or -100 where not supervised. The last position is always -100, so a
packed row never predicts the next sample's first token.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jinja2.exceptions import TemplateError
from tqdm import tqdm

from leantune.data.errors import DataError, Skips
from leantune.data.prompts import PromptStyle, Segment

IGNORE_INDEX = -100
Truncation = Literal["error", "truncate_response", "drop"]
TOO_LONG_FIX = ("Raise --train.max_seq_length, or set --data.truncation truncate_response (cut the reply) or "
                "drop (skip such samples)")
ROLE_ORDER_FIX = ("Reorder or merge the turns (start with a user turn, then alternate user/assistant; join consecutive "
                  "turns of one role), or pass a named --prompt_style such as chatml, which accepts any order")


@dataclass(frozen=True)
class Example:
    """One source row, normalised: a record for a prompt style, and where it came from."""

    record: dict[str, Any]
    path: str
    line: int
    sample_id: int

    @property
    def origin(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass
class Sample:
    """A tokenized training sample. `full_length` is its length before truncation (for statistics)."""

    input_ids: torch.Tensor  # (T,) int32
    labels: torch.Tensor  # (T,) int32, pre-shifted, -100 = not supervised
    sample_id: int
    origin: str = ""
    full_length: int = 0

    def __len__(self) -> int:
        return int(self.input_ids.numel())

    @property
    def n_supervised(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


def encode_segments(tokenizer: Any, segments: Sequence[Segment], mask_prompt: bool = True) -> tuple[list[int], list[bool]]:
    """Token ids of the segments and, per token, whether it is a training target.

    The first segment gets the checkpoint's BOS rule (bos=None: at most one BOS), the others none. A supervised
    segment (a reply) that does not already end in an EOS id gets the tokenizer's EOS appended, supervised.
    """
    eos_ids = set(tokenizer.eos_ids)
    ids: list[int] = []
    target: list[bool] = []
    for k, seg in enumerate(segments):
        enc = tokenizer.encode(seg.text, bos=None if k == 0 else False)
        if seg.supervised and not (enc and enc[-1] in eos_ids):
            enc = [*enc, tokenizer.eos_id]
        ids += enc
        target += [seg.supervised or not mask_prompt] * len(enc)
    return ids, target


def shift_labels(ids: Sequence[int], target: Sequence[bool]) -> list[int]:
    """labels[t] = ids[t+1] where token t+1 is a target, else -100; the last label is -100."""
    return [ids[t + 1] if target[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)] + [IGNORE_INDEX]


def make_sample(ids: Sequence[int], labels: Sequence[int], sample_id: int, origin: str = "",
                full_length: int | None = None) -> Sample:
    return Sample(torch.tensor(ids, dtype=torch.int32), torch.tensor(labels, dtype=torch.int32), sample_id, origin,
                  len(ids) if full_length is None else full_length)


def tokenize_example(example: Example, style: PromptStyle, tokenizer: Any, max_seq_length: int, skips: Skips,
                     mask_prompt: bool = True, truncation: Truncation = "error") -> Sample | None:
    """One Example -> Sample, or None when the policy drops it (counted in `skips`)."""
    skips.seen += 1
    try:
        segments = style.render_sft(example.record)
    except (KeyError, TypeError, ValueError, TemplateError) as e:
        skips.invalid(render_error(example, e))
        return None
    if mask_prompt:
        while segments and not segments[-1].supervised:
            segments = segments[:-1]  # text after the last reply trains nothing
    ids, target = encode_segments(tokenizer, segments, mask_prompt)
    full = len(ids)
    if 0 < max_seq_length < full:
        prompt_len = target.index(True) if True in target else full
        problem = f"sample is {full} tokens (prompt {prompt_len}), longer than max_seq_length {max_seq_length}"
        if truncation == "error":
            skips.invalid(DataError.at(example.path, example.line, problem, TOO_LONG_FIX))
            return None
        if truncation == "drop":
            skips.too_long(full, max_seq_length, example.origin, dropped=True)
            return None
        ids, target = ids[:max_seq_length], target[:max_seq_length]
    labels = shift_labels(ids, target)
    if all(x == IGNORE_INDEX for x in labels):
        if full > len(ids):
            skips.count(f"prompt fills max_seq_length {max_seq_length}, nothing left to train on", example.origin)
        else:
            skips.invalid(DataError.at(example.path, example.line, "no supervised tokens in this sample",
                                       "Give the row a non-empty reply (assistant turn)"))
        return None
    if full > len(ids):
        skips.too_long(full, max_seq_length, example.origin, dropped=False)
    return make_sample(ids, labels, example.sample_id, example.origin, full)


def render_error(example: Example, error: Exception) -> DataError:
    """Why a row could not be rendered. A chat template that rejects a conversation (most require user/assistant
    turns alternating from a user turn) is reported as the turn that breaks the order, not as a template fault."""
    messages = example.record.get("messages")
    problem = role_order_problem(messages) if isinstance(messages, list) else None
    if problem is not None:
        return DataError.at(example.path, example.line, f"the chat template cannot render this conversation: {problem}",
                            ROLE_ORDER_FIX)
    return DataError.at(example.path, example.line, f"cannot render this row ({error})",
                        "Check the row's fields or pick another --prompt_style")


def role_order_problem(messages: Sequence[Any]) -> str | None:
    """The first turn that breaks "optional system, then user/assistant alternating from user", or None."""
    roles = [m.get("role") if isinstance(m, dict) else None for m in messages]
    start = 1 if roles[:1] == ["system"] else 0
    for i in range(start, len(roles)):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if roles[i] == expected:
            continue
        if i == start:
            after = " (after the system turn)" if start else ""
            return f"turn {i} is {roles[i]!r}, but a conversation must start with a 'user' turn{after}"
        return f"turn {i} is {roles[i]!r} right after turn {i - 1} ({roles[i - 1]!r}); roles must alternate"
    return None


def tokenize_examples(examples: Sequence[Example], style: PromptStyle, tokenizer: Any, max_seq_length: int,
                      skips: Skips, mask_prompt: bool = True, truncation: Truncation = "error") -> list[Sample]:
    out = []
    quiet = len(examples) < 5000 or not sys.stderr.isatty()
    for ex in tqdm(examples, desc="tokenizing", unit="sample", disable=quiet, leave=False):
        sample = tokenize_example(ex, style, tokenizer, max_seq_length, skips, mask_prompt, truncation)
        if sample is not None:
            out.append(sample)
    return out


class SFTDataset(torch.utils.data.Dataset):
    """Tokenized samples in memory (int32 tensors), indexable by position."""

    def __init__(self, samples: list[Sample]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Sample:
        return self.samples[i]

    @property
    def lengths(self) -> list[int]:
        return [len(s) for s in self.samples]
