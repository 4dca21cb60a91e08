"""Read JSON / JSON Lines / text files with the line number of every row, so errors can point at it."""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from leantune.data.errors import DataError, RowError, Skips
from leantune.data.sft import Example

UTF8_FIX = "Re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 in > out`)"


def read_text(path: Path) -> str:
    """The whole file as text; a non-UTF-8 byte is reported with its line."""
    return _decode(path, _read_bytes(path))


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError.at(path, line, f"not valid UTF-8 (byte 0x{data[e.start]:02x})", UTF8_FIX) from None


def missing_file_error(path: Path, option: str | None = None) -> DataError:
    """Why `path` cannot be read as a data file, truthfully: missing, or there but not a regular file (a FIFO, a
    device such as /dev/zero, a socket: reading one would block or never end)."""
    where = f" (from {option})" if option else ""
    if path.exists() and not path.is_dir():
        return DataError(f"{path}: is not a regular file (a FIFO, device or socket){where}; give a .json or .jsonl "
                         "file.", path=path)
    return DataError(f"{path}: no such file{' or folder' if option else ''}{where}. Check the path (a folder needs "
                     "train/val files inside).", path=path)


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise missing_file_error(path)
    data = path.read_bytes()
    if data.startswith(codecs.BOM_UTF8):  # Windows editors write one; it is not part of the JSON
        data = data[len(codecs.BOM_UTF8):]
    if not data.strip():
        raise DataError.at(path, 1, "empty file", "Give a file with at least one row")
    return data


def iter_json_rows(path: Path, skips: Skips | None = None) -> Iterator[tuple[int, Any]]:
    """(line, value) for each row of a JSON list file or a JSON Lines file (detected from the first character).

    A malformed JSON Lines row or a non-UTF-8 line is one bad row (skippable); a broken JSON list is fatal.
    """
    data = _read_bytes(path)
    if data.lstrip()[:1] == b"[":
        yield from _json_list_rows(path, data)
    else:
        yield from _jsonl_rows(path, data, skips)


def _json_list_rows(path: Path, data: bytes) -> Iterator[tuple[int, Any]]:
    text = _decode(path, data)
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError.at(path, e.lineno, f"malformed JSON ({e.msg}, column {e.colno})",
                           "Fix the syntax, or use JSON Lines (one object per line)") from None
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    line = text.count("\n", 0, pos) + 1
    while True:  # walk the array element by element to know where each one starts
        nxt = _skip_ws(text, pos)
        line += text.count("\n", pos, nxt)
        pos = nxt
        if text[pos] == "]":
            return
        value, end = decoder.raw_decode(text, pos)
        yield line, value
        line += text.count("\n", pos, end)
        pos = _skip_ws(text, end)
        line += text.count("\n", end, pos)
        if text[pos] == ",":
            pos += 1


_WS = re.compile(r"[ \t\r\n]*")


def _skip_ws(text: str, pos: int) -> int:
    return _WS.match(text, pos).end()


def _jsonl_rows(path: Path, data: bytes, skips: Skips | None) -> Iterator[tuple[int, Any]]:
    for line_no, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            _bad(skips, DataError.at(path, line_no, f"not valid UTF-8 (byte 0x{raw[e.start]:02x})", UTF8_FIX))
            continue
        try:
            yield line_no, json.loads(text)
        except json.JSONDecodeError as e:
            if line_no == 1 and _is_single_object(data):
                raise DataError.at(path, 1, "the file is one JSON object, not a list of rows",
                                   "Put the rows in a JSON list [...] or write one object per line") from None
            _bad(skips, DataError.at(path, line_no, f"malformed JSON ({e.msg}, column {e.colno})",
                                     "Each line must be one complete JSON object"))


def _is_single_object(data: bytes) -> bool:
    try:
        return isinstance(json.loads(data), dict)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def _bad(skips: Skips | None, error: DataError) -> None:
    if skips is None:
        raise error
    skips.invalid(error)


def read_examples(path: Path, convert: Callable[[dict], dict], skips: Skips,
                  example: str = '{"instruction": "...", "output": "..."}') -> list[Example]:
    """An Example for every valid row of a JSON/JSONL file; `convert` normalises one row (RowError if invalid).

    sample_id is the row's index in the file (counting invalid rows too), so it points back at the source.
    """
    out = []
    skipped = skips.total
    for index, (line, row) in enumerate(iter_json_rows(path, skips)):
        if not isinstance(row, dict):
            skips.invalid(DataError.at(path, line, f"row is a JSON {_json_type(row)}, not an object",
                                       f"Each row must be an object like {example}"))
            continue
        try:
            out.append(Example(convert(row), str(path), line, index))
        except RowError as e:
            skips.invalid(DataError.at(path, line, e.problem, e.fix))
    if not out:
        raise DataError.at(path, 1, f"no usable rows ({skips.total - skipped} invalid row(s) skipped)",
                           f"Fix the rows; each must be an object like {example}")
    return out


def _json_type(value: Any) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(type(value), "null")


def require_text(row: dict, key: str, fix: str = "", allow_empty: bool = False) -> str:
    """row[key] as a string: missing, non-string or empty values are a RowError naming the field."""
    if key not in row or row[key] is None:
        have = ", ".join(sorted(map(str, row))) or "none"
        raise RowError(f'missing field "{key}" (row has: {have})', fix)
    value = row[key]
    if not isinstance(value, str):
        raise RowError(f'field "{key}" is a {_json_type(value)}, not a string', fix)
    if not allow_empty and not value.strip():
        raise RowError(f'field "{key}" is empty', "Remove the row or fill it (or pass --data.skip_invalid true)")
    return value


def optional_text(row: dict, key: str | None) -> str:
    """row[key] when present (None/missing -> ""); a non-string value is a RowError."""
    if not key or row.get(key) is None:
        return ""
    value = row[key]
    if not isinstance(value, str):
        raise RowError(f'field "{key}" is a {_json_type(value)}, not a string')
    return value


def find_split_file(folder: Path, names: tuple[str, ...]) -> Path | None:
    """The first of `<name>.json` / `<name>.jsonl` that exists in folder."""
    for name in names:
        for ext in (".json", ".jsonl"):
            if (folder / f"{name}{ext}").is_file():
                return folder / f"{name}{ext}"
    return None
