"""`leantune evaluate`: validation loss/perplexity and held-out exact match for a base, an adapter or a quantized base."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from leantune.checkpoint.io import write_json
from leantune.commands.flags import check_at_least, check_folder, check_model_flags, check_threads
from leantune.data import DataModule, Demo
from leantune.download import DEFAULT_CHECKPOINT
from leantune.evaluate import task_eval, validation_loss
from leantune.inference import load_for_inference
from leantune.train.args import EvalArgs, TrainArgs


def evaluate(
    checkpoint_dir: Path = DEFAULT_CHECKPOINT,
    adapter: Path | None = None,
    data: DataModule | None = None,
    quantize: str | None = None,
    precision: str | None = None,
    prompt_style: str | None = None,
    max_seq_length: int = TrainArgs.max_seq_length,
    batch_size: int = TrainArgs.micro_batch_size,
    max_batches: int | None = None,
    max_new_tokens: int = 32,
    exact_match: bool = EvalArgs.exact_match,
    out_file: Path | None = None,
    threads: int | None = None,
) -> dict:
    """Evaluate a model, with an adapter or a quantized base: validation loss, perplexity, and exact match.

    Validation loss and perplexity come from the data module's validation split; exact match from its held-out
    test set when it has one (the demo tasks do). The defaults match finetune's (same sequence length and batch
    size), except that evaluate scores the whole validation split where finetune stops at --eval.max_batches 20.

    Args:
        checkpoint_dir: Base model folder (default: the bundled default model, imported on first use).
        adapter: An adapter folder (e.g. out/finetune/lora/final, any method) or a PEFT folder, applied unmerged.
        data: Data module (default Demo), e.g. --data JSON --data.json_path file.jsonl --data.val_split_fraction 0.1.
        quantize: Load the base's block linears in 4/8 bits: bnb.nf4, bnb.nf4-dq, bnb.fp4, bnb.fp4-dq, bnb.int8.
        precision: 32-true, bf16-true, 16-true (default: fastest safe one for the device).
        prompt_style: Prompt style (default: the adapter's, else the checkpoint's chat template or config).
        max_seq_length: Longest validation sample in tokens (as in training).
        batch_size: Validation batch size.
        max_batches: Evaluate on at most this many validation batches (default: all).
        max_new_tokens: Generation budget per exact-match prompt.
        exact_match: Run the held-out exact-match evaluation when the data module has a test set.
        out_file: Also write the results as JSON here.
        threads: CPU threads for torch.
    """
    for flag, value in (("max_seq_length", max_seq_length), ("batch_size", batch_size),
                        ("max_new_tokens", max_new_tokens)):
        check_at_least(flag, value, 1)
    check_at_least("max_batches", max_batches, 1, allow_none=True)  # 0 is not "all" (that is the default, unset)
    check_threads(threads)
    check_model_flags(precision, quantize)
    check_folder("adapter", adapter)
    if threads:
        torch.set_num_threads(threads)
    model, tokenizer, precision, device = load_for_inference(checkpoint_dir, precision, adapter, quantize)
    if prompt_style is None and adapter is not None and (Path(adapter) / "leantune.json").is_file():
        prompt_style = json.loads((Path(adapter) / "leantune.json").read_text()).get("prompt_style")
    data = data if data is not None else Demo()
    data.connect(tokenizer, prompt_style=prompt_style, max_seq_length=max_seq_length, batch_size=batch_size)
    data.setup()
    result: dict = {"checkpoint": str(checkpoint_dir), "adapter": str(adapter) if adapter else None,
                    "quantize": quantize, "precision": precision, "data": type(data).__name__}
    if data.val_dataset is not None and len(data.val_dataset):
        result.update(validation_loss(model, data.val_dataloader(), device, max_batches))
        print(f"validation loss {result['val_loss']:.4f} (perplexity {result['val_ppl']:.2f})")
    task = task_eval(data, tokenizer, data.prompt_style, max_new_tokens) if exact_match else None
    if task is not None:
        acc, _ = task(model)
        result["exact_match"] = acc
        print(f"held-out exact match: {acc:.1%} ({len(data.test_set())} prompts)")
    if out_file is not None:
        write_json(Path(out_file), result)
    return result
