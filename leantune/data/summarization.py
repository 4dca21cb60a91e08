"""Summarization pairs (dialogue/document -> summary) in the samsum, cnn_dailymail or xsum layouts.

Two steps, kept apart so that both model kinds share the first:
1. row -> record (`Summarization.convert`): an instruction record {instruction, input: the source, output: the
   summary}. For samsum (`id`, `dialogue`, `summary`) the instruction is flan-t5's: "Summarize the following
   conversation." (the `id` field is not needed: a sample points back at its file:line).
2a. decoder models: the record goes through the prompt style like any instruction record (the user turn is
    "Summarize the following conversation.\\n\\n{dialogue}", the reply is the summary), and `sft.py` masks the prompt,
    supervises the summary + EOS and applies the truncation policy, counting what it drops or cuts.
2b. seq2seq models: `seq2seq_pair(record)` gives the encoder text and the decoder target. For samsum that is exactly
    flan-t5's prompt, "Summarize the following conversation.\\n\\n{dialogue}\\n\\nSummary: ", and the summary. (The
    cue "Summary: " stands where a decoder's prompt style puts its own reply marker.)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from leantune.data.base import InstructionDataModule
from leantune.data.errors import RowError
from leantune.data.json_data import data_files
from leantune.data.readers import read_examples, require_text
from leantune.data.seq2seq import record_pair
from leantune.data.sft import Example

# source field -> default instruction (samsum: dialogue/summary, cnn_dailymail: article/highlights, xsum: document)
SOURCES = {"dialogue": "Summarize the following conversation.", "article": "Summarize the following news article.",
           "document": "Summarize the following document.", "text": "Summarize the following text."}
TARGETS = ("summary", "highlights")
SUMMARY_CUE = "\n\nSummary: "
"""Ends a seq2seq source text: flan-t5's samsum prompt is "{instruction}\\n\\n{dialogue}\\n\\nSummary: "."""


def seq2seq_pair(record: Mapping[str, Any], cue: str = SUMMARY_CUE) -> tuple[str, str]:
    """(encoder input text, decoder target text) of an instruction record: the instruction and its input joined by a
    blank line, then `cue`; and the output. Works for any {instruction, input?, output} record (JSON data too; pass
    cue="" there, the cue is the summarization prompt's)."""
    return record_pair(record, cue)


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
    """The summarization instruction (default: one matching the source field, e.g. 'Summarize the following conversation.')."""

    seq2seq_cue: ClassVar[str] = SUMMARY_CUE

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
