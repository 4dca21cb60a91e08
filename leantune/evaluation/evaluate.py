"""Evaluation: greedy completions of held-out prompts scored by exact match or ROUGE, and validation loss/perplexity.

The generation metrics are built as functions of the model (`task_eval`, `rouge_eval`): the prompts are rendered and
tokenized once, then the same prompts score a base before finetuning and the finetuned model after, or a base and an
adapter side by side.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

from tqdm.auto import tqdm

from leantune.data.base import split_examples
from leantune.data.errors import Skips
from leantune.evaluation import rouge
from leantune.models.decoder.model import GPT
from leantune.models.kinds import greedy_outputs, is_seq2seq
from leantune.models.t5.model import T5


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """`text` up to the first of `stop_strings` (a style's end-of-reply text, e.g. Alpaca's "### Instruction:")."""
    cut = min((k for k in (text.find(s) for s in stop_strings if s) if k >= 0), default=len(text))
    return text[:cut]


def complete(model: GPT, tokenizer, encoded: Sequence[Sequence[int]], max_new_tokens: int,
             stop_strings: Sequence[str] = (), batch_size: int = 16, desc: str = "generating") -> list[str]:
    """Greedy completions of tokenized prompts, returned in the prompts' order.

    Batches are formed from prompts sorted by length, so the left padding `greedy_batch` adds stays small (a
    summarization set mixes short and long dialogues); each text is cut at the first stop string and stripped.
    """
    was_training = model.training
    model.eval()
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    texts = [""] * len(encoded)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    for s in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False, dynamic_ncols=True):
        rows = order[s:s + batch_size]
        outs = greedy_outputs(model, [encoded[i] for i in rows], max_new_tokens, tokenizer.eos_ids, pad_id)
        for i, out in zip(rows, outs):
            texts[i] = cut_at_stop(tokenizer.decode(out, skip_special_tokens=True), stop_strings).strip()
    model.train(was_training)
    return texts


def encode_prompts(model: GPT | T5, data, tokenizer, style, records: Sequence[dict[str, Any]]
                   ) -> tuple[list[str], list[list[int]]]:
    """(prompt texts, token ids) that generation starts from: a decoder gets the style's rendered prompt (the
    checkpoint's BOS rule); an encoder-decoder gets the data module's encoder text (`seq2seq_pair`) plus EOS, as
    in training."""
    if is_seq2seq(model):
        texts = [data.seq2seq_pair(r)[0] for r in records]
        return texts, [tokenizer.encode(t, bos=False, eos=True) for t in texts]
    texts = [style.render_prompt(r) for r in records]
    return texts, [tokenizer.encode(t, bos=None) for t in texts]


def exact_match(
    model: GPT,
    tokenizer,
    prompts: Sequence[str],
    answers: Sequence[str],
    score: Callable[[str, str], bool],
    max_new_tokens: int = 32,
    batch_size: int = 16,
    stop_strings: Sequence[str] = (),
) -> tuple[float, list[str]]:
    """Accuracy of greedy completions of rendered prompts against reference answers; also returns predictions."""
    encoded = [tokenizer.encode(p, bos=None) for p in prompts]
    preds = complete(model, tokenizer, encoded, max_new_tokens, stop_strings, batch_size, desc="exact match")
    correct = sum(bool(score(p, a)) for p, a in zip(preds, answers))
    return correct / max(len(answers), 1), preds


def task_eval(data, tokenizer, style, max_new_tokens: int = 32, limit: int | None = None):
    """Exact match on the data module's held-out test set, when it has one (the demo tasks do); else None."""
    if not hasattr(data, "test_set"):
        return None
    records = data.test_set()[:limit]
    prompts = [style.render_prompt(r) for r in records]
    answers = [r["output"] for r in records]

    def run(model: GPT) -> tuple[float, list[str]]:
        return exact_match(model, tokenizer, prompts, answers, data.score, max_new_tokens=max_new_tokens,
                           stop_strings=style.stop_strings)

    return run


def heldout_records(data) -> list[tuple[str, dict[str, Any]]]:
    """(origin, record) of the records generations are scored on: the module's held-out test set when it has one
    (Demo), else its validation split, the same rows `setup()` holds out (same file, fraction and seed).

    Reading the rows again counts invalid ones in a fresh tally, reported here only when `setup()` has not run
    (when it has, it reported them already).
    """
    if hasattr(data, "test_set"):
        return [(f"test:{i + 1}", r) for i, r in enumerate(data.test_set())]
    if not hasattr(data, "load_examples"):
        raise ValueError(f"--data {type(data).__name__} has no records with reference outputs to score generations "
                         "against; use --metric loss, or instruction/summarization data (JSON, Summarization, ...)")
    saved, data.skips = data.skips, Skips(data.skip_invalid)
    try:
        train, val = data.load_examples()
        if val is None:
            _, val = split_examples(train, data.val_split_fraction, data.split_seed)
        if data.train_dataset is None:
            data.skips.report(type(data).__name__)
    finally:
        data.skips = saved
    if not val:
        raise ValueError(f"--data {type(data).__name__} has no held-out records to score: give a validation file or "
                         "set --data.val_split_fraction above 0")
    return [(e.origin, e.record) for e in val]


def rouge_eval(data, tokenizer, style, max_new_tokens: int = 128, limit: int | None = None,
               max_prompt_tokens: int | None = None, batch_size: int = 16) -> Callable[[GPT], dict[str, Any]]:
    """ROUGE (see leantune.evaluation.rouge) of greedy completions of the held-out prompts against their reference outputs.

    Returns a function of the model, so one set of prompts scores a base and then an adapter. A prompt longer than
    `max_prompt_tokens` (or than the model can hold with room for one new token) is not scored, and counted
    (`rouge_skipped_long`, plus a warning): cutting it would score a summary of a different text.
    """
    items = heldout_records(data)[:limit]
    missing = next((origin for origin, r in items if "output" not in r), None)
    if missing is not None:
        raise ValueError(f"{missing}: this record has no reference output to score against (conversations are not "
                         "scored by ROUGE); use instruction or summarization data")
    records = [r for _, r in items]

    def run(model: GPT | T5) -> dict[str, Any]:
        prompts, encoded = encode_prompts(model, data, tokenizer, style, records)
        budget = prompt_budget(model, max_prompt_tokens)
        keep = [i for i, ids in enumerate(encoded) if len(ids) <= budget]
        skipped = len(items) - len(keep)
        if skipped:
            longest = max(len(ids) for ids in encoded)
            warnings.warn(f"ROUGE: {skipped} of {len(items)} prompts are longer than {budget} tokens and were not "
                          f"scored; --max_seq_length {longest} scores them all (if the model holds them)", stacklevel=2)
        if not keep:
            raise ValueError(f"ROUGE: every held-out prompt is longer than {budget} tokens; raise --max_seq_length")
        preds = complete(model, tokenizer, [encoded[i] for i in keep], max_new_tokens, style.stop_strings,
                         batch_size, desc="rouge")
        refs = [items[i][1]["output"] for i in keep]
        per_sample = rouge.score_pairs(preds, refs)
        return {"rouge": rouge.mean_fmeasure(per_sample), "rouge_ci95": rouge.bootstrap(per_sample),
                "rouge_samples": len(keep), "rouge_skipped_long": skipped,
                "predictions": [{"origin": items[i][0], "prompt": prompts[i], "reference": ref, "prediction": p}
                                for i, ref, p in zip(keep, refs, preds)]}

    return run


def prompt_budget(model: GPT | T5, max_prompt_tokens: int | None) -> float:
    """The longest prompt to score: max_prompt_tokens, and for a decoder room for one new token in its context (T5's
    relative positions have no length limit)."""
    limit = float("inf") if is_seq2seq(model) else model.max_tokens - 1
    return limit if max_prompt_tokens is None else min(max_prompt_tokens, limit)


ROWS = (("validation loss", "val_loss"), ("perplexity", "val_ppl"), ("exact match", "exact_match"),
        ("reward accuracy", "reward_accuracy"), ("reward margin", "reward_margin"), ("DPO loss", "dpo_loss"),
        *((t, f"rouge.{t}") for t in rouge.ROUGE_TYPES))
"""Report rows: label and key (`a.b` is key b of dict a) of each metric, in the order a table shows them."""


def _get(result: dict[str, Any], key: str) -> float | None:
    head, _, tail = key.partition(".")
    value = result.get(head)
    return value.get(tail) if tail and isinstance(value, dict) else (None if tail else value)


def task_rows(columns: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    """(label, key) rows of the lm-eval task metrics in any column ("tasks": {task: {metric: value}}), tasks in the
    order lm-eval reports them (groups before their subtasks), then examples/s."""
    tasks: dict[str, dict[str, Any]] = {}
    for result in columns.values():
        for task, metrics in (result.get("tasks") or {}).items():
            tasks.setdefault(task, {}).update(metrics)
    rows = []
    for task, metrics in tasks.items():
        names = [m for m, v in metrics.items() if m != "alias" and "_stderr" not in m and isinstance(v, int | float)]
        names.sort(key=lambda m: (m not in ("acc", "acc_norm"), m != "acc"))
        rows += [(f"{metrics.get('alias') or task} {m}", ("tasks", task, m)) for m in names]
    if any("examples_per_s" in r for r in columns.values()):
        rows.append(("lm-eval examples/s", "examples_per_s"))
    return rows


def _value(result: dict[str, Any], key: str | tuple[str, ...]) -> float | None:
    if isinstance(key, tuple):
        value: Any = result
        for k in key:
            value = value.get(k) if isinstance(value, dict) else None
        return value
    return _get(result, key)


def report_table(columns: dict[str, dict[str, Any]]) -> str:
    """A markdown table of the metrics present in any column (e.g. {"base": {...}, "adapter": {...}}), lm-eval task
    metrics included; with two columns a third gives the change from the first to the second."""
    names = list(columns)
    head = ["metric", *names] + (["change"] if len(names) == 2 else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, key in [*ROWS, *task_rows(columns)]:
        values = [_value(columns[n], key) for n in names]
        if all(v is None for v in values):
            continue
        cells = ["" if v is None else f"{v:.4f}" for v in values]
        if len(names) == 2:
            cells.append(f"{values[1] - values[0]:+.4f}" if None not in values else "")
        lines.append("| " + " | ".join([label, *cells]) + " |")
    return "\n".join(lines) + "\n"
