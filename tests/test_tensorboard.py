"""--train.logger tensorboard: event files carry exactly the CSV's scalars per step, resume logs each step once,
and a missing tensorboard package stops the run before any training work."""

import builtins
import csv
import shutil

import pytest
import torch
from conftest import TinyData, make_model

from leantune.methods import load_trainable, save_checkpoint
from leantune.train.loop import EvalArgs, TrainArgs, fit
from leantune.train.optim import OptimizerArgs

# CSV column -> TensorBoard tag, for every scalar the CSV holds
TAGS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "tokens": "train/tokens",
        "tokens_per_s": "train/tokens_per_s", "time_s": "train/time_s", "mem_gb": "train/mem_gb",
        "epoch": "train/epoch", "val_loss": "val/loss", "val_ppl": "val/ppl"}


def run(out_dir, resume=None, max_steps=6, save_interval=None, eval_interval=None, logger="tensorboard"):
    model, names = make_model("lora")

    def save_fn(path):
        save_checkpoint(path, model, "lora", names, {"method": "lora"}, checkpoint_dir=None)

    return fit(model, names, TinyData(), out_dir, save_fn, lambda p: load_trainable(model, "lora", p),
               TrainArgs(micro_batch_size=2, global_batch_size=4, max_steps=max_steps, warmup_steps=2,
                         save_interval=save_interval, logger=logger),
               EvalArgs(interval=eval_interval, max_batches=1, sample_new_tokens=0), OptimizerArgs(lr=1e-2),
               resume=resume)


def csv_scalars(out_dir) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} from metrics.csv; a step may appear only once per column."""
    got: dict[str, dict[int, float]] = {tag: {} for tag in TAGS.values()}
    with open(out_dir / "metrics.csv") as f:
        for row in csv.DictReader(f):
            for col, tag in TAGS.items():
                if row[col]:
                    step = int(row["step"])
                    assert step not in got[tag], f"step {step} of {col} logged twice in the CSV"
                    got[tag][step] = float(row[col])
    return got


def tb_scalars(out_dir) -> dict[str, dict[int, float]]:
    EventAccumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator").EventAccumulator
    acc = EventAccumulator(str(out_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    got: dict[str, dict[int, float]] = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        steps = [e.step for e in events]
        assert len(steps) == len(set(steps)), f"{tag}: a step appears twice: {steps}"
        got[tag] = {e.step: e.value for e in events}
    return got


def assert_same(tb: dict, table: dict) -> None:
    assert set(tb) == {tag for tag, values in table.items() if values}
    for tag, values in table.items():
        if not values:
            continue
        assert sorted(tb[tag]) == sorted(values), tag
        for step, v in values.items():
            # the CSV keeps 6 significant digits (relative error <= 5e-6); events hold float32
            assert tb[tag][step] == pytest.approx(v, rel=1e-5, abs=1e-12), (tag, step)


def test_event_files_hold_the_csv_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    run(tmp_path, max_steps=4, eval_interval=2)
    table, tb = csv_scalars(tmp_path), tb_scalars(tmp_path)
    assert sorted(table["train/loss"]) == [1, 2, 3, 4]
    assert sorted(table["val/loss"]) == [2, 4]  # one mid-run evaluation and the final one
    assert_same(tb, table)


def test_resume_logs_each_step_once(tmp_path):
    """A run that got past its last checkpoint (steps 4-6 logged) resumes from step 3: steps 4-6 are
    logged again by the resumed run and the earlier run's values for them are dropped, in both loggers."""
    pytest.importorskip("tensorboard")
    straight = tmp_path / "straight"
    run(straight, save_interval=3)
    crashed = tmp_path / "crashed"
    shutil.copytree(straight, crashed)
    shutil.rmtree(crashed / "final")
    with open(crashed / "metrics.csv", "a") as f:  # mark what the abandoned timeline logged past step 3
        f.write("5,0,123.0,,,,,,,,\n")
    run(crashed, resume=crashed / "step-000003")
    table, tb = csv_scalars(crashed), tb_scalars(crashed)
    assert sorted(table["train/loss"]) == [1, 2, 3, 4, 5, 6]
    assert 123.0 not in table["train/loss"].values()
    assert_same(tb, table)
    # exact resume: the resumed losses equal the straight run's
    assert tb["train/loss"] == pytest.approx(tb_scalars(straight)["train/loss"], abs=0)


def test_csv_logger_writes_no_event_files(tmp_path):
    run(tmp_path, max_steps=1, logger="csv")
    assert (tmp_path / "metrics.csv").is_file()
    assert not (tmp_path / "tensorboard").exists()


def test_missing_tensorboard_fails_before_training(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name == "tensorboard" or name.startswith(("tensorboard.", "torch.utils.tensorboard")):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    import sys

    for mod in [m for m in sys.modules if m == "tensorboard" or m.startswith(("tensorboard.", "torch.utils.tensorboard"))]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    model, names = make_model("lora")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ImportError, match="pip install tensorboard"):
        fit(model, names, TinyData(), tmp_path / "out", lambda p: None, lambda p: None,
            TrainArgs(micro_batch_size=2, global_batch_size=4, max_steps=2, logger="tensorboard"),
            EvalArgs(sample_new_tokens=0), OptimizerArgs(lr=1e-2))
    assert not (tmp_path / "out").exists()  # nothing was written: it stopped before any work
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
