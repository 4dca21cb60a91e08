"""leantune.evaluation.rouge against rouge-score itself and against HF `evaluate`'s rouge metric, transcribed below (the package
is not installed here: it would pull in `datasets`); hand-counted values show the settings (stemming, Lsum lines)."""

from __future__ import annotations

import numpy as np
import pytest
from rouge_score import rouge_scorer, scoring

from leantune.evaluation import rouge

PREDICTIONS = [
    "Amanda baked cookies and will bring some to Jerry tomorrow.",
    "Oliver is voting for the liberals.",
    "Steve and Gulab are going to watch England play tomorrow.\nCroatia is the opponent.",
    "",
    "The meeting was moved to Friday because Tom is sick",
]
REFERENCES = [
    "Amanda baked cookies and will bring Jerry some tomorrow.",
    "Oliver votes for the liberals.",
    "USA won last night.\nEngland is playing against Croatia tomorrow at 2.",
    "Hannah needs Betty's number but Amanda doesn't have it.",
    "Tom is ill, so the meeting moves to Friday.",
]


def evaluate_rouge_compute(predictions, references, rouge_types=None, use_aggregator=True, use_stemmer=False):
    """HF evaluate's metrics/rouge/rouge.py `Rouge._compute`, line for line (without the custom tokenizer option)."""
    if rouge_types is None:
        rouge_types = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
    multi_ref = isinstance(references[0], list)
    scorer = rouge_scorer.RougeScorer(rouge_types=rouge_types, use_stemmer=use_stemmer)
    if use_aggregator:
        aggregator = scoring.BootstrapAggregator()
    else:
        scores = []
    for ref, pred in zip(references, predictions):
        score = scorer.score_multi(ref, pred) if multi_ref else scorer.score(ref, pred)
        if use_aggregator:
            aggregator.add_scores(score)
        else:
            scores.append(score)
    if use_aggregator:
        result = aggregator.aggregate()
        for key in result:
            result[key] = result[key].mid.fmeasure
    else:
        result = {key: [s[key].fmeasure for s in scores] for key in scores[0]}
    return result


def test_mean_f_measure_equals_evaluate_without_aggregator_and_rouge_score_directly():
    ours = rouge.score(PREDICTIONS, REFERENCES)
    per_sample = evaluate_rouge_compute(PREDICTIONS, REFERENCES, use_aggregator=False, use_stemmer=True)
    assert set(ours) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}
    for key, values in per_sample.items():
        assert ours[key] == pytest.approx(float(np.mean(values)), abs=1e-12)
    scorer = rouge_scorer.RougeScorer(list(rouge.ROUGE_TYPES), use_stemmer=True)
    direct = [scorer.score(r, p) for p, r in zip(PREDICTIONS, REFERENCES)]
    for key in rouge.ROUGE_TYPES:
        assert ours[key] == pytest.approx(sum(d[key].fmeasure for d in direct) / len(direct), abs=1e-12)
    assert 0.2 < ours["rouge1"] < 0.9 and ours["rouge2"] < ours["rouge1"]  # a real, non-degenerate mix


def test_seeded_bootstrap_is_evaluates_aggregate_and_leaves_the_global_rng_alone():
    per_sample = rouge.score_pairs(PREDICTIONS, REFERENCES)
    np.random.seed(123)
    before = np.random.get_state()
    interval = rouge.bootstrap(per_sample, seed=7)
    after = np.random.get_state()
    assert all(np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b for a, b in zip(before, after))
    np.random.seed(7)  # evaluate with use_aggregator=True, on the same global seed
    reference = evaluate_rouge_compute(PREDICTIONS, REFERENCES, use_aggregator=True, use_stemmer=True)
    means = rouge.mean_fmeasure(per_sample)
    for key in rouge.ROUGE_TYPES:
        assert interval[key]["mid"] == pytest.approx(reference[key], abs=1e-12)
        assert interval[key]["low"] <= interval[key]["mid"] <= interval[key]["high"]
        assert interval[key]["low"] <= means[key] <= interval[key]["high"]
    assert rouge.bootstrap(per_sample, seed=7) == interval  # deterministic
    assert rouge.bootstrap(per_sample, seed=8) != interval


def test_hand_counted_values_show_stemming_and_lsum_lines():
    # unigrams: prediction 3 tokens all in the 6-token reference -> P 1, R 1/2, F 2/3; bigrams 2/2 and 2/5 -> F 4/7
    r = rouge.score(["the cat sat"], ["The cat sat on the mat."])
    assert r["rouge1"] == pytest.approx(2 / 3) and r["rouge2"] == pytest.approx(4 / 7)
    assert rouge.score(["running dogs"], ["run dog"])["rouge1"] == 1.0  # Porter stemming is on
    assert rouge.score(["running dogs"], ["run dog"], use_stemmer=False)["rouge1"] == 0.0
    # rougeLsum is the LCS per line (a union over the reference's lines): order across lines stops mattering
    one_line = rouge.score(["b a"], ["a b"])
    assert one_line["rougeL"] == one_line["rougeLsum"] == 0.5
    two_lines = rouge.score(["b\na"], ["a\nb"])
    assert two_lines["rougeL"] == 0.5 and two_lines["rougeLsum"] == 1.0


def test_several_references_score_against_the_best_and_bad_input_is_refused():
    multi = rouge.score(["Oliver votes liberal."], [["Something else entirely.", "Oliver votes liberal."]])
    assert multi["rouge1"] == 1.0
    assert rouge.score(["Oliver votes liberal."], [["Oliver votes liberal."]]) == multi
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        rouge.score(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no predictions"):
        rouge.score([], [])
