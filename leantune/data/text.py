"""Plain text files for continued pretraining: tokenized, concatenated, cut into max_seq_length windows.

Every token is a target exactly once: windows overlap by one token, because a window's last position has no
target inside the window (labels contract), so the next window starts there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from leantune.data.base import DataModule, split_examples
from leantune.data.errors import DataError
from leantune.data.readers import read_text
from leantune.data.sft import IGNORE_INDEX, Sample, make_sample


@dataclass
class Text(DataModule):
    """Unlabelled text (a .txt file or a folder of them); every token is trained on."""

    path: Path | None = None
    """A text file, or a folder whose files matching `glob` are used (sorted by name)."""
    glob: str = "*.txt"
    """Pattern of the files to read in a folder (searched recursively)."""

    def files(self) -> list[Path]:
        if self.path is None:
            raise DataError("no text given: set --data.path to a .txt file or a folder of them")
        path = Path(self.path)
        if path.is_dir():
            found = sorted(p for p in path.rglob(self.glob) if p.is_file())
            if not found:
                raise DataError(f"{path}: no files matching {self.glob!r} in this folder. Set --data.glob.", path=path)
            return found
        if not path.is_file():
            raise DataError(f"{path}: no such file or folder (from --data.path).", path=path)
        return [path]

    def build_samples(self) -> tuple[list[Sample], list[Sample]]:
        tok = self.tokenizer
        ids: list[int] = []
        for f in self.files():
            text = read_text(f)
            if not text.strip():
                self.skips.invalid(DataError.at(f, 1, "empty file", "Remove it or give it some text"))
                continue
            ids += tok.encode(text, bos=None, eos=True)  # documents separated by EOS (and BOS when the model uses it)
        return split_examples(chunk(ids, self.max_seq_length), self.val_split_fraction, self.split_seed)


def chunk(ids: list[int], block: int) -> list[Sample]:
    """Windows of `block` tokens with stride block-1; labels pre-shifted, every token predicted once."""
    if block < 2:
        raise ValueError("max_seq_length must be at least 2 for text data")
    out = []
    for k, start in enumerate(range(0, max(len(ids) - 1, 0), block - 1)):
        window = ids[start:start + block]
        if len(window) < 2:
            break
        out.append(make_sample(window, [*window[1:], IGNORE_INDEX], k, f"window {k}"))
    return out
