"""leantune sweep: specs checked before any trial, a 6-point grid split by two processes on one SQLite study with no
duplicate and no lost trial, a killed sweep resumed, a failing trial recorded while the sweep goes on."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import yaml

from leantune.cli import main
from leantune.experiments.spec import grid_points, load_spec, resolve_params
from tests.sweep_support import assert_grid_split, read_trials, start, sweep_cmd, write_spec

pytest.importorskip("optuna", reason="the [sweep] extra (optuna, sqlalchemy) is not installed")


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code, capsys.readouterr().err


def test_spec_grid_and_references(tmp_path, tiny_checkpoint, json_data):
    spec = load_spec(write_spec(tmp_path / "s.yaml", tiny_checkpoint, json_data))
    points = grid_points(spec)
    assert len(points) == spec.slots() == 6
    resolved = [resolve_params(spec, p)[1] for p in points]
    assert [(f["--lora.r"], f["--lora.alpha"]) for f in resolved] == [(2, 2), (2, 4), (4, 4), (4, 8), (8, 8), (8, 16)]


def test_spec_groups_and_methods(tmp_path, tiny_checkpoint, json_data):
    space = {"layers": [{"--lora.targets": ["query", "value"]}, {"--lora.targets": ["query", "key", "value"]}]}
    spec = load_spec(write_spec(tmp_path / "g.yaml", tiny_checkpoint, json_data, space=space,
                                method=["lora", "dora"]))
    combos = [resolve_params(spec, p) for p in grid_points(spec)]
    assert [(m, f["--lora.targets"]) for m, f in combos] == [
        ("lora", ["query", "value"]), ("lora", ["query", "key", "value"]),
        ("dora", ["query", "value"]), ("dora", ["query", "key", "value"])]


@pytest.mark.parametrize("case, space, extra, expected", [
    ("unknown flag", {"--lora.rr": [2, 4]}, {}, "--lora.rr"),
    ("empty space", {}, {}, "space: empty"),
    ("empty choices", {"--lora.r": []}, {}, "empty list of choices"),
    ("refused value", {"--lora.r": [4, 0]}, {}, "lora.r"),
    ("refused type", {"--train.max_steps": ["many"]}, {}, "train.max_steps"),
    ("unknown method", {"--lora.r": [4]}, {"method": "lorax"}, "lorax"),
    ("range in a grid", {"--optimizer.lr": {"low": 1e-4, "high": 1e-2}}, {}, "sampler grid needs a list"),
    ("dangling reference", {"--lora.alpha": ["{2*--lora.rank}"]}, {}, "--lora.rank"),
])
def test_bad_spec_is_one_line_before_any_trial(tmp_path, tiny_checkpoint, json_data, capsys, case, space, extra,
                                               expected):
    spec = write_spec(tmp_path / "bad.yaml", tiny_checkpoint, json_data, space=space, **extra)
    code, err = run_cli(["sweep", str(spec), "--out_dir", str(tmp_path / "sweep")], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (case, err)
    assert expected in lines[0] and str(spec) in lines[0], (case, lines[0])
    assert not (tmp_path / "sweep" / "trials").exists()


def test_unreachable_storage_is_one_line(tmp_path, tiny_checkpoint, json_data, capsys):
    spec = write_spec(tmp_path / "s.yaml", tiny_checkpoint, json_data)
    url = "postgresql://leantune:secret@127.0.0.1:9/nowhere"  # port 9 (discard): nothing listens
    code, err = run_cli(["sweep", str(spec), "--out_dir", str(tmp_path / "sweep"), "--storage", url], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: --storage postgresql://leantune:***@"), err
    assert "secret" not in err
    assert not (tmp_path / "sweep" / "trials").exists()
    code, err = run_cli(["sweep", str(spec), "--out_dir", str(tmp_path / "sweep"), "--storage", "nodb:/x"], capsys)
    assert code == 2 and err.startswith("error: --storage nodb:/x") and len(err.strip().splitlines()) == 1


def test_check_only_runs_nothing(tmp_path, tiny_checkpoint, json_data, capsys):
    spec = write_spec(tmp_path / "s.yaml", tiny_checkpoint, json_data)
    main(["sweep", str(spec), "--out_dir", str(tmp_path / "sweep"), "--check_only", "true"])
    assert "6 trials, every trial's flags accepted" in capsys.readouterr().out
    assert not (tmp_path / "sweep").exists()


def test_failed_trial_is_recorded_and_the_sweep_goes_on(tmp_path, tiny_checkpoint, json_data, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x", "output": "y"}\nnot json\n')
    space = {"data": [{"--data.json_path": str(json_data)}, {"--data.json_path": str(bad)}]}
    spec = write_spec(tmp_path / "f.yaml", tiny_checkpoint, json_data, space=space)
    out = tmp_path / "sweep"
    main(["sweep", str(spec), "--out_dir", str(out)])
    trials = read_trials(f"sqlite:///{out / 'study.db'}", "f")
    states = {t.user_attrs["slot"]: t.state.name for t in trials}
    assert states == {0: "COMPLETE", 1: "FAIL"}
    failed = next(t for t in trials if t.state.name == "FAIL")
    assert str(bad) in failed.user_attrs["error"] and "\n" not in failed.user_attrs["error"]
    record = json.loads((out / "sweep.json").read_text())
    assert record["counts"] == {"complete": 1, "fail": 1}
    assert record["best"]["number"] == next(t.number for t in trials if t.state.name == "COMPLETE")
    assert record["best"]["value"] == pytest.approx(json.loads(
        (Path(record["best"]["run_dir"]) / "summary.json").read_text())["val_loss"])
    # run again: nothing is left to do, nothing runs twice (the failed trial stays recorded)
    main(["sweep", str(spec), "--out_dir", str(out)])
    assert len(read_trials(f"sqlite:///{out / 'study.db'}", "f")) == 2


def test_two_processes_split_a_grid_on_sqlite(tmp_path, tiny_checkpoint, json_data):
    spec = write_spec(tmp_path / "grid.yaml", tiny_checkpoint, json_data)
    out = tmp_path / "sweep"
    procs = [start(sweep_cmd(spec, out), tmp_path / f"p{i}.log") for i in range(2)]
    for i, p in enumerate(procs):
        assert p.wait(timeout=600) == 0, (tmp_path / f"p{i}.log").read_text()[-3000:]
    trials = read_trials(f"sqlite:///{out / 'study.db'}", "grid")
    assert_grid_split(trials, 6)
    assert len(trials) == 6
    ran = [(tmp_path / f"p{i}.log").read_text().count(": val_loss ") for i in range(2)]
    assert sum(ran) == 6 and min(ran) >= 1, f"both processes should have run trials: {ran}"


def test_killed_sweep_resumes_and_finishes(tmp_path, tiny_checkpoint, json_data):
    spec = write_spec(tmp_path / "resume.yaml", tiny_checkpoint, json_data,
                      space={"--lora.r": [2, 4], "--lora.alpha": ["{--lora.r}", "{2*--lora.r}"]})
    out = tmp_path / "sweep"
    storage = f"sqlite:///{out / 'study.db'}"
    proc = start(sweep_cmd(spec, out), tmp_path / "first.log")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (out / "sweep.json").is_file() and json.loads((out / "sweep.json").read_text())["counts"].get("complete", 0) >= 2:
            break
        time.sleep(0.3)
    assert proc.poll() is None, (tmp_path / "first.log").read_text()[-2000:]
    proc.send_signal(signal.SIGKILL)  # no chance to release its slot: the heartbeat goes stale
    proc.wait()
    before = [t for t in read_trials(storage, "resume") if t.state.name == "COMPLETE"]
    assert 2 <= len(before) < 4
    again = start(sweep_cmd(spec, out, "--stale_after", "3"), tmp_path / "again.log")
    assert again.wait(timeout=600) == 0, (tmp_path / "again.log").read_text()[-3000:]
    trials = read_trials(storage, "resume")
    assert_grid_split(trials, 4)
    assert all(t.state.name in ("COMPLETE", "FAIL") for t in trials)  # the killed trial: failed, then rerun
    assert yaml.safe_load((out / "sweep.json").read_text())["counts"]["complete"] == 4


EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples" / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("spec", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_specs_are_accepted(spec, capsys):
    main(["sweep", str(spec), "--check_only", "true"])
    assert "every trial's flags accepted" in capsys.readouterr().out


def test_the_examples_are_the_seed_experiments():
    specs = {p.stem: load_spec(p) for p in EXAMPLES}
    assert {"lora-r-alpha", "qv-vs-all", "methods", "quick"} <= set(specs)
    assert specs["lora-r-alpha"].slots() == 6 and specs["qv-vs-all"].slots() == 2
    assert sorted(grid_points(specs["methods"])[i]["method"] for i in range(12)) == sorted(
        ["lora", "qlora", "dora", "loha", "lokr", "adalora", "ia3", "adapter", "adapter_v2", "prompt_tuning",
         "p_tuning", "prefix_tuning"])


def test_rouge_objective_evaluates_each_trial(tmp_path, tiny_checkpoint, json_data):
    """objective rouge: `leantune evaluate --metric rouge` on the trained adapter over the tiny base (not the default
    model), its ROUGE-L read back as the trial's value."""
    spec = write_spec(tmp_path / "rouge.yaml", tiny_checkpoint, json_data, space={"--lora.r": [2]},
                      objective="rouge", flags={"--train.max_seq_length": 64})
    out = tmp_path / "sweep"
    main(["sweep", str(spec), "--out_dir", str(out)])
    (trial,) = read_trials(f"sqlite:///{out / 'study.db'}", "rouge")
    assert trial.state.name == "COMPLETE", trial.user_attrs.get("error")
    result = json.loads((Path(trial.user_attrs["run_dir"]) / "objective.json").read_text())
    assert result["checkpoint"] == str(tiny_checkpoint)
    assert trial.value == pytest.approx(result["rouge"]["rougeL"]) and 0 <= trial.value <= 1
