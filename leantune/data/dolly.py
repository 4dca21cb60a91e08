"""Databricks Dolly 15k: `{instruction, context, response, category}` JSON Lines; context becomes the input."""

from __future__ import annotations

from dataclasses import dataclass

from leantune.data.readers import optional_text, read_examples, require_text
from leantune.data.remote import DownloadedDataModule
from leantune.data.sft import Example

URL = "https://huggingface.co/datasets/databricks/databricks-dolly-15k/resolve/main/databricks-dolly-15k.jsonl"
FILENAME = "databricks-dolly-15k.jsonl"


def dolly_row(row: dict) -> dict:
    return {"instruction": require_text(row, "instruction"), "input": optional_text(row, "context"),
            "output": require_text(row, "response")}


@dataclass
class Dolly(DownloadedDataModule):
    """Dolly 15k human-written instruction data, downloaded into the cache."""

    def load_examples(self) -> tuple[list[Example], list[Example] | None]:
        path = self.fetch(URL, "dolly", FILENAME)
        return read_examples(path, dolly_row, self.skips, '{"instruction": ..., "context": ..., "response": ...}'), None
