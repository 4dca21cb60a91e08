"""Summarization pairs (dialogue/document -> summary) in the samsum, cnn_dailymail or xsum layouts.

Each pair becomes an instruction record: a summarization instruction, the source as input, the summary as
output, so the same prompt styles (and the flan-t5 seq2seq flow: source = prompt, target = output) apply.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from leantune.data.base import InstructionDataModule
from leantune.data.errors import RowError
from leantune.data.json_data import data_files
from leantune.data.readers import read_examples, require_text
from leantune.data.sft import Example

# source field -> default instruction (samsum: dialogue/summary, cnn_dailymail: article/highlights, xsum: document)
SOURCES = {"dialogue": "Summarize the following dialogue.", "article": "Summarize the following news article.",
           "document": "Summarize the following document.", "text": "Summarize the following text."}
TARGETS = ("summary", "highlights")


@dataclass
class Summarization(InstructionDataModule):
    """Local summarization data; the layout (samsum, cnn_dailymail, xsum) is detected from the fields."""

    json_path: Path | None = None
    """A .json/.jsonl file of pairs, or a folder with train and val (or validation) files."""
    source_key: str | None = None
    """Field with the text to summarize (default: dialogue, article, document or text, whichever is present)."""
    target_key: str | None = None
    """Field with the reference summary (default: summary or highlights)."""
    instruction: str | None = None
    """The summarization instruction (default: one matching the source field, e.g. 'Summarize the following dialogue.')."""

    def convert(self, row: dict) -> dict:
        source_key = self.source_key or next((k for k in SOURCES if k in row), None)
        target_key = self.target_key or next((k for k in TARGETS if k in row), None)
        fix = "Set --data.source_key and --data.target_key to your field names"
        if source_key is None or target_key is None:
            missing = "source (dialogue/article/document/text)" if source_key is None else "summary/highlights"
            raise RowError(f"no {missing} field (row has: {', '.join(sorted(row)) or 'none'})", fix)
        instruction = self.instruction or SOURCES.get(source_key, "Summarize the following text.")
        return {"instruction": instruction, "input": require_text(row, source_key, fix),
                "output": require_text(row, target_key, fix)}

    def load_examples(self) -> tuple[list[Example], list[Example] | None]:
        train, val = data_files(self.json_path)
        hint = '{"dialogue": ..., "summary": ...}'
        val_examples = read_examples(val, self.convert, self.skips, hint) if val is not None else None
        return read_examples(train, self.convert, self.skips, hint), val_examples
