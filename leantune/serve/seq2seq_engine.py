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
- Adapters (`--adapter name=DIR`, POST /v1/adapters), as for decoders: LoRA adapters (leantune or PEFT folders)
  are *shared*: their factors sit in the served model's `MultiLoRALinear` layers and their rows decode in the base's
  batch, each row with its own adapter's update (`LoRARows`, set before each forward: the new rows' for an encoder
  pass, the running rows' for a decoder step). Any other method T5 trains (IA3, DoRA, LoHa, LoKr, AdaLoRA,
  prompt/P-tuning) is *grouped*: a copy of the model that shares every base weight, whose rows form a group with
  its own cache and forward each step. An adapter's virtual tokens count against the context length.
- Faults: a request whose own sampling or detokenizing fails ends alone (as for decoders); a failed encoder pass of
  several new requests is retried one request at a time; a failed decoder step ends the rows of that group (one
  model's forward over rows that share every weight), the other groups go on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from leantune.decode.seq2seq import pad_inputs
from leantune.models.kinds import kind_of
from leantune.models.t5.model import T5, T5DecodeCache
from leantune.serve.adapters import LoRARows, shared_copy
from leantune.serve.engine import Adapter, ContextOverflow, Engine, Request

log = logging.getLogger("leantune.serve")

DEFAULT_CONTEXT = 512
"""Tokens per encoder input and per completion when neither --max_seq_length nor config.json (n_positions) says."""
FIRST_COLUMNS = 64
"""Decoder cache columns allocated at first; the cache doubles when a row needs more."""


@dataclass
class Group:
    """The running rows of one served model (the base with its shared LoRA adapters, or one grouped adapter's copy)
    and their decoding cache."""

    model: T5
    shared: bool  # rows pick their LoRA adapter per row (`LoRARows`)
    batch: list[Request] = field(default_factory=list)  # the rows of `cache`, in order
    cache: T5DecodeCache | None = None


class Seq2SeqEngine(Engine):
    """Serves an encoder-decoder `model` (loaded once, never modified): `max_batch` rows decode together, at most
    `max_queue` requests wait, a prompt and a completion each hold up to `max_seq_length` tokens (default: the
    model's n_positions, else DEFAULT_CONTEXT)."""

    def _setup(self, max_seq_length: int | None) -> None:
        model: T5 = self.pristine
        self.capacity = max_seq_length or kind_of(model).context_length(model.config) or DEFAULT_CONTEXT
        self.served = shared_copy(model)
        self.rows = LoRARows()
        self.groups: dict[object, Group] = {}  # 0: the base and shared adapters; a grouped adapter's name

    @property
    def vocab_size(self) -> int:
        return self.pristine.config.vocab_size

    def _stream_decoder(self):
        """Special tokens (a `<pad>` the decoder emits mid-answer) are skipped, as `generate` decodes T5's answer."""
        return self.tokenizer.stream_decoder(skip_special_tokens=True)

    def _attach(self, model: T5) -> None:
        """Nothing to attach: a T5 keeps its decoding state in the cache passed to each call."""

    def _drop(self, adapter: Adapter) -> None:
        self.groups.pop(adapter.name, None)  # a grouped adapter's (empty) group
        super()._drop(adapter)

    def _set_rows(self, group: Group, reqs: list[Request]) -> None:
        if group.shared:
            self.rows.set([r.adapter.id for r in reqs], self.device)

    def _budget(self, adapter: Adapter, n_prompt: int, max_tokens: int | None, default_max_tokens: int) -> int:
        """The completion budget: the encoder reads the prompt, the decoder writes the completion, each up to the
        context length less an adapter's virtual tokens."""
        limit = self.capacity - adapter.n_virtual
        if n_prompt > limit:
            raise ContextOverflow(f"This model's maximum input length is {limit} tokens. However, your "
                                  f"prompt has {n_prompt} tokens. Please reduce the length of the prompt.")
        if max_tokens is None:
            return min(default_max_tokens, limit)
        if max_tokens > limit:
            raise ContextOverflow(f"This model's maximum completion length is {limit} tokens. However, you "
                                  f"requested {max_tokens} tokens in the completion. Please reduce max_tokens.")
        return max_tokens

    # ---- the scheduler thread -------------------------------------------------------------------------
    def _admit(self, admit: list[Request], free: list[int]) -> None:
        by_model: dict[object, list[Request]] = {}
        for req, slot in zip(admit, free):
            if req.cancelled:
                self._finish(req, "cancelled")
                continue
            self.slots[slot], req.slot = req, slot
            by_model.setdefault(_key(req.adapter), []).append(req)
        for new in by_model.values():
            try:
                self._start(new)
            except Exception as e:  # find the requests that fail on their own; the others start
                if len(new) == 1:
                    self._fail_row(new[0], e)
                    continue
                log.warning("the encoder pass of %d requests failed (%s: %s); running them one at a time",
                            len(new), type(e).__name__, e)
                for req in new:
                    try:
                        self._start([req])
                    except Exception as e1:  # this request's own failure
                        self._fail_row(req, e1)
        self._compact()

    def _start(self, reqs: list[Request]) -> None:
        """Encode the new requests' prompts (all for one served model) in one batch, run the decoder's first step
        for them, and add their rows to that model's running cache; nothing is committed before every row has its
        first token."""
        a, dev = reqs[0].adapter, self.device
        model = self._group_model(a)
        group = self.groups.get(_key(a)) or Group(model, a.shared)
        self._set_rows(group, reqs)
        ids, mask = pad_inputs([r.prompt for r in reqs], model.config.pad_token_id, device=dev)  # (n, S)
        enc = model.encode(ids, mask)
        cache = model.new_cache(enc, model.encoder_mask(mask), min(FIRST_COLUMNS, max(r.max_tokens for r in reqs)))
        start = torch.full((len(reqs), 1), model.config.decoder_start_token_id, dtype=torch.long, device=dev)
        hidden = model.decode(start, cache=cache, return_hidden=True)  # (n, 1, C)
        picked = self._pick(reqs, model.head, hidden[:, -1])
        self.groups.setdefault(_key(a), group)
        group.cache = cache if group.cache is None else _join(group.cache, cache)
        group.batch += reqs
        with self.cv:
            self.prompt_tokens += sum(len(r.prompt) for r in reqs)
        for r in reqs:
            r.length = 1  # the start token is in the cache
        self._accept(reqs, picked)

    def _decode_step(self) -> None:
        self._compact()
        for group in list(self.groups.values()):
            reqs = list(group.batch)
            try:
                picked = self._step(group)
            except Exception as e:  # one forward over rows that share every weight: the group's rows end
                log.warning("a decode step of %d rows failed: %s: %s", len(reqs), type(e).__name__, e)
                for r in reqs:
                    self._fail_row(r, e)
                continue
            for r in reqs:
                r.length += 1
            self._accept(reqs, picked)
        self._compact()

    def _step(self, group: Group) -> list[int | Exception]:
        """One token for every row of a group, in one decoder forward: each row attends to its own tokens (the last
        `length` columns of the cache) and the new one."""
        cache, reqs, dev = group.cache, group.batch, self.device
        L = cache.length
        _reserve(cache, L + 1)
        x = torch.tensor([[r.last] for r in reqs], dtype=torch.long, device=dev)  # (B, 1)
        lens = torch.tensor([r.length for r in reqs], device=dev)  # (B,)
        mask = torch.arange(L + 1, device=dev)[None] >= (L - lens)[:, None]  # (B, L + 1)
        self._set_rows(group, reqs)
        hidden = group.model.decode(x, cache=cache, decoder_attention_mask=mask, return_hidden=True)  # (B, 1, C)
        return self._pick(reqs, group.model.head, hidden[:, -1])

    def _compact(self) -> None:
        """Drop the cache rows of finished requests and the columns no running row uses any more; a group without
        rows goes."""
        for name, group in list(self.groups.items()):
            keep = [i for i, r in enumerate(group.batch) if not r.done]
            if not keep:
                del self.groups[name]
            elif len(keep) < len(group.batch):
                group.batch = [group.batch[i] for i in keep]
                S = max(len(r.prompt) for r in group.batch) + group.model.n_virtual  # encoder columns still needed
                _keep_rows(group.cache, torch.tensor(keep, device=self.device), max(r.length for r in group.batch), S)


def _key(adapter: Adapter) -> object:
    """The group an adapter's rows decode in: the base's (0) for the base and shared LoRA adapters, else its own."""
    return 0 if adapter.shared else adapter.name


def _keep_rows(c: T5DecodeCache, index: torch.Tensor, top: int, S: int) -> None:
    """Keep the cache rows `index`, whose longest row holds `top` tokens, and the first S encoder columns."""
    cut = c.length - top  # leading columns that only dropped rows used
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
