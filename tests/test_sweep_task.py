"""objective task:<lm-eval task>: each trial's value is the number `leantune evaluate --tasks` reports for that
trial's adapter on the base it trained on (acc_norm before acc), read from the task's own row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from leantune.cli import main
from tests.sweep_support import read_trials, write_spec

pytest.importorskip("optuna", reason="the [sweep] extra (optuna, sqlalchemy) is not installed")
pytest.importorskip("lm_eval", reason="lm-eval is not installed")


def write_task(folder: Path) -> Path:
    """A local multiple-choice task: a short and a long answer per question, the short one right in 6 of 8, so
    the plain acc of a random model (the short answer has the higher total log-probability) and the
    length-normalised acc_norm disagree."""
    data = folder / "pairs.jsonl"
    rows = [{"q": f"Question {i}: what follows {i}?",
             "choices": [str(i + 1), f"the number {i + 1}, written out at some length"], "answer": int(i % 4 == 0)}
            for i in range(8)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = folder / "pairs_task.yaml"
    task.write_text(json.dumps({
        "task": "sweep_pairs", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{q}}", "doc_to_choice": "choices",
        "doc_to_target": "answer", "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}))
    return task


def test_task_objective_is_what_evaluate_tasks_reports(tmp_path, tiny_checkpoint, json_data, capsys):
    task = write_task(tmp_path)
    spec = write_spec(tmp_path / "task.yaml", tiny_checkpoint, json_data, space={"--lora.r": [2, 4]},
                      objective=f"task:{task}", flags={"--train.max_seq_length": 64, "--optimizer.lr": 0.05})
    out = tmp_path / "sweep"
    main(["sweep", str(spec), "--out_dir", str(out)])
    trials = read_trials(f"sqlite:///{out / 'study.db'}", "task")
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"], [t.user_attrs.get("error") for t in trials]
    for t in trials:
        run = Path(t.user_attrs["run_dir"])
        again = tmp_path / f"again-{t.number}.json"
        main(["evaluate", "--checkpoint_dir", str(tiny_checkpoint), "--adapter", str(run / "final"), "--tasks",
              str(task), "--precision", "32-true", "--threads", "1", "--out_file", str(again)])
        reported = json.loads(again.read_text())
        row = reported["tasks"]["sweep_pairs"]
        assert reported["adapter"] == str(run / "final") and reported["examples"] == 8
        assert row["acc"] != row["acc_norm"], row  # a value read from the wrong key could not pass
        assert t.value == row["acc_norm"] and t.user_attrs["objective"] == row["acc_norm"]
        assert json.loads((run / "objective.json").read_text())["tasks"]["sweep_pairs"] == row
    record = json.loads((out / "sweep.json").read_text())
    assert record["objective"] == f"task:{task}" and record["direction"] == "maximize"
    assert record["best"]["value"] == max(t.value for t in trials)
