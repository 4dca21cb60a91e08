"""--train.logger mlflow: a run read back through MLflow's own client (params, per-step metric history, artifacts),
a resumed run continuing the same MLflow run, and a sweep's trials as child runs of the sweep's run."""

from __future__ import annotations

import json

import pytest

from leantune.cli import main
from tests.sweep_support import tiny_flags, write_spec

mlflow = pytest.importorskip("mlflow", reason="the [mlflow] extra (mlflow-skinny) is not installed")


def finetune_argv(tiny_checkpoint, json_data, out_dir, steps: int = 3) -> list[str]:
    flags = {**tiny_flags(tiny_checkpoint, json_data), "--train.max_steps": steps, "--eval.interval": 2,
             "--train.logger": "mlflow", "--lora.r": 4}
    return ["finetune", "lora", *[str(x) for kv in flags.items() for x in kv], "--out_dir", str(out_dir)]


@pytest.fixture
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # MLflow's artifact folder (./mlruns) lands in the temp dir
    return mlflow.tracking.MlflowClient(tracking_uri=uri)


def test_run_is_read_back_through_mlflow(tmp_path, tiny_checkpoint, json_data, store):
    out = tmp_path / "run"
    main(finetune_argv(tiny_checkpoint, json_data, out))
    run_id = json.loads((out / "tracking.json").read_text())["run_id"]
    run = store.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["method"] == "lora" and run.data.params["lora.r"] == "4"
    assert run.data.params["train.max_steps"] == "3" and run.data.params["optimizer.lr"]
    history = store.get_metric_history(run_id, "train/loss")
    assert [m.step for m in history] == [1, 2, 3]
    metrics = json.loads((out / "summary.json").read_text())
    assert [m.value for m in store.get_metric_history(run_id, "val/loss")][-1] == pytest.approx(metrics["val_loss"])
    assert run.data.metrics["final/val_loss"] == pytest.approx(metrics["val_loss"])
    artifacts = {a.path for a in store.list_artifacts(run_id)} | {a.path for a in store.list_artifacts(run_id, "final")}
    assert {"loss.png", "summary.json", "metrics.csv", "final/leantune.json", "final/run.json"} <= artifacts
    png = store.download_artifacts(run_id, "loss.png", str(tmp_path / "dl"))
    assert open(png, "rb").read(4) == b"\x89PNG"


def test_sweep_trials_are_child_runs(tmp_path, tiny_checkpoint, json_data, store):
    spec = write_spec(tmp_path / "tracked.yaml", tiny_checkpoint, json_data, space={"--lora.r": [2, 4]},
                      flags={"--train.logger": "mlflow"})
    main(["sweep", str(spec), "--out_dir", str(tmp_path / "sweep")])
    runs = store.search_runs([store.get_experiment_by_name("leantune").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert sorted(c.data.params["lora.r"] for c in children) == ["2", "4"]
    assert parents[0].data.params["objective"] == "val_loss"
    best = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["best"]["value"]
    assert parents[0].data.metrics["best_value"] == pytest.approx(best)
    assert parents[0].info.status == "FINISHED"
