"""Generation for the encoder-decoder `T5`: the encoder runs once, then the decoder one token at a time on a
`T5DecodeCache` (cross-attention keys/values computed once, self-attention keys/values appended).

Two strategies over a padded batch (encoder attention mask): `t5_generate` (greedy, or sampling through
`leantune.decode.generate.sample`) and `t5_beam_search` (num_beams, length_penalty, early_stopping, num_return_sequences).
Both follow transformers' `generate` for encoder-decoder models token for token: outputs start with the decoder start
token, `max_new_tokens` counts generated tokens, a sequence ends with its first EOS, finished rows are padded, and
`min_new_tokens` forbids EOS before that many tokens. Beam search is transformers' vectorised algorithm (top 2k
continuations, finished hypotheses scored by log-prob / generated_length ** length_penalty, the same early-stopping
heuristics), so its outputs equal `num_beams` beam search there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from leantune.decode.generate import Sampling, sample
from leantune.models.t5.model import T5


def pad_inputs(seqs: Sequence[Sequence[int]], pad_id: int, device: str | torch.device | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists into input_ids (B, S) and attention_mask (B, S) (T5's positions are relative, so the
    side does not matter; right is what its tokenizers do)."""
    S = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), S), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(seqs), S), dtype=torch.long, device=device)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(list(s), dtype=torch.long, device=device)
        mask[i, :len(s)] = 1
    return ids, mask


def _ids(model: T5, eos_ids: Sequence[int] | None, pad_id: int | None) -> tuple[list[int], int]:
    eos = model.config.eos_ids if eos_ids is None else list(eos_ids)
    return eos, model.config.pad_token_id if pad_id is None else pad_id


def _block_eos(logits: torch.Tensor, eos: list[int], generated: int, min_new_tokens: int) -> torch.Tensor:
    """EOS impossible while fewer than min_new_tokens tokens were generated (transformers' MinNewTokens processor)."""
    if generated < min_new_tokens and eos:
        logits[..., eos] = float("-inf")
    return logits


@torch.inference_mode()
def t5_generate(model: T5, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                max_new_tokens: int = 20, min_new_tokens: int = 0, sampling: Sampling | None = None,
                eos_ids: Sequence[int] | None = None, pad_id: int | None = None,
                generator: torch.Generator | None = None, use_cache: bool = True,
                stop_fn: Callable[[int, list[int]], bool] | None = None) -> torch.Tensor:
    """Greedy (the default Sampling) or sampled decoding of a batch: input_ids (B, S) -> (B, 1 + n) decoder tokens,
    n <= max_new_tokens, starting with the decoder start token; rows that ended (EOS) are padded with pad_id.
    use_cache=False recomputes the whole decoder sequence every step (the reference path for tests).
    `stop_fn(row, new_tokens)` (as `greedy_batch` takes it) ends a row after a token when it says so (e.g. a stop
    string appeared in the row's text); the row is padded from there like one that ended with EOS."""
    sampling = sampling or Sampling()
    eos, pad = _ids(model, eos_ids, pad_id)
    B = input_ids.shape[0]
    enc = model.encode(input_ids, attention_mask)  # (B, S, C)
    tokens = torch.full((B, 1), model.config.decoder_start_token_id, dtype=torch.long, device=input_ids.device)
    cache = model.new_cache(enc, model.encoder_mask(attention_mask), max_new_tokens) if use_cache else None
    eos_t = torch.tensor(eos or [-1], device=input_ids.device)
    unfinished = torch.ones(B, dtype=torch.bool, device=input_ids.device)
    x = tokens
    new: list[list[int]] = [[] for _ in range(B)]  # each row's tokens so far, for stop_fn
    for step in range(max_new_tokens):
        if cache is not None:
            hidden = model.decode(x, cache=cache, return_hidden=True)
        else:
            hidden = model.decode(tokens, enc, model.encoder_mask(attention_mask), return_hidden=True)
        logits = _block_eos(model.head(hidden[:, -1]).float(), eos, step, min_new_tokens)  # (B, V)
        nxt = sample(logits, sampling, generator)  # (B,)
        nxt = torch.where(unfinished, nxt, torch.full_like(nxt, pad))
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        unfinished &= ~torch.isin(nxt, eos_t)
        if stop_fn is not None:
            unfinished = _stopped_rows(stop_fn, new, nxt, unfinished)
        if not bool(unfinished.any()):
            break
        x = nxt[:, None]  # (B, 1)
    return tokens


def _stopped_rows(stop_fn: Callable[[int, list[int]], bool], new: list[list[int]], nxt: torch.Tensor,
                  unfinished: torch.Tensor) -> torch.Tensor:
    """`unfinished` less the rows stop_fn ends after this step's tokens `nxt` (appended to `new`, rows still going)."""
    going = unfinished.tolist()
    keep = list(going)
    for i, t in enumerate(nxt.tolist()):
        if going[i]:
            new[i].append(t)
            keep[i] = not stop_fn(i, new[i])
    return torch.tensor(keep, dtype=torch.bool, device=unfinished.device)


@dataclass
class BeamSearch:
    num_beams: int = 4
    length_penalty: float = 1.0
    """Finished hypotheses are ranked by sum of log-probs / generated_length ** length_penalty (> 0 favours longer
    outputs, < 0 shorter ones)."""
    early_stopping: bool | Literal["never"] = False
    """True: stop a batch item once num_beams hypotheses are finished. False: also stop when no running beam can
    still beat the worst finished one at its current length (transformers' default heuristic). "never": only stop
    when that is impossible even at max length (canonical beam search)."""
    num_return_sequences: int = 1

    def __post_init__(self) -> None:
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if not 1 <= self.num_return_sequences <= self.num_beams:
            raise ValueError(f"num_return_sequences must be in [1, num_beams={self.num_beams}], "
                             f"got {self.num_return_sequences}")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be true, false or 'never', got {self.early_stopping!r}")


@dataclass
class BeamOutput:
    sequences: torch.Tensor
    """(B * num_return_sequences, L) decoder tokens from the start token, best first per input, padded after EOS."""
    scores: torch.Tensor
    """(B * num_return_sequences,) length-penalised log-probabilities of those sequences."""


def _gather(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Select along dim 1 (beams) of t (B, K, ...) with index (B, K')."""
    while index.dim() < t.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(t, index, dim=1)


@torch.inference_mode()
def t5_beam_search(model: T5, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                   beams: BeamSearch | None = None, max_new_tokens: int = 20, min_new_tokens: int = 0,
                   eos_ids: Sequence[int] | None = None, pad_id: int | None = None,
                   use_cache: bool = True) -> BeamOutput:
    """Beam search over a batch input_ids (B, S) (see `BeamSearch`). Every step keeps the top 2K (K = num_beams;
    more with several EOS ids) continuations of all beams, moves those ending in EOS (or reaching the length limit)
    into each item's K best finished hypotheses, and continues the best K that did not end."""
    beams = beams or BeamSearch()
    eos, pad = _ids(model, eos_ids, pad_id)
    K, lp, early = beams.num_beams, beams.length_penalty, beams.early_stopping
    B, device = input_ids.shape[0], input_ids.device
    max_length = 1 + max_new_tokens  # the decoder "prompt" is the start token
    keep = max(2, 1 + len(eos)) * K
    top_k_mask = torch.arange(keep, device=device) < K  # only the top K continuations may finish a hypothesis
    eos_t = torch.tensor(eos or [-1], device=device)

    enc = model.encode(input_ids, attention_mask).repeat_interleave(K, dim=0)  # (B*K, S, C)
    enc_mask = model.encoder_mask(attention_mask)
    enc_mask = None if enc_mask is None else enc_mask.repeat_interleave(K, dim=0)
    cache = model.new_cache(enc, enc_mask, max_new_tokens) if use_cache else None

    running = torch.full((B, K, max_length), pad, dtype=torch.long, device=device)
    running[:, :, 0] = model.config.decoder_start_token_id
    running_scores = torch.zeros((B, K), device=device)
    running_scores[:, 1:] = -1e9  # all beams start equal: expand only the first
    running_origin = torch.full((B, K, max_length - 1), -1, dtype=torch.long, device=device)  # flat beam per step
    finished, finished_origin = running.clone(), running_origin.clone()
    finished_scores = torch.full((B, K), -1e9, device=device)
    is_finished = torch.zeros((B, K), dtype=torch.bool, device=device)
    may_improve = torch.ones((B, 1), dtype=torch.bool, device=device)
    batch_offset = torch.arange(B, device=device)[:, None] * K  # (B, 1)

    cur = 1
    while True:
        flat = running[:, :, :cur].reshape(B * K, cur)  # (B*K, cur)
        if cache is not None:
            hidden = model.decode(flat[:, -1:], cache=cache, return_hidden=True)
        else:
            hidden = model.decode(flat, enc, enc_mask, return_hidden=True)
        logits = model.head(hidden[:, -1]).float()  # (B*K, V)
        log_probs = _block_eos(F.log_softmax(logits, dim=-1), eos, cur - 1, min_new_tokens)
        V = log_probs.shape[-1]
        log_probs = (log_probs.view(B, K, V) + running_scores[:, :, None]).view(B, K * V)

        # the top `keep` continuations over all beams of each item
        top_scores, top_index = torch.topk(log_probs, k=keep)  # (B, keep)
        from_beam = top_index // V
        top_seqs = _gather(running, from_beam)  # (B, keep, max_length)
        top_seqs[:, :, cur] = top_index % V
        top_origin = _gather(running_origin, from_beam)
        top_origin[:, :, cur - 1] = from_beam + batch_offset
        ends = torch.isin(top_seqs[:, :, cur], eos_t) | (cur + 1 >= max_length)  # (B, keep)

        # the best K that did not end keep running
        alive_scores = top_scores + ends.to(torch.float32) * -1.0e9
        nxt = torch.topk(alive_scores, k=K)[1]  # (B, K)
        running, running_scores, running_origin = (_gather(top_seqs, nxt), _gather(alive_scores, nxt),
                                                   _gather(top_origin, nxt))

        # those that ended (among the top K) join the finished hypotheses if they beat the worst kept one
        just_finished = ends & top_k_mask[None, :]
        cand = top_scores / ((cur + 1 - 1) ** lp)
        cand = cand + (torch.all(is_finished, dim=-1, keepdim=True) & (early is True)).to(torch.float32) * -1.0e9
        cand = cand + (~may_improve).to(torch.float32) * -1.0e9
        cand = cand + (~just_finished) * -1.0e9
        merged = torch.cat((finished_scores, cand), dim=1)
        best = torch.topk(merged, k=K)[1]
        finished = _gather(torch.cat((finished, top_seqs), dim=1), best)
        finished_scores = _gather(merged, best)
        finished_origin = _gather(torch.cat((finished_origin, top_origin), dim=1), best)
        is_finished = _gather(torch.cat((is_finished, just_finished), dim=1), best)

        if cache is not None:  # each running beam continues the cache row it came from (same batch item)
            cache.reorder(running_origin[:, :, cur - 1].reshape(B * K), cross=False)
        cur += 1
        may_improve = may_improve & _can_improve(running_scores, finished_scores, is_finished, cur, max_length, lp,
                                                 early)
        stop = (not bool(may_improve.any()) or (bool(is_finished.all()) and early is True) or bool(ends.all()))
        if stop:
            break

    R = beams.num_return_sequences
    sequences = finished[:, :R].reshape(B * R, max_length)
    origin = finished_origin[:, :R].reshape(B * R, max_length - 1)
    length = 1 + int((origin + 1).bool().sum(dim=1).max())  # longest returned hypothesis
    sequences = sequences[:, :length]
    return BeamOutput(sequences=sequences, scores=finished_scores[:, :R].reshape(B * R))


def _can_improve(running_scores: torch.Tensor, finished_scores: torch.Tensor, is_finished: torch.Tensor, cur: int,
                 max_length: int, length_penalty: float, early: bool | str) -> torch.Tensor:
    """(B, 1): could the best running beam still beat the worst finished hypothesis? Its score only falls as it
    grows, so the bound divides by the current length (or by the max length for "never" with a positive penalty)."""
    length = (max_length - 1) if (early == "never" and length_penalty > 0.0) else (cur - 1)
    best_running = running_scores[:, :1] / (length ** length_penalty)
    worst_finished = torch.where(is_finished, torch.min(finished_scores, dim=1, keepdim=True)[0], -1.0e9)
    return torch.any(best_running > worst_finished, dim=-1, keepdim=True)
