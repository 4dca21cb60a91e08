"""The one training loop for every method: accumulation, schedule, clipping, eval, checkpoints, exact resume.

A method only decides which parameters are trainable and how a checkpoint is written (`save_fn`); everything
else (precision, batching, token-weighted loss, non-finite checks, logging, resume) lives here once.
"""

from __future__ import annotations

import contextlib
import csv
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from leantune.checkpoint.io import atomic_dir
from leantune.evaluate import validation_loss
from leantune.quantize import logical_numel
from leantune.runtime import autocast_dtype
from leantune.train.loss import supervised_ce_sum
from leantune.train.optim import OptimizerArgs, build_optimizer
from leantune.train.schedule import lr_at
from leantune.train.state import find_latest_checkpoint, load_training_state, save_training_state


@dataclass
class TrainArgs:
    micro_batch_size: int = 4
    """Samples per forward/backward pass."""
    global_batch_size: int = 16
    """Samples per optimizer step (gradient accumulation = global / micro)."""
    epochs: int = 1
    max_steps: int | None = None
    """Stop after this many optimizer steps."""
    max_tokens: int | None = None
    """Stop after this many trained (non-pad) tokens."""
    max_time: float | None = None
    """Stop after this many seconds of training."""
    max_seq_length: int = 512
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
    """Regional torch.compile of the transformer blocks (a minute of compiling on 2 CPU cores; on CPU it did not
    measurably beat leantune's fused eager ops, see bench/lora_cpu.py --compile)."""
    log_interval: int = 1
    logger: Literal["csv", "tensorboard"] = "csv"
    """metrics.csv is always written; tensorboard also writes event files to <out_dir>/tensorboard."""
    save_interval: int | None = None
    """Save a checkpoint every N optimizer steps (always at the end)."""
    seed: int = 42

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


class NonFiniteError(RuntimeError):
    pass


def fit(
    model: torch.nn.Module,
    trainable: list[str],
    data,
    out_dir: Path,
    save_fn: Callable[[Path], None],
    load_fn: Callable[[Path], None],
    train: TrainArgs,
    eval: EvalArgs,
    optimizer_args: OptimizerArgs,
    precision: str = "32-true",
    device: torch.device | None = None,
    resume: Path | str | None = None,
    sample_fn: Callable[[], str] | None = None,
) -> dict[str, Any]:
    """Train `trainable` parameters of `model` on `data`; returns a summary dict. Checkpoints go to out_dir/step-N."""
    summary_writer_cls = _require_tensorboard() if train.logger == "tensorboard" else None  # fail before any work
    device = device or next(model.parameters()).device
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    named = dict(model.named_parameters())
    params = [named[n] for n in trainable]
    accumulation = train.accumulation
    optimizer = build_optimizer(params, optimizer_args)
    if train.activation_checkpointing:
        enable_activation_checkpointing(model)
    if train.compile:
        from leantune.compile import compile_blocks

        compile_blocks(model)

    steps_per_epoch = max(1, len(data.train_dataloader(epoch=0)) // accumulation)
    total_steps = train.max_steps or steps_per_epoch * train.epochs
    if train.max_steps:
        total_steps = min(total_steps, train.max_steps)
    state = dict(step=0, epoch=0, batch_in_epoch=0, tokens=0, train_time=0.0)
    torch.manual_seed(train.seed)
    if resume:
        ckpt = find_latest_checkpoint(out_dir) if str(resume) == "auto" else Path(resume)
        if ckpt is None and str(resume) != "auto":
            raise FileNotFoundError(f"--resume {resume}: no such checkpoint")
        if ckpt is not None:
            load_fn(ckpt)
            state = load_training_state(ckpt, optimizer)
            print(f"Resumed from {ckpt} at step {state['step']}")

    metrics_path = out_dir / "metrics.csv"
    resumed = bool(resume) and state["step"] > 0
    metrics = _MetricsWriter(metrics_path, append=resumed, after_step=state["step"])
    if summary_writer_cls is not None:
        metrics = _Loggers([metrics, _TensorBoardWriter(summary_writer_cls, out_dir / "tensorboard",
                                                        first_step=state["step"] + 1 if resumed else None)])
    amp = autocast_dtype(precision)
    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp else contextlib.nullcontext
    scaler = torch.amp.GradScaler(device.type) if precision == "16-mixed" else None

    def evaluate() -> dict[str, float]:
        with autocast():
            return validation_loss(model, data.val_dataloader(), device, eval.max_batches)

    if eval.initial_validation:
        print(f"initial validation: {_fmt(evaluate())}")

    model.train()
    bar = tqdm(total=total_steps, initial=state["step"], desc="train", unit="step", dynamic_ncols=True)
    t_start = time.perf_counter() - state["train_time"]
    last_loss = float("nan")
    stop_reason = "done"
    epoch = state["epoch"]
    while state["step"] < total_steps and epoch < train.epochs:
        loader = iter(data.train_dataloader(epoch=epoch))
        for _ in range(state["batch_in_epoch"]):  # exact data position on resume
            next(loader)
        while state["step"] < total_steps:
            window = [b for b in (next(loader, None) for _ in range(accumulation)) if b is not None]
            if len(window) < accumulation:
                break  # drop the incomplete tail window of the epoch (keeps every step's batch size equal)
            state["batch_in_epoch"] += accumulation
            lr = lr_at(state["step"], optimizer_args.lr, train.warmup_steps, total_steps, train.min_lr_ratio)
            for g in optimizer.param_groups:
                g["lr"] = lr
            n_sup = sum(int((b["labels"] != -100).sum()) for b in window)
            if n_sup == 0:
                raise ValueError(f"step {state['step']}: no supervised tokens in the batch (samples "
                                 f"{_sample_ids(window)}); check --data.mask_prompt and max_seq_length")
            loss_sum = torch.zeros((), device=device)
            for b in window:
                b = _to_device(b, device)
                with autocast():
                    hidden = model(b["input_ids"], return_hidden=True, **_positional(b))
                    loss = supervised_ce_sum(hidden, model.lm_head, b["labels"]) / n_sup
                (scaler.scale(loss) if scaler else loss).backward()
                loss_sum += loss.detach()
                state["tokens"] += int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
            if scaler:
                scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, train.max_norm or float("inf"))
            last_loss = float(loss_sum)
            if not (math.isfinite(last_loss) and math.isfinite(float(grad_norm))):
                what = "loss" if not math.isfinite(last_loss) else "gradient norm"
                raise NonFiniteError(f"step {state['step'] + 1}: non-finite {what} ({last_loss=}, grad_norm="
                                     f"{float(grad_norm)}) on samples {_sample_ids(window)}; no checkpoint was written "
                                     f"from this state. Lower the learning rate or check these samples.")
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            state["train_time"] = time.perf_counter() - t_start
            tok_s = state["tokens"] / max(state["train_time"], 1e-9)
            row = dict(step=state["step"], epoch=epoch, loss=last_loss, lr=lr, grad_norm=float(grad_norm),
                       tokens=state["tokens"], tokens_per_s=tok_s, time_s=state["train_time"], mem_gb=_memory_gb(device))
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}", mem=f"{row['mem_gb']:.1f}G")
            if eval.interval and state["step"] % eval.interval == 0 and state["step"] < total_steps:
                row.update(evaluate())
                bar.write(f"step {state['step']}: {_fmt(row)}")
                if sample_fn and eval.sample_new_tokens:
                    bar.write(f"sample: {sample_fn()!r}")
            metrics.write(row)
            if train.save_interval and state["step"] % train.save_interval == 0 and state["step"] < total_steps:
                _checkpoint(out_dir / f"step-{state['step']:06d}", save_fn, optimizer, state, epoch)
            if train.max_tokens and state["tokens"] >= train.max_tokens:
                stop_reason = "max_tokens"
            if train.max_time and state["train_time"] >= train.max_time:
                stop_reason = "max_time"
            if stop_reason != "done":
                break
        if stop_reason != "done":
            break
        epoch += 1
        state["batch_in_epoch"] = 0
    bar.close()
    state["epoch"] = epoch
    final = evaluate()
    metrics.write(dict(step=state["step"], **final))
    metrics.close()
    final_dir = out_dir / "final"
    _checkpoint(final_dir, save_fn, optimizer, state, epoch)
    n_trainable = sum(named[n].numel() for n in trainable)
    n_total = sum(logical_numel(p) for p in {id(p): p for p in model.parameters()}.values())  # 4-bit: 2 per byte
    summary = dict(steps=state["step"], tokens=state["tokens"], time_s=round(state["train_time"], 2),
                   tokens_per_s=round(state["tokens"] / max(state["train_time"], 1e-9), 1), final_loss=last_loss,
                   peak_memory_gb=round(_memory_gb(device, peak=True), 3), trainable_params=n_trainable,
                   total_params=n_total, stop_reason=stop_reason, checkpoint=str(final_dir), **final)
    _plot_loss(metrics_path, out_dir / "loss.png")
    return summary


def _checkpoint(path: Path, save_fn, optimizer, state, epoch) -> None:
    """Weights (by the method's save_fn) and training state land together, atomically, or not at all."""
    with atomic_dir(path) as tmp:
        save_fn(tmp)
        save_training_state(tmp, optimizer, {**state, "epoch": epoch})


def _positional(batch: dict) -> dict:
    return {k: batch[k] for k in ("position_ids", "segment_ids") if k in batch}


def _to_device(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _sample_ids(window: list[dict]) -> list[int]:
    ids: list[int] = []
    for b in window:
        for row in b.get("sample_ids", []):
            ids.extend(row if isinstance(row, list | tuple) else [int(row)])
    return ids


def _memory_gb(device, peak: bool = False) -> float:
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device) if peak else torch.cuda.memory_allocated(device)) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB: peak RSS in GiB
    except Exception:
        return 0.0


def _fmt(row: dict) -> str:
    return ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


def enable_activation_checkpointing(model) -> None:
    """Recompute each block in backward (non-reentrant checkpoint): backward keeps only the block inputs."""
    from torch.utils.checkpoint import checkpoint

    for block in model.transformer.h:
        forward = block.forward

        def wrapped(*args, _f=forward):
            return checkpoint(_f, *args, use_reentrant=False) if torch.is_grad_enabled() else _f(*args)

        block.forward = wrapped


class _MetricsWriter:
    FIELDS = ["step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "time_s", "mem_gb", "val_loss", "val_ppl"]

    def __init__(self, path: Path, append: bool, after_step: int = 0) -> None:
        new = not (append and path.exists())
        if not new:
            self._truncate(path, after_step)
        self.f = open(path, "a" if not new else "w", newline="", encoding="utf-8")
        self.w = csv.DictWriter(self.f, fieldnames=self.FIELDS, extrasaction="ignore")
        if new:
            self.w.writeheader()

    @staticmethod
    def _truncate(path: Path, after_step: int) -> None:
        """Drop rows past the resumed step: a run that got further than its last checkpoint logged steps the
        resumed run repeats, and each step must appear once (TensorBoard's purge_step does the same)."""
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        if all(int(r["step"]) <= after_step for r in rows):
            return
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=_MetricsWriter.FIELDS, extrasaction="ignore")
            w.writeheader()
            w.writerows(r for r in rows if int(r["step"]) <= after_step)
        tmp.replace(path)

    def write(self, row: dict) -> None:
        self.w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def _require_tensorboard():
    """SummaryWriter, or a clear error before any training work when the optional package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError("--train.logger tensorboard needs the tensorboard package: pip install tensorboard "
                          "(or pip install 'leantune[tensorboard]')") from e
    return SummaryWriter


class _TensorBoardWriter:
    """The CSV's scalars as TensorBoard event files, keyed by optimizer step."""

    TAGS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "tokens": "train/tokens",
            "tokens_per_s": "train/tokens_per_s", "time_s": "train/time_s", "mem_gb": "train/mem_gb",
            "epoch": "train/epoch", "val_loss": "val/loss", "val_ppl": "val/ppl"}

    def __init__(self, summary_writer_cls, log_dir: Path, first_step: int | None) -> None:
        # purge_step: on resume TensorBoard hides events of earlier runs from first_step on (steps logged after
        # the checkpoint the run resumed from), so every step shows once, from the run that continued.
        self.writer = summary_writer_cls(log_dir=str(log_dir), purge_step=first_step)

    def write(self, row: dict) -> None:
        for key, tag in self.TAGS.items():
            if row.get(key) is not None:
                self.writer.add_scalar(tag, float(row[key]), global_step=int(row["step"]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _Loggers:
    def __init__(self, loggers: list) -> None:
        self.loggers = loggers

    def write(self, row: dict) -> None:
        for logger in self.loggers:
            logger.write(row)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def _plot_loss(metrics_path: Path, png: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    steps, loss, vsteps, vloss = [], [], [], []
    with open(metrics_path, encoding="utf-8") as f:
        for r in csv.DictReader(f):
            if r.get("loss"):
                steps.append(int(r["step"]))
                loss.append(float(r["loss"]))
            if r.get("val_loss"):
                vsteps.append(int(r["step"]))
                vloss.append(float(r["val_loss"]))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, loss, label="train loss")
    if vloss:
        ax.plot(vsteps, vloss, "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = png.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(png)
