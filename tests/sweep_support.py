"""Helpers of the sweep tests: a tiny spec, the sweep command as a subprocess, the study read back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]


def tiny_flags(checkpoint: Path, data: Path) -> dict:
    """Flags of a 2-step LoRA run on the tiny model (a few seconds a trial, most of it starting Python)."""
    return {"--checkpoint_dir": str(checkpoint), "--data": "JSON", "--data.json_path": str(data),
            "--train.max_steps": 2, "--train.micro_batch_size": 2, "--train.global_batch_size": 2,
            "--train.warmup_steps": 0, "--eval.max_batches": 1, "--eval.sample_new_tokens": 4,
            "--eval.exact_match": False, "--precision": "32-true", "--threads": 1}


def write_spec(path: Path, checkpoint: Path, data: Path, space: dict | None = None, **extra) -> Path:
    spec = {"name": extra.pop("name", path.stem), "method": "lora", "flags": {**tiny_flags(checkpoint, data),
                                                                          **extra.pop("flags", {})},
            "space": space if space is not None else {"--lora.r": [2, 4, 8],
                                                      "--lora.alpha": ["{--lora.r}", "{2*--lora.r}"]},
            "objective": "val_loss", "sampler": "grid", **extra}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def sweep_cmd(spec: Path, out_dir: Path, *more: str) -> list[str]:
    return [sys.executable, "-m", "leantune.cli", "sweep", str(spec), "--out_dir", str(out_dir), *more]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env)


def read_trials(storage: str, name: str) -> list:
    """The study's trials, opened as the sweep opens its storage (postgresql:// through psycopg2 when psycopg 3 is
    absent)."""
    import optuna

    from leantune.experiments.sweep import open_storage

    return optuna.load_study(study_name=name, storage=open_storage(storage)[0]).get_trials(deepcopy=False)


def assert_grid_split(trials: list, expected_points: int) -> None:
    """Every grid point ran exactly once and completed, each in its own run folder with a summary."""
    done = [t for t in trials if t.state.name == "COMPLETE"]
    points = [json.dumps(t.params, sort_keys=True) for t in done]
    assert len(points) == expected_points, [(t.number, t.state.name, t.user_attrs.get("error")) for t in trials]
    assert len(set(points)) == expected_points, f"a grid point ran twice: {sorted(points)}"
    assert sorted(t.user_attrs["slot"] for t in done) == list(range(expected_points))
    for t in done:
        assert (Path(t.user_attrs["run_dir"]) / "summary.json").is_file()
