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
    """Counts what was skipped or cut and why; raises instead when skipping is not allowed.

    `skip_invalid=False` makes invalid rows fatal (first one raises). Length-policy drops and reply cuts are always
    counted, never fatal. `report()` warns once with the totals so nothing disappears without a number.
    """

    def __init__(self, skip_invalid: bool = False) -> None:
        self.skip_invalid = skip_invalid
        self.counts: Counter[str] = Counter()
        self.first: dict[str, str] = {}
        self.seen = 0
        """Samples offered to the length policy (the "of N" of the report)."""
        self.dropped = LengthTally()
        self.cut = LengthTally()

    def invalid(self, error: DataError) -> None:
        """An invalid row: raise, or count it under its problem when `skip_invalid` is on."""
        if not self.skip_invalid:
            raise error
        self.count(error.problem or str(error), str(error))

    def count(self, reason: str, example: str = "") -> None:
        self.counts[reason] += 1
        self.first.setdefault(reason, example)

    def too_long(self, length: int, max_seq_length: int, origin: str, dropped: bool) -> None:
        """A sample over max_seq_length that was dropped, or kept with its reply cut."""
        (self.dropped if dropped else self.cut).add(length, max_seq_length, origin)
        if dropped:
            self.count(drop_reason(max_seq_length), origin)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def length_lines(self, what: str = "") -> list[str]:
        """One line per length policy that acted, naming the longest sample and the flag that keeps it whole."""
        lines, what = [], f"{what}: " if what else ""
        if self.dropped.n:
            d = self.dropped
            lines.append(f"{what}dropped {d.n} of {self.seen} samples longer than {d.limit} tokens; "
                         f"--train.max_seq_length {d.longest} keeps them (longest: {d.longest_origin})")
        if self.cut.n:
            c = self.cut
            lines.append(f"{what}cut the reply of {c.n} of {self.seen} samples longer than {c.limit} tokens; "
                         f"--train.max_seq_length {c.longest} keeps them whole (longest: {c.longest_origin})")
        return lines

    def report(self, what: str = "data") -> None:
        lines = self.length_lines(what)
        invalid = [(reason, n) for reason, n in self.counts.most_common() if not reason.startswith(DROP_PREFIX)]
        if invalid:
            lines.append(f"{what}: skipped {sum(n for _, n in invalid)} sample(s):")
            lines += [f"  {n} x {reason} (first: {self.first[reason]})" for reason, n in invalid]
        if lines:
            warnings.warn("\n".join(lines), stacklevel=2)


DROP_PREFIX = "longer than max_seq_length"


def drop_reason(max_seq_length: int) -> str:
    return f"{DROP_PREFIX} {max_seq_length} (truncation=drop)"


class LengthTally:
    """How many samples exceeded the limit, and the longest of them (its length says what limit keeps them all)."""

    def __init__(self) -> None:
        self.n, self.limit, self.longest, self.longest_origin = 0, 0, 0, ""

    def add(self, length: int, limit: int, origin: str) -> None:
        self.n += 1
        self.limit = limit
        if length > self.longest:
            self.longest, self.longest_origin = length, origin
