"""LongForm: `{input, output}` rows (the input is the instruction) with its own train/val files."""

from __future__ import annotations

from dataclasses import dataclass

from leantune.data.readers import read_examples, require_text
from leantune.data.remote import DownloadedDataModule
from leantune.data.sft import Example

URL = "https://raw.githubusercontent.com/akoksal/LongForm/main/dataset"


def longform_row(row: dict) -> dict:
    return {"instruction": require_text(row, "input"), "input": "", "output": require_text(row, "output")}


@dataclass
class LongForm(DownloadedDataModule):
    """LongForm long-text generation data (train.json / val.json), downloaded into the cache."""

    def load_examples(self) -> tuple[list[Example], list[Example] | None]:
        hint = '{"input": "<instruction>", "output": ...}'
        train, val = (self.fetch(f"{URL}/{f}", "longform", f, folder=True) for f in ("train.json", "val.json"))
        return read_examples(train, longform_row, self.skips, hint), read_examples(val, longform_row, self.skips, hint)
