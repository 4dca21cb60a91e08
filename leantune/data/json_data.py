"""Your own instruction data: a JSON list or JSON Lines of `{instruction, input?, output}`, or a folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from leantune.data.base import InstructionDataModule
from leantune.data.errors import DataError
from leantune.data.readers import find_split_file, missing_file_error, optional_text, read_examples, require_text
from leantune.data.sft import Example

TRAIN_NAMES, VAL_NAMES = ("train",), ("val", "validation")


def data_files(path: Path | None, option: str = "--data.json_path") -> tuple[Path, Path | None]:
    """(train file, val file or None) from a file, or from a folder holding train.json(l) and val.json(l)."""
    if path is None:
        raise DataError(f"no data file given: set {option} to a .json/.jsonl file or a folder with train/val files")
    path = Path(path)
    if path.is_dir():
        train = find_split_file(path, TRAIN_NAMES)
        if train is None:
            raise DataError(f"{path}: no train.json or train.jsonl in this folder. Name the training file "
                            "train.json(l) (and optionally val.json(l)), or pass the file itself.", path=path)
        return train, find_split_file(path, VAL_NAMES)
    if not path.is_file():
        raise missing_file_error(path, option)
    return path, None


@dataclass
class JSON(InstructionDataModule):
    """Instruction data from a local JSON/JSONL file, or a folder with train and val files."""

    json_path: Path | None = None
    """A .json list or .jsonl file of {instruction, input?, output} rows, or a folder with train/val files."""
    instruction_key: str = "instruction"
    """Field holding the instruction."""
    input_key: str = "input"
    """Field holding the optional input (context) of the instruction."""
    output_key: str = "output"
    """Field holding the expected response."""
    system_key: str = "system"
    """Optional field holding a per-row system prompt."""

    def convert(self, row: dict) -> dict:
        fix = "Add it, or map your field names with --data.instruction_key / --data.output_key"
        record = {"instruction": require_text(row, self.instruction_key, fix),
                  "input": optional_text(row, self.input_key), "output": require_text(row, self.output_key, fix)}
        system = optional_text(row, self.system_key)
        if system:
            record["system"] = system
        return record

    def load_examples(self) -> tuple[list[Example], list[Example] | None]:
        train, val = data_files(self.json_path)
        hint = f'{{"{self.instruction_key}": ..., "{self.output_key}": ...}}'
        val_examples = read_examples(val, self.convert, self.skips, hint) if val is not None else None
        return read_examples(train, self.convert, self.skips, hint), val_examples
