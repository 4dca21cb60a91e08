"""The median pruner sees a trial's intermediate validation losses as its run writes them to metrics.csv: a trial
worse than the median of earlier trials at the same step is stopped, a better one is not, and a maximised objective
(exact match) gets the losses negated so "better" points the same way."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from leantune.experiments.slots import Slots, worker_id
from leantune.experiments.spec import Dimension, SweepSpec
from leantune.experiments.sweep import Sweep, _prune_check, create_study, open_storage

optuna = pytest.importorskip("optuna", reason="the [sweep] extra (optuna, sqlalchemy) is not installed")


def make_sweep(tmp_path: Path, direction: str) -> Sweep:
    spec = SweepSpec(name="p", path=tmp_path / "p.yaml", method="lora", flags={},
                     space=(Dimension("--lora.r", (2, 4)),), objective="val_loss" if direction == "minimize"
                     else "exact_match", direction=direction, sampler="random", trials=5, pruner="median")
    storage, engine = open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    create_study(spec, storage)
    return Sweep(spec, tmp_path, storage, Slots(engine, "p", worker_id()), stale_after=60)


def write_metrics(run_dir: Path, val_losses: list[float]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["step", "loss", "val_loss"])
        w.writeheader()
        for step, v in enumerate(val_losses, start=1):  # a train row, then the step's validation row
            w.writerow({"step": step, "loss": 3.0, "val_loss": ""})
            w.writerow({"step": step, "loss": 3.0, "val_loss": v})


@pytest.mark.parametrize("direction", ["minimize", "maximize"])
def test_a_trial_worse_than_the_median_is_pruned(tmp_path, direction):
    sweep = make_sweep(tmp_path, direction)
    study = sweep.study()
    sign = -1.0 if direction == "maximize" else 1.0
    for losses in ([2.0, 1.5], [2.2, 1.7]):  # two finished trials: the pruner's startup
        t = study.ask()
        for step, v in enumerate(losses, start=1):
            t.report(sign * v, step)
        study.tell(t, 0.5)
    good = study.ask()
    write_metrics(tmp_path / "good", [1.9, 1.4])
    seen: dict[str, int] = {}
    _prune_check(sweep, good, tmp_path / "good", seen)  # better than the median: goes on
    assert seen["n"] == 2
    bad = study.ask()
    write_metrics(tmp_path / "bad", [3.5])
    with pytest.raises(optuna.TrialPruned, match="validation loss 3.5 at step 1"):
        _prune_check(sweep, bad, tmp_path / "bad", {})


def test_each_loss_is_reported_once(tmp_path):
    sweep = make_sweep(tmp_path, "minimize")
    trial = sweep.study().ask()
    seen: dict[str, int] = {}
    write_metrics(tmp_path / "run", [2.0])
    _prune_check(sweep, trial, tmp_path / "run", seen)
    write_metrics(tmp_path / "run", [2.0, 1.8])  # the run went on: only the new row is reported
    _prune_check(sweep, trial, tmp_path / "run", seen)
    frozen = sweep.study().get_trials()[0]
    assert frozen.intermediate_values == {1: 2.0, 2: 1.8} and seen["n"] == 2


def test_a_second_process_that_loses_the_sqlite_schema_race_retries(tmp_path, monkeypatch):
    """Two `leantune sweep` processes starting on one new SQLite file both create optuna's tables; the loser's
    SQLite says "table alembic_version already exists" (an OperationalError). It retries and opens the storage; any
    other OperationalError is not retried."""
    import optuna
    import sqlalchemy as sa

    from leantune.experiments import sweep

    real, calls = optuna.storages.RDBStorage, []

    def racing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise sa.exc.OperationalError("CREATE TABLE alembic_version", {}, Exception(
                "table alembic_version already exists"))
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep.time, "sleep", lambda s: None)
    monkeypatch.setattr(optuna.storages, "RDBStorage", racing)
    storage, engine = open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    assert len(calls) == 2 and isinstance(storage, real)
    engine.dispose()

    def broken(*args, **kwargs):
        calls.append(1)
        raise sa.exc.OperationalError("SELECT 1", {}, Exception("disk I/O error"))

    calls.clear()
    monkeypatch.setattr(optuna.storages, "RDBStorage", broken)
    with pytest.raises(ValueError, match="cannot open the study database .*disk I/O error"):
        open_storage(f"sqlite:///{tmp_path / 'other.db'}")
    assert len(calls) == 1
