"""`leantune evaluate`: validation loss/perplexity, held-out exact match and ROUGE for a base, an adapter or a quantized
base, or a base and its adapter side by side."""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

import torch

from leantune.checkpoint.io import atomic_write_bytes, write_json
from leantune.commands.flags import check_at_least, check_folder, check_model_flags, check_threads
from leantune.data import DataModule, Demo
from leantune.download import DEFAULT_CHECKPOINT
from leantune.evaluate import report_table, rouge_eval, task_eval, validation_loss
from leantune.inference import load_for_inference
from leantune.kinds import decoder_start_id
from leantune.methods import MANIFEST_FILE, read_manifest
from leantune.train.args import EvalArgs, TrainArgs

METRICS = ("loss", "exact_match", "rouge")
DEFAULT_NEW_TOKENS = {"exact_match": 32, "rouge": 128}
"""Generation budget per metric when --max_new_tokens is unset: short answers for exact match, a summary for ROUGE."""


def parse_metrics(metric: str | None) -> tuple[str, ...] | None:
    """The --metric list (comma-separated), checked; None when unset (the default set)."""
    if metric is None:
        return None
    names = tuple(dict.fromkeys(m.strip() for m in metric.split(",") if m.strip()))
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise ValueError(f"--metric {metric!r}: give one or more of {', '.join(METRICS)}, comma-separated "
                         "(e.g. --metric loss,rouge)")
    return names


def evaluate(
    checkpoint_dir: Path = DEFAULT_CHECKPOINT,
    adapter: Path | None = None,
    data: DataModule | None = None,
    metric: str | None = None,
    compare_base: bool = False,
    quantize: str | None = None,
    precision: str | None = None,
    prompt_style: str | None = None,
    max_seq_length: int = TrainArgs.max_seq_length,
    batch_size: int = TrainArgs.micro_batch_size,
    max_batches: int | None = None,
    max_new_tokens: int | None = None,
    limit: int | None = None,
    exact_match: bool = EvalArgs.exact_match,
    out_file: Path | None = None,
    threads: int | None = None,
) -> dict:
    """Evaluate a model, with an adapter or a quantized base: validation loss, perplexity, exact match and ROUGE.

    Validation loss and perplexity come from the data module's validation split. Exact match and ROUGE score greedy
    completions of held-out prompts: the module's test set when it has one (Demo), else its validation records
    (ROUGE: rouge1/2/L/Lsum, stemmed, mean F-measure with a seeded bootstrap 95% interval). The defaults match
    finetune's (same sequence length and batch size), except that evaluate scores the whole validation split where
    finetune stops at --eval.max_batches 20.

    Args:
        checkpoint_dir: Base model folder (default: the bundled default model, imported on first use).
        adapter: An adapter folder (e.g. out/finetune/lora/final, any method) or a PEFT folder, applied unmerged.
        data: Data module (default Demo), e.g. --data Summarization --data.json_path samsum_val.jsonl.
        metric: Comma-separated metrics: loss, exact_match, rouge (default: loss, plus exact_match when the data has a
            held-out test set and --exact_match is true).
        compare_base: With --adapter, evaluate the base first, then the adapter, and report both side by side.
        quantize: int8 or int4: weight-only quantized linears and head for fast CPU decoding (torch's kernels, fp32
            accumulation); or bitsandbytes 4/8 bits as QLoRA trains: bnb.nf4, bnb.nf4-dq, bnb.fp4, bnb.fp4-dq, bnb.int8
            (use the mode a QLoRA adapter was trained with).
        precision: 32-true, bf16-true, 16-true (default: fastest safe one for the device).
        prompt_style: Prompt style (default: the adapter's, else the checkpoint's chat template or config).
        max_seq_length: Longest validation sample in tokens (as in training); ROUGE skips (and counts) longer prompts.
        batch_size: Validation batch size.
        max_batches: Evaluate on at most this many validation batches (default: all).
        max_new_tokens: Generation budget per prompt (default: 32 for exact match, 128 for ROUGE).
        limit: Score at most this many held-out prompts with exact match or ROUGE (default: all).
        exact_match: Run the held-out exact-match evaluation when the data module has a test set (--metric unset).
        out_file: Write the results as JSON here, the table beside it (.md) and, with ROUGE, the predictions
            (.predictions.jsonl).
        threads: CPU threads for torch.
    """
    metrics = parse_metrics(metric)
    for flag, value in (("max_seq_length", max_seq_length), ("batch_size", batch_size)):
        check_at_least(flag, value, 1)
    for flag, value in (("max_batches", max_batches), ("max_new_tokens", max_new_tokens), ("limit", limit)):
        check_at_least(flag, value, 1, allow_none=True)  # 0 is not "all" (that is the default, unset)
    check_threads(threads)
    check_model_flags(precision, quantize, inference=True)
    check_folder("adapter", adapter)
    if compare_base and adapter is None:
        raise ValueError("--compare_base true compares a base with its adapter: give --adapter DIR too")
    data = data if data is not None else Demo()
    check_data_supports(data, metrics)
    if threads:
        torch.set_num_threads(threads)
    if prompt_style is None and adapter is not None and (Path(adapter) / MANIFEST_FILE).is_file():
        prompt_style = read_manifest(Path(adapter)).get("prompt_style")  # a damaged manifest: an error naming it

    runs: dict[str, Path | None] = {"base": None, "adapter": adapter} if compare_base else {"model": adapter}
    results: dict[str, dict[str, Any]] = {}
    predictions: list[dict[str, Any]] = []
    evaluators = None
    for label, adapter_dir in runs.items():
        model, tokenizer, precision, device = load_for_inference(checkpoint_dir, precision, adapter_dir, quantize)
        if evaluators is None:  # data and prompts once: both models see the same samples
            evaluators = prepare(data, tokenizer, metrics, exact_match, prompt_style, max_seq_length, batch_size,
                                 max_new_tokens, limit, decoder_start_id(model))
        prefix = f"[{label}] " if compare_base else ""
        results[label], preds = measure(model, evaluators, data, device, max_batches, prefix)
        predictions += [{"model": label, **p} for p in preds]
        del model
        gc.collect()  # the base's weights go before the adapter's model loads

    result: dict[str, Any] = {"checkpoint": str(checkpoint_dir), "adapter": str(adapter) if adapter else None,
                              "quantize": quantize, "precision": precision, "data": type(data).__name__}
    result.update(results["adapter" if compare_base else "model"])
    if compare_base:
        result["base"] = results["base"]
    table = report_table(results if compare_base else {"model": results["model"]})
    if len(table.splitlines()) > 2:
        print(table, end="")
    if out_file is not None:
        write_reports(Path(out_file), result, table, predictions)
    return result


def check_data_supports(data: DataModule, metrics: tuple[str, ...] | None) -> None:
    """Refuse, before any model loads, a metric the data module cannot give."""
    if metrics is None:
        return
    if "exact_match" in metrics and not hasattr(data, "test_set"):
        raise ValueError(f"--metric exact_match needs data with a held-out test set and a scorer (Demo); --data "
                         f"{type(data).__name__} has none: use --metric rouge to score free-text references")
    if "rouge" in metrics and not (hasattr(data, "test_set") or hasattr(data, "load_examples")):
        raise ValueError(f"--metric rouge needs records with reference outputs; --data {type(data).__name__} has "
                         "none (use --metric loss)")


def prepare(data: DataModule, tokenizer, metrics: tuple[str, ...] | None, exact_match: bool,
            prompt_style: str | None, max_seq_length: int, batch_size: int, max_new_tokens: int | None,
            limit: int | None, decoder_start_id: int | None = None) -> dict[str, Any]:
    """Connect the data and build each requested metric's evaluator (a function of the model); decoder_start_id:
    the model is an encoder-decoder (see `DataModule.connect`)."""
    data.connect(tokenizer, prompt_style=prompt_style, max_seq_length=max_seq_length, batch_size=batch_size,
                 decoder_start_id=decoder_start_id)
    wanted = metrics or ("loss", "exact_match")
    out: dict[str, Any] = {}
    if "loss" in wanted:
        data.setup()
        if data.val_dataset is not None and len(data.val_dataset):
            out["loss"] = True
        elif metrics is not None:
            raise ValueError(f"--metric loss: --data {type(data).__name__} has no validation split; give a "
                             "validation file or set --data.val_split_fraction above 0")
    if "exact_match" in wanted and (metrics is not None or exact_match):
        out["exact_match"] = task_eval(data, tokenizer, data.prompt_style,
                                       max_new_tokens or DEFAULT_NEW_TOKENS["exact_match"], limit)
    if "rouge" in wanted:
        out["rouge"] = rouge_eval(data, tokenizer, data.prompt_style, max_new_tokens or DEFAULT_NEW_TOKENS["rouge"],
                                  limit, max_prompt_tokens=max_seq_length)
    return {k: v for k, v in out.items() if v is not None}


def measure(model, evaluators: dict[str, Any], data: DataModule, device: torch.device, max_batches: int | None,
            prefix: str = "") -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run the evaluators on one model: its metrics, and its ROUGE predictions (empty without ROUGE)."""
    out: dict[str, Any] = {}
    predictions: list[dict[str, Any]] = []
    if "loss" in evaluators:
        out.update(validation_loss(model, data.val_dataloader(), device, max_batches))
        print(f"{prefix}validation loss {out['val_loss']:.4f} (perplexity {out['val_ppl']:.2f})")
    if "exact_match" in evaluators:
        acc, preds = evaluators["exact_match"](model)
        out["exact_match"] = acc
        print(f"{prefix}held-out exact match: {acc:.1%} ({len(preds)} prompts)")
    if "rouge" in evaluators:
        scores = evaluators["rouge"](model)
        predictions = scores.pop("predictions")
        out.update(scores)
        r = scores["rouge"]
        print(f"{prefix}ROUGE on {scores['rouge_samples']} held-out prompts: " +
              ", ".join(f"{k} {v:.4f}" for k, v in r.items()))
    return out, predictions


def write_reports(out_file: Path, result: dict[str, Any], table: str, predictions: list[dict[str, Any]]) -> None:
    """The JSON report, the markdown table beside it, and the ROUGE predictions as JSON Lines."""
    write_json(out_file, result)
    md = out_file.with_suffix(".md")
    atomic_write_bytes(md if md != out_file else out_file.with_name(out_file.name + ".md"), table.encode())
    if predictions:
        lines = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions)
        atomic_write_bytes(out_file.with_name(f"{out_file.stem}.predictions.jsonl"), lines.encode())
