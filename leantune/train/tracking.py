"""Experiment trackers for `--train.logger`: TensorBoard, and MLflow and W&B behind the same SummaryWriter interface.

The loop feeds one scalar path (leantune.train.metrics.TensorBoardWriter: add_scalar, flush, close), so a tracker is
a class with that interface: `MLflowWriter` buffers each step's scalars and sends them as one batch. What exists only
once the run is over (its settings in final/run.json, loss.png, summary.json, the adapter manifest) is logged by
`finish_tracking`, which the recipe calls after writing summary.json; it also ends the MLflow run.

MLflow writes to MLFLOW_TRACKING_URI, or by default to a local SQLite store, ./mlflow.db (MLflow's own default
backend; its file store is retired), in the experiment MLFLOW_EXPERIMENT_NAME (default "leantune"). A sweep's
trials become child runs of the sweep's run (LEANTUNE_MLFLOW_PARENT_RUN_ID). W&B runs offline by default (no
network, no key), into <out_dir>/wandb; a sweep's trials share a W&B group named after the sweep (LEANTUNE_SWEEP).
On both, a trial's run is named after its number and parameters (LEANTUNE_TRIAL_NAME), not its folder alone.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from leantune.checkpoint.io import write_json
from leantune.train.metrics import require_tensorboard

TRACKING_FILE = "tracking.json"
"""In the run folder: which tracker and run the run logs to (a resume continues the same MLflow run)."""
PARENT_RUN_ENV = "LEANTUNE_MLFLOW_PARENT_RUN_ID"
SWEEP_ENV = "LEANTUNE_SWEEP"
"""Set by `leantune sweep` for its trials: the sweep's name, their W&B group."""
TRIAL_NAME_ENV = "LEANTUNE_TRIAL_NAME"
"""Set by `leantune sweep` for its trials: the trial's run name on the tracker ("trial-003 lora.r=16 ...")."""
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def require_logger(name: str):
    """The SummaryWriter-like class of `--train.logger` (None for csv alone), checked before any training work."""
    if name == "tensorboard":
        return require_tensorboard()
    if name == "mlflow":
        require_mlflow()
        return MLflowWriter
    if name == "wandb":
        require_wandb()
        return WandbWriter
    return None


def require_wandb():
    try:
        import wandb
    except ImportError as e:
        raise ImportError("--train.logger wandb needs the wandb package: pip install 'leantune[wandb]'") from e
    return wandb


def require_mlflow():
    try:
        from mlflow.tracking import MlflowClient
    except ImportError as e:
        raise ImportError("--train.logger mlflow needs the mlflow client: pip install 'leantune[mlflow]' "
                          "(mlflow-skinny)") from e
    return MlflowClient


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def mlflow_client():
    return require_mlflow()(tracking_uri=tracking_uri())


def experiment_id(client, name: str | None = None) -> str:
    name = name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "leantune"
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # created by a parallel trial between the lookup and the create
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def start_run(client, run_name: str, parent: str | None = None, tags: dict[str, str] | None = None) -> str:
    all_tags = {"mlflow.runName": run_name, **(tags or {})}
    if parent:
        all_tags["mlflow.parentRunId"] = parent
    return client.create_run(experiment_id(client), tags=all_tags).info.run_id


def run_name(out_dir: Path) -> str:
    """The tracker's name for the run: a sweep trial's number and parameters, else the run folder's name."""
    return os.environ.get(TRIAL_NAME_ENV) or Path(out_dir).name


class MLflowWriter:
    """SummaryWriter's interface over an MLflow run of the run folder (`log_dir`'s parent)."""

    def __init__(self, log_dir: str, purge_step: int | None = None) -> None:
        from mlflow.entities import Metric

        self._metric = Metric
        self.out_dir = Path(log_dir).parent
        self.client = mlflow_client()
        previous = _read_tracking(self.out_dir)
        if purge_step is not None and previous.get("logger") == "mlflow" and previous.get("tracking_uri") == tracking_uri():
            self.run_id = previous["run_id"]  # a resumed run continues its MLflow run
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = start_run(self.client, run_name(self.out_dir), os.environ.get(PARENT_RUN_ENV),
                                    tags={"leantune.out_dir": str(self.out_dir.resolve())})
        write_json(self.out_dir / TRACKING_FILE, {"logger": "mlflow", "tracking_uri": tracking_uri(),
                                                  "run_id": self.run_id})
        self.pending: list = []

    def add_scalar(self, tag: str, value: float, global_step: int) -> None:
        self.pending.append(self._metric(tag, float(value), int(time.time() * 1000), int(global_step)))

    def flush(self) -> None:
        if self.pending:
            self.client.log_batch(self.run_id, metrics=self.pending)
            self.pending = []

    def close(self) -> None:
        self.flush()  # the run stays open for finish_tracking (params, artifacts, final results)


class WandbWriter:
    """SummaryWriter's interface over a Weights & Biases run in the run folder (`<out_dir>/wandb`), offline unless
    WANDB_MODE says otherwise (`wandb sync <out_dir>/wandb/offline-run-*` uploads it later)."""

    def __init__(self, log_dir: str, purge_step: int | None = None) -> None:
        wandb = require_wandb()
        self.out_dir = Path(log_dir).parent
        previous = _read_tracking(self.out_dir)
        run_id = previous.get("run_id") if purge_step is not None and previous.get("logger") == "wandb" else None
        self.run = wandb.init(dir=str(self.out_dir), project=os.environ.get("WANDB_PROJECT", "leantune"),
                              name=run_name(self.out_dir), group=os.environ.get(SWEEP_ENV) or None,
                              id=run_id, resume="allow" if run_id else None,
                              mode=os.environ.get("WANDB_MODE", "offline"), reinit="finish_previous",
                              settings=wandb.Settings(console="off", x_disable_stats=True))
        write_json(self.out_dir / TRACKING_FILE, {"logger": "wandb", "run_id": self.run.id})
        self.pending: dict[int, dict[str, float]] = {}

    def add_scalar(self, tag: str, value: float, global_step: int) -> None:
        self.pending.setdefault(int(global_step), {})[tag] = float(value)

    def flush(self) -> None:
        for step in sorted(self.pending):
            self.run.log(self.pending[step], step=step)
        self.pending = {}

    def close(self) -> None:
        self.flush()  # the run stays open for finish_tracking


def _finish_wandb(out_dir: Path, summary: dict[str, Any]) -> None:
    wandb = require_wandb()
    run = wandb.run
    if run is None:  # the run was made in another process (a launcher's rank): nothing open here
        return
    run_json = out_dir / "final" / "run.json"
    if run_json.is_file():
        run.config.update(flat_params(json.loads(run_json.read_text(encoding="utf-8"))), allow_val_change=True)
    run.summary.update({f"final/{k}": v for k, v in summary.items()
                        if isinstance(v, int | float) and not isinstance(v, bool)})
    artifact = wandb.Artifact(f"run-{run.id}", type="run")
    for path in (out_dir / "loss.png", out_dir / "summary.json", out_dir / "metrics.csv",
                 out_dir / "final" / "leantune.json", out_dir / "final" / "run.json"):
        if path.is_file():
            artifact.add_file(str(path), name=str(path.relative_to(out_dir)))
    run.log_artifact(artifact)
    run.finish()


def _read_tracking(out_dir: Path) -> dict[str, Any]:
    path = Path(out_dir) / TRACKING_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A run's settings as MLflow params: nested keys joined with dots, values as text (MLflow's 6000-char cap)."""
    out: dict[str, str] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_params(v, f"{key}."))
        else:
            out[key] = (json.dumps(v) if isinstance(v, list | bool) or v is None else str(v))[:6000]
    return out


def finish_tracking(out_dir: Path, summary: dict[str, Any]) -> None:
    """Log what exists once the run is over (settings, final results, loss plot, summary, adapter manifest) to the
    run's tracker, and end the run; a run without a tracker is left alone."""
    info = _read_tracking(out_dir)
    if info.get("logger") == "wandb":
        _finish_wandb(Path(out_dir), summary)
        return
    if info.get("logger") != "mlflow":
        return
    from mlflow.entities import Metric, Param  # only reached when the run logged to MLflow

    client = require_mlflow()(tracking_uri=info["tracking_uri"])
    run_id = info["run_id"]
    out_dir = Path(out_dir)
    params = {}
    run_json = out_dir / "final" / "run.json"
    if run_json.is_file():
        params = flat_params(json.loads(run_json.read_text(encoding="utf-8")))
    logged = client.get_run(run_id).data.params
    params = [Param(k, v) for k, v in params.items() if k not in logged]  # a resumed run logged them already
    now = int(time.time() * 1000)
    finals = [Metric(f"final/{k}", float(v), now, int(summary.get("steps") or 0)) for k, v in summary.items()
              if isinstance(v, int | float) and not isinstance(v, bool)]
    for i in range(0, max(len(params), len(finals)), 100):  # MLflow's batch limit: 100 params, 1000 metrics
        client.log_batch(run_id, params=params[i:i + 100], metrics=finals[i:i + 100])
    for path, folder in ((out_dir / "loss.png", None), (out_dir / "summary.json", None),
                         (out_dir / "metrics.csv", None), (out_dir / "final" / "leantune.json", "final"),
                         (out_dir / "final" / "run.json", "final")):
        if path.is_file():
            client.log_artifact(run_id, str(path), folder)
    client.set_terminated(run_id)
