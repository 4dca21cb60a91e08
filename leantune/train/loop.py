"""The one training loop for every method, in named steps over a typed state (leantune.train.state.TrainState).

A method only decides which parameters are trainable and how a checkpoint is written (`save_fn`); everything
else (precision, batching, token-weighted loss, non-finite checks, logging, exact resume) lives here once:
setup_model -> setup_optimizer -> plan_steps -> resume_state -> epoch_batches / train_step (leantune.train.step)
-> save_checkpoint, with logging in leantune.train.metrics.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from leantune.checkpoint.io import atomic_dir, load_safetensors, save_safetensors
from leantune.decode.compile import compile_blocks
from leantune.models.kinds import blocks
from leantune.models.quantize import logical_numel
from leantune.peft.base import Method
from leantune.runtime import autocast_dtype, cast_frozen_matrices, restore_dtypes
from leantune.train.args import EvalArgs, TrainArgs
from leantune.train.distributed import (
    FSDPArgs,
    Parallel,
    ShardedLoader,
    check_batch_sizes,
    check_fsdp_args,
    consolidated,
    is_sharded_checkpoint,
    load_full_optimizer,
    load_sharded,
    rank_streams,
    restore_rank_streams,
    save_sharded,
    shard_batch,
    shard_model,
    shared_atomic_dir,
)
from leantune.train.loss import release_head_caches
from leantune.train.metrics import PREFERENCE_FIELDS, open_loggers, plot_loss
from leantune.train.optim import OptimizerArgs, build_optimizer
from leantune.train.preference import PreferenceObjective
from leantune.train.protocol import TrainingData
from leantune.train.run_config import batch_position, check_resume, jsonable, load_run_config, save_run_config
from leantune.train.schedule import lr_at
from leantune.train.state import (
    TrainState,
    find_latest_checkpoint,
    load_training_state,
    read_training_state,
    save_training_state,
)
from leantune.train.step import NonFiniteError, train_step
from leantune.train.tracking import require_logger
from leantune.train.validate import preference_validation, validation_loss

METHOD_STATE_FILE = "method_state.safetensors"
"""A method's state between steps (`Method.train_state`), beside training_state.pt in each checkpoint."""

__all__ = ["EvalArgs", "NonFiniteError", "TrainArgs", "fit", "enable_activation_checkpointing", "run_configuration"]


def fit(
    model: torch.nn.Module,
    trainable: list[str],
    data: TrainingData,
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
    run_config: dict[str, Any] | None = None,
    method: Method | None = None,
    parallel: Parallel | None = None,
    fsdp: FSDPArgs | None = None,
    objective: PreferenceObjective | None = None,
) -> dict[str, Any]:
    """Train `trainable` parameters of `model` on `data`; returns a summary dict. Checkpoints go to out_dir/step-N
    and out_dir/final, each with the run configuration (`run.json`: the caller's `run_config` - base, data, method
    args... - plus this loop's train/eval/optimizer/precision settings), which a resume must match. `method`'s
    hooks (regularizer, on_step, train_state), when given, join every step and checkpoint.

    With `parallel` of several ranks (leantune.train.distributed): `data` yields global batches of
    micro_batch_size x world_size rows, of which each rank trains on its share; the model is sharded with FSDP2
    (`fsdp` settings), checkpoints are sharded (DCP) and rank 0 alone logs and writes the other files.

    With `objective` (leantune.train.preference) `data` yields preference pairs and every step, validation and log
    row uses its loss and reward statistics instead of the cross-entropy; the rest of the loop is unchanged."""
    summary_writer_cls = require_logger(train.logger)  # TensorBoard's or MLflow's writer; fails before any work
    parallel = parallel or Parallel()
    check_parallel_method(parallel, method)
    check_fsdp_args(parallel, fsdp or FSDPArgs(), precision, optimizer_args.name)
    device = device or next(model.parameters()).device
    out_dir = Path(out_dir)
    config = run_configuration(run_config, train, eval, optimizer_args, precision, parallel.world_size)
    ckpt = resume_checkpoint(out_dir, resume)
    if ckpt is not None:
        check_resume(ckpt, config)  # before load_fn: another run's checkpoint is refused, not a size mismatch
    main = parallel.is_main
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    sharded_ckpt = ckpt is not None and is_sharded_checkpoint(ckpt)
    if ckpt is not None and parallel.enabled and not sharded_ckpt:
        load_fn(ckpt)  # a one-process checkpoint: whole tensors, copied in before the model is sharded
    setup_model(model, train)
    if parallel.enabled:
        shard_model(model, parallel, precision, fsdp or FSDPArgs())
    amp = autocast_dtype(precision)
    # -mixed in one process: the frozen base's linears in the autocast dtype for the run (restored at the end);
    # several processes keep FSDP's / DDP's own mixed-precision handling
    cast = cast_frozen_matrices(model, trainable, amp) if amp is not None and not parallel.enabled else {}
    try:
        params, optimizer = setup_optimizer(model, trainable, optimizer_args)
        scaler = torch.amp.GradScaler(device.type) if precision == "16-mixed" else None
        accumulation = accumulation_steps(train, parallel)
        total_steps = plan_steps(data, train, accumulation)
        torch.manual_seed(train.seed + parallel.rank)  # rank 0 draws the one-process stream; other ranks their own
        state = TrainState()
        if ckpt is not None:
            state = resume_state(ckpt, model, trainable, optimizer, scaler, load_fn, method, parallel)
            state.batch_in_epoch = batch_position(load_run_config(ckpt), state.batch_in_epoch,  # another cut: same rows
                                                  train.micro_batch_size * parallel.world_size,
                                                  len(data.train_dataloader(epoch=state.epoch)))
            if main:
                print(f"Resumed from {ckpt} at step {state.step}")
        autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp else contextlib.nullcontext

        def evaluate() -> dict[str, float]:
            loader = data.val_dataloader() if not parallel.enabled else ShardedLoader(data.val_dataloader(), parallel)
            reduce = parallel.sum if parallel.enabled else None
            with autocast():
                if objective is not None:
                    return preference_validation(model, loader, device, objective, eval.max_batches, reduce=reduce)
                return validation_loss(model, loader, device, eval.max_batches, reduce=reduce)

        if eval.initial_validation:
            row = evaluate()
            if main:
                print(f"initial validation: {_fmt(row)}")
        loggers = (open_loggers(out_dir, summary_writer_cls, state.step if ckpt is not None and state.step > 0 else None,
                                tuple(PREFERENCE_FIELDS) if objective is not None else ())
                   if main else _NoLoggers())
        model.train()
        bar = tqdm(total=total_steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True, disable=not main)
        t_start = time.perf_counter() - state.train_time
        last_loss, stop_reason = float("nan"), None
        resuming = ckpt is not None
        sum_across = parallel.sum if parallel.enabled else None

        def save(path: Path, consolidate: bool = False) -> None:
            if parallel.enabled:
                save_sharded_checkpoint(path, parallel, model, save_fn if consolidate else None, state, optimizer,
                                        scaler, config, frozen=method is None or method.saves_full_model)
            else:
                save_checkpoint(path, save_fn, state, optimizer, scaler, config, method_state(method, model))
        while stop_reason is None:
            if state.step >= total_steps:
                stop_reason = "max_steps" if train.max_steps is not None else "epochs"
                break
            if train.max_steps is None and state.epoch >= train.epochs:
                stop_reason = "epochs"
                break
            batches = epoch_batches(data, state, resuming)
            if parallel.enabled:
                batches = (shard_batch(b, parallel.rank, parallel.world_size) for b in batches)
            resuming = False
            while state.step < total_steps:
                window = [b for b in (next(batches, None) for _ in range(accumulation)) if b is not None]
                if len(window) < accumulation:
                    break  # drop the incomplete tail window of the epoch (keeps every step's batch size equal)
                state.batch_in_epoch += accumulation
                lr = lr_at(state.step, optimizer_args.lr, train.warmup_steps, total_steps, train.min_lr_ratio)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                result = train_step(model, window, optimizer, params, device=device, autocast=autocast, scaler=scaler,
                                    max_norm=train.max_norm, step=state.step + 1, sum_across=sum_across,
                                    objective=objective, **step_hooks(method, model, state.step, total_steps))
                last_loss = result.loss
                state.step += 1
                state.tokens += result.tokens
                state.train_time = time.perf_counter() - t_start
                tok_s = state.tokens / max(state.train_time, 1e-9)
                row = dict(step=state.step, epoch=state.epoch, loss=last_loss, lr=lr, grad_norm=result.grad_norm,
                           tokens=state.tokens, tokens_per_s=tok_s, time_s=state.train_time, mem_gb=_memory_gb(device),
                           **result.metrics)
                bar.update(1)
                bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}", mem=f"{row['mem_gb']:.1f}G")
                if eval.interval and state.step % eval.interval == 0 and state.step < total_steps:
                    row.update(evaluate())
                    if main:
                        bar.write(f"step {state.step}: {_fmt(row)}")
                    if sample_fn and eval.sample_new_tokens:
                        with autocast():
                            text = sample_fn()  # every rank: a sharded model generates together
                        if main:
                            bar.write(f"sample: {text!r}")
                loggers.write(row)
                if train.save_interval and state.step % train.save_interval == 0 and state.step < total_steps:
                    save(out_dir / f"step-{state.step:06d}")
                if train.max_tokens and state.tokens >= train.max_tokens:
                    stop_reason = "max_tokens"
                elif train.max_time and state.train_time >= train.max_time:
                    stop_reason = "max_time"
                if stop_reason is not None:
                    break
            else:
                continue  # step == total_steps mid-epoch: the epoch is not over, the check above stops the run
            if stop_reason is None:  # the epoch ran out of full windows
                state.epoch += 1
                state.batch_in_epoch = 0
        bar.close()
        final = evaluate()
        loggers.write(dict(step=state.step, **final))
        loggers.close()
        final_dir = out_dir / "final"
        save(final_dir, consolidate=True)
        named = dict(model.named_parameters())
        n_trainable = sum(named[n].numel() for n in trainable)
        n_total = sum(logical_numel(p) for p in {id(p): p for p in model.parameters()}.values())  # 4-bit: 2 per byte
        if main:
            plot_loss(out_dir / "metrics.csv", out_dir / "loss.png")
        return dict(steps=state.step, tokens=state.tokens, time_s=round(state.train_time, 2),
                    tokens_per_s=round(state.tokens / max(state.train_time, 1e-9), 1), final_loss=last_loss,
                    peak_memory_gb=round(_memory_gb(device, peak=True), 3), trainable_params=n_trainable,
                    total_params=n_total, stop_reason=stop_reason, checkpoint=str(final_dir), **final)
    finally:  # on success and on failure alike (a notebook catching the error reuses the model)
        restore_dtypes(model, cast)  # callers (exact match, merge, export) get the model in the dtypes they gave
        release_head_caches()  # the head's bf16 copy (bf16-mixed with a tied fp32 head) and its CPU workspaces


def run_configuration(run_config: dict[str, Any] | None, train: TrainArgs, eval: EvalArgs,
                      optimizer_args: OptimizerArgs, precision: str, world_size: int = 1) -> dict[str, Any]:
    """The caller's settings (base, data, method args, quantize...) plus the loop's own, as plain JSON types.

    train.micro_batch_size is recorded as typed (per process); several ranks also record world_size and batch_rows
    (micro batch x world size), what a resume on another world size needs (see leantune.train.run_config)."""
    extra: dict[str, Any] = {}
    if world_size > 1:
        extra.update(world_size=world_size, batch_rows=train.micro_batch_size * world_size)
    return jsonable({**(run_config or {}), "train": train, "eval": eval, "optimizer": optimizer_args,
                     "precision": precision, **extra})


def resume_checkpoint(out_dir: Path, resume: Path | str | None) -> Path | None:
    """The checkpoint to resume: "auto" -> the latest complete step-N in out_dir (None: start fresh), or a folder."""
    if not resume:
        return None
    if str(resume) == "auto":
        return find_latest_checkpoint(out_dir)
    ckpt = Path(resume)
    if not ckpt.is_dir():
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint")
    return ckpt


def setup_model(model: torch.nn.Module, train: TrainArgs) -> None:
    if train.activation_checkpointing:
        enable_activation_checkpointing(model)
    if train.compile:
        compile_blocks(blocks(model))


def setup_optimizer(model: torch.nn.Module, trainable: list[str], args: OptimizerArgs):
    named = dict(model.named_parameters())
    params = [named[n] for n in trainable]
    return params, build_optimizer(params, args)


def accumulation_steps(train: TrainArgs, parallel: Parallel) -> int:
    """Micro-batches per optimizer step on each rank: global batch / (micro batch x ranks)."""
    return check_batch_sizes(train.micro_batch_size, train.global_batch_size, parallel.world_size)


def plan_steps(data: TrainingData, train: TrainArgs, accumulation: int | None = None) -> int:
    """Total optimizer steps: --train.max_steps when given (epochs repeat as needed), else epochs x full windows."""
    accumulation = accumulation or train.accumulation
    batches = len(data.train_dataloader(epoch=0))
    if batches < accumulation:
        raise ValueError(f"the training split gives {batches} batch(es) of --train.micro_batch_size "
                         f"{train.micro_batch_size}, fewer than one optimizer step of --train.global_batch_size "
                         f"{train.global_batch_size}: lower --train.global_batch_size or give more data")
    return train.max_steps if train.max_steps is not None else batches // accumulation * train.epochs


def epoch_batches(data: TrainingData, state: TrainState, resuming: bool) -> Iterator[dict]:
    """This epoch's batches from state.batch_in_epoch on, with the RNG exactly where an uninterrupted run has it.

    Making a loader iterator draws from torch's generator (a DataLoader's base seed, a shuffling sampler). A
    straight run records the generator before that draw; a resumed one replays it from there, skips the used
    batches, and only then restores the generator of the checkpointed step (else dropout masks would shift).
    """
    if resuming:
        state.restore_epoch_rng()  # a format-1 state has none: the iterator's draw is then simply overwritten
    else:
        state.capture_epoch_rng()
    batches = iter(data.train_dataloader(epoch=state.epoch))
    for _ in range(state.batch_in_epoch):
        next(batches)
    if resuming:
        state.restore_rng()
    return batches


def save_checkpoint(path: Path, save_fn: Callable[[Path], None], state: TrainState, optimizer, scaler,
                    config: dict[str, Any], extra_state: dict[str, torch.Tensor] | None = None) -> None:
    """Weights (by the method's save_fn), run configuration, training state and the method's own state between
    steps (`extra_state`, e.g. AdaLoRA's importance averages) land together, atomically."""
    with atomic_dir(path) as tmp:
        save_fn(tmp)
        save_run_config(tmp, config)
        if extra_state is not None:
            save_safetensors({k: v.detach().cpu().contiguous() for k, v in extra_state.items()},
                             tmp / METHOD_STATE_FILE)
        save_training_state(tmp, state, optimizer, scaler)


def save_sharded_checkpoint(path: Path, parallel: Parallel, model: torch.nn.Module,
                            save_fn: Callable[[Path], None] | None, state: TrainState, optimizer, scaler,
                            config: dict[str, Any], frozen: bool = True) -> None:
    """A checkpoint of several ranks, atomically: every rank's shards of the trainable tensors and optimizer state
    (dcp/), and from rank 0 the run configuration and training state with every rank's RNG streams; with
    `save_fn` also the method's consolidated folder (adapter or HF model), as one process writes it; `frozen`: whether
    that needs the frozen tensors too (a full model does, an adapter does not)."""
    state.capture_rng()
    streams = parallel.gather(rank_streams(state))
    with shared_atomic_dir(path, parallel) as tmp:
        save_sharded(tmp, model, optimizer)
        if save_fn is not None:
            with consolidated(model, parallel, frozen) as writer:
                if writer:
                    save_fn(tmp)
        if parallel.is_main:
            save_run_config(tmp, config)
            save_training_state(tmp, state, None, scaler, extra={"ranks": streams, "world_size": parallel.world_size})


def resume_state(ckpt: Path, model: torch.nn.Module, trainable: list[str], optimizer, scaler,
                 load_fn: Callable[[Path], None], method: Method | None, parallel: Parallel) -> TrainState:
    """Load checkpoint `ckpt` into the (possibly sharded) model and optimizer; returns its training state.

    One process, one-process checkpoint: the method's load_fn and the optimizer state as saved. A sharded checkpoint
    (dcp/) loads on any world size (DCP reshards). A one-process checkpoint on several ranks: its tensors were
    copied in before sharding (see fit); its optimizer state is sharded here."""
    if not is_sharded_checkpoint(ckpt) and not parallel.enabled:
        load_fn(ckpt)
        load_method_state(ckpt, method, model)
        return load_training_state(ckpt, optimizer, scaler)
    state, blob = read_training_state(ckpt)
    if is_sharded_checkpoint(ckpt):
        load_sharded(ckpt, model, optimizer)
    else:
        load_full_optimizer(model, optimizer, blob["optimizer"], trainable)
    if scaler is not None and blob.get("scaler"):
        scaler.load_state_dict(blob["scaler"])
    restore_rank_streams(state, blob.get("ranks"), parallel)
    return state


def check_parallel_method(parallel: Parallel, method: Method | None) -> None:
    """Methods with state between steps (AdaLoRA's rank allocator) run in one process only, for now."""
    if parallel.enabled and method is not None and (method.regularizer or method.on_step or method.train_state):
        raise ValueError(f"{method.name} finetuning keeps state between steps (a regularizer or a per-step "
                         "allocation over whole tensors) and runs in one process only: leave --devices out")


class _NoLoggers:
    """Ranks other than 0 log nothing."""

    def write(self, row: dict) -> None:
        pass

    def close(self) -> None:
        pass


def step_hooks(method: Method | None, model: torch.nn.Module, step: int, total_steps: int) -> dict[str, Any]:
    """train_step's regularizer/after_step for the method's hooks; `step` is the 0-based index of the step taken."""
    hooks: dict[str, Any] = {}
    if method is not None and method.regularizer is not None:
        hooks["regularizer"] = lambda: method.regularizer(model)
    if method is not None and method.on_step is not None:
        hooks["after_step"] = lambda: method.on_step(model, step, total_steps)
    return hooks


def method_state(method: Method | None, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    return method.train_state(model) if method is not None and method.train_state is not None else None


def load_method_state(ckpt: Path, method: Method | None, model: torch.nn.Module) -> None:
    """Give a resumed method the state it saved; a method with state refuses a checkpoint without it."""
    if method is None or method.load_train_state is None:
        return
    file = Path(ckpt) / METHOD_STATE_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing; the {method.name} run cannot resume exactly without its state")
    method.load_train_state(model, load_safetensors(file))


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

    for block in blocks(model):
        forward = block.forward

        def wrapped(*args, _f=forward):
            return checkpoint(_f, *args, use_reentrant=False) if torch.is_grad_enabled() else _f(*args)

        block.forward = wrapped
