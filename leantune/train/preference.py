"""Preference objectives (DPO, IPO, ORPO, SimPO) as TRL defines them, for the one loop.

A preference batch (`leantune.data.preference`) holds 2B rows: the B chosen sequences, then the B rejected ones
(one forward for both, as TRL's concatenated forward), with labels pre-shifted and -100 outside the responses.
`PreferenceObjective` turns such a batch into loss *sums* per normaliser ("pairs", and for ORPO "nll_tokens"), so
the loop divides by the window's totals and 1 x 4 pairs, 2 x 2 with accumulation, or 2 processes x 2 give the same
update, exactly as the SFT loss is token-weighted.

The formulas (checked against TRL's own code in tests/test_preference_parity.py):
- dpo:   -(1-ls) logsigmoid(beta d) - ls logsigmoid(-beta d), d = (pi_c - ref_c) - (pi_r - ref_r), log-probs summed
         over the response (ls = 0 is TRL's DPOTrainer `sigmoid`; ls > 0 is the conservative form TRL's CPO and
         earlier DPO trainers use).
- ipo:   ((d_c/n_c - d_r/n_r) - 1/(2 beta))^2 with per-response token counts n (TRL's length-normalised IPO).
- orpo:  mean NLL of the chosen rows (every real token after the first, prompt included, as TRL's ORPOTrainer)
         - beta * mean logsigmoid(log-odds), log-odds from the mean response log-probs; no reference.
- simpo: -(1-ls) logsigmoid(beta (m_c - m_r) - gamma) - ls logsigmoid(-(...)), m the mean response log-prob
         (TRL's CPOTrainer with loss_type simpo and cpo_alpha 0); no reference.
Rewards are beta * (log-prob - reference) for dpo/ipo, beta * log-prob (mean log-prob for orpo/simpo) otherwise.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from leantune.checkpoint.io import load_safetensors, save_safetensors
from leantune.peft.base import adapter_off, switchable_layers
from leantune.train.args import positive

Objective = Literal["sft", "dpo", "ipo", "orpo", "simpo"]
OBJECTIVES: tuple[str, ...] = ("sft", "dpo", "ipo", "orpo", "simpo")
NEEDS_REFERENCE = ("dpo", "ipo")
STAT_KEYS = ("rewards_chosen", "rewards_rejected", "reward_accuracy", "reward_margin", "logps_chosen",
             "logps_rejected")
"""Per-pair statistics the loop logs (means over the step's pairs)."""


@dataclass
class PreferenceArgs:
    beta: float = 0.1
    """Strength of the preference term (DPO's KL weight; IPO's tau; ORPO's odds-ratio weight; SimPO's scale)."""
    label_smoothing: float = 0.0
    """dpo and simpo: assumed share of flipped labels (conservative DPO), in [0, 0.5)."""
    gamma: float = 0.5
    """simpo: target reward margin (TRL's simpo_gamma)."""
    reference: Literal["auto", "adapter_off", "precomputed"] = "auto"
    """dpo/ipo reference model: adapter_off (the base with the adapter switched off: one extra forward, no copy),
    precomputed (log-probs of the starting model computed once before training and stored with the run), or auto:
    adapter_off for a new adapter of a method that can switch off, else precomputed (full finetuning, a continued
    --resume_adapter whose starting point is not the base, methods without an off switch)."""

    def __post_init__(self) -> None:
        positive("preference.beta", self.beta)
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"--preference.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.reference not in ("auto", "adapter_off", "precomputed"):
            raise ValueError(f"--preference.reference must be auto, adapter_off or precomputed, got {self.reference}")


def check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")


def is_preference_batch(batch: dict) -> bool:
    return "pairs" in batch


# ---- log-probabilities --------------------------------------------------------------------------------------------
def _chunk_logps(lm_head, hc, yc):
    return -F.cross_entropy(lm_head(hc).float(), yc, reduction="none")


def token_logps(hidden: torch.Tensor, lm_head: torch.nn.Module, labels: torch.Tensor,
                chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-row sum of log p(label), per-row count) over positions with a label; hidden (R, T, C), labels (R, T).

    Only labelled positions go through the head, chunk by chunk (recomputed in backward), so no (tokens x vocab)
    tensor outlives its chunk."""
    keep = labels != -100
    rows = keep.nonzero()[:, 0]
    h, y = hidden[keep], labels[keep]
    sums = torch.zeros(labels.shape[0], dtype=torch.float32, device=hidden.device)
    if h.shape[0]:
        pieces = []
        for hc, yc in zip(h.split(chunk_size), y.split(chunk_size)):
            if torch.is_grad_enabled() and h.shape[0] > chunk_size:
                pieces.append(checkpoint(_chunk_logps, lm_head, hc, yc, use_reentrant=False))
            else:
                pieces.append(_chunk_logps(lm_head, hc, yc))
        sums = sums.index_add(0, rows, torch.cat(pieces))
    return sums, keep.sum(1)


def forward_hidden(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    return model(batch["input_ids"], return_hidden=True)


def full_sequence_labels(batch: dict) -> torch.Tensor:
    """Labels of every real token after the first (ORPO's NLL over prompt and response): input_ids shifted, -100
    where the next position is padding."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = torch.where(mask[:, 1:] == 1, ids[:, 1:], -100)
    return labels


# ---- losses (per pair) --------------------------------------------------------------------------------------------
def sigmoid_loss(logits: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """-(1-ls) logsigmoid(beta x) - ls logsigmoid(-beta x): DPO's sigmoid loss (conservative when ls > 0)."""
    return -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing


def dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    return sigmoid_loss((chosen - ref_chosen) - (rejected - ref_rejected), beta, label_smoothing)


def ipo_loss(chosen, rejected, ref_chosen, ref_rejected, n_chosen, n_rejected, beta: float) -> torch.Tensor:
    delta = (chosen - ref_chosen) / n_chosen.clamp(min=1) - (rejected - ref_rejected) / n_rejected.clamp(min=1)
    return (delta - 1 / (2 * beta)) ** 2


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_log_odds_ratio(mean_chosen, mean_rejected) -> tuple[torch.Tensor, torch.Tensor]:
    """(logsigmoid(log-odds), log-odds) of ORPO from the mean response log-probs."""
    c, r = mean_chosen.float(), mean_rejected.float()
    log_odds = (c - r) - (log1mexp(c) - log1mexp(r))
    return F.logsigmoid(log_odds), log_odds


def simpo_loss(mean_chosen, mean_rejected, beta: float, gamma: float, label_smoothing: float = 0.0) -> torch.Tensor:
    return sigmoid_loss((mean_chosen - mean_rejected) - gamma / beta, beta, label_smoothing)


# ---- the objective ------------------------------------------------------------------------------------------------
ReferenceFn = Callable[[torch.nn.Module, dict], torch.Tensor]
"""reference(model, batch) -> (2B,) summed response log-probs of the reference model (no gradient)."""


@dataclass
class PreferenceObjective:
    """The loop's hook for a preference run: what to count, and the loss sums and statistics of a batch."""

    objective: str
    args: PreferenceArgs
    reference: ReferenceFn | None = None

    def __post_init__(self) -> None:
        check_objective(self.objective)
        if self.objective == "sft":
            raise ValueError("PreferenceObjective is for dpo, ipo, orpo or simpo")
        if self.objective in NEEDS_REFERENCE and self.reference is None:
            raise ValueError(f"--objective {self.objective} needs a reference model")

    def counts(self, batch: dict) -> dict[str, int]:
        """The normalisers of a batch, summed over a window (and over ranks) before any loss is divided."""
        out = {"pairs": int(batch["pairs"])}
        if self.objective == "orpo":
            B, w = pair_weights(batch)
            out["nll_tokens"] = int(((full_sequence_labels(batch)[:B] != -100).sum(1) * w.to(torch.long)).sum())
        return out

    def terms(self, model: torch.nn.Module, batch: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(loss sums keyed like `counts`, statistic sums over the batch's pairs, detached)."""
        B, w = pair_weights(batch)
        w = w.to(batch["input_ids"].device, torch.float32)
        hidden = forward_hidden(model, batch)
        head = model.lm_head
        logps, n = token_logps(hidden, head, batch["labels"])
        a = self.args
        stats_logps = logps
        if self.objective in ("dpo", "ipo"):
            with torch.no_grad():
                ref = self.reference(model, batch).to(logps.device, torch.float32)
            pc, pr, rc, rr = logps[:B], logps[B:], ref[:B], ref[B:]
            if self.objective == "dpo":
                losses = dpo_loss(pc, pr, rc, rr, a.beta, a.label_smoothing)
            else:
                losses = ipo_loss(pc, pr, rc, rr, n[:B], n[B:], a.beta)
            rewards = a.beta * (logps - ref).detach()
            terms = {"pairs": (losses * w).sum()}
        else:
            mean = logps / n.clamp(min=1)
            stats_logps = mean
            rewards = a.beta * mean.detach()
            if self.objective == "simpo":
                terms = {"pairs": (simpo_loss(mean[:B], mean[B:], a.beta, a.gamma, a.label_smoothing) * w).sum()}
            else:
                ratio, _ = orpo_log_odds_ratio(mean[:B], mean[B:])
                nll, _ = token_logps(hidden[:B], head, full_sequence_labels(batch)[:B])
                terms = {"nll_tokens": -(nll * w).sum(), "pairs": -a.beta * (ratio * w).sum()}
        return terms, pair_stats(rewards[:B], rewards[B:], stats_logps[:B].detach(), stats_logps[B:].detach(), w)


def pair_weights(batch: dict) -> tuple[int, torch.Tensor]:
    """(rows per side, per-pair weight): 1 for every pair, 0 for the stand-in pair of a rank whose share of a
    short last batch is empty (it runs the same forward and backward as the others, contributing nothing)."""
    B = batch["input_ids"].shape[0] // 2
    w = batch.get("pair_weight")
    return B, (w if w is not None else torch.ones(B))


def pair_stats(rc: torch.Tensor, rr: torch.Tensor, lc: torch.Tensor, lr: torch.Tensor,
               w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sums over the pairs (the loop divides by the step's pair count): rewards, accuracy, margin, log-probs."""
    return {"rewards_chosen": (rc * w).sum(), "rewards_rejected": (rr * w).sum(),
            "reward_accuracy": ((rc > rr).float() * w).sum(), "reward_margin": ((rc - rr) * w).sum(),
            "logps_chosen": (lc * w).sum(), "logps_rejected": (lr * w).sum()}


def shard_pairs(batch: dict, rank: int, world_size: int) -> dict:
    """This rank's pairs [rank*B/N, (rank+1)*B/N) of a global pair batch: its chosen rows and their rejected rows
    (a plain row split would tear pairs apart), trailing all-padding columns dropped. An empty share gets pair 0
    with weight 0."""
    B = batch["input_ids"].shape[0] // 2
    lo, hi = rank * B // world_size, (rank + 1) * B // world_size
    empty = hi == lo
    if empty:
        lo, hi = 0, 1
    rows = torch.cat([torch.arange(lo, hi), torch.arange(B + lo, B + hi)])
    out = dict(batch)
    keep = max(int(batch["attention_mask"][rows].sum(1).max()), 1)
    for k in ("input_ids", "labels", "attention_mask"):
        out[k] = batch[k][rows][:, :keep]
    out["pair_index"] = batch["pair_index"][lo:hi]
    out["sample_ids"] = batch["sample_ids"][lo:hi] if not empty else [[]]
    out["pairs"] = 0 if empty else hi - lo
    out["pair_weight"] = torch.zeros(1) if empty else torch.ones(hi - lo)
    return out


# ---- references ---------------------------------------------------------------------------------------------------
def adapter_off_reference(switch_off: Callable[[torch.nn.Module], AbstractContextManager]) -> ReferenceFn:
    """The base model as reference: the same forward with the method's layers switched off (no weight copy)."""

    def reference(model: torch.nn.Module, batch: dict) -> torch.Tensor:
        with torch.no_grad(), switch_off(model):
            return token_logps(forward_hidden(model, batch), model.lm_head, batch["labels"])[0]

    return reference


class PrecomputedReference:
    """Reference log-probs computed once, before training, from the starting model: {split: (N, 2) chosen/rejected}
    indexed by each pair's position in its split (`pair_index` of a batch)."""

    def __init__(self, tables: dict[str, torch.Tensor]) -> None:
        self.tables = tables

    def __call__(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        table = self.tables[batch["split"]]
        idx = batch["pair_index"].to(table.device)
        ref = torch.cat([table[idx, 0], table[idx, 1]])
        if bool(ref.isnan().any()):
            raise RuntimeError(f"no reference log-probs for some {batch['split']} pairs of this batch (the table "
                               "covers only the batches it was computed over)")
        return ref


def compute_reference_table(model: torch.nn.Module, loader, n: int, device: torch.device,
                            autocast: Callable[[], AbstractContextManager] = contextlib.nullcontext,
                            max_batches: int | None = None) -> torch.Tensor:
    """(n, 2) summed chosen/rejected response log-probs of `model` over every pair of a split's loader, or over the
    pairs of its first `max_batches` batches (the other rows stay NaN: `evaluate --max_batches` reads no more)."""
    table = torch.full((n, 2), float("nan"))
    was = model.training
    model.eval()
    with torch.no_grad():
        for batch in itertools.islice(loader, max_batches):
            B = int(batch["pairs"])
            b = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
            with autocast():
                logps = token_logps(forward_hidden(model, b), model.lm_head, b["labels"])[0].float().cpu()
            idx = batch["pair_index"]
            table[idx, 0], table[idx, 1] = logps[:B], logps[B:]
    model.train(was)
    if max_batches is None and bool(table.isnan().any()):
        raise RuntimeError("reference log-probs missing for some pairs (the loader skipped rows)")
    return table


REFERENCE_FILE = "reference_logps.safetensors"
"""Beside run.json: the precomputed reference log-probs of every pair, {split: (N, 2)}, written once per run."""


def choose_reference(mode: str, model: torch.nn.Module, trainable: list[str], full_model: bool,
                     continued: bool) -> tuple[str, list[torch.nn.Module] | None]:
    """("adapter_off", the layers to switch off) or ("precomputed", None) for --preference.reference `mode`.

    auto takes adapter_off only where switching the adapter off gives the starting model: a new adapter whose layers
    can all switch off (LoRA's, initialised to no change). Full finetuning has no adapter; a continued adapter
    (--resume_adapter) starts elsewhere than the base: both get the precomputed reference of the starting model."""
    layers = None if full_model else switchable_layers(model, trainable)
    if mode == "adapter_off" and layers is None:
        raise ValueError("--preference.reference adapter_off needs an adapter whose layers can be switched off (lora, "
                         "qlora, dora); use --preference.reference precomputed (or auto)")
    if mode == "adapter_off" or (mode == "auto" and layers is not None and not continued):
        return "adapter_off", layers
    return "precomputed", None


def reference_for(mode: str, layers: list[torch.nn.Module] | None, data, out_dir: Path, resume: bool,
                  model: torch.nn.Module, device: torch.device, autocast, is_main: bool) -> ReferenceFn:
    """The reference of a dpo/ipo run: the adapter switched off, or log-probs of the starting model computed now
    (before any step) and stored in out_dir, or read back from there when the run resumes."""
    if mode == "adapter_off":
        return adapter_off_reference(lambda _model: adapter_off(layers))
    file = Path(out_dir) / REFERENCE_FILE
    sizes = {"train": len(data.train_dataset), "val": len(data.val_dataset)}
    if resume and file.is_file():
        tables = load_safetensors(file)
        if {k: v.shape[0] for k, v in tables.items()} != sizes:
            raise ValueError(f"{file}: reference log-probs for {tables and {k: v.shape[0] for k, v in tables.items()}}"
                             f" pairs, but the data gives {sizes}; resume with the run's own data")
        return PrecomputedReference(tables)
    if resume:
        raise FileNotFoundError(f"{file}: missing; a run with a precomputed reference resumes with the log-probs "
                                "of its starting model (start the run again without --resume)")
    tables = {"train": compute_reference_table(model, data.train_dataloader(), sizes["train"], device, autocast),
              "val": compute_reference_table(model, data.val_dataloader(), sizes["val"], device, autocast)}
    if is_main:
        save_safetensors(tables, file)
    return PrecomputedReference(tables)
