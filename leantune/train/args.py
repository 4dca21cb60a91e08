"""The loop's flags (--train.*, --eval.*), checked when parsed: a bad value fails before any data or model loads."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from leantune.data.base import DEFAULT_MAX_SEQ_LENGTH
from leantune.models.kinds import kind_of_folder


def at_least(flag: str, value, low, allow_none: bool = False) -> None:
    """Raise one ValueError naming the flag unless `value >= low` (or None where None means unset)."""
    if value is None and allow_none:
        return
    if value is None or isinstance(value, bool) or value < low:
        raise ValueError(f"--{flag} must be >= {low}, got {value}")


def positive(flag: str, value, allow_none: bool = False) -> None:
    """Raise one ValueError naming the flag unless `value > 0` (or None where None means unset)."""
    if value is None and allow_none:
        return
    if value is None or isinstance(value, bool) or not value > 0:  # `not >` also refuses NaN
        raise ValueError(f"--{flag} must be > 0, got {value}")


def fit_max_seq_length(max_seq_length: int, checkpoint_dir: str | Path) -> int:
    """--train.max_seq_length checked against the model's context, read from config.json before any weight loads.

    Above the context a value is refused in one line: a decoder has no positions past its max position embeddings
    (learned position tables end there, RoPE tables are built to it); T5's relative positions would run on, but
    config.json's `n_positions` (512 for flan-t5) is the length it was trained at, so it counts as its context (a
    T5 config without it has none; raise it to train longer on purpose). Only the default, 512, is capped instead,
    with one warning, so that a run that never set the flag still starts on a model built for fewer positions.
    Returns the length to train with."""
    kind = kind_of_folder(checkpoint_dir)
    context = kind.context_length(kind.config_of(checkpoint_dir))
    if context is None or max_seq_length <= context:
        return max_seq_length
    if max_seq_length == DEFAULT_MAX_SEQ_LENGTH:
        warnings.warn(f"--train.max_seq_length defaults to {max_seq_length}, more than the {context}-token context "
                      f"{checkpoint_dir}/config.json gives the model: training with {context}", stacklevel=2)
        return context
    raise ValueError(f"--train.max_seq_length {max_seq_length} is more than the {context}-token context "
                     f"{checkpoint_dir}/config.json gives the model; use --train.max_seq_length {context} or less")


@dataclass
class TrainArgs:
    micro_batch_size: int = 4
    """Samples per forward/backward pass."""
    global_batch_size: int = 16
    """Samples per optimizer step (gradient accumulation = global / micro)."""
    epochs: int = 1
    """Passes over the training split (ignored when --train.max_steps is given)."""
    max_steps: int | None = None
    """Train exactly this many optimizer steps, repeating epochs as needed (overrides --train.epochs)."""
    max_tokens: int | None = None
    """Stop after this many trained (non-pad) tokens."""
    max_time: float | None = None
    """Stop after this many seconds of training."""
    max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    """Cosine decay ends at this fraction of the peak learning rate."""
    max_norm: float | None = 1.0
    """Gradient clipping norm (None: no clipping)."""
    packing: bool = False
    """Pack several samples per row (no padding, no attention across samples)."""
    activation_checkpointing: bool = False
    """Recompute each block in backward to save activation memory."""
    compile: bool = False
    """Regional torch.compile of the transformer blocks (about a minute of compiling on 2 CPU cores, 7-20 s once
    inductor's cache holds the graphs). On a 2-core AMX CPU under bf16-mixed it paid off only on long rows: LoRA steps
    of 4 x 256 tokens 1.02-1.26x faster than leantune's fused eager ops, of 4 x 56 (the main job's) 0.83-0.93x."""
    log_interval: int = 1
    logger: Literal["csv", "tensorboard", "mlflow", "wandb"] = "csv"
    """metrics.csv is always written; tensorboard also writes event files to <out_dir>/tensorboard; mlflow logs
    params, per-step metrics and artifacts to MLFLOW_TRACKING_URI (default: a local ./mlflow.db); wandb does the
    same to a W&B run, offline in <out_dir>/wandb unless WANDB_MODE=online."""
    save_interval: int | None = None
    """Save a checkpoint every N optimizer steps (always at the end)."""
    seed: int = 42

    def __post_init__(self) -> None:
        at_least("train.micro_batch_size", self.micro_batch_size, 1)
        at_least("train.global_batch_size", self.global_batch_size, 1)
        at_least("train.epochs", self.epochs, 1)
        at_least("train.max_steps", self.max_steps, 1, allow_none=True)
        at_least("train.max_tokens", self.max_tokens, 1, allow_none=True)
        positive("train.max_time", self.max_time, allow_none=True)
        at_least("train.max_seq_length", self.max_seq_length, 1)
        at_least("train.warmup_steps", self.warmup_steps, 0)
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"--train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        positive("train.max_norm", self.max_norm, allow_none=True)
        at_least("train.log_interval", self.log_interval, 1)
        at_least("train.save_interval", self.save_interval, 1, allow_none=True)
        if isinstance(self.seed, bool) or not 0 <= self.seed < 2**63:  # torch seeds are 64-bit; offsets get added
            raise ValueError(f"--train.seed must be in [0, 2**63), got {self.seed}")
        self.accumulation  # noqa: B018 -- global must be a multiple of micro: checked here, at parse time

    @property
    def accumulation(self) -> int:
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(f"--train.global_batch_size {self.global_batch_size} must be a multiple of "
                             f"--train.micro_batch_size {self.micro_batch_size}")
        return self.global_batch_size // self.micro_batch_size


@dataclass
class EvalArgs:
    interval: int | None = None
    """Validate every N optimizer steps (always at the end)."""
    max_batches: int | None = 20
    """Validation batches per evaluation (None: the whole split)."""
    initial_validation: bool = False
    sample_new_tokens: int = 48
    """Generate a sample answer for the first validation prompt at each evaluation (0: off)."""
    exact_match: bool = True
    """Before and after training, score greedy answers on the data's held-out test set when it has one (Demo)."""

    def __post_init__(self) -> None:
        at_least("eval.interval", self.interval, 1, allow_none=True)
        at_least("eval.max_batches", self.max_batches, 1, allow_none=True)
        at_least("eval.sample_new_tokens", self.sample_new_tokens, 0)
