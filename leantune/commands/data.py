"""`leantune data preview`: training samples as the model sees them (supervised text marked) and token statistics."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

from leantune.commands.flags import check_at_least
from leantune.data import DEFAULT_MAX_SEQ_LENGTH, DataModule, Demo, InstructionDataModule, PreferenceDataModule
from leantune.data.preference import PairSample
from leantune.data.preview import format_stats, render_pair, render_sample
from leantune.data.prompts import prompt_style_for_checkpoint
from leantune.download import DEFAULT_CHECKPOINT, ensure_checkpoint
from leantune.tokenizer import Tokenizer


def preview(
    data: DataModule | None = None,
    checkpoint_dir: Path = DEFAULT_CHECKPOINT,
    num_samples: int = 3,
    max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH,
    prompt_style: str | None = None,
) -> dict[str, Any]:
    """Print a few training samples as the model sees them (supervised text marked) and token statistics.

    Args:
        data: Dataset module, e.g. --data Demo (the default), --data JSON --data.json_path file.jsonl.
        checkpoint_dir: Checkpoint whose tokenizer (and chat template) renders the data.
        num_samples: How many training samples to print.
        max_seq_length: Sequence length to check the samples against (the same default as finetune's
            --train.max_seq_length).
        prompt_style: Prompt style name (default: the checkpoint's chat template, else from its config).
    """
    check_at_least("num_samples", num_samples, 0)
    check_at_least("max_seq_length", max_seq_length, 1)
    if data is None:
        data = Demo()
    tokenizer = Tokenizer(ensure_checkpoint(Path(checkpoint_dir)))
    style = prompt_style_for_checkpoint(checkpoint_dir, tokenizer, prompt_style)
    policy = data.truncation if isinstance(data, InstructionDataModule | PreferenceDataModule) else None
    measure = policy in ("error", "drop")  # tokenize without a limit: count over-long samples, don't stop or hide
    data.connect(tokenizer, prompt_style=style, max_seq_length=0 if measure else max_seq_length, batch_size=1)
    with warnings.catch_warnings():
        if measure:  # the counts of the unlimited run would not describe training
            warnings.simplefilter("ignore")
        data.setup()
    data.max_seq_length = max_seq_length  # the statistics compare against the training limit
    color = sys.stdout.isatty()
    print(f"prompt style: {style.name}; {'green' if color else '[[...]]'} = trained on")
    for sample in data.train_dataset.samples[:num_samples]:
        if isinstance(sample, PairSample):
            print(f"--- pair {sample.sample_id} ({sample.origin}, prompt {len(sample.prompt)} tokens, chosen "
                  f"{len(sample.chosen)}, rejected {len(sample.rejected)})")
            print(render_pair(sample, tokenizer, color))
            continue
        print(f"--- sample {sample.sample_id} ({sample.origin}, {len(sample)} tokens, {sample.n_supervised} supervised)")
        print(render_sample(sample, tokenizer, color))
    stats = data.stats()
    print("---")
    print(format_stats(stats))
    over = [s for s in data.train_dataset.samples + data.val_dataset.samples if s.full_length > max_seq_length]
    if over:
        longest = max(over, key=lambda s: s.full_length)
        keep = f"--train.max_seq_length {longest.full_length} keeps them (longest: {longest.origin})"
        if policy == "error":
            print(f"note: with --data.truncation error, training stops at the first over-long sample "
                  f"({over[0].origin}); use drop or truncate_response, or raise max_seq_length. {keep}")
        elif policy == "drop":
            print(f"note: training drops the {len(over)} sample(s) longer than {max_seq_length} tokens "
                  f"(--data.truncation drop); {keep}")
    return stats
