"""The serving engine of an encoder-decoder (T5): `Engine`'s scheduler, queue, budgets, sampling, streaming and fault
handling, with the model-kind part replaced.

- Admission: the requests admitted in one scheduler turn run their encoder pass together (a right-padded batch with
  its attention mask), then one decoder step from the start token that samples each one's first token.
- Decoding: each row keeps its own decoder state (self-attention keys/values of the tokens it decoded, cross-
  attention keys/values of its encoder output), held together as the rows of one `T5DecodeCache` so that a step is
  one decoder forward for every running row. A row's self-attention columns are right-aligned: a row that joined
  later has masked columns on its left, which changes nothing because T5's positions are relative (only the
  distance to the newest token counts). Cross-attention keys/values are padded to the longest encoder input of the
  batch and masked per row. A row that finishes leaves at once; its cache row is dropped and columns no row uses any
  more are trimmed, so the next request never waits for a long one.
- Budgets: the prompt is the encoder's input and the completion the decoder's, so each is bounded by the context
  length on its own (not their sum, as for a decoder).
- Adapters: not per request. An encoder-decoder adapter is served by merging it first (`leantune merge`), then
  serving the merged folder; `--adapter` and POST /v1/adapters say so in one line.
- Faults: a request whose own sampling or detokenizing fails ends alone (as for decoders); a failed encoder pass of
  several new requests is retried one request at a time; a failed decoder step (the one base model, no per-request
  weights) ends the rows of that step.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from leantune.decode.seq2seq import pad_inputs
from leantune.models.kinds import kind_of
from leantune.models.t5.model import T5, T5DecodeCache
from leantune.serve.engine import Adapter, ContextOverflow, Engine, Request

log = logging.getLogger("leantune.serve")

DEFAULT_CONTEXT = 512
"""Tokens per encoder input and per completion when neither --max_seq_length nor config.json (n_positions) says."""
FIRST_COLUMNS = 64
"""Decoder cache columns allocated at first; the cache doubles when a row needs more."""
NO_ADAPTERS = ("per-request adapters are served for decoder models only; for an encoder-decoder (T5) run `leantune "
               "merge` on the adapter and serve the merged folder")


class Seq2SeqEngine(Engine):
    """Serves an encoder-decoder `model` (loaded once, never modified): `max_batch` rows decode together, at most
    `max_queue` requests wait, a prompt and a completion each hold up to `max_seq_length` tokens (default: the
    model's n_positions, else DEFAULT_CONTEXT)."""

    def _setup(self, max_seq_length: int | None) -> None:
        model: T5 = self.pristine
        self.capacity = max_seq_length or kind_of(model).context_length(model.config) or DEFAULT_CONTEXT
        self.served = model
        self.batch: list[Request] = []  # the rows of self.cache, in order
        self.cache: T5DecodeCache | None = None

    @property
    def vocab_size(self) -> int:
        return self.pristine.config.vocab_size

    def add_adapter(self, name: str, path: Path) -> Adapter:
        raise ValueError(NO_ADAPTERS)

    def _budget(self, adapter: Adapter, n_prompt: int, max_tokens: int | None, default_max_tokens: int) -> int:
        """The completion budget: the encoder reads the prompt, the decoder writes the completion, each up to the
        context length."""
        if n_prompt > self.capacity:
            raise ContextOverflow(f"This model's maximum input length is {self.capacity} tokens. However, your "
                                  f"prompt has {n_prompt} tokens. Please reduce the length of the prompt.")
        if max_tokens is None:
            return min(default_max_tokens, self.capacity)
        if max_tokens > self.capacity:
            raise ContextOverflow(f"This model's maximum completion length is {self.capacity} tokens. However, you "
                                  f"requested {max_tokens} tokens in the completion. Please reduce max_tokens.")
        return max_tokens

    # ---- the scheduler thread -------------------------------------------------------------------------
    def _admit(self, admit: list[Request], free: list[int]) -> None:
        new = []
        for req, slot in zip(admit, free):
            if req.cancelled:
                self._finish(req, "cancelled")
                continue
            self.slots[slot], req.slot = req, slot
            new.append(req)
        if not new:
            return
        try:
            self._start(new)
        except Exception as e:  # find the requests that fail on their own; the others start
            if len(new) == 1:
                self._fail_row(new[0], e)
            else:
                log.warning("the encoder pass of %d requests failed (%s: %s); running them one at a time", len(new),
                            type(e).__name__, e)
                for req in new:
                    try:
                        self._start([req])
                    except Exception as e1:  # this request's own failure
                        self._fail_row(req, e1)
        self._compact()

    def _start(self, reqs: list[Request]) -> None:
        """Encode the new requests' prompts in one batch, run the decoder's first step for them, and add their rows
        to the running cache; nothing is committed before every row has its first token."""
        model, dev = self.served, self.device
        ids, mask = pad_inputs([r.prompt for r in reqs], model.config.pad_token_id, device=dev)  # (n, S)
        enc = model.encode(ids, mask)
        cache = model.new_cache(enc, model.encoder_mask(mask), min(FIRST_COLUMNS, max(r.max_tokens for r in reqs)))
        start = torch.full((len(reqs), 1), model.config.decoder_start_token_id, dtype=torch.long, device=dev)
        hidden = model.decode(start, cache=cache, return_hidden=True)  # (n, 1, C)
        picked = self._pick(reqs, model.head, hidden[:, -1])
        self.cache = cache if self.cache is None else _join(self.cache, cache)
        self.batch += reqs
        with self.cv:
            self.prompt_tokens += sum(len(r.prompt) for r in reqs)
        for r in reqs:
            r.length = 1  # the start token is in the cache
        self._accept(reqs, picked)

    def _decode_step(self) -> None:
        self._compact()
        reqs = list(self.batch)
        if not reqs:
            return
        try:
            picked = self._step(reqs)
        except Exception as e:  # one base model, no per-request weights: the step's rows end
            log.warning("a decode step of %d rows failed: %s: %s", len(reqs), type(e).__name__, e)
            for r in reqs:
                self._fail_row(r, e)
            self._compact()
            return
        for r in reqs:
            r.length += 1
        self._accept(reqs, picked)
        self._compact()

    def _step(self, reqs: list[Request]) -> list[int | Exception]:
        """One token for every running row, in one decoder forward: each row attends to its own tokens (the last
        `length` columns of the cache) and the new one."""
        cache, dev = self.cache, self.device
        L = cache.length
        _reserve(cache, L + 1)
        x = torch.tensor([[r.last] for r in reqs], dtype=torch.long, device=dev)  # (B, 1)
        lens = torch.tensor([r.length for r in reqs], device=dev)  # (B,)
        mask = torch.arange(L + 1, device=dev)[None] >= (L - lens)[:, None]  # (B, L + 1)
        hidden = self.served.decode(x, cache=cache, decoder_attention_mask=mask, return_hidden=True)  # (B, 1, C)
        return self._pick(reqs, self.served.head, hidden[:, -1])

    def _compact(self) -> None:
        """Drop the cache rows of finished requests and the columns no running row uses any more."""
        keep = [i for i, r in enumerate(self.batch) if not r.done]
        if len(keep) == len(self.batch):
            return
        if not keep:
            self.batch, self.cache = [], None
            return
        self.batch = [self.batch[i] for i in keep]
        c = self.cache
        index = torch.tensor(keep, device=self.device)
        top = max(r.length for r in self.batch)
        cut = c.length - top  # leading columns that only finished rows used
        S = max(len(r.prompt) for r in self.batch) + self.served.n_virtual  # encoder columns still needed
        c.self_k = [t.index_select(0, index)[:, :, cut:] for t in c.self_k]
        c.self_v = [t.index_select(0, index)[:, :, cut:] for t in c.self_v]
        c.cross_k = [t.index_select(0, index)[:, :, :S] for t in c.cross_k]
        c.cross_v = [t.index_select(0, index)[:, :, :S] for t in c.cross_v]
        if c.cross_bias is not None:
            c.cross_bias = c.cross_bias.index_select(0, index)[..., :S]
        c.length = top


def _reserve(cache: T5DecodeCache, columns: int) -> None:
    """Grow the self-attention keys/values to hold `columns` columns (doubling)."""
    have = cache.self_k[0].shape[2]
    if have >= columns:
        return
    size = max(columns, 2 * have)
    cache.self_k = [_pad_dim(t, 2, size, 0.0) for t in cache.self_k]
    cache.self_v = [_pad_dim(t, 2, size, 0.0) for t in cache.self_v]


def _pad_dim(t: torch.Tensor, dim: int, size: int, value: float, left: int = 0) -> torch.Tensor:
    """t placed in a tensor whose `dim` has `size` entries, starting at `left`, `value` elsewhere."""
    shape = list(t.shape)
    shape[dim] = size
    out = t.new_full(shape, value)
    out.narrow(dim, left, t.shape[dim]).copy_(t)
    return out


def _join(a: T5DecodeCache, b: T5DecodeCache) -> T5DecodeCache:
    """The rows of a then b in one cache: self-attention columns right-aligned at the longer length, cross-attention
    keys/values padded to the longer encoder input and masked."""
    L = max(a.length, b.length)
    cols = max(L + 1, a.self_k[0].shape[2])
    S = max(a.cross_k[0].shape[2], b.cross_k[0].shape[2])

    def self_part(x: torch.Tensor, n: int) -> torch.Tensor:  # the filled columns, ending at column L
        return _pad_dim(x[:, :, :n], 2, cols, 0.0, left=L - n)

    def cross_part(x: torch.Tensor) -> torch.Tensor:
        return _pad_dim(x, 2, S, 0.0)

    def bias(c: T5DecodeCache) -> torch.Tensor:  # (B, 1, 1, S): 0 where attended, the dtype's minimum elsewhere
        k = c.cross_k[0]
        lowest = torch.finfo(k.dtype).min
        given = c.cross_bias if c.cross_bias is not None else k.new_zeros(k.shape[0], 1, 1, k.shape[2])
        return _pad_dim(given, 3, S, lowest)

    return T5DecodeCache(
        self_k=[torch.cat([self_part(x, a.length), self_part(y, b.length)]) for x, y in zip(a.self_k, b.self_k)],
        self_v=[torch.cat([self_part(x, a.length), self_part(y, b.length)]) for x, y in zip(a.self_v, b.self_v)],
        cross_k=[torch.cat([cross_part(x), cross_part(y)]) for x, y in zip(a.cross_k, b.cross_k)],
        cross_v=[torch.cat([cross_part(x), cross_part(y)]) for x, y in zip(a.cross_v, b.cross_v)],
        cross_bias=torch.cat([bias(a), bias(b)]),
        length=L,
    )
