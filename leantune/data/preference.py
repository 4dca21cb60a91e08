"""Preference pairs: a prompt with a chosen and a rejected response, for DPO, IPO, ORPO and SimPO.

Rows (JSON or JSON Lines), each normalised to (prompt messages, chosen reply, rejected reply):
- `{"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}`: a message list for a response
  ends with the assistant reply; the messages before it are the prompt (they must agree with `prompt` when both
  are given): the UltraFeedback-binarized layout (`prompt` text, `chosen`/`rejected` as [user, assistant]) is this.
- The Anthropic HH layout: `chosen` and `rejected` are whole transcripts ("\\n\\nHuman: ...\\n\\nAssistant: ...")
  sharing everything up to the last assistant turn.
The prompt is rendered with the prompt style (chat template) exactly as an SFT sample's prompt, the reply as its
supervised turn (with the end-of-turn token). A batch holds the B chosen rows, then the B rejected ones.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from jinja2.exceptions import TemplateError
from torch.utils.data import DataLoader, Dataset

from leantune.data.base import DataModule, split_examples
from leantune.data.chat import ROLES
from leantune.data.collate import pad_id_of, plan_epoch
from leantune.data.demo import Demo
from leantune.data.errors import DataError, RowError, Skips
from leantune.data.json_data import data_files
from leantune.data.prompts import PromptStyle, Segment
from leantune.data.readers import read_examples
from leantune.data.sft import IGNORE_INDEX, Example, Truncation, encode_segments

PAIR_HINT = ('Rows need {"prompt": ..., "chosen": ..., "rejected": ...} (strings or message lists), or the HH '
             'layout {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}')
HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


@dataclass
class PairSample:
    """A tokenized pair: shared prompt ids and the two response ids (each ending in EOS / end of turn)."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    sample_id: int
    origin: str = ""
    full_length: int = 0
    """The longer of the two sequences before truncation."""
    index: int = 0
    """Position in its split (the key of precomputed reference log-probs)."""

    def __len__(self) -> int:
        return len(self.prompt) + max(len(self.chosen), len(self.rejected))

    @property
    def n_supervised(self) -> int:
        """The response tokens of the longer row (statistics read it against `len`)."""
        return max(len(self.chosen), len(self.rejected))


# ---- rows -> (prompt messages, chosen, rejected) -------------------------------------------------------------------
def _messages(value: Any, what: str) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise RowError(f'"{what}" is neither a string nor a message list', PAIR_HINT)
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise RowError(f'"{what}" message {i} is not an object', PAIR_HINT)
        role = ROLES.get(str(m.get("role", m.get("from", ""))).lower())
        content = m.get("content", m.get("value"))
        if role is None:
            raise RowError(f'"{what}" message {i} has unknown role {m.get("role", m.get("from"))!r}',
                           f"Use one of: {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise RowError(f'"{what}" message {i} has no text content', PAIR_HINT)
        out.append({"role": role, "content": content})
    return out


def _response(value: Any, what: str) -> tuple[list[dict[str, str]] | None, str]:
    """(the prompt messages a message-list response carries, or None; the reply text)."""
    if isinstance(value, str):
        return None, value
    msgs = _messages(value, what)
    if not msgs or msgs[-1]["role"] != "assistant":
        raise RowError(f'"{what}" does not end with an assistant message', PAIR_HINT)
    return msgs[:-1], msgs[-1]["content"]


def parse_hh(text: str, what: str) -> list[dict[str, str]]:
    """An Anthropic HH transcript as messages (user/assistant)."""
    parts = HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise RowError(f'"{what}" is not an HH transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...")', PAIR_HINT)
    return [{"role": "user" if who == "Human" else "assistant", "content": body.strip()}
            for who, body in zip(parts[1::2], parts[2::2])]


def convert_pair(row: dict) -> dict:
    """One row as {"messages": prompt messages, "chosen": reply, "rejected": reply}; RowError when unusable."""
    for key in ("chosen", "rejected"):
        if row.get(key) is None:
            have = ", ".join(sorted(map(str, row))) or "none"
            raise RowError(f'missing field "{key}" (row has: {have})', PAIR_HINT)
    if "prompt" not in row and isinstance(row["chosen"], str) and isinstance(row["rejected"], str):
        chosen_msgs, rejected_msgs = parse_hh(row["chosen"], "chosen"), parse_hh(row["rejected"], "rejected")
        row = {"chosen": chosen_msgs, "rejected": rejected_msgs}
    prompt = None
    if "prompt" in row:
        p = row["prompt"]
        prompt = [{"role": "user", "content": p}] if isinstance(p, str) else _messages(p, "prompt")
    (c_prompt, chosen), (r_prompt, rejected) = _response(row["chosen"], "chosen"), _response(row["rejected"], "rejected")
    for implied in (c_prompt, r_prompt):
        if not implied:
            continue
        if prompt is None:
            prompt = implied
        elif implied != prompt:
            raise RowError("chosen and rejected do not share the same prompt", "Give both responses after one prompt")
    if not prompt or prompt[-1]["role"] != "user" or not any(m["content"].strip() for m in prompt):
        raise RowError("the prompt is empty or does not end with a user turn", PAIR_HINT)
    for key, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise RowError(f'the "{key}" response is empty', "Remove the row or fill it (or --data.skip_invalid true)")
    if chosen.strip() == rejected.strip():
        raise RowError("chosen and rejected are the same response, so there is no preference to learn",
                       "Remove the row or fix one response (or --data.skip_invalid true)")
    return {"messages": prompt, "chosen": chosen, "rejected": rejected}


# ---- tokenizing ----------------------------------------------------------------------------------------------------
def split_prompt_reply(segments: Sequence[Segment]) -> tuple[list[Segment], Segment]:
    """The segments before the last supervised one (the prompt, masked) and that one (the reply)."""
    last = max(i for i, s in enumerate(segments) if s.supervised)
    return [Segment(s.text, False) for s in segments[:last]], segments[last]


def encode_reply(tokenizer: Any, text: str) -> list[int]:
    """A reply's ids as `encode_segments` gives a supervised segment after the first: no BOS, EOS appended unless
    the rendered turn already ends in one."""
    ids = tokenizer.encode(text, bos=False)
    return ids if ids and ids[-1] in set(tokenizer.eos_ids) else [*ids, tokenizer.eos_id]


def tokenize_pair(example: Example, style: PromptStyle, tokenizer: Any, max_seq_length: int, skips: Skips,
                  truncation: Truncation) -> PairSample | None:
    """Render and tokenize one pair; apply the truncation policy (counted in `skips`, as SFT's)."""
    skips.seen += 1
    record = example.record
    try:
        prompt_c, reply_c = split_prompt_reply(style.render_sft(
            {"messages": [*record["messages"], {"role": "assistant", "content": record["chosen"]}]}))
        prompt_r, reply_r = split_prompt_reply(style.render_sft(
            {"messages": [*record["messages"], {"role": "assistant", "content": record["rejected"]}]}))
    except (KeyError, TypeError, ValueError, TemplateError) as e:
        skips.invalid(DataError.at(example.path, example.line, f"cannot render this pair ({e})",
                                   "Check the prompt's turns or pick another --prompt_style"))
        return None
    if prompt_c != prompt_r:
        skips.invalid(DataError.at(example.path, example.line, "the prompt style renders the prompt differently for "
                                   "the two responses", "Pick another --prompt_style"))
        return None
    prompt, _ = encode_segments(tokenizer, prompt_c)
    chosen, rejected = encode_reply(tokenizer, reply_c.text), encode_reply(tokenizer, reply_r.text)
    full = len(prompt) + max(len(chosen), len(rejected))
    if 0 < max_seq_length < full:
        problem = f"pair is {full} tokens (prompt {len(prompt)}), longer than max_seq_length {max_seq_length}"
        if len(prompt) >= max_seq_length:
            skips.invalid(DataError.at(example.path, example.line, f"the prompt alone is {len(prompt)} tokens, "
                                       f"filling max_seq_length {max_seq_length}", "Shorten the prompt, raise "
                                       "--train.max_seq_length, or pass --data.skip_invalid true"))
            return None
        if truncation == "error":
            skips.invalid(DataError.at(example.path, example.line, problem, "Raise --train.max_seq_length, or set "
                                       "--data.truncation truncate_response or drop"))
            return None
        if truncation == "drop":
            skips.too_long(full, max_seq_length, example.origin, dropped=True)
            return None
        room = max_seq_length - len(prompt)  # TRL's keep_start: the responses lose their ends
        chosen, rejected = chosen[:room], rejected[:room]
        skips.too_long(full, max_seq_length, example.origin, dropped=False)
    return PairSample(prompt, chosen, rejected, example.sample_id, example.origin, full)


def collate_pairs(pairs: Sequence[PairSample], pad_id: int, split: str = "train") -> dict[str, Any]:
    """2B right-padded rows (chosen, then rejected), labels pre-shifted with -100 outside the responses."""
    rows = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
    T = max(len(a) + len(b) for a, b in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, (prompt, reply) in enumerate(rows):
        ids = prompt + reply
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attention_mask[i, :len(ids)] = 1
        if reply:
            labels[i, len(prompt) - 1:len(ids) - 1] = torch.tensor(reply)  # labels[t] = ids[t + 1]
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "pairs": len(pairs),
            "pair_index": torch.tensor([p.index for p in pairs], dtype=torch.long), "split": split,
            "sample_ids": [[p.sample_id] for p in pairs]}


class _PlannedPairs(Dataset):
    def __init__(self, samples: Sequence[PairSample], plan) -> None:
        self.samples, self.plan = samples, plan

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, k: int) -> list[PairSample]:
        return [self.samples[i] for row in self.plan[k] for i in row]


def pair_loader(samples: Sequence[PairSample], plan, pad_id: int, split: str) -> DataLoader:
    return DataLoader(_PlannedPairs(samples, plan), batch_size=None, shuffle=False, num_workers=0,
                      collate_fn=lambda pairs: collate_pairs(pairs, pad_id, split))


# ---- modules -------------------------------------------------------------------------------------------------------
@dataclass
class PreferenceDataModule(DataModule):
    """Base of pair modules: batches of chosen/rejected rows instead of SFT samples."""

    truncation: Truncation = "drop"
    """A pair longer than max_seq_length: drop (skip, counted), truncate_response (cut both responses, counted),
    or error (stop, naming file:line). A prompt alone that fills max_seq_length is always an error naming its row."""

    is_preference: ClassVar[bool] = True

    def load_pairs(self) -> tuple[list[Example], list[Example] | None]:
        """(train, val) pair examples (records from `convert_pair`); val None: split val_split_fraction off."""
        raise NotImplementedError

    def connect(self, *args, **kwargs) -> None:
        if kwargs.get("packing"):
            raise ValueError("--train.packing is for SFT samples; preference pairs train on padded batches")
        super().connect(*args, **kwargs)

    def build_samples(self) -> tuple[list[PairSample], list[PairSample]]:
        train, val = self.load_pairs()
        if val is None:
            train, val = split_examples(train, self.val_split_fraction, self.split_seed)
        style = self.prompt_style or PromptStyle.from_name("alpaca")
        out = []
        for examples in (train, val):
            samples = [s for ex in examples if (s := tokenize_pair(ex, style, self.tokenizer, self.max_seq_length,
                                                                    self.skips, self.truncation)) is not None]
            for i, s in enumerate(samples):
                s.index = i
            out.append(samples)
        return out[0], out[1]

    def train_dataloader(self, epoch: int = 0) -> DataLoader:
        ds = self._ready(self.train_dataset)
        plan = plan_epoch(ds.lengths, self.batch_size, self.seed, epoch, shuffle=True,
                          max_seq_length=self.max_seq_length, length_grouping=self.length_grouping)
        return pair_loader(ds.samples, plan, pad_id_of(self.tokenizer), "train")

    def val_dataloader(self) -> DataLoader:
        ds = self._ready(self.val_dataset)
        return pair_loader(ds.samples, plan_epoch(ds.lengths, self.batch_size, self.seed, 0, shuffle=False),
                           pad_id_of(self.tokenizer), "val")


@dataclass
class Preference(PreferenceDataModule):
    """Preference pairs from a local JSON/JSONL file (or a folder with train/val files): prompt/chosen/rejected as
    strings or message lists, the Anthropic HH layout, or UltraFeedback-binarized rows."""

    json_path: Path | None = None
    """A .json list or .jsonl file of pairs, or a folder with train/val files."""

    def load_pairs(self) -> tuple[list[Example], list[Example] | None]:
        train, val = data_files(self.json_path)
        hint = '{"prompt": ..., "chosen": ..., "rejected": ...}'
        val_examples = read_examples(val, convert_pair, self.skips, hint) if val is not None else None
        return read_examples(train, convert_pair, self.skips, hint), val_examples


def wrong_answer(record: dict, r: random.Random) -> str:
    """A plausible wrong answer to a Demo record: the right format, the wrong content."""
    task, answer = record["task"], record["output"]
    if task in ("add", "subtract", "count"):
        n = int(answer)
        return str(n + r.choice((-1, 1, 10)) if n > 1 else n + 1)
    if task == "convert":
        return str(int(answer) // 10)
    if task == "uppercase":
        return answer.lower().capitalize()
    items = answer.split()
    if task == "sort":
        i = r.randrange(len(items) - 1)
        items[i], items[i + 1] = items[i + 1], items[i]
        return " ".join(items)
    return " ".join(reversed(items))  # reverse: the words in their original order


@dataclass
class DemoPreference(PreferenceDataModule):
    """Pairs from the built-in Demo tasks: the right answer (chosen) against a plausible wrong one (rejected); the
    held-out Demo test set scores exact match as for Demo."""

    num_train: int = 800
    """Training pairs."""
    num_val: int = 100
    """Validation pairs."""
    num_test: int = 100
    """Held-out test prompts (exact match before/after), the same as Demo's."""
    task_seed: int = 0
    """Seed of the task generator (the same splits as Demo with this seed)."""
    tasks: str | None = None
    """Comma-separated subset of Demo's tasks (default: all)."""

    def _demo(self) -> Demo:
        return Demo(num_train=self.num_train, num_val=self.num_val, num_test=self.num_test, task_seed=self.task_seed,
                    tasks=self.tasks)

    def test_set(self) -> list[dict]:
        return self._demo().test_set()

    score = staticmethod(Demo.score)

    def load_pairs(self) -> tuple[list[Example], list[Example] | None]:
        train, val = self._demo().load_examples()
        r = random.Random(self.task_seed)

        def pairs(examples: list[Example]) -> list[Example]:
            return [Example({"messages": [{"role": "user", "content": e.record["instruction"]}],
                             "chosen": e.record["output"], "rejected": wrong_answer(e.record, r)},
                            e.path, e.line, e.sample_id) for e in examples]

        return pairs(train), pairs(val or [])

