"""`leantune evaluate --metric rouge`: greedy summaries of the held-out prompts scored by ROUGE, a base and its adapter
side by side in one report (JSON + markdown table + predictions), and the numbers equal rouge-score run directly on
the written predictions."""

from __future__ import annotations

import json
import types
import warnings

import pytest
from adapter_support import random_lora
from data_support import StubTokenizer
from rouge_score import rouge_scorer

import leantune.evaluation.evaluate as ev
from leantune.cli import main
from leantune.commands.evaluate import evaluate
from leantune.data import Demo, Summarization
from leantune.data.base import split_examples
from leantune.data.prompts import Alpaca

TYPES = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
NAMES = ["Amanda", "Jerry", "Olivia", "Oliver", "Steve", "Gulab", "Hannah", "Betty", "Sam", "Noah"]


def samsum_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        a, b = NAMES[i % len(NAMES)], NAMES[(i + 3) % len(NAMES)]
        dialogue = f"{a}: Are we still meeting at {i + 2} pm?\n{b}: Yes, see you at the cafe." + " Bring the notes." * i
        rows.append({"id": str(1000 + i), "dialogue": dialogue,
                     "summary": f"{a} and {b} will meet at the cafe at {i + 2} pm."})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def direct_rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """rouge-score's own scorer, averaged: what the report must say."""
    scorer = rouge_scorer.RougeScorer(TYPES, use_stemmer=True)
    scores = [scorer.score(r, p) for p, r in zip(predictions, references)]
    return {t: sum(s[t].fmeasure for s in scores) / len(scores) for t in TYPES}


@pytest.fixture(scope="module")
def perturbed_adapter(tiny_checkpoint, tmp_path_factory):
    """A LoRA adapter with random (non-zero) weights, saved with the alpaca prompt style in its manifest."""
    return random_lora(tiny_checkpoint, tmp_path_factory.mktemp("adapter") / "lora")


def test_base_and_adapter_side_by_side_equal_rouge_score_on_the_written_predictions(tiny_checkpoint,
                                                                                   perturbed_adapter, tmp_path,
                                                                                   capsys):
    folder = tmp_path / "samsum"
    folder.mkdir()
    rows = samsum_rows(10)
    write_jsonl(folder / "train.jsonl", rows[:6])
    write_jsonl(folder / "validation.jsonl", rows[6:])
    out = tmp_path / "report" / "eval.json"
    main(["evaluate", "--checkpoint_dir", str(tiny_checkpoint), "--adapter", str(perturbed_adapter),
          "--compare_base", "true", "--data", "Summarization", "--data.json_path", str(folder),
          "--metric", "loss,rouge", "--limit", "3", "--max_new_tokens", "6", "--max_seq_length", "200",
          "--batch_size", "2", "--threads", "2", "--out_file", str(out)])
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    lines = [json.loads(line) for line in (out.parent / "eval.predictions.jsonl").read_text().splitlines()]
    table = (out.parent / "eval.md").read_text()

    held_out = rows[6:9]  # --limit 3 of the validation file, in file order
    for label, report in (("base", result["base"]), ("adapter", result)):
        preds = [p for p in lines if p["model"] == label]
        assert [p["reference"] for p in preds] == [r["summary"] for r in held_out]
        assert [p["origin"] for p in preds] == [f"{folder / 'validation.jsonl'}:{i}" for i in (1, 2, 3)]
        assert [p["prompt"] for p in preds] == [  # the adapter's prompt style, for the base too
            Alpaca().render_prompt({"instruction": "Summarize the following conversation.", "input": r["dialogue"]})
            for r in held_out]
        assert report["rouge_samples"] == 3 and report["rouge_skipped_long"] == 0
        expected = direct_rouge([p["prediction"] for p in preds], [p["reference"] for p in preds])
        assert report["rouge"] == pytest.approx(expected, abs=1e-12)
        for t in TYPES:
            ci = report["rouge_ci95"][t]
            assert ci["low"] <= report["rouge"][t] + 1e-12 and report["rouge"][t] <= ci["high"] + 1e-12
        assert report["val_loss"] > 0
    assert result["val_loss"] != pytest.approx(result["base"]["val_loss"], abs=1e-4)  # the adapter changes the model
    assert [p["prediction"] for p in lines if p["model"] == "base"] != [p["prediction"] for p in lines
                                                                       if p["model"] == "adapter"]
    assert table.splitlines()[0] == "| metric | base | adapter | change |"
    loss_row = next(line for line in table.splitlines() if line.startswith("| validation loss |"))
    base_loss, adapter_loss, change = (float(c) for c in loss_row.strip("| ").split(" | ")[1:])
    assert (base_loss, adapter_loss) == (pytest.approx(result["base"]["val_loss"], abs=1e-4),
                                         pytest.approx(result["val_loss"], abs=1e-4))
    assert change == pytest.approx(adapter_loss - base_loss, abs=2e-4)
    assert {line.split(" | ")[0].strip("| ") for line in table.splitlines()[2:]} >= {"rouge1", "rougeLsum"}
    assert "[base] ROUGE on 3 held-out prompts" in printed and table in printed


def test_each_prediction_is_scored_against_its_own_reference(tmp_path, monkeypatch):
    """Generation replaced by a known answer per prompt (the first words of its own summary, then text past the
    style's stop string): the batching by length, the stop-string cut and the pairing with references are exact."""
    rows = samsum_rows(8)
    long_index = split_examples(list(range(8)), 0.5, 42)[1][0]  # a row the module holds out (its seed is 42)
    rows[long_index]["dialogue"] = "Noah: " + "a very long story " * 40  # over the prompt budget: skipped, counted
    path = write_jsonl(tmp_path / "samsum.jsonl", rows)
    tok = StubTokenizer(use_bos=False)
    data = Summarization(json_path=path, val_split_fraction=0.5)
    data.connect(tok, prompt_style="alpaca", max_seq_length=4096)
    summaries = {r["dialogue"]: r["summary"] for r in rows}
    batches = []

    def fake_greedy_batch(model, prompts, max_new_tokens, stop_ids, pad_id=0):
        batches.append([len(p) for p in prompts])
        outs = []
        for ids in prompts:
            summary = next(s for d, s in summaries.items() if d in tok.decode(ids))
            outs.append(tok.encode(" ".join(summary.split()[:4]) + " ### Instruction: more", bos=False))
        return outs

    monkeypatch.setattr(ev, "greedy_outputs", fake_greedy_batch)  # a stand-in model: no kind record to ask
    monkeypatch.setattr(ev, "is_seq2seq", lambda model: False)
    model = types.SimpleNamespace(training=False, max_tokens=10_000, eval=lambda: None, train=lambda mode: None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = ev.rouge_eval(data, tok, data.prompt_style, max_new_tokens=8, max_prompt_tokens=600,
                               batch_size=2)(model)

    data.setup()
    held_out = sorted(s.origin for s in data.val_dataset.samples)  # the rows setup() holds out, nothing else
    long_origin = f"{path}:{long_index + 1}"
    assert long_origin in held_out and len(held_out) == 4
    assert [p["origin"] for p in result["predictions"]] == [o for o in held_out if o != long_origin]  # file order
    assert result["rouge_skipped_long"] == 1 and result["rouge_samples"] == 3
    long_prompt = Alpaca().render_prompt({"instruction": "Summarize the following conversation.",
                                          "input": rows[long_index]["dialogue"]})
    assert [str(w.message) for w in caught] == [
        f"ROUGE: 1 of 4 prompts are longer than 600 tokens and were not scored; --max_seq_length "
        f"{len(tok.encode(long_prompt, bos=False))} scores them all (if the model holds them)"]
    assert all(b == sorted(b) for b in batches) and sum(batches, []) == sorted(sum(batches, []))  # by length
    preds = [p["prediction"] for p in result["predictions"]]
    refs = [p["reference"] for p in result["predictions"]]
    assert preds == [" ".join(r.split()[:4]) for r in refs]  # own summary, cut at "### Instruction:"
    assert refs == [summaries[p["prompt"].split("### Input:\n")[1].split("\n\n### Response:")[0]]
                    for p in result["predictions"]]
    assert result["rouge"] == pytest.approx(direct_rouge(preds, refs), abs=1e-12)
    assert 0.3 < result["rouge"]["rouge1"] < 0.9  # partial overlap: the comparison is not 0 == 0


def test_demo_keeps_the_default_metrics_and_takes_rouge_too(tiny_checkpoint):
    data = Demo(num_train=8, num_val=4, num_test=4)
    default = evaluate(checkpoint_dir=tiny_checkpoint, data=data, max_new_tokens=3, threads=2)
    assert {"val_loss", "val_ppl", "exact_match"} <= set(default) and "rouge" not in default
    chosen = evaluate(checkpoint_dir=tiny_checkpoint, data=Demo(num_train=8, num_val=4, num_test=4),
                      metric="exact_match,rouge", limit=2, max_new_tokens=3, threads=2)
    assert "val_loss" not in chosen and chosen["rouge_samples"] == 2 and 0 <= chosen["exact_match"] <= 1


def test_bad_metric_flags_fail_before_any_model_loads(tmp_path, capsys):
    missing = tmp_path / "no-model"  # loading it would fail differently: each error below comes first
    with pytest.raises(ValueError, match="--metric 'nope'"):
        evaluate(checkpoint_dir=missing, metric="nope")
    with pytest.raises(ValueError, match="--metric"):
        evaluate(checkpoint_dir=missing, metric=" , ")
    with pytest.raises(ValueError, match="--compare_base true .* give --adapter"):
        evaluate(checkpoint_dir=missing, compare_base=True)
    with pytest.raises(ValueError, match="--metric exact_match needs data with a held-out test set"):
        evaluate(checkpoint_dir=missing, data=Summarization(json_path=tmp_path / "x.jsonl"), metric="exact_match")
    with pytest.raises(ValueError, match="--limit must be >= 1"):
        evaluate(checkpoint_dir=missing, limit=0)
    with pytest.raises(SystemExit):
        main(["evaluate", "--checkpoint_dir", str(missing), "--metric", "bleu"])
    assert "--metric 'bleu'" in capsys.readouterr().err
