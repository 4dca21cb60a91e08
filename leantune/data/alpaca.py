"""Stanford Alpaca and its variants: `{instruction, input, output}` rows."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from leantune.data.errors import DataError, RowError, Skips
from leantune.data.readers import optional_text, read_examples, require_text
from leantune.data.remote import DownloadedDataModule
from leantune.data.sft import Example

# version -> (URL, file name). alpaca-gpt4 is the authors' JSON release (vicgalle/alpaca-gpt4 on the Hub holds
# the same rows as parquet); alpaca-2k exists only as parquet and needs `pyarrow`.
URLS = {
    "alpaca": ("https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json",
               "alpaca_data.json"),
    "alpaca-cleaned": ("https://huggingface.co/datasets/yahma/alpaca-cleaned/resolve/main/alpaca_data_cleaned.json",
                       "alpaca_data_cleaned.json"),
    "alpaca-gpt4": ("https://raw.githubusercontent.com/Instruction-Tuning-with-GPT-4/GPT-4-LLM/main/data/"
                    "alpaca_gpt4_data.json", "alpaca_gpt4_data.json"),
    "alpaca-2k": ("https://huggingface.co/datasets/mhenrichsen/alpaca_2k_test/resolve/main/alpaca_2000.parquet",
                  "alpaca_2000.parquet"),
}


def alpaca_row(row: dict) -> dict:
    """An Alpaca-layout row as a record (input optional)."""
    return {"instruction": require_text(row, "instruction"), "input": optional_text(row, "input"),
            "output": require_text(row, "output")}


@dataclass
class Alpaca(DownloadedDataModule):
    """Alpaca instruction data (52k rows; cleaned, GPT-4 and 2k variants), downloaded into the cache."""

    version: Literal["alpaca", "alpaca-cleaned", "alpaca-gpt4", "alpaca-2k"] = "alpaca"
    """Which release: alpaca (original 52k), alpaca-cleaned, alpaca-gpt4 (GPT-4 answers), alpaca-2k (2k subset)."""

    def load_examples(self) -> tuple[list[Example], list[Example] | None]:
        url, filename = URLS[self.version]
        path = self.fetch(url, self.version, filename)
        if path.suffix == ".parquet":
            return parquet_examples(path, alpaca_row, self.skips), None
        return read_examples(path, alpaca_row, self.skips), None


def parquet_examples(path: Path, convert, skips: Skips) -> list[Example]:
    """Rows of a parquet file (line = row number, 1-based), via pyarrow when it is installed."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow. `pip install pyarrow`, or convert the file to JSON "
                        "Lines and use --data JSON --data.json_path FILE", path=path) from None
    out = []
    for i, row in enumerate(pq.read_table(path).to_pylist()):
        try:
            out.append(Example(convert(row), str(path), i + 1, i))
        except RowError as e:
            skips.invalid(DataError.at(path, i + 1, e.problem, e.fix))
    return out
