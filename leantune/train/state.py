"""Exact resume: optimizer state, counters, RNG and data position beside each checkpoint."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "training_state.pt"


def save_training_state(path: Path, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    blob = {
        "optimizer": optimizer.state_dict(),
        "state": dict(state),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    tmp = Path(path) / (STATE_FILE + ".tmp")
    torch.save(blob, tmp)
    tmp.replace(Path(path) / STATE_FILE)


def load_training_state(path: Path, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    file = Path(path) / STATE_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no training state to resume from (was this checkpoint written by leantune?)")
    blob = torch.load(file, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    torch.set_rng_state(blob["rng_cpu"])
    if blob["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(blob["rng_cuda"])
    return dict(blob["state"])


def find_latest_checkpoint(out_dir: Path) -> Path | None:
    """The step-N folder with the highest N that has a complete training state, or None."""
    best, best_step = None, -1
    for d in Path(out_dir).glob("step-*"):
        m = re.fullmatch(r"step-(\d+)", d.name)
        if m and (d / STATE_FILE).is_file() and int(m.group(1)) > best_step:
            best, best_step = d, int(m.group(1))
    return best
