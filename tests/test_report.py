"""leantune report: the table (one row per run, best per column marked), the embedded plots, the markdown twin, the
answers side by side, hostile text escaped, and one-line refusals."""

from __future__ import annotations

import base64
import csv
import json
import re
from pathlib import Path

import pytest

from leantune.cli import main
from leantune.report import write_report


def fake_run(folder: Path, method: str, r: int, val_loss: float, tok_s: float, sample: str = "42") -> Path:
    """A run folder as finetune writes it: summary.json, metrics.csv, final/run.json."""
    (folder / "final").mkdir(parents=True)
    summary = {"method": method, "val_loss": val_loss, "tokens_per_s": tok_s, "time_s": 10.0 + r,
               "peak_memory_gb": 0.1 * r, "trainable_params": 1000 * r, "sample": sample, "steps": 3}
    (folder / "summary.json").write_text(json.dumps(summary))
    with open(folder / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["step", "loss", "val_loss"])
        w.writeheader()
        for step in (1, 2, 3):
            w.writerow({"step": step, "loss": val_loss + 1 / step, "val_loss": val_loss if step == 3 else ""})
    (folder / "final" / "run.json").write_text(json.dumps({"method": method, "lora": {"r": r, "alpha": 2 * r},
                                                           "precision": "32-true"}))
    return folder


def fake_sweep(folder: Path) -> Path:
    trials = []
    for n, (r, loss) in enumerate([(2, 3.0), (4, 2.5), (8, 2.8)]):
        run = fake_run(folder / "trials" / f"trial-{n:03d}", "lora", r, loss, 100.0 * (n + 1))
        trials.append({"number": n, "state": "complete", "value": loss, "params": {"--lora.r": r},
                       "run_dir": str(run), "settings": {"method": "lora", "--lora.r": r}, "val_loss": loss})
    trials.append({"number": 3, "state": "fail", "value": None, "params": {"--lora.r": 16},
                   "settings": {"method": "lora", "--lora.r": 16}, "error": "data.jsonl:2: not JSON <b>x</b>"})
    (folder / "sweep.json").write_text(json.dumps({"name": "demo", "objective": "val_loss", "direction": "minimize",
                                                   "swept": ["--lora.r"], "trials": trials}))
    return folder


def test_sweep_report_table_plots_and_twin(tmp_path):
    sweep = fake_sweep(tmp_path / "sweep")
    result = write_report([sweep], tmp_path / "out" / "report.html")
    page = (tmp_path / "out" / "report.html").read_text()
    rows = re.findall(r"<tr class='run'>(.*?)</tr>", page)
    assert len(rows) == result["runs"] == 4
    # best per column: the lowest val loss (trial 1, 2.5), the highest tokens/s (trial 2, 300)
    assert "class='num best'>2.5<" in rows[1] and "class='num best'>2.5<" not in rows[0]
    assert "class='num best'>300<" in rows[2]
    assert "best" not in rows[3]  # a failed trial is never best
    assert "&lt;b&gt;x&lt;/b&gt;" in page and "<b>x</b>" not in page  # text from the folders is escaped
    images = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    assert len(images) == result["plots"] >= 3  # loss curves, val_loss vs --lora.r, time/memory per method
    assert all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    assert "http://" not in page and "https://" not in page  # nothing fetched from a network
    md = (tmp_path / "out" / "report.md").read_text()
    table, answers = md.split("## Answers")
    assert table.count("\n| trial-") == 4 and answers.count("\n| trial-") == 3 and "**2.5**" in md and "**300**" in md
    for name in re.findall(r"\]\(([^)]+\.png)\)", md):
        assert (tmp_path / "out" / name).read_bytes().startswith(b"\x89PNG")


def test_a_swept_reference_shows_the_value_the_trial_ran_with(tmp_path):
    """A choice like {2*--lora.r} is the number it resolved to in that trial, in the table and on the plot's axis."""
    sweep = fake_sweep(tmp_path / "sweep")
    record = json.loads((sweep / "sweep.json").read_text())
    record["swept"].append("--lora.alpha")
    for t in record["trials"]:
        t["params"]["--lora.alpha"] = "{2*--lora.r}"
        t["settings"]["--lora.alpha"] = 2 * t["settings"]["--lora.r"]
    (sweep / "sweep.json").write_text(json.dumps(record))
    write_report([sweep], tmp_path / "r.html")
    rows = re.findall(r"<tr class='run'>(.*?)</tr>", (tmp_path / "r.html").read_text())
    assert len(rows) == 4
    for row, r in zip(rows, (2, 4, 8, 16)):
        assert re.search(rf">{r}</td><td[^>]*>{2 * r}</td>", row), row
    assert "2*--lora.r" not in (tmp_path / "r.md").read_text()
    group = json.dumps({"--lora.targets": ["query", "value"]})  # a group of flags: one label, not its JSON
    record["swept"].append("layers")
    for t in record["trials"]:
        t["params"]["layers"] = group
    (sweep / "sweep.json").write_text(json.dumps(record))
    write_report([sweep], tmp_path / "g.html")
    rows = re.findall(r"<tr class='run'>(.*?)</tr>", (tmp_path / "g.html").read_text())
    assert all(">lora.targets=query,value</td>" in row for row in rows), rows[0]


def test_plain_runs_compare_what_differs(tmp_path, capsys):
    a = fake_run(tmp_path / "lora8", "lora", 8, 2.0, 500.0, sample="The answer is 7")
    b = fake_run(tmp_path / "dora8", "dora", 8, 1.9, 400.0, sample="7")
    main(["report", str(a), str(b), "--out", str(tmp_path / "cmp.html")])
    page = (tmp_path / "cmp.html").read_text()
    header = re.search(r"<thead>(.*?)</thead>", page)[1]
    assert "method" in header and "--lora.r" not in header  # only the differing settings are columns
    assert "The answer is 7" in page and "id='answers'" in page
    assert "cmp.html (2 runs" in capsys.readouterr().out


def test_report_refuses_a_folder_that_is_no_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["report", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith(f"error: {tmp_path}: neither a run folder") and "\n" not in err


def test_heldout_answers_side_by_side(tmp_path, tiny_checkpoint):
    """finetune keeps its answers to the first held-out prompts in summary.json; the report lays them out prompt by
    run, right answers marked."""
    runs = []
    for r in (2, 4):
        out = tmp_path / f"lora-r{r}"
        main(["finetune", "lora", "--checkpoint_dir", str(tiny_checkpoint), "--data", "Demo", "--data.num_test", "3",
              "--data.num_train", "16", "--data.num_val", "4", "--train.max_steps", "1", "--train.micro_batch_size",
              "2", "--train.global_batch_size", "2", "--eval.max_batches", "1", "--eval.sample_new_tokens", "0",
              "--lora.r", str(r), "--precision", "32-true", "--out_dir", str(out)])
        runs.append(out)
    answers = json.loads((runs[0] / "summary.json").read_text())["heldout_answers"]
    assert len(answers) == 3 and all({"prompt", "expected", "answer", "right"} <= set(a) for a in answers)
    write_report(runs, tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    grid = re.search(r"<table id='answers'>(.*?)</table>", page)[1]
    assert grid.count("<tr>") == 1 + 3 and grid.count("<th>lora-r") == 2
    md = (tmp_path / "r.md").read_text()
    assert md.split("## Answers to held-out prompts")[1].count("\n| ") == 1 + 3


def test_a_parameter_every_trial_shares_gets_no_plot(tmp_path):
    """methods.yaml sweeps `method` with `--train.seed: [42]`: objective vs method is plotted, vs the seed is not."""
    sweep = fake_sweep(tmp_path / "sweep")
    data = json.loads((sweep / "sweep.json").read_text())
    for t in data["trials"]:
        t["settings"]["--train.seed"] = 42
    data["swept"] = ["--lora.r", "--train.seed"]
    (sweep / "sweep.json").write_text(json.dumps(data))
    write_report([sweep], tmp_path / "report.html")
    md = (tmp_path / "report.md").read_text()
    assert "vs --lora.r" in md and "vs --train.seed" not in md
