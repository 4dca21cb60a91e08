"""Exact resume: the typed training state, which is also the `training_state.pt` format beside each checkpoint.

The file holds only plain types (ints, floats, tensors, lists, dicts) so it loads with `weights_only=True`
(`leantune.checkpoint.safe_pickle.load_torch_file`): a file that holds anything else is refused, never run.
Format 2 is `{"format": 2, **TrainState fields, "optimizer": ..., "scaler": ...}`; format 1 (an untyped
`{"state": {...}, "optimizer", "rng_cpu", "rng_cuda"}` dict) still loads.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from leantune.checkpoint.safe_pickle import load_torch_file

STATE_FILE = "training_state.pt"
FORMAT = 2


@dataclass
class TrainState:
    """Where a run is: counters for the schedule and stop rules, the data position, and the RNG streams."""

    step: int = 0
    """Optimizer steps taken."""
    epoch: int = 0
    batch_in_epoch: int = 0
    """Micro-batches of this epoch already consumed (resume rebuilds the epoch's loader and skips them)."""
    tokens: int = 0
    """Trained (non-pad) tokens so far."""
    train_time: float = 0.0
    """Seconds spent training (evaluation included), summed over resumed runs."""
    rng_cpu: torch.Tensor | None = None
    """torch's CPU generator after `step` (dropout masks of the next steps come from it)."""
    rng_cuda: list[torch.Tensor] = field(default_factory=list)
    epoch_rng_cpu: torch.Tensor | None = None
    """The CPU generator just before this epoch's loader iterator was made: making an iterator draws from it
    (a DataLoader's base seed, a shuffling sampler), so resume replays that draw exactly, then restores rng_cpu."""
    epoch_rng_cuda: list[torch.Tensor] = field(default_factory=list)

    def capture_rng(self) -> None:
        self.rng_cpu, self.rng_cuda = _get_rng()

    def capture_epoch_rng(self) -> None:
        self.epoch_rng_cpu, self.epoch_rng_cuda = _get_rng()

    def restore_rng(self) -> None:
        _set_rng(self.rng_cpu, self.rng_cuda)

    def restore_epoch_rng(self) -> bool:
        """Set the generators to this epoch's start; False for a format-1 state that did not record it."""
        if self.epoch_rng_cpu is None:
            return False
        _set_rng(self.epoch_rng_cpu, self.epoch_rng_cuda)
        return True


def _get_rng() -> tuple[torch.Tensor, list[torch.Tensor]]:
    return torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def _set_rng(cpu: torch.Tensor | None, cuda: list[torch.Tensor]) -> None:
    if cpu is not None:
        torch.set_rng_state(cpu)
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_training_state(path: Path, state: TrainState, optimizer: torch.optim.Optimizer | None,
                        scaler: torch.amp.GradScaler | None = None, extra: dict[str, Any] | None = None) -> None:
    """Write `path/training_state.pt`; the RNG streams are captured now (after the step just taken). A checkpoint
    written by several ranks passes optimizer None (its state is in the sharded files) and `extra` (every rank's
    RNG streams)."""
    state.capture_rng()
    blob: dict[str, Any] = {"format": FORMAT, **{f.name: getattr(state, f.name) for f in dataclasses.fields(state)},
                            "optimizer": optimizer.state_dict() if optimizer is not None else None,
                            "scaler": scaler.state_dict() if scaler else None, **(extra or {})}
    tmp = Path(path) / (STATE_FILE + ".tmp")
    torch.save(blob, tmp)
    tmp.replace(Path(path) / STATE_FILE)


def load_training_state(path: Path, optimizer: torch.optim.Optimizer,
                        scaler: torch.amp.GradScaler | None = None) -> TrainState:
    """The state of checkpoint `path`, loading the optimizer (and scaler) in place. RNG is NOT restored here: the
    loop restores it after the data position is rebuilt (see TrainState.epoch_rng_cpu)."""
    state, blob = read_training_state(path)
    optimizer.load_state_dict(blob["optimizer"])
    if scaler is not None and blob.get("scaler"):
        scaler.load_state_dict(blob["scaler"])
    return state


def read_training_state(path: Path) -> tuple[TrainState, dict[str, Any]]:
    """The state of checkpoint `path` and the file's whole content (optimizer and scaler states included)."""
    file = Path(path) / STATE_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no training state to resume from (was this checkpoint written by leantune?)")
    blob = load_torch_file(file)
    if not isinstance(blob, dict) or not ("format" in blob or isinstance(blob.get("state"), dict)):
        raise ValueError(f"{file}: holds a {type(blob).__name__} without leantune's training state fields; resume "
                         "from a checkpoint a leantune run wrote")
    if "format" not in blob:  # format 1: counters in a string-keyed dict
        names = {f.name for f in dataclasses.fields(TrainState)}
        counters = {k: v for k, v in blob["state"].items() if k in names}
        state = TrainState(**counters, rng_cpu=blob["rng_cpu"], rng_cuda=list(blob["rng_cuda"]))
    elif blob["format"] == FORMAT:
        state = TrainState(**{f.name: blob[f.name] for f in dataclasses.fields(TrainState)})
    else:
        raise ValueError(f"{file}: training state format {blob['format']} is newer than this leantune reads "
                         f"({FORMAT}); upgrade leantune to resume it")
    return state, blob


def find_latest_checkpoint(out_dir: Path) -> Path | None:
    """The complete checkpoint (step-N or final, with its training state) furthest into the run, or None.

    `final` counts: resuming a finished run with a larger --train.max_steps continues from it. A step-N beyond it
    (written by a later resume of that run) wins, and on a tie the step-N folder is taken.
    """
    best, best_step = None, -1
    for d in Path(out_dir).glob("step-*"):
        m = re.fullmatch(r"step-(\d+)", d.name)
        if m and (d / STATE_FILE).is_file() and int(m.group(1)) > best_step:
            best, best_step = d, int(m.group(1))
    final = Path(out_dir) / "final"
    if (final / STATE_FILE).is_file():
        step = checkpoint_step(final)
        if step is not None and step > best_step:
            best = final
    return best


def checkpoint_step(checkpoint: Path) -> int | None:
    """The optimizer step a checkpoint was written at, or None when its state cannot be read."""
    try:
        blob = load_torch_file(Path(checkpoint) / STATE_FILE)
        return int(blob["step"] if "format" in blob else blob["state"]["step"])
    except Exception:
        return None
