"""The serving engine: one scheduler thread owns the model and decodes every running request together.

Continuous batching over `max_batch` slots: each loop turn runs pending adapter loads/unloads, gives waiting
requests the free slots, prefills up to `prefill_chunk` prompt tokens of the admitted requests (oldest first; the
chunk that ends a prompt samples its first token), then one decode step for every row whose prompt is in. A short
chunk of a base or LoRA request (MIX_TOKENS) runs inside that decode step, one forward row per prompt token, since
a forward's cost is mostly what does not grow with its rows; a longer one runs in a forward of its own. A long
prompt is thus read over several turns while the running rows keep getting a token each turn (chunked prefill, as
vLLM and llama.cpp's server do) instead of stalling them until it is all read. A row that finishes (EOS, a stop
string, its max_tokens) frees its slot at once for the next waiting request. Rows live in the slot KV cache
(`cache.py`), each at its own length, so no row waits for another.

One step runs one forward per *group*: the base and every shared (LoRA) adapter form one group, decoded in one batch
with per-row adapter selection (`adapters.LoRARows`); each grouped adapter (other methods) is a group of its own. A
forward covers the contiguous slot range of its group's rows; other slots in that range ride along as passengers
whose outputs are ignored and whose writes go to the cache's scratch column.

Prefix reuse: a new request whose prompt starts like what a row already holds for the same adapter (a running
row, or a finished one whose slot was not refilled yet; typically the chat template's system message) gets those
keys and values copied into its row and prefills only the rest.

Sampling is per row: greedy rows share one `greedy_tokens` call (an fp32 head on CPU: `screen.Bf16Screen`, the
same argmax from a bfloat16 copy), sampled rows use their own `Sampling` and a `torch.Generator` seeded from the
request's seed, so a seeded request draws the same tokens as `generate --seed`.

Faults are isolated per request, as vLLM and llama.cpp's server do: a request whose own prefill, sampling or
detokenizing fails ends alone with an error event; a group's decode forward that fails is retried one row at a time,
so only the rows that fail alone (e.g. those of a broken adapter) end, and their batch-mates go on unchanged.
Text is detokenized incrementally per row with the checkpoint's stop ids (EOS) and the request's stop strings held back
until they can no longer match (`StopStringFilter`). The waiting queue is bounded: `submit` raises `QueueFull`
(HTTP 429 with Retry-After) instead of growing without limit.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import re
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch

from leantune.cpu_threads import in_own_thread
from leantune.decode.generate import Sampling, StopStringFilter, sample
from leantune.decode.packed import PackedLinear, pack_block_linears, packable
from leantune.models.decoder.model import GPT
from leantune.models.quantize import greedy_tokens
from leantune.serve.adapters import LoRARows, install_lora, load_onto_copy, lora_factors, shared_copy, uninstall_lora
from leantune.serve.cache import SlotKVCache, SlotLayout
from leantune.serve.screen import Bf16Screen

log = logging.getLogger("leantune.serve")

Sink = Callable[[str, object], None]
"""Receives a request's events from the scheduler thread: ("text", str), ("done", dict) or ("error", str)."""


ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")
"""A served adapter's name: 1 to 128 letters, digits and . _ - : / (it travels in URLs and JSON), starting with a
letter or digit."""


def check_adapter_name(name: str) -> str:
    """The name if ADAPTER_NAME matches it; else ValueError saying the rule (a long name is shown cut)."""
    if not ADAPTER_NAME.fullmatch(name):
        shown = name if len(name) <= 40 else name[:40] + "..."
        raise ValueError(f"adapter name {shown!r}: use 1 to 128 letters, digits and . _ - : / (starting with a "
                         "letter or digit)")
    return name


PREFILL_CHUNK = 128
"""Prompt tokens prefilled per engine turn (all admitted requests together). Measured on the default model (fp32, 2
threads, a 512-token prompt, 2 alternating rounds): 2.4-3.0 ms a token at 128 against 2.2-3.1 for the whole prompt
at once and 3.2-3.4 at 64, 4.2-4.5 at 32; a 128-token chunk took 240-350 ms, about two 16-row decode steps, which is
how long a running row waits for its next token while a long prompt is read."""


MIX_TOKENS = 32
"""A shared-group request's prompt chunk of at most this many tokens is run inside the decode step, one forward row
per token, instead of a forward of its own: on the default model a forward costs mostly what does not grow with its
rows (reading every weight, per-op overhead), so a chat prompt's ~20 new tokens cost a few ms inside the step against
~100-130 ms alone. `bench/serve_cpu.py`'s 16 clients in fp32 (engine in process): prefill forwards 8-9 s of a ~27 s
run before, 0-1.6 s of ~20 s after."""
MIX_KEYS = 16384
"""At most this many (forward rows x attended columns) in a mixed step: its rows' keys and values are gathered per
row, a copy that grows with both (a long prompt's last chunk runs in a forward of its own instead)."""


class QueueFull(Exception):
    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ContextOverflow(ValueError):
    """The prompt plus the completion budget does not fit the context window (HTTP 400 naming the limit)."""


class UnknownModel(LookupError):
    pass


class ShuttingDown(RuntimeError):
    pass


@dataclass
class Adapter:
    """A served model name: the base (id 0), a shared LoRA adapter (id > 0) or a grouped one (its own model)."""

    name: str
    path: Path | None
    method: str
    shared: bool
    id: int = 0
    model: GPT | None = None  # grouped adapters: a shared copy of the base with the adapter applied
    n_virtual: int = 0
    users: int = 0  # waiting or running requests
    unloading: bool = False

    @property
    def kind(self) -> str:
        return "base" if self.path is None else ("shared" if self.shared else "grouped")


@dataclass
class Request:
    prompt: list[int]
    adapter: Adapter
    max_tokens: int
    sampling: Sampling
    generator: torch.Generator | None
    stops: StopStringFilter
    decoder: object
    sink: Sink
    submitted: float = field(default_factory=time.perf_counter)
    slot: int = -1
    length: int = 0  # real tokens in this row's cache
    last: int = 0  # the newest sampled token (the next decode input)
    ready: bool = False  # its prompt is prefilled and its first token sampled: it decodes with the batch
    generated: int = 0
    cancelled: bool = False
    done: bool = False


class Engine:
    """Serves a decoder `model` (loaded once, never modified) and the adapters added to it; `max_batch` rows decode
    together, at most `max_queue` requests wait, each request holds up to `max_seq_length` tokens (default: the
    model's); at most `prefill_chunk` prompt tokens are prefilled between two decode steps. The model-kind part
    (`_setup`, `_budget`, `_admit`, `_decode_step`) is what `Seq2SeqEngine` replaces for an encoder-decoder; the
    scheduler, queue, sampling, text and fault handling are shared."""

    def __init__(self, model: GPT, tokenizer, checkpoint_dir: Path, base_name: str, max_batch: int = 8,
                 max_queue: int = 64, max_seq_length: int | None = None, prefix_cache: bool = True,
                 prefill_chunk: int = PREFILL_CHUNK, mix_prefill: bool = True, screen_head: bool = True,
                 pack_weights: bool = True) -> None:
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1 token, got {prefill_chunk}")
        self.pristine = model.eval()
        self.tokenizer, self.checkpoint_dir, self.base_name = tokenizer, Path(checkpoint_dir), base_name
        self.device = model.lm_head.weight.device
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.mix_prefill, self.screen_head, self.pack_weights = mix_prefill, screen_head, pack_weights
        self._screens: dict[int, tuple[torch.Tensor, Bf16Screen]] = {}  # id(head weight) -> (it, its screen)
        self.prefilling: deque[Request] = deque()  # admitted requests whose prompt is not all in yet, oldest first
        self.mixed: list[tuple[Request, int]] = []  # this turn's (request, chunk end) for the decode step to run
        in_own_thread(self._setup, max_seq_length)  # its OpenMP pool must not outlive it (cpu_threads.in_own_thread)
        self.eos = set(tokenizer.eos_ids)
        self.adapters: dict[str, Adapter] = {base_name: Adapter(base_name, None, "base", shared=True)}
        self._pending: set[str] = set()
        self._next_id = 1
        self.slots: list[Request | None] = [None] * max_batch
        # Prefix reuse: the tokens whose keys/values row s holds (from column n_virtual on) and for which adapter;
        # kept after the row's request finishes, until the slot is filled again.
        self.prefix_cache = prefix_cache
        self.row_tokens: list[list[int]] = [[] for _ in range(max_batch)]
        self.row_adapter: list[Adapter | None] = [None] * max_batch
        self.reused_tokens = 0
        self.waiting: deque[Request] = deque()
        self.commands: deque[tuple[Callable[[], object], Future]] = deque()
        self.cv = threading.Condition()
        self.closing = self.stopped = False
        self.failure: str | None = None
        self.served_requests = self.generated_tokens = self.cancelled_requests = self.prompt_tokens = 0
        self._service_time = 1.0  # moving average of a request's seconds from submit to finish (Retry-After)
        self.thread = threading.Thread(target=self._loop, name="leantune-engine", daemon=True)
        self.thread.start()

    def _setup(self, max_seq_length: int | None) -> None:
        """The model-kind part of the engine's state: the served copy with per-row LoRA, the slot KV cache."""
        model, cfg = self.pristine, self.pristine.config
        self.served = shared_copy(model)
        if self.pack_weights:
            pack_block_linears(self.served.transformer.h)
            head = self.served.lm_head
            if packable(head) and head.weight.dtype == torch.bfloat16:  # an fp32 head is read through Bf16Screen
                self.served.lm_head = PackedLinear(head)
        self.rows = LoRARows()
        self.capacity = min(cfg.block_size, max_seq_length or cfg.block_size)
        self.layout = SlotLayout(self.capacity)
        dtype = model.transformer.wte.weight.dtype
        self.caches = [SlotKVCache(self.layout, self.max_batch, cfg.n_query_groups, cfg.head_size, self.device, dtype)
                       for _ in range(cfg.n_layer)]
        self._attach(self.served)

    @property
    def vocab_size(self) -> int:
        """Token ids a prompt may hold: [0, vocab_size)."""
        return self.pristine.config.padded_vocab_size

    # ---- what the HTTP layer calls (any thread) -------------------------------------------------------
    def lookup(self, name: str) -> Adapter:
        a = self.adapters.get(name)
        if a is None or a.unloading:
            known = ", ".join(n for n, x in self.adapters.items() if not x.unloading)
            raise UnknownModel(f"The model {name!r} does not exist on this server; choose one of: {known}")
        return a

    def submit(self, name: str, prompt: list[int], max_tokens: int | None, default_max_tokens: int,
               sampling: Sampling, seed: int | None, stop: list[str], sink: Sink) -> Request:
        """Queue a request; raises UnknownModel, ContextOverflow, QueueFull or ShuttingDown."""
        adapter = self.lookup(name)
        if not prompt:
            raise ContextOverflow("the prompt is empty")
        if max_tokens is not None:
            max_tokens = min(max_tokens, default_max_tokens)  # the server's cap (serve --max_new_tokens)
        max_tokens = self._budget(adapter, len(prompt), max_tokens, default_max_tokens)
        generator = None
        if not sampling.greedy:
            generator = torch.Generator(device=self.device).manual_seed(
                seed if seed is not None else random.randrange(2**63))
        req = Request(list(prompt), adapter, max_tokens, sampling, generator, StopStringFilter(stop),
                      self._stream_decoder(), sink)
        with self.cv:
            if self.closing:
                raise ShuttingDown("the server is shutting down")
            if self.failure:
                raise ShuttingDown(f"the engine failed: {self.failure}")
            if adapter.unloading:  # unloaded since the lookup above
                raise UnknownModel(f"The model {name!r} was just unloaded from this server")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"The server's queue is full ({self.max_queue} waiting requests); retry later",
                                self.retry_after())
            adapter.users += 1
            self.waiting.append(req)
            self.cv.notify()
        return req

    def _stream_decoder(self):
        """A request's incremental detokenizer: special tokens kept as text, as `generate` prints them."""
        return self.tokenizer.stream_decoder()

    def _budget(self, adapter: Adapter, n_prompt: int, max_tokens: int | None, default_max_tokens: int) -> int:
        """The request's completion budget, or ContextOverflow: prompt and completion share the context window."""
        limit = self.capacity - adapter.n_virtual
        if max_tokens is None:
            if n_prompt >= limit:
                raise ContextOverflow(f"This model's maximum context length is {limit} tokens. However, your "
                                      f"prompt has {n_prompt} tokens, leaving no room for a completion. Please "
                                      "reduce the length of the prompt.")
            return min(default_max_tokens, limit - n_prompt)
        if n_prompt + max_tokens > limit:
            raise ContextOverflow(f"This model's maximum context length is {limit} tokens. However, you requested "
                                  f"{n_prompt + max_tokens} tokens ({n_prompt} in the prompt, {max_tokens} in "
                                  "the completion). Please reduce the length of the prompt or max_tokens.")
        return max_tokens

    def cancel(self, req: Request) -> None:
        """Stop a request (e.g. its client went away); its slot is freed before the next step."""
        with self.cv:
            req.cancelled = True
            self.cv.notify()

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the queue ahead, drained max_batch at a time."""
        turns = (len(self.waiting) + 1) / self.max_batch
        return max(1, min(60, math.ceil(self._service_time * turns)))

    def stats(self) -> dict:
        with self.cv:
            running = sum(r is not None for r in self.slots)
            return {"running": running, "waiting": len(self.waiting), "max_batch_size": self.max_batch,
                    "max_queue": self.max_queue, "context_length": self.capacity,
                    "served_requests": self.served_requests, "cancelled_requests": self.cancelled_requests,
                    "generated_tokens": self.generated_tokens, "prompt_tokens": self.prompt_tokens,
                    "prompt_tokens_reused": self.reused_tokens}

    def add_adapter(self, name: str, path: Path) -> Adapter:
        """Load an adapter folder (leantune or PEFT, any method) under `name`; the caller waits while it loads (in a
        thread that ends, so the caller keeps no OpenMP pool beside the engine's: `cpu_threads.in_own_thread`), and it
        installs between two decode steps. Raises ValueError/FileNotFoundError for a bad name or folder."""
        check_adapter_name(name)
        with self.cv:
            if name in self.adapters or name in self._pending:
                raise FileExistsError(f"a model named {name!r} is already being served; unload it first")
            self._pending.add(name)
        try:
            model, manifest, factors = in_own_thread(self._load_adapter, Path(path))
            adapter = Adapter(name, Path(path), manifest.get("method", "?"), shared=factors is not None)
            if factors is not None:
                adapter.id = self._take_id()
                self._in_loop(lambda: install_lora(self.served, self.rows, adapter.id, factors))
            else:
                adapter.model, adapter.n_virtual = model, model.n_virtual
                self._attach(model)
            with self.cv:
                self.adapters[name] = adapter
            log.info("adapter %s: %s from %s (%s)", name, adapter.method, path,
                     "shares batches with the base" if adapter.shared else "batched with its own rows")
            return adapter
        finally:
            with self.cv:
                self._pending.discard(name)

    def _load_adapter(self, path: Path) -> tuple[torch.nn.Module, dict, dict | None]:
        """(a shared copy of the base with the adapter applied, its manifest, its LoRA factors or None)."""
        model, manifest = load_onto_copy(self.pristine, path, self.checkpoint_dir)
        return model, manifest, lora_factors(self.pristine, model)

    def remove_adapter(self, name: str) -> None:
        """Unload an adapter: new requests for it get 404 at once; requests already queued or running finish."""
        with self.cv:
            adapter = self.lookup(name)
            if adapter.path is None:
                raise ValueError(f"{name!r} is the base model; only adapters can be unloaded")
            adapter.unloading = True
            if adapter.users == 0:
                self.commands.append((lambda: self._drop(adapter), Future()))
                self.cv.notify()

    def close(self, timeout: float | None = None) -> None:
        """Refuse new requests, let queued and running ones finish (up to `timeout` s), then stop the thread."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cv:
            self.closing = True
            while (self.waiting or any(self.slots)) and self.thread.is_alive():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self.cv.wait(timeout=left if left is not None else 1.0)
            self.stopped = True
            self.cv.notify_all()
        self.thread.join(timeout=30)

    # ---- the scheduler thread -------------------------------------------------------------------------
    def _take_id(self) -> int:
        with self.cv:
            self._next_id += 1
            return self._next_id - 1

    def _in_loop(self, fn: Callable[[], object]) -> object:
        """Run `fn` in the scheduler thread between two steps and wait for it (the thread owns the model)."""
        fut: Future = Future()
        with self.cv:
            self.commands.append((fn, fut))
            self.cv.notify()
        return fut.result()

    def _attach(self, model: GPT) -> None:
        for block, cache in zip(model.transformer.h, self.caches):
            block.attn.kv_cache = cache

    def _drop(self, adapter: Adapter) -> None:
        if adapter.shared:
            uninstall_lora(self.served, adapter.id)
        with self.cv:
            if self.adapters.get(adapter.name) is adapter:
                del self.adapters[adapter.name]
        adapter.model = None
        for s, a in enumerate(self.row_adapter):  # its rows' keys/values are of no use to anyone now
            if a is adapter:
                self.row_tokens[s], self.row_adapter[s] = [], None
        log.info("adapter %s unloaded", adapter.name)

    def _loop(self) -> None:
        try:
            self._run()
        except BaseException as e:  # the thread is ending: nobody may wait for it any more
            self.failure = f"{type(e).__name__}: {e}"
            log.error("engine stopped: %s", traceback.format_exc())
            with self.cv:
                pending = [*self.waiting, *(r for r in self.slots if r is not None)]
                self.waiting.clear()
                for _, fut in self.commands:
                    fut.set_exception(RuntimeError(f"the engine stopped: {self.failure}"))
                self.commands.clear()
            for req in pending:
                self._fail(req, self.failure)
            raise

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        with torch.inference_mode():
            while True:
                with self.cv:
                    while not (self.commands or self.waiting or any(self.slots) or self.stopped):
                        self.cv.wait()
                    if self.stopped and not self.commands:
                        break
                    commands = list(self.commands)
                    self.commands.clear()
                    admit = []
                    free = [i for i, r in enumerate(self.slots) if r is None]
                    while self.waiting and len(admit) < len(free):
                        admit.append(self.waiting.popleft())
                for fn, fut in commands:
                    try:
                        fut.set_result(fn())
                    except Exception as e:  # reported to the caller waiting on the future
                        fut.set_exception(e)
                try:
                    self._admit(admit, free)
                    for req in [r for r in self.slots if r is not None and r.cancelled]:
                        self._finish(req, "cancelled")
                    self._prefill_turn()
                    if any(self.slots):
                        self._decode_step()
                    self.prefilling = deque(r for r in self.prefilling if not (r.ready or r.done or r.cancelled))
                except Exception as e:  # outside any one request (a bug in the step itself): fail the rows, keep serving
                    log.error("engine step failed: %s", traceback.format_exc())
                    self.row_tokens = [[] for _ in self.slots]  # what the rows hold is unknown now
                    self.prefilling.clear()
                    self.mixed = []
                    for req in [r for r in self.slots if r is not None]:
                        self._fail(req, f"{type(e).__name__}: {e}")

    def _admit(self, admit: list[Request], free: list[int]) -> None:
        """Give each newly admitted request a free slot and queue its prompt for prefill (`_prefill_turn` runs it)."""
        for req, slot in zip(admit, free):
            if req.cancelled:
                self._finish(req, "cancelled")
                continue
            self.slots[slot], req.slot = req, slot
            try:
                self._start_prefill(req)
            except Exception as e:  # this request's own failure (its prompt, its adapter): it alone ends
                self._fail_row(req, e)
                continue
            self.prefilling.append(req)

    def _group_model(self, adapter: Adapter) -> GPT:
        return self.served if adapter.shared else adapter.model

    def _start_prefill(self, req: Request) -> None:
        """Make the request's row ready to be prefilled: its cache columns zeroed (before any decode step may zero
        them under it), a reusable prompt start copied in; `req.length` counts the prompt tokens in its row."""
        a, slot, L = req.adapter, req.slot, len(req.prompt)
        for c in self.caches:
            c.ensure_filled(a.n_virtual + L)
        m = self._reuse_prefix(req) if self.prefix_cache else 0
        req.length = m
        self.row_tokens[slot], self.row_adapter[slot] = req.prompt[:m], a
        with self.cv:
            self.prompt_tokens += L
            self.reused_tokens += m

    def _prefill_turn(self) -> None:
        """Prefill up to `prefill_chunk` prompt tokens of the admitted requests, oldest first. A short chunk of a
        shared-group request is left in `self.mixed` for the decode step to run as rows of its own forward
        (`_mixable`); the others run now, one forward each. A request whose chunk fails ends alone; one cancelled
        meanwhile is left for the loop to finish."""
        budget, self.mixed = self.prefill_chunk, []
        for req in list(self.prefilling):
            if budget <= 0:
                break
            if req.done or req.cancelled:
                continue
            end = min(len(req.prompt), req.length + budget)
            if self._mixable(req, end):
                self.mixed.append((req, end))
                budget -= end - req.length
                continue
            try:
                budget -= self._prefill_chunk(req, budget)
            except Exception as e:  # this request's own failure (its prompt, its adapter): it alone ends
                self._fail_row(req, e)

    def _mixable(self, req: Request, end: int) -> bool:
        """Whether prompt tokens [req.length, end) ride along in this turn's decode step: a shared-group request's
        chunk of at most MIX_TOKENS, while the step's gathered keys (rows x columns) stay under MIX_KEYS."""
        if not (self.mix_prefill and req.adapter.shared and end - req.length <= MIX_TOKENS):
            return False
        rows = self.max_batch + sum(e - r.length for r, e in self.mixed) + end - req.length
        longest = max([end, *(e for _, e in self.mixed), *(r.length + 1 for r in self.slots if r is not None and r.ready)])
        return rows * longest <= MIX_KEYS

    def _prefill_chunk(self, req: Request, budget: int) -> int:
        """Run the next (at most `budget`) prompt tokens of `req` into its slot's row of the cache; the chunk that
        ends the prompt samples the first token. Returns the tokens run."""
        a, slot = req.adapter, req.slot
        model = self._group_model(a)
        start, L = req.length, len(req.prompt)
        end = min(L, start + budget)
        self.layout.prefill(slot)
        if a.shared:
            self.rows.set([a.id], self.device)
        ids = torch.tensor([req.prompt[start:end]], dtype=torch.long, device=self.device)  # (1, end - start)
        hidden = model.decode(ids, torch.arange(start, end, device=self.device), return_hidden=True)  # (1, T, C)
        req.length = end
        self.row_tokens[slot] = req.prompt[:end]
        if end == L:
            req.ready = True
            self._accept([req], self._pick([req], model.lm_head, hidden[:, -1]))
        return end - start

    def _reuse_prefix(self, req: Request) -> int:
        """Tokens at the start of the prompt whose keys/values some row already holds for the same adapter (e.g.
        the chat template's system message), copied into this request's row (in place when it is that row); the
        prefill then runs only the rest. At least the last prompt token is always run: its logits are needed."""
        best, src = 0, -1
        for s, tokens in enumerate(self.row_tokens):
            if self.row_adapter[s] is req.adapter and tokens:
                n = len(os.path.commonprefix([tokens, req.prompt]))
                if n > best:
                    best, src = n, s
        m = min(best, len(req.prompt) - 1)
        if m > 0 and src != req.slot:
            cols = req.adapter.n_virtual + m  # the virtual positions come along
            for c in self.caches:
                c.k[req.slot, :, :cols] = c.k[src, :, :cols]
                c.v[req.slot, :, :cols] = c.v[src, :, :cols]
        return max(m, 0)

    def _decode_step(self) -> None:
        groups: dict[object, list[int]] = {}
        for s, r in enumerate(self.slots):
            if r is not None and r.ready:  # a row still prefilling rides along as a passenger, if in range
                groups.setdefault(0 if r.adapter.shared else r.adapter.name, []).append(s)
        mixed = [(r, end) for r, end in self.mixed if not (r.done or r.cancelled)]
        self.mixed = []
        if mixed:
            groups.setdefault(0, [])
        for key, slots in groups.items():
            mix = mixed if key == 0 else []
            try:
                self._decode_group(slots, mix)
            except Exception as e:  # nothing of this step is committed yet: find the rows that fail on their own
                if len(slots) + len(mix) == 1:
                    self._fail_row(self.slots[slots[0]] if slots else mix[0][0], e)
                    continue
                log.warning("a decode step of %d rows and %d prompt chunks failed (%s: %s); running them one at a "
                            "time", len(slots), len(mix), type(e).__name__, e)
                for r, end in mix:
                    try:
                        self._prefill_chunk(r, end - r.length)
                    except Exception as e1:  # this request's own failure
                        self._fail_row(r, e1)
                for s in slots:
                    try:
                        self._decode_group([s])
                    except Exception as e1:  # this row's own failure
                        self._fail_row(self.slots[s], e1)

    def _decode_group(self, slots: list[int], mixed: list[tuple[Request, int]] = ()) -> None:
        """One token for each row in `slots` (all of one group), in one forward over the slot range they span, and
        prompt tokens [r.length, end) of each (r, end) in `mixed` (shared group only) as one forward row each, whose
        chunk that ends a prompt samples its first token. Nothing is committed before every row has its token, so
        a failed call can be retried row by row (a row rewrites the same cache columns)."""
        reqs = [self.slots[s] for s in slots]
        a = reqs[0].adapter if reqs else mixed[0][0].adapter
        model, P, dev = self._group_model(a), a.n_virtual, self.device
        lo, hi = (slots[0], slots[-1] + 1) if slots else (0, 0)
        B = hi - lo
        # forward rows: the slot range lo:hi (passengers write the scratch column), then one row per prompt token
        tokens, pos, cols, seen, ids = [0] * B, [0] * B, [self.capacity] * B, [-1] * B, [0] * B
        for s, r in zip(slots, reqs):
            i = s - lo
            tokens[i], pos[i], cols[i], seen[i], ids[i] = r.last, r.length, P + r.length, r.length, r.adapter.id
        row_slots, ends = list(range(lo, hi)), []  # ends: (request, its last prompt row) for chunks ending a prompt
        for r, end in mixed:
            n = end - r.length
            tokens += r.prompt[r.length:end]
            pos += range(r.length, end)
            cols += range(r.length, end)
            seen += range(r.length, end)
            ids += [r.adapter.id] * n
            row_slots += [r.slot] * n
            if end == len(r.prompt):
                ends.append((r, len(tokens) - 1))
        S_real = max(seen) + 1
        seen = [S_real - 1 if x < 0 else x for x in seen]  # passengers see every column (their output is dropped)
        seen_t = torch.tensor(seen, device=dev)  # (B',) the last column each row may see
        keys = torch.arange(S_real, device=dev)[None]  # (1, S_real)
        mask = keys <= seen_t[:, None]  # (B', S_real): each row sees its own tokens and the new one
        window = model.config.sliding_window
        if window is not None:
            mask &= seen_t[:, None] - keys < window
        cols_t = torch.tensor(cols, device=dev)
        if mixed:
            self.layout.mixed(torch.tensor(row_slots, device=dev), cols_t, P + S_real)
        else:
            self.layout.decode(lo, hi, cols_t, P + S_real)
        for c in self.caches:
            c.ensure_filled(P + S_real)
        if a.shared:
            self.rows.set(ids, dev)
        with _no_model_window(model):  # the per-row window is in `mask`; the model's would use one shared position
            hidden = model.decode(torch.tensor(tokens, device=dev)[:, None], torch.tensor([S_real - 1], device=dev),
                                  position_ids=torch.tensor(pos, device=dev)[:, None], attention_mask=mask,
                                  return_hidden=True)  # (B', 1, C)
        out = reqs + [r for r, _ in ends]  # the rows that get a token
        h = hidden[[s - lo for s in slots] + [i for _, i in ends], -1]  # (len(out), C)
        if a.shared:
            self.rows.set([r.adapter.id for r in out], dev)
        picked = self._pick(out, model.lm_head, h)
        for r in reqs:
            r.length += 1
            self.row_tokens[r.slot].append(r.last)  # the token just written at its row's column
        for r, end in mixed:
            r.length, self.row_tokens[r.slot] = end, r.prompt[:end]
            r.ready = end == len(r.prompt)
        self._accept(out, picked)

    def _pick(self, reqs: list[Request], head: torch.nn.Module, h: torch.Tensor) -> list[int | Exception]:
        """One token per row from its last hidden state h (n, C): greedy rows through `greedy_tokens` over all n rows
        (the per-row adapter ids cover all of them; with few rows a weight-only head screens with its int4 copy, as
        `generate` does), sampled rows from the head's logits. A row whose own sampling fails gets its exception
        instead of a token; a failure of the shared calls raises."""
        if not reqs:  # a mixed step of prompt chunks none of which ends its prompt
            return []
        sampled = [i for i, r in enumerate(reqs) if r.generator is not None]
        if not sampled and self.screen_head and Bf16Screen.applies(head):
            return self._screen(head).argmax(h).tolist()
        logits = head(h) if sampled else None  # (n, V)
        tokens: list[int | Exception] = (greedy_tokens(head, h, logits).tolist() if len(sampled) < len(reqs)
                                         else [0] * len(reqs))
        for i in sampled:
            try:
                tokens[i] = int(sample(logits[i:i + 1], reqs[i].sampling, reqs[i].generator))
            except Exception as e:  # e.g. non-finite logits under this row's own sampling
                tokens[i] = e
        return tokens

    def _screen(self, head: torch.nn.Linear) -> Bf16Screen:
        """The bfloat16 screen of this head's weight (made on first use; heads sharing a weight share it)."""
        weight, screen = self._screens.get(id(head.weight), (None, None))
        if weight is not head.weight:
            screen = Bf16Screen(head)
            self._screens[id(head.weight)] = (head.weight, screen)
        return screen

    def _accept(self, reqs: list[Request], tokens: list[int | Exception]) -> None:
        """Hand each row its token; a row whose token is an exception, or whose text fails to decode, ends alone."""
        for r, t in zip(reqs, tokens):
            try:
                if isinstance(t, Exception):
                    raise t
                self._push(r, t)
            except Exception as e:
                self._fail_row(r, e)

    def _push(self, req: Request, token: int) -> None:
        req.generated += 1
        req.last = token
        if token in self.eos:
            return self._finish(req, "stop")
        text = req.stops.push(req.decoder.push(token))
        if text:
            req.sink("text", text)
        if req.stops.stopped:
            self._finish(req, "stop")
        elif req.generated >= req.max_tokens or req.adapter.n_virtual + req.length + 1 > self.capacity:
            self._finish(req, "length")

    def _release(self, req: Request) -> None:
        req.done = True
        if req.slot >= 0 and self.slots[req.slot] is req:
            self.slots[req.slot] = None
        a = req.adapter
        with self.cv:
            a.users -= 1
            self.served_requests += 1
            self.generated_tokens += req.generated
            self._service_time = 0.8 * self._service_time + 0.2 * (time.perf_counter() - req.submitted)
            self.cv.notify_all()
        if a.unloading and a.users == 0:
            self._drop(a)

    def _finish(self, req: Request, reason: str) -> None:
        if req.done:
            return
        tail = req.stops.push(req.decoder.flush()) + req.stops.flush()
        if tail and reason != "cancelled":
            req.sink("text", tail)
        if reason == "cancelled":
            self.cancelled_requests += 1
        self._release(req)
        req.sink("done", {"finish_reason": reason, "prompt_tokens": len(req.prompt),
                          "completion_tokens": req.generated})

    def _fail(self, req: Request, message: str) -> None:
        if not req.done:
            self._release(req)
            req.sink("error", message)

    def _fail_row(self, req: Request, e: Exception) -> None:
        """End one request with its own error; what its row of the cache holds is unknown now, so nothing reuses it."""
        log.warning("request failed alone: %s: %s", type(e).__name__, e)
        if req.slot >= 0:
            self.row_tokens[req.slot], self.row_adapter[req.slot] = [], None
        self._fail(req, f"{type(e).__name__}: {e}")


@contextlib.contextmanager
def _no_model_window(model: GPT):
    window = model.config.sliding_window
    if window is None:
        yield
        return
    model.config.sliding_window = None
    try:
        yield
    finally:
        model.config.sliding_window = window
