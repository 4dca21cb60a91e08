"""Evaluation: exact-match accuracy of greedy answers, and validation loss/perplexity."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from leantune.generate import greedy_batch
from leantune.model import GPT
from leantune.train.loss import supervised_ce_sum


def exact_match(
    model: GPT,
    tokenizer,
    prompts: Sequence[str],
    answers: Sequence[str],
    score: Callable[[str, str], bool],
    max_new_tokens: int = 32,
    batch_size: int = 16,
) -> tuple[float, list[str]]:
    """Accuracy of greedy completions of rendered prompts against reference answers; also returns predictions."""
    was_training = model.training
    model.eval()
    encoded = [tokenizer.encode(p, bos=None) for p in prompts]
    preds: list[str] = []
    for s in tqdm(range(0, len(encoded), batch_size), desc="exact match", unit="batch", leave=False,
                  dynamic_ncols=True):
        chunk = encoded[s:s + batch_size]
        outs = greedy_batch(model, chunk, max_new_tokens, tokenizer.eos_ids,
                            pad_id=tokenizer.pad_id if tokenizer.pad_id is not None else 0)
        preds.extend(tokenizer.decode(o, skip_special_tokens=True).strip() for o in outs)
    model.train(was_training)
    correct = sum(bool(score(p, a)) for p, a in zip(preds, answers))
    return correct / max(len(answers), 1), preds


@torch.no_grad()
def validation_loss(model: GPT, loader, device: torch.device, max_batches: int | None = None) -> dict[str, float]:
    """Token-weighted mean cross-entropy over the supervised tokens of `loader`, and its perplexity."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        kwargs = {k: batch[k].to(device) for k in ("position_ids", "segment_ids") if k in batch}
        hidden = model(batch["input_ids"].to(device), return_hidden=True, **kwargs)
        labels = batch["labels"].to(device)
        total += float(supervised_ce_sum(hidden, model.lm_head, labels))
        n += int((labels != -100).sum())
    model.train(was_training)
    loss = total / max(n, 1)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50))}


def task_eval(data, tokenizer, style, max_new_tokens: int = 32):
    """Exact match on the data module's held-out test set, when it has one (the demo tasks do); else None."""
    if not hasattr(data, "test_set"):
        return None
    records = data.test_set()
    prompts = [style.render_prompt(r) for r in records]
    answers = [r["output"] for r in records]

    def run(model: GPT) -> tuple[float, list[str]]:
        return exact_match(model, tokenizer, prompts, answers, data.score, max_new_tokens=max_new_tokens)

    return run
