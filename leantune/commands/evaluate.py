"""`leantune evaluate`: validation loss/perplexity, held-out exact match, ROUGE and lm-eval-harness tasks for a base,
an adapter or a quantized base, or several models and adapters side by side (`--compare`)."""

from __future__ import annotations

import gc
import json
import platform
import sys
from pathlib import Path
from typing import Any

import torch

import leantune
from leantune.checkpoint.io import atomic_write_bytes, write_json
from leantune.commands.flags import check_at_least, check_folder, check_model_flags, check_threads
from leantune.cpu_threads import apply_threads
from leantune.data import DataModule, Demo, PreferenceDataModule
from leantune.download import DEFAULT_CHECKPOINT
from leantune.evaluation.evaluate import report_table, rouge_eval, task_eval
from leantune.evaluation.harness import harness_lm, require_lm_eval
from leantune.evaluation.harness_tasks import parse_tasks, resolve_tasks, run_tasks
from leantune.inference import load_for_inference
from leantune.methods import MANIFEST_FILE, read_manifest
from leantune.models.kinds import LM_EVAL, decoder_start_id, kind_of_folder
from leantune.train.args import EvalArgs, TrainArgs
from leantune.train.preference import (
    PrecomputedReference,
    PreferenceArgs,
    PreferenceObjective,
    compute_reference_table,
)
from leantune.train.validate import preference_validation, validation_loss

METRICS = ("loss", "exact_match", "rouge", "preference")
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
    tasks: str | None = None,
    num_fewshot: int | None = None,
    compare: list[str] | None = None,
) -> dict:
    """Evaluate a model, with an adapter or a quantized base: validation loss, perplexity, exact match, ROUGE and
    lm-evaluation-harness tasks, for one model or several side by side.

    Validation loss and perplexity come from the data module's validation split. Exact match and ROUGE score greedy
    completions of held-out prompts: the module's test set when it has one (Demo), else its validation records
    (ROUGE: rouge1/2/L/Lsum, stemmed, mean F-measure with a seeded bootstrap 95% interval). The defaults match
    finetune's (same sequence length and batch size), except that evaluate scores the whole validation split where
    finetune stops at --eval.max_batches 20.

    --tasks runs lm-eval-harness tasks in process (optional: python -m pip install 'lm-eval>=0.4.5,<0.5'): lm-eval task
    names, task YAML files, or mmlu_exemplars, the offline multiple-choice benchmark built from the MMLU questions
    the lm-eval package ships (per subject, per category and overall acc/acc_norm). --compare evaluates several
    models and adapters in one run and prints them side by side (--compare [base,out/lora/final,out/dora/final]).

    Args:
        checkpoint_dir: Base model folder (default: the bundled default model, imported on first use).
        adapter: An adapter folder (e.g. out/finetune/lora/final, any method) or a PEFT folder, applied unmerged.
        data: Data module (default Demo), e.g. --data Summarization --data.json_path samsum_val.jsonl.
        metric: Comma-separated metrics: loss, exact_match, rouge, preference (default: loss, plus exact_match when
            the data has a held-out test set and --exact_match is true; preference for pair data). preference: DPO
            reward accuracy and margin (beta 0.1) on the held-out pairs of --data Preference / DemoPreference, with
            the base model (--checkpoint_dir without the adapter) as the reference.
        compare_base: With --adapter, evaluate the base first, then the adapter, and report both side by side.
        quantize: int8 or int4: weight-only quantized linears and head for fast CPU decoding (torch's kernels, fp32
            accumulation); or bitsandbytes 4/8 bits as QLoRA trains: bnb.nf4, bnb.nf4-dq, bnb.fp4, bnb.fp4-dq, bnb.int8
            (use the mode a QLoRA adapter was trained with).
        precision: 32-true, bf16-true, 16-true (default: fastest safe one for the device).
        prompt_style: Prompt style (default: the adapter's, else the checkpoint's chat template or config).
        max_seq_length: Longest validation sample in tokens (as in training); ROUGE skips (and counts) longer prompts.
        batch_size: Validation batch size, and the rows per forward pass of lm-eval requests (--tasks).
        max_batches: Evaluate on at most this many validation batches (default: all).
        max_new_tokens: Generation budget per prompt (default: 32 for exact match, 128 for ROUGE).
        limit: Score at most this many held-out prompts with exact match or ROUGE, and this many documents per
            lm-eval task (default: all).
        exact_match: Run the held-out exact-match evaluation when the data module has a test set (--metric unset).
        out_file: Write the results as JSON here, the table beside it (.md) and, with ROUGE, the predictions
            (.predictions.jsonl).
        threads: CPU threads for torch (default: one per usable CPU; when the machine is busy at start, OpenMP's
            threads sleep instead of spinning while they wait, so other work cannot stall every op; the choice
            is printed).
        tasks: lm-eval tasks, comma-separated: task or group names (hellaswag, mmlu_exemplars,
            mmlu_exemplars_stem, mmlu_exemplars_anatomy, ...) or task YAML files. With --tasks alone, only the
            tasks run; add --metric for the other metrics too.
        num_fewshot: Few-shot examples per lm-eval prompt (default: each task's own).
        compare: Models to evaluate one after another and report side by side: `base` (the --checkpoint_dir alone),
            an adapter folder (applied on --checkpoint_dir), or an HF model folder; `label=path` names a column.
    """
    metrics = parse_metrics(metric)
    for flag, value in (("max_seq_length", max_seq_length), ("batch_size", batch_size)):
        check_at_least(flag, value, 1)
    for flag, value in (("max_batches", max_batches), ("max_new_tokens", max_new_tokens), ("limit", limit)):
        check_at_least(flag, value, 1, allow_none=True)  # 0 is not "all" (that is the default, unset)
    check_threads(threads)
    check_model_flags(precision, quantize, inference=True)
    check_folder("adapter", adapter)
    check_at_least("num_fewshot", num_fewshot, 0, allow_none=True)
    if compare_base and adapter is None:
        raise ValueError("--compare_base true compares a base with its adapter: give --adapter DIR too")
    runs = plan_runs(Path(checkpoint_dir), adapter, compare_base, compare)
    task_names = parse_tasks(tasks) if tasks is not None else []
    if task_names:
        for ckpt, _ in runs.values():
            kind_of_folder(ckpt).check(LM_EVAL)
        require_lm_eval()  # one line naming the extra, before any model loads
    data = data if data is not None else Demo()
    if metrics is None and isinstance(data, PreferenceDataModule):
        metrics = ("preference",)  # pairs have no single reference answer: the preference metric is their score
    check_data_supports(data, metrics)
    print(f"[threads: {apply_threads(threads).describe()}]", file=sys.stderr)
    first_adapter = next((a for _, a in runs.values() if a is not None), None)
    if prompt_style is None and first_adapter is not None and (Path(first_adapter) / MANIFEST_FILE).is_file():
        prompt_style = read_manifest(Path(first_adapter)).get("prompt_style")  # a damaged one: an error naming it
    task_specs = resolve_tasks(task_names) if task_names else None  # unknown names fail before a model loads
    classic = metrics is not None or not task_names  # loss / exact match / ROUGE too, not only lm-eval tasks

    results: dict[str, dict[str, Any]] = {}
    predictions: list[dict[str, Any]] = []
    evaluators, prepared_for = None, None
    side_by_side = len(runs) > 1
    for label, (ckpt, adapter_dir) in runs.items():
        model, tokenizer, precision, device = load_for_inference(ckpt, precision, adapter_dir, quantize)
        prefix = f"[{label}] " if side_by_side else ""
        results[label], preds = {}, []
        if classic:
            if evaluators is None or prepared_for != ckpt:  # data and prompts once per base: same samples for all
                evaluators = prepare(data, tokenizer, metrics, exact_match, prompt_style, max_seq_length,
                                     batch_size, max_new_tokens, limit, decoder_start_id(model))
                prepared_for = ckpt
                if "preference" in evaluators:
                    evaluators["preference_objective"] = base_reference(ckpt, adapter_dir, model, data, precision,
                                                                        quantize, device, max_batches)
            results[label], preds = measure(model, evaluators, data, device, max_batches, prefix)
        if task_specs is not None:
            specs, manager, local = task_specs
            lm = harness_lm(model, tokenizer, batch_size=batch_size, name=str(ckpt))
            run = run_tasks(lm, specs, manager, local, num_fewshot=num_fewshot, limit=limit)
            print(f"{prefix}lm-eval: {run['examples']} examples in {run['model_seconds']:.1f} s "
                  f"({run['examples_per_s']:.2f} examples/s)")
            results[label].update(run)
            del lm
        results[label].update({"checkpoint": str(ckpt), "adapter": str(adapter_dir) if adapter_dir else None})
        predictions += [{"model": label, **p} for p in preds]
        del model
        gc.collect()  # one model's weights go before the next one loads

    result: dict[str, Any] = {"checkpoint": str(checkpoint_dir), "adapter": str(adapter) if adapter else None,
                              "quantize": quantize, "precision": precision, "data": type(data).__name__ if classic
                              else None, "task_list": task_names or None, "num_fewshot": num_fewshot, "limit": limit,
                              "batch_size": batch_size, "versions": versions(bool(task_names))}
    if compare:
        result["runs"] = results
    else:
        result.update(results["adapter" if compare_base else "model"])
        if compare_base:
            result["base"] = results["base"]
    table = report_table(results if side_by_side else {"model": results["model"]})
    if len(table.splitlines()) > 2:
        print(table, end="")
    if out_file is not None:
        write_reports(Path(out_file), result, table, predictions)
    return result


def plan_runs(checkpoint_dir: Path, adapter: Path | None, compare_base: bool, compare: list[str] | None
              ) -> dict[str, tuple[Path, Path | None]]:
    """{column label: (base checkpoint, adapter or None)} of the models to evaluate, in order."""
    if not compare:
        if compare_base:
            return {"base": (checkpoint_dir, None), "adapter": (checkpoint_dir, adapter)}
        return {"model": (checkpoint_dir, adapter)}
    if adapter is not None or compare_base:
        raise ValueError("--compare lists every model to evaluate: put the adapter there (--compare [base,DIR]) "
                         "instead of --adapter/--compare_base")
    runs: dict[str, tuple[Path, Path | None]] = {}
    for entry in compare:
        label, sep, target = str(entry).partition("=")
        if not sep:
            label, target = "", label
        target = target.strip()
        if target == "base":
            run: tuple[Path, Path | None] = (checkpoint_dir, None)
        else:
            path = Path(target)
            check_folder("compare", path)
            if (path / MANIFEST_FILE).is_file() or (path / "adapter_config.json").is_file():
                run = (checkpoint_dir, path)
            elif (path / "config.json").is_file():
                run = (path, None)
            else:
                raise ValueError(f"--compare {target}: neither an adapter folder (leantune.json or "
                                 "adapter_config.json) nor an HF model folder (config.json)")
        label = label.strip() or default_label(target)
        base, n = label, 2
        while label in runs:
            label, n = f"{base}-{n}", n + 1
        runs[label] = run
    return runs


def default_label(target: str) -> str:
    """A column name for a --compare entry: `base`, else the folder's name (its parent's for step-N/final)."""
    if target == "base":
        return "base"
    path = Path(target).resolve()
    generic = path.name == "final" or path.name.startswith("step-")
    return path.parent.name if generic and path.parent.name else path.name


def versions(with_lm_eval: bool) -> dict[str, str]:
    """Versions behind the numbers: leantune, torch, Python and, with lm-eval tasks, lm-eval."""
    out = {"leantune": leantune.__version__, "torch": torch.__version__, "python": platform.python_version()}
    if with_lm_eval:
        out["lm_eval"] = getattr(require_lm_eval(), "__version__", "unknown")
    return out


def check_data_supports(data: DataModule, metrics: tuple[str, ...] | None) -> None:
    """Refuse, before any model loads, a metric the data module cannot give."""
    if metrics is None:
        return
    if "exact_match" in metrics and not hasattr(data, "test_set"):
        raise ValueError(f"--metric exact_match needs data with a held-out test set and a scorer (Demo); --data "
                         f"{type(data).__name__} has none: use --metric rouge to score free-text references")
    if "preference" in metrics and not isinstance(data, PreferenceDataModule):
        raise ValueError(f"--metric preference scores chosen/rejected pairs; --data {type(data).__name__} has none: "
                         "use --data Preference --data.json_path pairs.jsonl or --data DemoPreference")
    if isinstance(data, PreferenceDataModule) and set(metrics) - {"preference"}:
        raise ValueError(f"--data {type(data).__name__} holds preference pairs: evaluate it with --metric preference")
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
    if "preference" in wanted:
        data.setup()
        out["preference"] = True
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
    if "preference" in evaluators:
        row = preference_validation(model, data.val_dataloader(), device, evaluators["preference_objective"],
                                    max_batches)
        out.update(reward_accuracy=row["val_reward_accuracy"], reward_margin=row["val_reward_margin"],
                   dpo_loss=row["val_loss"])
        pairs = len(data.val_dataset)
        shown = f"{pairs}" if max_batches is None else f"at most {max_batches} batches of {pairs}"
        print(f"{prefix}held-out pairs ({shown}), the base model as reference (beta "
              f"{PreferenceArgs.beta}): reward accuracy {out['reward_accuracy']:.1%}, margin "
              f"{out['reward_margin']:.4f}, DPO loss {out['dpo_loss']:.4f}")
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


def base_reference(ckpt: Path, adapter_dir: Path | None, model, data: DataModule, precision: str,
                   quantize: str | None, device: torch.device, max_batches: int | None) -> PreferenceObjective:
    """DPO's objective on the held-out pairs (those of the first `max_batches` batches) with the base model (`ckpt`
    without adapter) as the reference: its log-probs computed once (the model itself when no adapter is applied:
    rewards are then 0)."""
    base = model
    if adapter_dir is not None:
        base, _, _, _ = load_for_inference(ckpt, precision, None, quantize)
    table = compute_reference_table(base, data.val_dataloader(), len(data.val_dataset), device,
                                    max_batches=max_batches)
    del base
    gc.collect()
    return PreferenceObjective("dpo", PreferenceArgs(), PrecomputedReference({"val": table}))


def write_reports(out_file: Path, result: dict[str, Any], table: str, predictions: list[dict[str, Any]]) -> None:
    """The JSON report, the markdown table beside it, and the ROUGE predictions as JSON Lines."""
    write_json(out_file, result)
    md = out_file.with_suffix(".md")
    atomic_write_bytes(md if md != out_file else out_file.with_name(out_file.name + ".md"), table.encode())
    if predictions:
        lines = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions)
        atomic_write_bytes(out_file.with_name(f"{out_file.stem}.predictions.jsonl"), lines.encode())
