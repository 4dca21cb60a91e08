"""ROUGE of generated text against references, by the `rouge-score` package (Google's reimplementation of
ROUGE-1.5.5, the one HF `evaluate`'s "rouge" metric wraps), so the numbers are the ones users compare against.

Choices, made once here:
- rouge1, rouge2, rougeL and rougeLsum, Porter stemming on (`use_stemmer=True`, as the flan-t5/samsum recipes pass).
- rougeLsum is the summary-level LCS over the text's lines: rouge-score splits on "\\n" and nothing else. No sentence
  splitter is added: HF's run_summarization.py first puts one sentence per line with nltk's punkt, which needs a data
  download, and `evaluate.load("rouge").compute(...)` on raw strings (what most notebooks do) does not split either.
  Text on one line therefore scores rougeLsum == rougeL.
- The headline number per type is the mean F-measure over samples: exactly the mean of what `evaluate` returns with
  `use_aggregator=False`. With `use_aggregator=True` evaluate reports `BootstrapAggregator().aggregate()[t].mid
  .fmeasure`, the median of 1000 bootstrap means drawn from numpy's global RNG: random, it moves in the third or fourth
  decimal from run to run. `bootstrap()` computes that same aggregate (low/mid/high) under a fixed seed instead, as a
  95% confidence interval that tells whether a base-vs-adapter difference is more than noise.
- Several references per prediction (a list) score against the best one, as `RougeScorer.score_multi` (and evaluate).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
Reference = str | Sequence[str]


def _scoring():
    """rouge_score's scorer and aggregator modules, imported on first use: the import pulls in nltk (~0.5 s), which
    every `leantune` command would otherwise pay at start-up although only ROUGE evaluation needs it."""
    from rouge_score import rouge_scorer, scoring

    return rouge_scorer, scoring


def score_pairs(predictions: Sequence[str], references: Sequence[Reference], use_stemmer: bool = True,
                rouge_types: Sequence[str] = ROUGE_TYPES) -> list[dict]:
    """Per-sample rouge_score `Score(precision, recall, fmeasure)` for each type: one dict per prediction."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references: give one reference "
                         "(or one list of references) per prediction")
    rouge_scorer, _ = _scoring()
    scorer = rouge_scorer.RougeScorer(list(rouge_types), use_stemmer=use_stemmer)
    out = []
    for pred, ref in zip(predictions, references):
        if isinstance(ref, str):
            out.append(scorer.score(ref, pred))
        else:
            out.append(scorer.score_multi(list(ref), pred))
    return out


def mean_fmeasure(per_sample: Sequence[Mapping]) -> dict[str, float]:
    """Mean F-measure per ROUGE type over the samples (the headline numbers)."""
    if not per_sample:
        raise ValueError("no predictions to score")
    return {t: float(np.mean([s[t].fmeasure for s in per_sample])) for t in per_sample[0]}


def bootstrap(per_sample: Sequence[Mapping], seed: int = 0, n_samples: int = 1000,
              confidence: float = 0.95) -> dict[str, dict[str, float]]:
    """`evaluate`'s aggregate under a fixed seed: {type: {low, mid, high}} of the F-measure, by rouge_score's own
    BootstrapAggregator. It draws from numpy's global RNG, so that RNG is seeded for the call and then put back as it
    was: the caller's random stream is untouched and the interval is the same every run."""
    if not per_sample:
        raise ValueError("no predictions to score")
    _, scoring = _scoring()
    aggregator = scoring.BootstrapAggregator(confidence_interval=confidence, n_samples=n_samples)
    for s in per_sample:
        aggregator.add_scores(s)
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        result = aggregator.aggregate()
    finally:
        np.random.set_state(state)
    return {t: {"low": float(a.low.fmeasure), "mid": float(a.mid.fmeasure), "high": float(a.high.fmeasure)}
            for t, a in result.items()}


def score(predictions: Sequence[str], references: Sequence[Reference], use_stemmer: bool = True) -> dict[str, float]:
    """{rouge1, rouge2, rougeL, rougeLsum}: mean F-measure in [0, 1] of `predictions` against `references`."""
    return mean_fmeasure(score_pairs(predictions, references, use_stemmer))
