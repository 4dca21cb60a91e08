"""Checks of flags that several commands share, run before anything loads: a bad value fails at once with one error
naming its flag, instead of a traceback (or a silent no-op) after the model has loaded."""

from __future__ import annotations

import math
from pathlib import Path

from leantune.models.quantize import check_mode
from leantune.runtime import PRECISIONS, default_device, resolve_precision

SEED_LIMIT = 2**63
"""torch seeds are 64-bit; leantune adds small offsets (epoch, rank) to a seed, so it stays below 2**63."""


def check_threads(threads: int | None) -> None:
    if threads is not None and (isinstance(threads, bool) or threads < 1):
        raise ValueError(f"--threads must be >= 1 (or unset: one per usable CPU), got {threads}")


def check_seed(seed: int, flag: str = "seed") -> None:
    if isinstance(seed, bool) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"--{flag} must be in [0, 2**63), got {seed}")


def check_at_least(flag: str, value: int | None, low: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or isinstance(value, bool) or value < low:
        raise ValueError(f"--{flag} must be >= {low}, got {value}")


def check_model_flags(precision: str | None, quantize: str | None, inference: bool = False) -> None:
    """--precision (for this machine's device) and --quantize, as loading would check them later (`inference`: the
    weight-only decode modes int8/int4 are allowed too)."""
    if precision == "":  # not "unset": an empty value is a mistake (a YAML `precision:` or a shell variable)
        raise ValueError("--precision is empty: give one of " + ", ".join(PRECISIONS) + " or leave it out")
    resolve_precision(precision, default_device())
    check_mode(quantize, inference=inference)


def check_weights(weights: list[float] | None, n_adapters: int) -> None:
    if weights is None:
        return
    if len(weights) != n_adapters:
        raise ValueError(f"--weights has {len(weights)} value(s) for {n_adapters} adapter(s): give one per --adapter")
    bad = [w for w in weights if not math.isfinite(w)]
    if bad:
        raise ValueError(f"--weights must be finite numbers, got {weights}")


def check_folder(flag: str, path: str | Path | None) -> None:
    """An input folder that must exist (its contents are checked by whatever reads it)."""
    if path is None:
        return
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--{flag} {path}: no such folder")
    if not path.is_dir():
        raise NotADirectoryError(f"--{flag} {path} is a file, not a folder")
