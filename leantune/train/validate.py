"""Validation loss: the held-out half of training's own objective, shared by the loop and `leantune evaluate`."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from leantune.models.decoder.model import GPT
from leantune.train.loss import is_seq2seq_batch, seq2seq_ce_sum, supervised_ce_sum
from leantune.train.preference import PreferenceObjective


@torch.no_grad()
def validation_loss(model: GPT, loader, device: torch.device, max_batches: int | None = None,
                    reduce: Callable[[list[float]], list[float]] | None = None) -> dict[str, float]:
    """Token-weighted mean cross-entropy over the supervised tokens of `loader`, and its perplexity. `reduce` sums
    (loss sum, token count) over the ranks of a multi-process run, each of which saw its share of every batch."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        labels = batch["labels"].to(device)
        if is_seq2seq_batch(batch):
            total += float(seq2seq_ce_sum(model, {k: v.to(device) for k, v in batch.items()
                                                  if isinstance(v, torch.Tensor)}))
        else:
            kwargs = {k: batch[k].to(device) for k in ("position_ids", "segment_ids") if k in batch}
            hidden = model(batch["input_ids"].to(device), return_hidden=True, **kwargs)
            total += float(supervised_ce_sum(hidden, model.lm_head, labels))
        n += int((labels != -100).sum())
    model.train(was_training)
    if reduce is not None:
        total, n = reduce([total, n])
    loss = total / max(n, 1)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50))}


@torch.no_grad()
def preference_validation(model: GPT, loader, device: torch.device, objective: PreferenceObjective,
                          max_batches: int | None = None,
                          reduce: Callable[[list[float]], list[float]] | None = None) -> dict[str, float]:
    """The objective's loss on held-out pairs (val_loss), with their reward accuracy and margin."""
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        b = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        terms, stats = objective.terms(model, b)
        counts = objective.counts(b)
        for k, v in [*((f"loss_{k}", float(t)) for k, t in terms.items()), *((f"n_{k}", n) for k, n in counts.items()),
                     ("accuracy", float(stats["reward_accuracy"])), ("margin", float(stats["reward_margin"]))]:
            sums[k] = sums.get(k, 0.0) + v
    model.train(was_training)
    if reduce is not None:
        sums = dict(zip(sums, reduce(list(sums.values()))))
    pairs = max(sums.get("n_pairs", 0.0), 1.0)
    loss = sum(v / max(sums[f"n_{k[5:]}"], 1.0) for k, v in sums.items() if k.startswith("loss_"))
    return {"val_loss": loss, "val_reward_accuracy": sums.get("accuracy", 0.0) / pairs,
            "val_reward_margin": sums.get("margin", 0.0) / pairs}
