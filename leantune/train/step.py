"""One optimizer step over one accumulation window: the hot path, shared by the loop and estimate's measurement."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch

from leantune.train.loss import is_seq2seq_batch, seq2seq_ce_sum, supervised_ce_sum
from leantune.train.preference import STAT_KEYS, PreferenceObjective


class NonFiniteError(RuntimeError):
    pass


@dataclass
class StepResult:
    loss: float
    """Mean cross-entropy over the window's supervised tokens (token-weighted across micro-batches)."""
    grad_norm: float
    """Total gradient norm before clipping."""
    tokens: int
    """Non-pad tokens trained on."""
    supervised: int
    """Tokens whose label counted in the loss."""
    metrics: dict[str, float] = field(default_factory=dict)
    """A preference objective's per-step means over the window's pairs (rewards, accuracy, margin, log-probs)."""


def _no_phase(name: str) -> AbstractContextManager:
    return contextlib.nullcontext()


def train_step(model: torch.nn.Module, window: list[dict], optimizer: torch.optim.Optimizer,
               params: list[torch.nn.Parameter], *, device: torch.device | None = None,
               autocast: Callable[[], AbstractContextManager] = contextlib.nullcontext,
               scaler: torch.amp.GradScaler | None = None, max_norm: float | None = None, step: int = 1,
               phase: Callable[[str], AbstractContextManager] = _no_phase,
               regularizer: Callable[[], torch.Tensor | None] | None = None,
               after_step: Callable[[], None] | None = None,
               sum_across: Callable[[list[float]], list[float]] | None = None,
               objective: PreferenceObjective | None = None) -> StepResult:
    """Forward/backward every micro-batch of `window`, clip, check for non-finite values, step, zero the grads.

    The loss of each micro-batch is divided by the window's supervised-token count, so 1x8, 2x4 and 8x1 give the
    same update. `step` (1-based) only labels errors. `phase(name)` wraps "forward", "backward" and "step" (estimate
    profiles each); a non-finite loss or gradient raises before the optimizer touches the weights.
    `regularizer()` (a method's extra loss term, outside autocast) is backpropagated once per window, and not
    counted in the reported loss; `after_step()` runs after the optimizer step, while the gradients still exist.
    `sum_across(values)` sums over the ranks of a data-parallel run (each `window` is then this rank's share): the
    loss is divided by the whole window's supervised tokens, and the reported loss and token count are global.
    `objective` (a preference run) replaces the cross-entropy: each of its loss sums is divided by the window's
    total of its normaliser (pairs; ORPO's NLL tokens too), so the update is again invariant to the cut.
    """
    device = device or params[0].device
    n_sup = sum(int((b["labels"] != -100).sum()) for b in window)
    counts = window_counts(objective, window, sum_across)
    if sum_across is not None:
        n_sup = int(sum_across([n_sup])[0])
    if n_sup == 0:
        raise ValueError(f"step {step}: no supervised tokens in the batch (samples {_sample_ids(window)}); check "
                         "--data.mask_prompt and max_seq_length")
    loss_sum = torch.zeros((), device=device)
    stats = dict.fromkeys(STAT_KEYS, 0.0)
    tokens = 0
    for b in window:
        b = _to_device(b, device)
        with phase("forward"), autocast():
            # the hidden states are not kept past the loss: backward needs only what the graph saved
            if objective is not None:
                terms, batch_stats = objective.terms(model, b)
                loss = sum(terms[k] / counts[k] for k in terms)
                for k, v in batch_stats.items():
                    stats[k] += float(v)
            elif is_seq2seq_batch(b):
                loss = seq2seq_ce_sum(model, b) / n_sup
            else:
                loss = supervised_ce_sum(model(b["input_ids"], return_hidden=True, **_positional(b)), model.lm_head,
                                         b["labels"]) / n_sup
        with phase("backward"):
            (scaler.scale(loss) if scaler else loss).backward()
        loss_sum += loss.detach()
        del loss
        tokens += int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
        if is_seq2seq_batch(b):
            tokens += int((b["labels"] != -100).sum())  # the decoder's tokens (labels = its inputs shifted)
    reg = regularizer() if regularizer is not None else None
    if reg is not None:
        with phase("backward"):
            (scaler.scale(reg) if scaler else reg).backward()
    with phase("step"):
        if scaler:
            scaler.unscale_(optimizer)
        grad_norm = _float(torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf")))
        loss_value = float(loss_sum)
        if sum_across is not None:
            loss_value, total_tokens, *stat_values = sum_across([loss_value, tokens, *stats.values()])
            tokens = int(total_tokens)
            stats = dict(zip(stats, stat_values))
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            what = "loss" if not math.isfinite(loss_value) else "gradient norm"
            optimizer.zero_grad(set_to_none=True)
            raise NonFiniteError(f"step {step}: non-finite {what} (loss={loss_value}, grad_norm={grad_norm}) on "
                                 f"samples {_sample_ids(window)}; no checkpoint was written from this state. Lower "
                                 "the learning rate or check these samples.")
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if after_step is not None:
            after_step()
        optimizer.zero_grad(set_to_none=True)
    metrics = {k: v / counts["pairs"] for k, v in stats.items()} if objective is not None else {}
    return StepResult(loss=loss_value, grad_norm=grad_norm, tokens=tokens, supervised=n_sup, metrics=metrics)


def window_counts(objective: PreferenceObjective | None, window: list[dict],
                  sum_across: Callable[[list[float]], list[float]] | None) -> dict[str, int]:
    """The objective's normalisers summed over the window (and the ranks): what each loss sum is divided by."""
    if objective is None:
        return {}
    counts: dict[str, int] = {}
    for b in window:
        for k, v in objective.counts(b).items():
            counts[k] = counts.get(k, 0) + v
    if sum_across is not None:
        counts = dict(zip(counts, (int(v) for v in sum_across(list(counts.values())))))
    return counts


def _float(x) -> float:
    """A float of the total norm, which clip_grad_norm_ returns as a DTensor over sharded (FSDP) parameters."""
    full = getattr(x, "full_tensor", None)
    return float(full() if full is not None else x)


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
