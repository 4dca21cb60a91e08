"""`leantune data preview`: show rendered samples with the supervised spans marked, and length statistics.

Answers "what will the model actually be trained on?" before any compute is spent.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

from leantune.data.base import DataModule, InstructionDataModule
from leantune.data.sft import IGNORE_INDEX, Sample

GREEN, RESET = "\033[32m", "\033[0m"


def render_sample(sample: Sample, tokenizer: Any, color: bool = False) -> str:
    """Decoded text of a sample, trained-on spans in green (or [[...]] without a terminal)."""
    ids = sample.input_ids.tolist()
    target = [False] + [int(x) != IGNORE_INDEX for x in sample.labels.tolist()[:-1]]  # is token t a target?
    out, start = [], 0
    for t in range(1, len(ids) + 1):
        if t == len(ids) or target[t] != target[start]:
            text = tokenizer.decode(ids[start:t])
            if target[start]:
                text = f"{GREEN}{text}{RESET}" if color else f"[[{text}]]"
            out.append(text)
            start = t
    return "".join(out)


def format_stats(stats: dict[str, Any]) -> str:
    lines = []
    for split in ("train", "val"):
        s = stats.get(split, {})
        if not s.get("count"):
            lines.append(f"{split}: 0 samples")
            continue
        lines.append(f"{split}: {s['count']} samples, {s['tokens']} tokens; length min {s['min']} / mean {s['mean']} / "
                     f"median {s['median']} / p95 {s['p95']} / max {s['max']}; {s['over_max_seq_length']} over "
                     f"max_seq_length {stats['max_seq_length']} ({s['truncated']} truncated); supervised "
                     f"{s['supervised_fraction']:.1%} of tokens")
    for reason, n in stats.get("skipped", {}).items():
        lines.append(f"skipped {n}: {reason}")
    return "\n".join(lines)


def preview_command(
    data: DataModule | None = None,
    checkpoint_dir: Path = Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"),
    num_samples: int = 3,
    max_seq_length: int = 2048,
    prompt_style: str | None = None,
) -> dict[str, Any]:
    """Print a few training samples as the model sees them (supervised text marked) and token statistics.

    Args:
        data: Dataset module, e.g. --data Demo (the default), --data JSON --data.json_path file.jsonl.
        checkpoint_dir: Checkpoint whose tokenizer (and chat template) renders the data.
        num_samples: How many training samples to print.
        max_seq_length: Sequence length to check the samples against.
        prompt_style: Prompt style name (default: the checkpoint's chat template, else from its config).
    """
    from leantune.data.prompts import prompt_style_for_checkpoint
    from leantune.tokenizer import Tokenizer

    if data is None:
        from leantune.data.demo import Demo

        data = Demo()
    tokenizer = Tokenizer(checkpoint_dir)
    style = prompt_style_for_checkpoint(checkpoint_dir, tokenizer, prompt_style)
    strict = isinstance(data, InstructionDataModule) and data.truncation == "error"
    if strict:  # measure over-long samples instead of stopping at the first one
        data = dataclasses.replace(data, truncation="truncate_response")
    data.connect(tokenizer, prompt_style=style, max_seq_length=max_seq_length, batch_size=1)
    data.setup()
    color = sys.stdout.isatty()
    print(f"prompt style: {style.name}; {'green' if color else '[[...]]'} = trained on")
    for sample in data.train_dataset.samples[:num_samples]:
        print(f"--- sample {sample.sample_id} ({sample.origin}, {len(sample)} tokens, {sample.n_supervised} supervised)")
        print(render_sample(sample, tokenizer, color))
    stats = data.stats()
    print("---")
    print(format_stats(stats))
    over = [s for s in data.train_dataset.samples + data.val_dataset.samples if s.full_length > max_seq_length]
    if strict and over:
        print(f"note: with --data.truncation error, training stops at the first over-long sample ({over[0].origin}); "
              "use truncate_response or drop, or raise max_seq_length")
    return stats
