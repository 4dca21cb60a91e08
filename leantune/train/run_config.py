"""The run configuration saved beside each checkpoint (`run.json`) and compared on resume.

A resumed run must be the same run: same base, data, method, batch shape, sequence length, precision,
quantization, optimizer and schedule. Otherwise it crashes on a size mismatch or, worse, silently trains on
another run's checkpoint. Only the fields in RESUME_MAY_DIFFER may change on resume:
- how long and how fast to train: train.epochs, train.max_steps, train.max_tokens, train.max_time (extending a run
  is the point of resuming; the cosine schedule then spans the new length), and the schedule's shape,
  train.warmup_steps and train.min_lr_ratio (the learning rate is a pure function of the step, so changing it
  breaks nothing the checkpoint holds); train.compile and train.activation_checkpointing (same numbers, other
  speed/memory), threads;
- what is logged or saved: train.log_interval, train.logger, train.save_interval, and every eval.* setting;
- where it runs from: out_dir, resume, resume_adapter (only read when a run starts), overwrite;
- how each optimizer step's global batch is cut: world_size (the number of processes) and train.micro_batch_size
  (per process, as typed). Every epoch is planned as one shuffled order of samples (or packed rows) cut into batches
  of micro_batch_size x world_size rows (`batch_rows`), so a position in the epoch is a number of rows whatever the
  cut: `batch_position` carries it over, and `--devices 2 --train.micro_batch_size 2` resumes on one process with
  the same flags (the same global batches, two micro batches per step). Not with --data.length_grouping, whose
  plan depends on the batch size: there the rows per batch must stay the checkpoint's.
"""

from __future__ import annotations

import dataclasses
import json
import math
from enum import Enum
from pathlib import Path, PurePath
from typing import Any

from leantune.checkpoint.io import write_json

RUN_FILE = "run.json"
RESUME_MAY_DIFFER = frozenset({
    "train.epochs", "train.max_steps", "train.max_tokens", "train.max_time", "train.warmup_steps",
    "train.min_lr_ratio", "train.compile",
    "train.activation_checkpointing", "train.log_interval", "train.logger", "train.save_interval",
    "threads", "out_dir", "resume", "resume_adapter", "overwrite", "world_size", "train.micro_batch_size",
    "batch_rows",
})
RESUME_MAY_DIFFER_PREFIXES = ("eval.",)


class RunConfigMismatch(ValueError):
    """A resume whose configuration differs from the checkpoint's run."""


def jsonable(obj: Any) -> Any:
    """Plain JSON types from dataclasses (a data module becomes {"class": name, **fields}), paths, tuples, enums."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {"class": type(obj).__name__}
        out.update({f.name: jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)})
        return out
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [jsonable(v) for v in obj]
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, Enum):
        return jsonable(obj.value)
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    return repr(obj)


def flatten(cfg: dict, prefix: str = "") -> dict[str, Any]:
    """{"train": {"micro_batch_size": 2}} -> {"train.micro_batch_size": 2}; the keys read like the CLI flags."""
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def may_differ(key: str) -> bool:
    return key in RESUME_MAY_DIFFER or key.startswith(RESUME_MAY_DIFFER_PREFIXES)


def batch_rows(cfg: dict) -> int | None:
    """Rows of one planned batch over all processes (micro batch x world size). A run.json written before batch_rows
    existed recorded that product as train.micro_batch_size."""
    rows = cfg.get("batch_rows")
    return rows if isinstance(rows, int) else (cfg.get("train") or {}).get("micro_batch_size")


def _cut(cfg: dict) -> str:
    world = cfg.get("world_size") or 1
    rows = batch_rows(cfg)
    if world > 1 and isinstance(rows, int):
        return f"{rows // world} x {world} processes"
    return f"{rows} x 1 process"


def differences(saved: dict, current: dict) -> list[str]:
    """'--key saved -> current' for every compared field that differs (a missing field counts as unset)."""
    a, b = flatten(jsonable(saved)), flatten(jsonable(current))
    out = []
    grouped = a.get("data.length_grouping") is True or b.get("data.length_grouping") is True
    if grouped and batch_rows(saved) != batch_rows(current):  # that plan depends on the batch size
        out.append(f"--train.micro_batch_size {_cut(saved)} -> {_cut(current)} (with --data.length_grouping the rows "
                   "per batch, micro batch x processes, must stay the same)")
    for key in sorted(set(a) | set(b)):
        if may_differ(key) or a.get(key) == b.get(key):
            continue
        flag = "--" + key.removesuffix(".class")
        out.append(f"{flag} {_show(a.get(key, '(unset)'))} -> {_show(b.get(key, '(unset)'))}")
    return out


def _show(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def batch_position(saved: dict | None, batch_in_epoch: int, rows: int, batches_in_epoch: int) -> int:
    """The checkpoint's position in its epoch (`batch_in_epoch` batches of the saved run's rows) in batches of `rows`:
    the same samples are behind it. Checkpoints fall on optimizer steps, whose rows every allowed cut divides; only
    an epoch's short last batch makes a remainder, and then the epoch is over (clamped to its batches)."""
    before = batch_rows(saved or {})
    if not before or before == rows:
        return batch_in_epoch
    return min(-(-batch_in_epoch * before // rows), batches_in_epoch)


def save_run_config(folder: Path, cfg: dict) -> None:
    write_json(Path(folder) / RUN_FILE, jsonable(cfg))


def load_run_config(checkpoint: Path) -> dict | None:
    """The checkpoint's run configuration, or None for a checkpoint written before run.json existed."""
    file = Path(checkpoint) / RUN_FILE
    if not file.is_file():
        return None
    return json.loads(file.read_text(encoding="utf-8"))


def check_resume(checkpoint: Path, cfg: dict) -> None:
    """Refuse to resume `checkpoint` with a configuration other than the one it was trained with."""
    saved = load_run_config(checkpoint)
    if saved is None:
        print(f"note: {checkpoint} has no {RUN_FILE} (written by an older leantune); its configuration is not checked")
        return
    diff = differences(saved, cfg)
    if diff:
        raise RunConfigMismatch(
            f"cannot resume {checkpoint}: it was trained with other settings ({'; '.join(diff)}). Resume with the "
            f"checkpoint's settings (see {Path(checkpoint) / RUN_FILE}), or start a new run: --overwrite true or "
            "another --out_dir")
