"""`--devices 2` in a sweep's flags: the trial is `finetune --devices 2`, which launches torchrun (2 ranks on CPU over
gloo) from the trial's subprocess; the run folder records both ranks and the objective is read from it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from leantune.cli import main
from tests.sweep_support import read_trials, write_spec

pytest.importorskip("optuna", reason="the [sweep] extra (optuna, sqlalchemy) is not installed")


def test_a_trial_with_devices_2_runs_on_two_ranks(tmp_path, tiny_checkpoint, json_data):
    flags = {"--devices": 2, "--train.micro_batch_size": 1, "--train.global_batch_size": 2,
             "--train.max_seq_length": 64, "--eval.sample_new_tokens": 0, "--fsdp.timeout": 60}
    spec = write_spec(tmp_path / "ranks.yaml", tiny_checkpoint, json_data, space={"--lora.r": [4]}, flags=flags)
    out = tmp_path / "sweep"
    main(["sweep", str(spec), "--out_dir", str(out)])
    (trial,) = read_trials(f"sqlite:///{out / 'study.db'}", "ranks")
    run = Path(trial.user_attrs["run_dir"])
    log = (run.parent / f"{run.name}.log").read_text()
    assert trial.state.name == "COMPLETE", (trial.user_attrs.get("error"), log[-3000:])
    assert "--devices 2" in trial.user_attrs["command"]
    config = json.loads((run / "final" / "run.json").read_text())
    assert config["world_size"] == 2 and config["train"]["micro_batch_size"] == 1
    assert log.count("trainable parameters") == 1  # one summary: rank 0's
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2
    assert trial.value == summary["val_loss"] and trial.user_attrs["objective"] == summary["val_loss"]
    record = json.loads((out / "sweep.json").read_text())
    assert record["counts"] == {"complete": 1} and record["best"]["value"] == trial.value
