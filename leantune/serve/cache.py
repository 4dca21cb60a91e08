"""The slot KV cache: one row per batch slot, each row holding its own sequence from column 0 at its own length.

GPT's attention calls `kv_cache.update(input_pos, k, v)`; this cache takes the place of `KVCache` in every layer (of
the served model and of every grouped adapter's model, which share it) and writes where the engine's `SlotLayout`
says, so rows of different lengths decode in one forward without left padding or compaction:

- prefill (one new request in slot i): columns `input_pos` of row i, as KVCache would (virtual positions included);
- decode (a slice of slots lo:hi, one token each): row b at its own column `cols[b]`; the step attends over the
  first S columns, rows shorter than S-1 masked by the attention mask the engine passes;
- mixed (a decode step with prompt tokens of admitted requests riding along): forward row b is one token of slot
  `slots[b]`, written at column `cols[b]`; every row's token is written before any row reads, so a prompt token sees
  the earlier tokens of its own chunk (the mask makes each row causal), and the rows' keys are gathered per row.

A row that is only a passenger of a step (an idle slot, or a row of another adapter group inside the slice) writes to
the scratch column at index `capacity`, which no step reads. Memory is reserved with `torch.empty` and zeroed lazily
up to the highest column used so far, so a long context costs memory only once it is used.
"""

from __future__ import annotations

import torch

from leantune.runtime import cpu_has_amx


class SlotLayout:
    """Where the next forward's keys and values go; shared by every layer's SlotKVCache."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.lo, self.hi = 0, 1
        self.cols: torch.Tensor | None = None  # (hi - lo,) decode columns; None: prefill at input_pos
        self.S = 0
        self.rows: torch.Tensor | None = None  # arange(hi - lo), for the decode write
        self.slots: torch.Tensor | None = None  # mixed: (B,) slot of each forward row; None otherwise

    def prefill(self, slot: int) -> None:
        self.lo, self.hi, self.cols, self.slots = slot, slot + 1, None, None

    def decode(self, lo: int, hi: int, cols: torch.Tensor, S: int) -> None:
        self.lo, self.hi, self.cols, self.S, self.slots = lo, hi, cols, S, None
        self.rows = torch.arange(hi - lo, device=cols.device)

    def mixed(self, slots: torch.Tensor, cols: torch.Tensor, S: int) -> None:
        """slots, cols (B,): forward row b writes its token to (slots[b], cols[b]) and attends over that slot's
        first S columns."""
        self.slots, self.cols, self.S = slots, cols, S


class SlotKVCache:
    """Keys and values (slots, n_query_groups, capacity + 1, head_size) of one layer."""

    static = False  # as KVCache's: update() returns only the columns the rows use (GPT._mask reads this)

    def __init__(self, layout: SlotLayout, slots: int, n_groups: int, head_size: int, device, dtype) -> None:
        shape = (slots, n_groups, layout.capacity + 1, head_size)  # + 1: the scratch column
        self.layout = layout
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.filled = 0  # columns [0, filled) of every row hold finite values (written or zeroed)
        self._fp32_steps = dtype == torch.bfloat16 and torch.device(device).type == "cpu" and not cpu_has_amx()

    @property
    def attend_fp32(self) -> bool:
        """Whether this forward's attention runs on fp32 q, k, v (cast in, cast back; read by CausalSelfAttention).
        True for a decode or mixed step (one query a row) over a bf16 cache on a CPU without AMX: there bf16 SDPA
        made the default model's step longer than with the casts (16 rows ~84 vs ~63 ms, 4 rows ~50 vs ~43, 1 row
        ~40 vs ~38; 2 threads, AVX-512 bf16). Prefill chunks (many queries a row) keep bf16, which was as fast or
        faster there (20-32 queries over 60-100 keys: the casts took 1.05-1.8x as long)."""
        return self._fp32_steps and self.layout.cols is not None

    def ensure_filled(self, n: int) -> None:
        """Zero columns [filled, n) of every row before anything is written there or read from there."""
        if n > self.filled:
            self.k[:, :, self.filled:n].zero_()
            self.v[:, :, self.filled:n].zero_()
            self.filled = n

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """k, v (B, ng, T, hs) -> this row slice's keys and values (B, ng, S, hs) to attend over."""
        L = self.layout
        if L.cols is None:  # prefill: one slot, KVCache's own indexing
            ks, vs = self.k[L.lo:L.hi], self.v[L.lo:L.hi]  # views
            ks.index_copy_(2, input_pos, k.to(ks.dtype))
            vs.index_copy_(2, input_pos, v.to(vs.dtype))
            S = int(input_pos[-1]) + 1
            return ks[:, :, :S], vs[:, :, :S]
        # decode and mixed: row b writes its token at (its slot, every group, its column), as one index_copy_ over
        # the flattened (slot, group, column) rows (an advanced-index write cost ~4% of a 16-row step)
        slots = L.slots if L.slots is not None else L.rows + L.lo  # (B,)
        n_groups, width = self.k.shape[1], self.k.shape[2]
        groups = torch.arange(n_groups, device=slots.device)
        flat = ((slots[:, None] * n_groups + groups) * width + L.cols[:, None]).flatten()  # (B * ng,)
        hs = self.k.shape[3]
        self.k.view(-1, hs).index_copy_(0, flat, k[:, :, 0].reshape(-1, hs).to(self.k.dtype))
        self.v.view(-1, hs).index_copy_(0, flat, v[:, :, 0].reshape(-1, hs).to(self.v.dtype))
        if L.slots is not None:  # mixed: rows of any slots, several rows per slot; all written, now gathered
            return self.k[:, :, :L.S].index_select(0, L.slots), self.v[:, :, :L.S].index_select(0, L.slots)
        return self.k[L.lo:L.hi, :, :L.S], self.v[L.lo:L.hi, :, :L.S]
