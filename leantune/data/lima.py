"""LIMA (1k curated conversations): `{conversations: [user, assistant, user, ...], source}` JSON Lines.

Gated on the Hugging Face Hub: accept its terms there and set HF_TOKEN, or pass --data.local_path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from leantune.data.errors import DataError, RowError
from leantune.data.readers import iter_json_rows
from leantune.data.remote import DownloadedDataModule
from leantune.data.sft import Example

URL = "https://huggingface.co/datasets/GAIR/lima/resolve/main/train.jsonl"


def lima_turns(row: dict) -> list[str]:
    turns = row.get("conversations")
    if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
        raise RowError('field "conversations" must be a list of strings (user, assistant, user, ...)')
    if len(turns) < 2 or not turns[1].strip():
        raise RowError("conversation has no answered turn", "Each row needs at least a question and its answer")
    return turns[: len(turns) // 2 * 2]  # an unanswered last question trains nothing


@dataclass
class LIMA(DownloadedDataModule):
    """LIMA: 1,000 curated prompts and answers, some multi-turn."""

    multiturn: Literal["first", "flatten", "keep"] = "first"
    """Multi-turn rows: first (first exchange only), flatten (every exchange a sample), keep (one conversation,
    every assistant turn supervised)."""

    def load_examples(self) -> tuple[list[Example], list[Example] | None]:
        path = self.fetch(URL, "lima", "train.jsonl")
        out: list[Example] = []
        for index, (line, row) in enumerate(iter_json_rows(path, self.skips)):
            try:
                if not isinstance(row, dict):
                    raise RowError("row is not a JSON object", 'Each row must be like {"conversations": [...]}')
                turns = lima_turns(row)
            except RowError as e:
                self.skips.invalid(DataError.at(path, line, e.problem, e.fix))
                continue
            out += [Example(r, str(path), line, index) for r in self._records(turns)]
        return out, None

    def _records(self, turns: list[str]) -> list[dict]:
        pairs = [(turns[i], turns[i + 1]) for i in range(0, len(turns), 2)]
        if self.multiturn == "keep":
            roles = ["user", "assistant"] * len(pairs)
            return [{"messages": [{"role": r, "content": c} for r, c in zip(roles, turns)]}]
        pairs = pairs if self.multiturn == "flatten" else pairs[:1]
        return [{"instruction": q, "input": "", "output": a} for q, a in pairs if a.strip()]
