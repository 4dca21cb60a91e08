"""Bad input is reported once, clearly, with the file and line: never a deep traceback, never a silent drop."""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path


class DataError(ValueError):
    """A problem with the user's data; the message reads `<path>:<line>: <problem>. <how to fix>`.

    The CLI prints the message alone (no traceback): everything the user needs is in it. It is a ValueError so
    the CLI's existing handler for bad arguments catches it too.
    """

    def __init__(self, message: str, path: str | Path | None = None, line: int | None = None,
                 problem: str | None = None) -> None:
        super().__init__(message)
        self.path, self.line, self.problem = (str(path) if path is not None else None), line, problem

    @classmethod
    def at(cls, path: str | Path, line: int, problem: str, fix: str = "") -> DataError:
        message = f"{path}:{line}: {problem}." + (f" {fix}" if fix else "")
        return cls(message, path=path, line=line, problem=problem)


class RowError(ValueError):
    """A row-level problem raised where the location is unknown; the reader adds path and line."""

    def __init__(self, problem: str, fix: str = "") -> None:
        super().__init__(problem)
        self.problem, self.fix = problem, fix


class Skips:
    """Counts what was skipped and why; raises instead when skipping is not allowed.

    `skip_invalid=False` makes invalid rows fatal (first one raises). Policy drops (truncation="drop") are always
    counted, never fatal. `report()` warns once with the totals so nothing disappears without a number.
    """

    def __init__(self, skip_invalid: bool = False) -> None:
        self.skip_invalid = skip_invalid
        self.counts: Counter[str] = Counter()
        self.first: dict[str, str] = {}

    def invalid(self, error: DataError) -> None:
        """An invalid row: raise, or count it under its problem when `skip_invalid` is on."""
        if not self.skip_invalid:
            raise error
        self.count(error.problem or str(error), str(error))

    def count(self, reason: str, example: str = "") -> None:
        self.counts[reason] += 1
        self.first.setdefault(reason, example)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def report(self, what: str = "data") -> None:
        if not self.counts:
            return
        lines = [f"{what}: skipped {self.total} sample(s):"]
        lines += [f"  {n} x {reason} (first: {self.first[reason]})" for reason, n in self.counts.most_common()]
        warnings.warn("\n".join(lines), stacklevel=2)
