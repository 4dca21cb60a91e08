"""AdaLoRA as a method of the one training loop: the layer is in `adalora_layers`, PEFT's format in `peft_format`,
and the rank allocator (PEFT's `RankAllocator` + `AdaLoraModel.update_and_allocate`) is here, as the record's hooks.

After every optimizer step (`on_step`, gradients still present) the allocator smooths each trained entry's
sensitivity |w * grad| and its uncertainty with EMAs (beta1, beta2); every `delta_t` steps of the budgeting phase it
scores each triplet (E_i + mean over A's row + mean over B's column of sensitivity * uncertainty) and zeroes the
E of the lowest-scoring triplets across all layers until the budget is left. The budget falls cubically from
init_r to target_r per matrix between `tinit` and `total_step - tfinal`; at that step the final rank pattern is
fixed and re-applied after every later step. `step` is the 0-based index of the step just taken, as in PEFT's
examples. The averages and the final mask are the method's train state, saved with each checkpoint for exact resume.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from leantune.peft.adalora_layers import (
    STATE_BUFFERS,
    AdaLoRAArgs,
    AdaLoRALinear,
    adalora_layers,
    adalora_params,
    apply_adalora,
    merge_adalora,
    orth_regularizer,
)
from leantune.peft.base import Method
from leantune.peft.peft_format import ADALORA

__all__ = ["METHOD", "AdaLoRAArgs", "AdaLoRALinear", "allocate", "apply_adalora", "budget_schedule", "merge_adalora"]


def budget_schedule(step: int, tinit: int, tfinal: int, total: int, delta_t: int, init_bgt: int,
                    target_bgt: int) -> tuple[int, bool]:
    """(rank budget over all matrices, whether to mask now) at `step`: PEFT's cubic schedule."""
    if step <= tinit:
        return init_bgt, False
    if step > total - tfinal:
        return target_bgt, True
    mul = 1 - (step - tinit) / (total - tfinal - tinit)
    return int((init_bgt - target_bgt) * (mul**3) + target_bgt), step % delta_t == 0


@torch.no_grad()
def update_importance(layers: list[AdaLoRALinear], beta1: float, beta2: float) -> None:
    """EMA of the sensitivity |p * grad| and of its deviation from that EMA, entry by entry (PEFT's update_ipt)."""
    for m in layers:
        for name, p in (("A", m.lora_A), ("E", m.lora_E), ("B", m.lora_B)):
            ipt = (p * p.grad).abs() if p.grad is not None else torch.zeros_like(p)
            ema = getattr(m, f"ipt_{name}")
            unc = getattr(m, f"unc_{name}")
            ema = beta1 * (ema if ema is not None else torch.zeros_like(p)) + (1 - beta1) * ipt
            unc = beta2 * (unc if unc is not None else torch.zeros_like(p)) + (1 - beta2) * (ipt - ema).abs()
            setattr(m, f"ipt_{name}", ema)
            setattr(m, f"unc_{name}", unc)


def triplet_scores(m: AdaLoRALinear) -> torch.Tensor:
    """(parts * r,) importance of each triplet: E's score + the mean score of its A row + of its B column."""
    P, r = len(m.parts), m.r
    a = (m.ipt_A * m.unc_A).view(P, r, m.in_features).mean(dim=2)  # (P, r)
    score_B = m.ipt_B * m.unc_B
    b = torch.stack([s.mean(dim=0) for s in score_B.split([e - s for s, e in m.parts])])  # (P, r)
    return (m.ipt_E * m.unc_E).view(-1) + (a + b).view(-1)


@torch.no_grad()
def mask_to_budget(layers: list[AdaLoRALinear], budget: int) -> list[torch.Tensor]:
    """Zero the E of the lowest-scoring triplets (ties included) so `budget` remain; returns each layer's keep mask."""
    scores = [triplet_scores(m) for m in layers]
    k = sum(s.numel() for s in scores) - budget
    threshold = torch.kthvalue(torch.cat(scores), k)[0].item() if k > 0 else -float("inf")
    keep = []
    for m, s in zip(layers, scores):
        m.lora_E.masked_fill_((s <= threshold).view(-1, 1), 0.0)
        keep.append(s > threshold)
    return keep


@torch.no_grad()
def allocate(model: nn.Module, step: int, total_steps: int) -> None:
    """The record's on_step: PEFT's `update_and_allocate(step)` with total_step defaulting to the run's length."""
    layers = adalora_layers(model)
    if not layers:
        return
    args = layers[0].args
    tinit, tfinal, total = args.schedule(total_steps)
    init_bgt = sum(m.lora_E.shape[0] for m in layers)
    target_bgt = args.target_r * sum(len(m.parts) for m in layers)
    budget, mask_now = budget_schedule(step, tinit, tfinal, total, args.delta_t, init_bgt, target_bgt)
    if step < total - tfinal:
        update_importance(layers, args.beta1, args.beta2)
        if mask_now:
            mask_to_budget(layers, budget)
    elif step == total - tfinal:  # the final pattern: fixed from here on, the averages are no longer needed
        for m, keep in zip(layers, mask_to_budget(layers, budget)):
            m.rank_mask = keep
            for name in STATE_BUFFERS[:-1]:
                setattr(m, name, None)
    else:
        for m in layers:
            if m.rank_mask is not None:
                m.lora_E.masked_fill_(~m.rank_mask.view(-1, 1), 0.0)


def allocator_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The allocator's averages and final mask, by layer name (saved beside each checkpoint)."""
    return {f"{n}.{b}": t for n, m in model.named_modules() if isinstance(m, AdaLoRALinear)
            for b, t in m.named_buffers(recurse=False)}


def load_allocator_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    layers = {n: m for n, m in model.named_modules() if isinstance(m, AdaLoRALinear)}
    unknown = sorted(k for k in state if k.rsplit(".", 1)[0] not in layers)
    if unknown:
        raise ValueError(f"AdaLoRA allocator state for layers this model lacks: {unknown[:3]}")
    for n, m in layers.items():
        for b in STATE_BUFFERS:
            t = state.get(f"{n}.{b}")
            setattr(m, b, t.to(m.lora_A.device) if t is not None else None)


METHOD = Method(
    name="adalora",
    summary="AdaLoRA: SVD-form LoRA whose ranks are reallocated by importance over a schedule, mergeable, "
            "PEFT-exportable",
    args_class=AdaLoRAArgs,
    apply=apply_adalora,
    adapter_params=adalora_params,
    default_lr=2e-3,
    merge=merge_adalora,
    peft=ADALORA.format,
    regularizer=orth_regularizer,
    on_step=allocate,
    train_state=allocator_state,
    load_train_state=load_allocator_state,
)
