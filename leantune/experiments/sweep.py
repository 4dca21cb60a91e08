"""`leantune sweep`: an Optuna study over `finetune` flags whose trials are ordinary run folders.

Each trial is a `leantune finetune` subprocess, not a call in this process: a trial that fails (a refused flag, an
out-of-memory, a crash in native code) ends as one recorded line while the sweep goes on, every trial starts with
fresh memory (no allocator or compile caches leaking from the last one), `--devices N` trials launch torchrun as
they would from a shell, and a trial's folder is exactly what the same command typed by hand makes (resume, export
and upload work on it). Starting the Python process costs a few seconds per trial, small beside a trial.

The study lives in an SQLAlchemy database (SQLite in the sweep folder by default, PostgreSQL for many machines);
which process runs which trial is decided by leantune.experiments.slots, so any number of processes running the
same command split the trials with none run twice, and running it again after an interruption finishes the rest.
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from leantune.checkpoint.io import write_json
from leantune.experiments.slots import (
    DONE,
    FAILED,
    FINISHED,
    PRUNED,
    RELEASED,
    RUNNING,
    Slots,
    require_sweep,
    worker_id,
)
from leantune.experiments.spec import Dimension, SweepSpec, finetune_argv, grid_points, resolve_params
from leantune.train.tracking import (
    PARENT_RUN_ENV,
    SWEEP_ENV,
    TRIAL_NAME_ENV,
    flat_params,
    mlflow_client,
    start_run,
)

if TYPE_CHECKING:  # optional: the [sweep] extra; imported where used, with one error naming the extra
    import optuna
    import sqlalchemy as sa

SWEEP_FILE = "sweep.json"
"""The study's trials as JSON in the sweep folder, rewritten after each trial (what `leantune report` reads)."""
HEARTBEAT_S = 5.0
RESULT_KEYS = ("val_loss", "val_ppl", "exact_match_before", "exact_match_after", "tokens_per_s", "time_s",
               "peak_memory_gb", "trainable_params", "total_params", "steps", "tokens", "sample")
METRIC_KEYS = ("acc_norm", "acc", "exact_match", "f1")
"""An lm-eval task objective's number: the first of these its row has."""
PARENT_RUN_KEY = "leantune_mlflow_parent_run_id"
"""The study's system attribute naming the sweep's MLflow run, of which each trial's run is a child."""


class TrialFailed(Exception):
    """A trial's one-line reason (its `error:` line, or what went wrong reading its result)."""


def public_url(url: str) -> str:
    """The storage URL without its password, for messages."""
    _, sa = require_sweep()
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return url


def open_storage(url: str) -> tuple[optuna.storages.RDBStorage, sa.Engine]:
    """Optuna's RDB storage and an engine on the same database; an unreachable or malformed URL is one ValueError."""
    optuna, sa = require_sweep()
    shown = public_url(url)
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError:
        raise ValueError(f"--storage {url}: not a database URL (sqlite:///path/study.db, "
                         "postgresql://user@host/db)") from None
    kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        kwargs = {"connect_args": {"timeout": 60}}  # several processes: wait for the writer instead of "locked"
        if parsed.database and parsed.database != ":memory:":
            try:
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
                raise ValueError(f"--storage {shown}: cannot make the folder of the SQLite file ({e})") from None
    elif parsed.get_backend_name() == "postgresql":
        kwargs = {"connect_args": {"connect_timeout": 10}}
        if parsed.drivername == "postgresql" and not _importable("psycopg") and _importable("psycopg2"):
            url = parsed.set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)
    try:
        engine = sa.create_engine(url, **kwargs)
        with engine.connect():
            pass
        storage = _rdb_storage(optuna, sa, url, kwargs)
    except ModuleNotFoundError as e:
        raise ImportError(f"--storage {shown}: the database driver {e.name} is not installed "
                          f"(pip install 'leantune[sweep]', or pip install psycopg2-binary for PostgreSQL)") from None
    except (sa.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError, ValueError, OSError) as e:
        first = (str(getattr(e, "orig", None) or e).strip().splitlines() or ["?"])[0]
        raise ValueError(f"--storage {shown}: cannot open the study database ({first}); check the URL, that the "
                         "server runs and that the user may connect") from None
    return storage, engine


def _rdb_storage(optuna, sa, url: str, kwargs: dict):
    """Optuna's storage; two processes creating its tables at once collide (PostgreSQL: on a catalog key; SQLite:
    "table alembic_version already exists"): the loser retries and finds them made."""
    for attempt in range(6):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
        except (sa.exc.IntegrityError, sa.exc.ProgrammingError, sa.exc.OperationalError) as e:
            collided = not isinstance(e, sa.exc.OperationalError) or "already exists" in str(e)
            if attempt == 5 or not collided:
                raise
            time.sleep(0.5 * (attempt + 1))


def _importable(module: str) -> bool:
    """Whether a database driver is installed: SQLAlchemy's default for postgresql:// is psycopg (3); the
    psycopg2-binary wheel serves as well."""
    try:
        __import__(module)
    except ImportError:
        return False
    return True


@dataclass
class Sweep:
    spec: SweepSpec
    out_dir: Path
    storage: optuna.storages.RDBStorage
    slots: Slots
    stale_after: float
    python: str = sys.executable
    parent_run_id: str | None = None

    @property
    def study_name(self) -> str:
        return self.spec.name

    def study(self, sampler: optuna.samplers.BaseSampler | None = None) -> optuna.Study:
        optuna, _ = require_sweep()
        pruner = (optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0) if self.spec.pruner == "median"
                  else optuna.pruners.NopPruner())
        return optuna.load_study(study_name=self.study_name, storage=self.storage, sampler=sampler, pruner=pruner)


def create_study(spec: SweepSpec, storage: optuna.storages.RDBStorage) -> None:
    """Create the study, or find the one an earlier or parallel run made (which must optimise the same way)."""
    optuna, _ = require_sweep()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(study_name=spec.name, storage=storage, direction=spec.direction,
                                    load_if_exists=True)
    except optuna.exceptions.DuplicatedStudyError:  # created by a parallel process between the check and the insert
        study = optuna.load_study(study_name=spec.name, storage=storage)
    if study.direction.name.lower() != spec.direction:
        raise ValueError(f"{spec.path}: study {spec.name!r} in this storage was created to {study.direction.name.lower()} "
                         f"its objective; this spec would {spec.direction} it: give the spec another name")
    attrs = storage.get_study_system_attrs(study._study_id)
    fingerprint = json.dumps({"space": [repr(d) for d in spec.space], "objective": spec.objective,
                              "sampler": spec.sampler}, sort_keys=True)
    if "leantune_spec" not in attrs:
        storage.set_study_system_attr(study._study_id, "leantune_spec", fingerprint)
    elif attrs["leantune_spec"] != fingerprint:
        raise ValueError(f"{spec.path}: study {spec.name!r} in this storage was made from another space, objective "
                         "or sampler; give this spec another name (name: ...) or another --storage")


def run_sweep(spec: SweepSpec, out_dir: Path, storage_url: str | None = None, stale_after: float = 120.0,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the trials of `spec` that no other process has taken; returns the study's counts and best trial."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    storage_url = storage_url or f"sqlite:///{(out_dir / 'study.db').resolve()}"
    storage, engine = open_storage(storage_url)
    create_study(spec, storage)
    slots = Slots(engine, spec.name, worker_id())
    slots.create()
    sweep = Sweep(spec, out_dir, storage, slots, stale_after)
    sweep.parent_run_id = mlflow_parent_run(sweep)
    total = spec.slots()
    log(f"sweep {spec.name}: {total} trials ({spec.sampler}), objective {spec.objective} ({spec.direction}), "
        f"storage {public_url(storage_url)}")
    ran = 0
    with _terminate_as_interrupt():
        while (slot := next_slot(slots, total, stale_after)) is not None:
            if slot < 0:  # the rest are running in other processes: wait for them to end, or to go stale
                time.sleep(min(HEARTBEAT_S, stale_after / 2))
                continue
            run_slot(sweep, slot, log)
            ran += 1
            write_sweep_file(sweep)
    result = write_sweep_file(sweep)
    if sweep.parent_run_id:
        finish_parent_run(sweep.parent_run_id, result)
    log(f"sweep {spec.name}: this process ran {ran} trials; study: {result['counts']}")
    if result.get("best"):
        b = result["best"]
        log(f"best: trial {b['number']} {spec.objective} {b['value']:.4g} {json.dumps(b['params'])} ({b['run_dir']})")
    return result


def uses_mlflow(spec: SweepSpec) -> bool:
    return spec.flags.get("--train.logger") == "mlflow" or any(
        d.name == "--train.logger" and "mlflow" in (d.choices or ()) for d in spec.space)


def mlflow_parent_run(sweep: Sweep, wait_s: float = 60.0) -> str | None:
    """The sweep's MLflow run (trials log as its children) when trials log to MLflow: made by the first process
    (slot -1 of the slots table decides which), found by the others in the study."""
    if not uses_mlflow(sweep.spec):
        return None
    study_id = sweep.study()._study_id
    if sweep.slots.claim(-1, stale_after=math.inf):
        spec = sweep.spec
        client = mlflow_client()
        run_id = start_run(client, f"sweep {spec.name}", tags={"leantune.sweep": spec.name})
        from mlflow.entities import Param  # only reached with the mlflow extra (checked by the trials' flags)

        params = flat_params({"objective": spec.objective, "direction": spec.direction, "sampler": spec.sampler,
                              "trials": spec.slots(), "space": {d.name: list(d.choices) if d.choices is not None
                                                                else [d.low, d.high] for d in spec.space}})
        client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()][:100])
        sweep.storage.set_study_system_attr(study_id, PARENT_RUN_KEY, run_id)
        sweep.slots.finish(-1, DONE)
        return run_id
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        run_id = sweep.storage.get_study_system_attrs(study_id).get(PARENT_RUN_KEY)
        if run_id:
            return run_id
        time.sleep(0.5)
    return None  # the process that took slot -1 died before making the run: trials log as top-level runs


def finish_parent_run(run_id: str, result: dict[str, Any]) -> None:
    client = mlflow_client()
    best = result.get("best")
    if best and best.get("value") is not None:
        client.log_metric(run_id, "best_value", float(best["value"]))
        client.set_tag(run_id, "best_trial", str(best["number"]))
    for state, n in result.get("counts", {}).items():
        client.log_metric(run_id, f"trials_{state}", float(n))
    client.set_terminated(run_id)


def next_slot(slots: Slots, total: int, stale_after: float) -> int | None:
    """A slot this process now owns; -1 when every open slot is held by a live process; None when all are done."""
    rows = {r.slot: r for r in slots.rows()}
    now = time.time()
    for slot in range(total):
        row = rows.get(slot)
        open_ = row is None or row.state == RELEASED or (row.state == RUNNING and row.heartbeat < now - stale_after)
        if open_ and slots.claim(slot, stale_after):
            return slot
    rows = {r.slot: r for r in slots.rows()}
    return -1 if any(rows.get(s) is None or rows[s].state not in FINISHED for s in range(total)) else None


def sampler_for(spec: SweepSpec, slot: int) -> optuna.samplers.BaseSampler:
    """Grid: slot i is point i (fixed values). Random/TPE: seeded by slot, so two processes draw different points."""
    optuna, _ = require_sweep()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PartialFixedSampler is marked experimental
        if spec.sampler == "grid":
            return optuna.samplers.PartialFixedSampler(grid_points(spec)[slot],
                                                       optuna.samplers.RandomSampler(seed=spec.seed))
        if spec.sampler == "random":
            return optuna.samplers.RandomSampler(seed=spec.seed + slot)
        return optuna.samplers.TPESampler(seed=spec.seed + slot, n_startup_trials=min(5, max(1, (spec.trials or 2) // 3)))


def suggest(trial: optuna.Trial, d: Dimension) -> Any:
    if d.choices is not None:
        return trial.suggest_categorical(d.name, list(d.encoded()))
    if d.is_int_range:
        return trial.suggest_int(d.name, int(d.low), int(d.high), step=int(d.step or 1), log=d.log)
    return trial.suggest_float(d.name, float(d.low), float(d.high), step=d.step, log=d.log)


def run_slot(sweep: Sweep, slot: int, log: Callable[[str], None]) -> None:
    """Ask the study for the slot's trial, run it, tell the study how it ended."""
    optuna, _ = require_sweep()
    TrialState = optuna.trial.TrialState
    spec = sweep.spec
    previous = sweep.slots.previous_trial(slot)
    study = sweep.study(sampler_for(spec, slot))
    if previous is not None:  # a killed process's trial: it ends failed, this process runs the slot again
        with contextlib.suppress(Exception):
            study.tell(previous, state=TrialState.FAIL, skip_if_finished=True)
    trial = study.ask()
    sweep.slots.set_trial(slot, trial.number)
    params = {d.name: suggest(trial, d) for d in spec.space}
    run_dir = sweep.out_dir / "trials" / f"trial-{trial.number:03d}"
    method, flags = resolve_params(spec, params)
    argv = finetune_argv(method, flags, run_dir)
    trial.set_user_attr("slot", slot)
    trial.set_user_attr("run_dir", str(run_dir))
    trial.set_user_attr("command", shlex.join(["leantune", *argv]))
    trial.set_user_attr("settings", {"method": method, **{k: v for k, v in flags.items()}})
    trial.set_user_attr("title", trial_title(spec, trial.number, params))
    log(f"trial {trial.number} (slot {slot}): {shlex.join(['leantune', *argv])}")
    try:
        value, results = run_trial(sweep, trial, argv, run_dir, slot)
    except optuna.TrialPruned as e:
        trial.set_user_attr("error", str(e))
        study.tell(trial, state=TrialState.PRUNED)
        sweep.slots.finish(slot, PRUNED)
        log(f"trial {trial.number}: pruned ({e})")
        return
    except TrialFailed as e:
        trial.set_user_attr("error", str(e))
        study.tell(trial, state=TrialState.FAIL)
        sweep.slots.finish(slot, FAILED)
        log(f"trial {trial.number}: failed: {e}")
        return
    except BaseException:  # interrupted: the slot is free again for a rerun or another process
        trial.set_user_attr("error", "interrupted")
        with contextlib.suppress(Exception):
            study.tell(trial, state=TrialState.FAIL)
            sweep.slots.finish(slot, RELEASED)
        raise
    for key, v in results.items():
        trial.set_user_attr(key, v)
    study.tell(trial, value)
    sweep.slots.finish(slot, DONE)
    log(f"trial {trial.number}: {spec.objective} {value:.4g}")


def trial_title(spec: SweepSpec, number: int, params: dict[str, Any]) -> str:
    """The trial's run name on a tracker: its number and swept values ("trial-003 lora.r=16 lora.alpha=32"; a group
    shows the flags it sets, a reference its number)."""
    method, flags = resolve_params(spec, params)
    parts = [f"trial-{number:03d}"]
    for d in spec.space:
        if d.name == "method":
            parts.append(f"method={method}")
            continue
        for flag in (d.decode(params[d.name]) if d.is_group else [d.name]):
            value = flags.get(flag)
            text = ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)
            parts.append(f"{flag.removeprefix('--')}={text}")
    return " ".join(parts)[:128]  # W&B's display name limit


def run_trial(sweep: Sweep, trial: optuna.Trial, argv: list[str], run_dir: Path, slot: int) -> tuple[float, dict]:
    """Run the finetune subprocess (reporting its validation losses to the pruner), then read its objective."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log_path = run_dir.parent / f"{run_dir.name}.log"
    env = {**os.environ, SWEEP_ENV: sweep.spec.name, TRIAL_NAME_ENV: trial.user_attrs["title"]}
    if sweep.parent_run_id:
        env[PARENT_RUN_ENV] = sweep.parent_run_id
    seen: dict[str, int] = {}
    proc = _run(sweep.python, argv, log_path, env, beat=lambda: sweep.slots.beat(slot),
                watch=lambda: _prune_check(sweep, trial, run_dir, seen))
    if proc != 0:
        raise TrialFailed(error_line(log_path, proc))
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise TrialFailed(f"the run wrote no {summary_path}")
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    results = {k: summary[k] for k in RESULT_KEYS if k in summary}
    value = objective_value(sweep, summary, argv, run_dir, log_path)
    results["objective"] = value
    return value, results


def objective_value(sweep: Sweep, summary: dict, argv: list[str], run_dir: Path, log_path: Path) -> float:
    spec = sweep.spec
    if spec.objective == "val_loss":
        value = summary.get("val_loss")
    elif spec.objective == "exact_match":
        value = summary.get("exact_match_after")
        if value is None:
            raise TrialFailed("the run has no held-out exact match (its data has no test set, or "
                              "--eval.exact_match false); use objective val_loss or rouge")
    else:
        value = evaluated_objective(sweep, summary, argv, run_dir, log_path)
    if value is None or not math.isfinite(float(value)):
        raise TrialFailed(f"objective {spec.objective} is {value!r} in {run_dir / 'summary.json'}")
    return float(value)


def evaluated_objective(sweep: Sweep, summary: dict, argv: list[str], run_dir: Path, log_path: Path) -> float:
    """ROUGE or an lm-eval task: `leantune evaluate` on the trained run, its JSON read back."""
    spec = sweep.spec
    final = Path(summary.get("checkpoint") or run_dir / "final")  # fit's summary: the final checkpoint folder
    full = summary.get("method") == "full"
    carried = ("--data", "--prompt_style", "--precision", "--quantize", "--threads", "--checkpoint_dir")
    args = ["evaluate", "--checkpoint_dir", str(final)] if full else ["evaluate", "--adapter", str(final)]
    for i in range(2, len(argv) - 1, 2):  # the trial's base, data and precision, as it trained
        if argv[i].split(".")[0] in carried and not (full and argv[i] == "--checkpoint_dir"):
            args += [argv[i], argv[i + 1]]
    if spec.objective == "rouge":
        args += ["--metric", "rouge"]
    else:
        args += ["--tasks", spec.objective.removeprefix("task:"), "--metric", "loss"]
    out = run_dir / "objective.json"
    args += ["--out_file", str(out)]
    code = _run(sweep.python, args, log_path, dict(os.environ), beat=lambda: None, watch=lambda: None, append=True)
    if code != 0:
        raise TrialFailed("evaluate: " + error_line(log_path, code))
    return pick_metric(json.loads(out.read_text(encoding="utf-8")), spec.objective)


def pick_metric(result: dict, objective: str) -> float:
    """ROUGE-L of `evaluate --metric rouge`, or the first of acc_norm, acc, exact_match, f1 in the task's own row of
    `evaluate --tasks` (a task YAML file's row is its `task:` name, the first row evaluate reports)."""
    if objective == "rouge":
        rouge = result.get("rouge")
        value = rouge.get("rougeL") if isinstance(rouge, dict) else rouge
        if value is None:
            raise TrialFailed("evaluate wrote no rouge score")
        return float(value)
    task = objective.removeprefix("task:")
    rows = result.get("tasks") or {}
    row = rows.get(task)
    if row is None and task.endswith((".yaml", ".yml")):  # one file asked for: its task (or group) comes first
        row = next(iter(rows.values()), None)
    if not isinstance(row, dict):
        raise TrialFailed(f"evaluate reported no task {task} (it reported: {', '.join(rows) or 'none'})")
    for key in METRIC_KEYS:
        if isinstance(row.get(key), int | float) and not isinstance(row[key], bool):
            return float(row[key])
    raise TrialFailed(f"evaluate reported none of {', '.join(METRIC_KEYS)} for task {task} (it has: "
                      f"{', '.join(k for k in row if k != 'alias') or 'nothing'})")


def _prune_check(sweep: Sweep, trial: optuna.Trial, run_dir: Path, seen: dict[str, int]) -> None:
    """Report the run's new validation losses (metrics.csv) to the pruner; raise TrialPruned when it says so.
    A maximised objective gets the negated loss, so "better" points the same way for the pruner."""
    if sweep.spec.pruner == "none":
        return
    optuna, _ = require_sweep()
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return
    sign = -1.0 if sweep.spec.direction == "maximize" else 1.0
    reported = seen.get("n", 0)
    with open(path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val_loss")]
    for row in rows[reported:]:
        trial.report(sign * float(row["val_loss"]), int(row["step"]))
        seen["n"] = reported = reported + 1
        if trial.should_prune():
            raise optuna.TrialPruned(f"validation loss {float(row['val_loss']):.4g} at step {row['step']} is worse "
                                     "than the median of earlier trials")


def _run(python: str, argv: list[str], log_path: Path, env: dict, beat: Callable[[], None],
         watch: Callable[[], None], append: bool = False) -> int:
    """`python -m leantune.cli ARGV` with its output in log_path; beats the slot's heartbeat and runs `watch` every
    second. An exception from `watch` (pruned) or an interrupt stops the child first."""
    with open(log_path, "a" if append else "w", encoding="utf-8") as log_file:
        proc = subprocess.Popen([python, "-m", "leantune.cli", *argv], stdout=log_file, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, preexec_fn=_die_with_parent)
        last_beat = time.monotonic()
        try:
            while proc.poll() is None:
                time.sleep(0.5)
                if time.monotonic() - last_beat > HEARTBEAT_S:
                    beat()
                    last_beat = time.monotonic()
                watch()
            watch()
        except BaseException:
            _stop(proc)
            raise
    return proc.returncode


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _die_with_parent() -> None:
    """In the child before exec: on Linux, end it when the sweep process dies (even by SIGKILL), so a killed sweep
    leaves no trial training on."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def error_line(log_path: Path, code: int) -> str:
    """The trial's `error: ...` line (the CLI's one-line reason), else its exit status and last output line."""
    lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines() if log_path.is_file() else []
    for line in reversed(lines):
        if line.startswith("error: "):
            return line.removeprefix("error: ").strip()
    last = next((ln.strip() for ln in reversed(lines) if ln.strip()), "no output")
    return f"exit status {code}: {last[:300]} (see {log_path})"


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM (a scheduler's stop, `kill`) ends the sweep like Ctrl-C: the running trial's slot is released."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def study_trials(study: optuna.Study) -> list[dict[str, Any]]:
    """Every trial of the study as plain JSON: number, state, params, value and what the sweep recorded."""
    out = []
    for t in study.get_trials(deepcopy=False):
        attrs = {k: v for k, v in t.user_attrs.items() if not k.startswith("_")}
        out.append({"number": t.number, "state": t.state.name.lower(), "value": t.value, "params": t.params,
                    "intermediate": {str(k): v for k, v in sorted(t.intermediate_values.items())},
                    "duration_s": t.duration.total_seconds() if t.duration else None, **attrs})
    return out


def write_sweep_file(sweep: Sweep) -> dict[str, Any]:
    study = sweep.study()
    trials = study_trials(study)
    counts: dict[str, int] = {}
    for t in trials:
        counts[t["state"]] = counts.get(t["state"], 0) + 1
    done = [t for t in trials if t["state"] == "complete" and t["value"] is not None]
    best = None
    if done:
        pick = max if sweep.spec.direction == "maximize" else min
        best = pick(done, key=lambda t: t["value"])
    result = {"name": sweep.spec.name, "objective": sweep.spec.objective, "direction": sweep.spec.direction,
              "sampler": sweep.spec.sampler, "swept": sweep.spec.swept, "slots": sweep.spec.slots(), "counts": counts,
              "best": best, "trials": trials}
    write_json(sweep.out_dir / SWEEP_FILE, json.loads(json.dumps(result, default=str)))
    return result
