"""KV-cache decoding: sampling (greedy, temperature, top-k, top-p), stop ids and strings, streaming, and batched
greedy completion with left padding."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from leantune.decode.compile import compiled_decode_step, static_cache_length
from leantune.models.decoder.model import GPT
from leantune.models.quantize import greedy_tokens

MIN_TEMPERATURE = 1e-5
"""Temperatures below this decode greedily: dividing the logits by less can overflow float32 (1e-40 turned them into
inf and the probabilities into NaN), and what it would sample is greedy's for every logit gap above 1e-3 anyway."""


@dataclass
class Sampling:
    """How the next token is picked; the one place that says what is greedy (generate, chat, evaluate, serve)."""

    temperature: float = 0.0
    """0 (or anything below MIN_TEMPERATURE) means greedy decoding."""
    top_k: int | None = None
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not 0 <= self.temperature < math.inf:  # `not` also refuses NaN
            raise ValueError(f"--temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"--top_k must be >= 1 (or None for all tokens), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE


def sample(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,)."""
    if s.greedy:
        return logits.argmax(dim=-1)
    logits = logits.float() / s.temperature
    if s.top_k is not None and s.top_k < logits.shape[-1]:
        kth = torch.topk(logits, s.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > s.top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate_tokens(
    model: GPT,
    prompt: torch.Tensor,
    max_new_tokens: int,
    sampling: Sampling | None = None,
    stop_ids: Sequence[int] = (),
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    compiled: bool = False,
) -> Iterator[int]:
    """Yield new token ids one at a time for a 1-D prompt; stops after a stop id (which is yielded) or the budget.

    With use_cache=False every step recomputes the whole sequence (reference path for tests). compiled=True runs the
    one-token steps through `leantune.decode.compile.compiled_decode_step` over a static KV cache (the prompt stays eager).
    """
    sampling = sampling or Sampling()
    device = model.lm_head.weight.device
    prompt = prompt.to(device)
    T = prompt.shape[0]
    max_len = min(T + max_new_tokens, model.max_tokens)
    if T >= model.max_tokens:
        raise ValueError(f"prompt has {T} tokens; the model's block size is {model.config.block_size}"
                         + (f" of which {model.n_virtual} hold virtual tokens" if model.n_virtual else ""))
    stop = set(stop_ids)
    step = compiled_decode_step(model, greedy=sampling.greedy) if compiled and use_cache else None
    if step is not None:
        model.set_kv_cache(1, static_cache_length(max_len, model.max_tokens), device=device, static=True)
    elif use_cache:
        model.set_kv_cache(1, max_len, device=device)
    try:
        tokens = prompt[None]  # (1, T)
        input_pos = torch.arange(T, device=device)
        x = tokens
        for i in range(max_len - T):
            if step is not None and i > 0:
                out = step(x, input_pos)  # (1,) token or (1, V) logits
            else:
                hidden = (model.decode(x, input_pos, return_hidden=True) if use_cache
                          else model(tokens, return_hidden=True))[:, -1]  # (1, C): project only the last position
                out = greedy_tokens(model.lm_head, hidden) if sampling.greedy else model.lm_head(hidden)
            nxt = out if sampling.greedy else sample(out, sampling, generator)  # (1,)
            token = int(nxt)
            yield token
            if token in stop:
                return
            x = nxt[None]  # (1, 1)
            input_pos = input_pos[-1:] + 1
            if not use_cache:
                tokens = torch.cat([tokens, x], dim=1)
    finally:
        if use_cache:
            model.clear_kv_cache()


class StopStringFilter:
    """Streams text while holding back any tail that could still grow into a stop string."""

    def __init__(self, stop_strings: Sequence[str]) -> None:
        self.stops = [s for s in stop_strings if s]
        self.buffer = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """Add newly decoded text; return the part that is safe to show."""
        if self.stopped:
            return ""
        self.buffer += text
        for s in self.stops:
            i = self.buffer.find(s)
            if i >= 0:
                self.stopped = True
                out, self.buffer = self.buffer[:i], ""
                return out
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.buffer.endswith(s[:k])), default=0)
        out = self.buffer[: len(self.buffer) - hold]
        self.buffer = self.buffer[len(self.buffer) - hold:]
        return out

    def flush(self) -> str:
        out, self.buffer = ("" if self.stopped else self.buffer), ""
        return out


def encode_prompt(tokenizer, prompt: str, raw: bool = False, system: str | None = None) -> list[int]:
    """Apply the checkpoint's chat template (instruct models) unless raw; exactly one BOS either way."""
    if raw or not tokenizer.chat_template:
        return tokenizer.encode(prompt)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return tokenizer.encode(text, bos=bos_for_rendered(tokenizer, text))


def bos_for_rendered(tokenizer, text: str) -> bool | None:
    """A template that renders the BOS text itself must not get a second BOS from encode."""
    if tokenizer.bos_id is None:
        return None
    return False if text.startswith(tokenizer.decode([tokenizer.bos_id])) else None


def stream_text(model, tokenizer, ids, max_new_tokens, sampling, stop, generator, compiled: bool = False):
    """Print tokens as they are decoded (stop strings held back); returns (text, tokens generated, start time)."""
    decoder = tokenizer.stream_decoder()
    stops = StopStringFilter(stop or [])
    eos = set(tokenizer.eos_ids)
    pieces, n = [], 0
    t0 = time.perf_counter()
    for token in generate_tokens(model, ids, max_new_tokens, sampling, stop_ids=tokenizer.eos_ids, generator=generator,
                                 compiled=compiled):
        n += 1
        if token in eos:
            break
        out = stops.push(decoder.push(token))
        print(out, end="", flush=True)
        pieces.append(out)
        if stops.stopped:
            break
    tail = stops.push(decoder.flush()) + stops.flush()
    print(tail, end="", flush=True)
    pieces.append(tail)
    return "".join(pieces), n, t0


@torch.inference_mode()
def greedy_batch(model: GPT, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: Sequence[int],
                 pad_id: int = 0, stop_fn: Callable[[int, list[int]], bool] | None = None,
                 compiled: bool = False) -> list[list[int]]:
    """Greedy continuations of several prompts at once; each stops at its first stop id (not included), or once
    `stop_fn(row, new_tokens)` says so after a token is added (e.g. a stop string appeared in the decoded text).
    compiled=True: the one-token steps run compiled over a static KV cache, as in `generate_tokens`."""
    device = model.lm_head.weight.device
    B, L = len(prompts), max(len(p) for p in prompts)
    max_len = min(L + max_new_tokens, model.max_tokens)
    step = compiled_decode_step(model, B, greedy=True) if compiled else None
    cache_len = static_cache_length(max_len, model.max_tokens) if step is not None else max_len
    idx = torch.full((B, L), pad_id, dtype=torch.long, device=device)
    attn = torch.zeros(B, cache_len, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):  # left padding: every prompt ends at column L-1
        idx[i, L - len(p):] = torch.tensor(p, device=device)
        attn[i, L - len(p):L] = 1
    pos = (attn[:, :L].cumsum(-1) - 1).clamp(min=0)  # (B, L) per-row positions
    stop = torch.tensor(sorted(set(stop_ids)) or [-1], device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out: list[list[int]] = [[] for _ in range(B)]
    model.set_kv_cache(B, cache_len, device=device, static=step is not None)
    try:
        input_pos = torch.arange(L, device=device)
        x = idx
        for t in range(max_len - L):
            if step is not None and t > 0:
                nxt = step(x, input_pos, pos, attn)  # (B,)
            else:
                hidden = model.decode(x, input_pos, position_ids=pos, attention_mask=attn, return_hidden=True)
                nxt = greedy_tokens(model.lm_head, hidden[:, -1])  # (B,)
            done |= torch.isin(nxt, stop)
            for i in (~done).nonzero().flatten().tolist():
                out[i].append(int(nxt[i]))
                if stop_fn is not None and stop_fn(i, out[i]):
                    done[i] = True
            if bool(done.all()):
                break
            attn[:, L + t] = 1
            x = nxt[:, None]  # (B, 1)
            pos = pos[:, -1:] + 1
            input_pos = input_pos[-1:] + 1
    finally:
        model.clear_kv_cache()
    return out
