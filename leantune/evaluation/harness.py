"""lm-evaluation-harness in process: an lm-eval `LM` over leantune's decoder (a base, any adapter, a quantized base),
so `leantune evaluate --tasks ...` runs lm-eval's own task definitions without exporting a merged model.

lm-eval is optional (the `eval` extra; `python -m pip install 'lm-eval>=0.4.5,<0.5'`): this module imports it only when an LM is built
(`harness_lm`), so the runtime without the extra never loads it. The scoring itself is plain torch:

- `score_continuations`: log P(continuation | context) and whether greedy decoding would produce it, for many
  (context, continuation) token pairs at once. A request whose input is a prefix of another's (MMLU's four one-token
  answers share one context) is read off the longer row's forward pass; the rows left run sorted by length in right-
  padded batches (causal attention never sees the padding on the right, so no mask is needed), cut where the padding
  saved is worth more than one more batch (`_plan_batches`), and only the scored positions go through the LM head
  and the fp32 log-softmax, never the whole (B, T, vocab) logits. The tokens all
  rows of a batch begin with (MMLU's "The following are multiple choice questions (with answers) about") run once,
  at batch size 1, and the rows run only what follows, attending to its keys and values (`context_kv`; the
  attention is merged exactly from a context part and a causal part, see `leantune.models.decoder.model.attention_with_context`).
- `generate_until`: greedy decoding with the KV cache and left padding (`greedy_batch`), batched by prompt length,
  stopping a row at an end-of-sequence id or the first stop string; sampled decoding runs one prompt at a time.
Tokenization follows lm-eval's `hf` backend (the checkpoint's own BOS rule, context/continuation split of the whole
text, the BOS token as the context of an empty one), so scores equal `lm_eval.models.huggingface.HFLM`'s.

An encoder-decoder (T5) gets the LM lm-eval's `hf` backend is with backend="seq2seq" (`harness_lm` picks it from the
model's kind): the context, tokenized with the tokenizer's special tokens (T5: `</s>` appended) and cut to its last
max_length tokens, is the encoder input; the continuation, tokenized alone without special tokens, is scored by the
decoder from its start token (`score_seq2seq`). Rolling loglikelihoods score lm-eval's rolling windows the same way
(each window's context to the encoder, as the `hf` backend does). `generate_until` decodes with `t5_generate`, the
encoder reading the whole max_length; max_gen_toks counts generated tokens (the `hf` backend passes max_length =
prompt length + max_gen_toks to transformers' generate, which for an encoder-decoder bounds the decoder alone).
"""

from __future__ import annotations

import functools
import json
import math
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from leantune.decode.generate import Sampling, generate_tokens, greedy_batch
from leantune.decode.seq2seq import pad_inputs, t5_generate
from leantune.evaluation.evaluate import cut_at_stop
from leantune.models.kinds import LM_EVAL, kind_of

LM_EVAL_REQUIREMENT = "lm-eval>=0.4.5,<0.5"
"""The lm-eval versions leantune's tasks run on (pyproject's `eval` extra says the same)."""


def install_hint() -> str:
    """A command that installs lm-eval where it is needed: into the Python running leantune (`pip install
    'leantune[eval]'` fails outside the project's venv and from any index without leantune)."""
    return f"{shlex.quote(sys.executable)} -m pip install '{LM_EVAL_REQUIREMENT}'"

HEAD_CHUNK = 1024
"""Scored positions projected through the LM head at a time (a rolling window scores every position)."""
MIN_SHARED = 4
"""Fewest common first tokens of a batch's rows worth running once for all of them."""
BATCH_COST = 128
"""What one more batch costs, in tokens' worth of work (one more pass over the weights, smaller multiplies): batches
are cut where the padding this saves is worth more (`_plan_batches`)."""
CONTEXTS_KEPT = 8
"""Shared contexts' keys/values kept for later batches (they are small: n_layer x 2 x ng x P x hs)."""
DEFAULT_MAX_LENGTH = 2048
"""lm-eval's max_length for a model whose config names no context length (T5's relative positions have none)."""


def require_lm_eval():
    """The lm_eval package, or one clear ImportError naming the extra to install."""
    try:
        import lm_eval
        import lm_eval.api.model  # noqa: F401
    except ImportError as e:
        raise ImportError(f"lm-eval tasks need the optional lm-eval package ({e}); install it into the Python "
                          f"that runs leantune: {install_hint()}") from None
    return lm_eval


@torch.inference_mode()
def score_continuations(model, requests: Sequence[tuple[Sequence[int], Sequence[int]]], max_length: int,
                        batch_size: int = 16, progress: bool = False, plain: bool = False
                        ) -> list[tuple[float, bool]]:
    """(sum of log-probabilities of `continuation`, is it the greedy continuation) per (context, continuation).

    As lm-eval's `hf` backend: the model reads (context + continuation)[-(max_length + 1):][:-1] (cut from the left
    when too long) and the continuation's tokens are scored at its last positions. Where the model allows it, the
    first tokens common to a batch's rows run once (`_can_share_prefix`) and the last block runs only at the scored
    positions (`_can_cut_last`); plain=True runs every token of every row through every block instead (the same
    scores up to float rounding: the reference the tests compare with).
    """
    device = model.lm_head.weight.device
    share_prefix = not plain and _can_share_prefix(model)
    cut_last = not plain and _can_cut_last(model)
    contexts: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}
    inputs: list[tuple[int, ...]] = []
    for ctx, cont in requests:
        if not cont:
            raise ValueError("a loglikelihood request has an empty continuation")
        if len(cont) > max_length:
            raise ValueError(f"a continuation of {len(cont)} tokens is longer than the model's {max_length}")
        inputs.append(tuple((list(ctx) + list(cont))[-(max_length + 1):][:-1]))
    # A row whose tokens start another row's needs no forward pass of its own: causal attention gives it the same
    # hidden states at those positions. In sorted order a prefix sits right before a sequence it starts.
    unique = sorted(set(inputs))
    host = {seq: seq for seq in unique}
    for a, b in zip(reversed(unique[:-1]), reversed(unique[1:])):
        if b[:len(a)] == a:
            host[a] = host[b]
    rows = sorted({host[s] for s in unique}, key=lambda s: (-len(s), s))  # longest first: time estimates over
    wanted: dict[tuple[int, ...], list[int]] = {}  # host row -> request indices it scores
    for i, seq in enumerate(inputs):
        wanted.setdefault(host[seq], []).append(i)
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    bar = tqdm(total=len(requests), desc="loglikelihood", unit="req", leave=False, disable=not progress,
               dynamic_ncols=True)
    # The first position each row is scored at: a shared start stops before it (its hidden state is needed).
    first_scored = [min(len(inputs[i]) - len(requests[i][1]) for i in wanted[seq]) for seq in rows]
    for s, e, p in _plan_batches(rows, first_scored if share_prefix else None, batch_size):
        batch = rows[s:e]
        L = len(batch[0])
        ids = torch.zeros(len(batch), L - p, dtype=torch.long)
        for r, seq in enumerate(batch):
            ids[r, :len(seq) - p] = torch.tensor(seq[p:])
        if p:
            prefix = batch[0][:p]
            if prefix not in contexts:
                if len(contexts) >= CONTEXTS_KEPT:
                    contexts.pop(next(iter(contexts)))
                contexts[prefix] = _context_kv(model, prefix)
        row_idx, pos_idx, targets, owners = [], [], [], []
        for r, seq in enumerate(batch):
            for i in wanted[seq]:
                n, end = len(requests[i][1]), len(inputs[i]) - p
                row_idx += [r] * n
                pos_idx += range(end - n, end)
                targets += list(requests[i][1])
                owners.append((i, n))
        keep = None
        if cut_last:  # few scored positions per row (MMLU: one): the last block runs only there
            scored: list[set[int]] = [set() for _ in batch]
            for r, q in zip(row_idx, pos_idx):
                scored[r].add(q)
            kept = [sorted(q) for q in scored]
            m = max(map(len, kept))
            if 2 * m <= L - p:
                keep = torch.tensor([q + q[-1:] * (m - len(q)) for q in kept], device=device)  # (B, m)
                column = [{q: c for c, q in enumerate(k)} for k in kept]
                pos_idx = [column[r][q] for r, q in zip(row_idx, pos_idx)]
        if p:  # the rows continue a shared context: only their own tokens, at positions p.., run per row
            position_ids = torch.arange(p, L, device=device)[None]
            hidden = model.score(ids.to(device), position_ids=position_ids, context_kv=contexts[prefix], keep=keep,
                                 return_hidden=True)
        else:  # (B, L|m, C); right padding is never attended to
            hidden = model.score(ids.to(device), keep=keep, return_hidden=True)
        logp, greedy = _score_positions(model, hidden, row_idx, pos_idx, targets)
        k = 0
        for i, n in owners:
            results[i] = (float(logp[k:k + n].sum()), bool(greedy[k:k + n].all()))
            k += n
        bar.update(len(owners))
    bar.close()
    return results  # type: ignore[return-value]


def _can_share_prefix(model) -> bool:
    """Whether `context_kv` serves this model: one `_can_cut_last` serves, on CPU (the merge needs the CPU flash
    kernel's logsumexp)."""
    return model.lm_head.weight.device.type == "cpu" and _can_cut_last(model)


def _can_cut_last(model) -> bool:
    """Whether `GPT.score(keep=...)` serves this model: a leantune decoder without virtual tokens (prompt/prefix
    tuning renumber positions) or a sliding window."""
    return (hasattr(model, "transformer") and getattr(model, "virtual", None) is None
            and model.config.sliding_window is None)


def _plan_batches(rows: Sequence[tuple[int, ...]], first_scored: Sequence[int] | None, batch_size: int
                  ) -> list[tuple[int, int, int]]:
    """(start, end, shared length) of each batch of the rows (sorted longest first): runs of at most batch_size
    rows, cut where that costs least: the tokens run (every row padded to its batch's first, less a start shared by
    the batch, which runs once) plus BATCH_COST per batch. A fixed cut every batch_size rows pads fifteen rows to
    one long row's length; this cuts around such rows. first_scored (None: no sharing) bounds the shared start per
    row; a start shorter than MIN_SHARED is not shared. Dynamic programming over the cut points, O(rows *
    batch_size) prefix comparisons."""
    n = len(rows)
    best, plan = [0.0] + [math.inf] * n, [(0, 0)] * (n + 1)
    for j in range(1, n + 1):
        last = rows[j - 1]  # the shortest row of rows[i:j]
        common = len(last) - 1  # the common start of rows[i:j], leaving `last` a token of its own
        for i in range(j - 1, max(0, j - batch_size) - 1, -1):
            p = 0
            if first_scored is not None:
                common = min(_common_length(rows[i], last, common), first_scored[i])
                p = common if common >= MIN_SHARED and j - i > 1 else 0  # one row alone: nothing to share
            cost = best[i] + (j - i) * (len(rows[i]) - p) + p + BATCH_COST
            if cost < best[j]:
                best[j], plan[j] = cost, (i, p)
    out, j = [], n
    while j > 0:
        i, p = plan[j]
        out.append((i, j, p))
        j = i
    return out[::-1]


def _common_length(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """How many first tokens a and b (tuples) have in common, at most limit: a binary search over slice comparisons,
    which run at C speed (few-shot prompts share hundreds of tokens, row after row)."""
    lo, hi = 0, min(limit, len(a), len(b))  # a[:lo] == b[:lo]; the answer is in [lo, hi]
    if a[:hi] == b[:hi]:
        return hi
    while hi - lo > 1:  # a[:hi] != b[:hi]
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _context_kv(model, prefix: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every layer's keys (rotated) and values (1, ng, P, hs) for the P tokens of `prefix`, through the KV cache."""
    blocks = model.transformer.h
    kept = [block.attn.kv_cache for block in blocks]  # a caller's cache, if any, is put back
    P = len(prefix)
    try:
        model.set_kv_cache(1, P)
        device = model.lm_head.weight.device
        model.decode(torch.tensor([prefix], device=device), torch.arange(P, device=device))
        return [(block.attn.kv_cache.k[:, :, :P].clone(), block.attn.kv_cache.v[:, :, :P].clone()) for block in blocks]
    finally:
        for block, cache in zip(blocks, kept):
            block.attn.kv_cache = cache


def _score_positions(model, hidden: torch.Tensor, rows: list[int], positions: list[int], targets: list[int]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities (N,) of `targets` at hidden[rows, positions] and whether each is the argmax, through the
    LM head a chunk at a time, log-softmax in fp32 over the tokenizer's vocabulary."""
    vocab = model.config.vocab_size
    rows_t, pos_t = torch.tensor(rows, device=hidden.device), torch.tensor(positions, device=hidden.device)
    tgt = torch.tensor(targets, device=hidden.device)
    logps, greedys = [], []
    for c in range(0, len(rows), HEAD_CHUNK):
        h = hidden[rows_t[c:c + HEAD_CHUNK], pos_t[c:c + HEAD_CHUNK]]  # (n, C)
        logits = model.lm_head(h)[:, :vocab].float().log_softmax(-1)  # (n, V)
        t = tgt[c:c + HEAD_CHUNK]
        logps.append(logits.gather(-1, t[:, None]).squeeze(-1))
        greedys.append(logits.argmax(-1) == t)
    return torch.cat(logps).cpu(), torch.cat(greedys).cpu()


def generate_until(model, tokenizer, prompts: Sequence[Sequence[int]], until: Sequence[str], max_new_tokens: int,
                   sampling: Sampling | None = None, batch_size: int = 16, seed: int = 1234,
                   progress: bool = False) -> list[str]:
    """Continuations of tokenized prompts, each cut before the first of `until` and stopped at an EOS id.

    Greedy (sampling None or temperature 0) runs in batches of prompts of similar length with left padding and the
    KV cache; a row stops as soon as its text holds a stop string. Sampling runs one prompt at a time, seeded.
    """
    stops = [s for s in until if s]
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    texts = [""] * len(prompts)
    bar = tqdm(total=len(prompts), desc="generate_until", unit="req", leave=False, disable=not progress,
               dynamic_ncols=True)
    if sampling is None or sampling.greedy:
        order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
        for s in range(0, len(order), batch_size):
            rows = order[s:s + batch_size]
            outs = greedy_batch(model, [prompts[i] for i in rows], max_new_tokens, tokenizer.eos_ids, pad_id=pad,
                                stop_fn=_stop_on_text(tokenizer, stops))
            for i, out in zip(rows, outs):
                texts[i] = cut_at_stop(tokenizer.decode(out, skip_special_tokens=True), stops)
            bar.update(len(rows))
    else:
        generator = torch.Generator(device=model.lm_head.weight.device).manual_seed(seed)
        stop_fn = _stop_on_text(tokenizer, stops)
        for i, prompt in enumerate(prompts):
            out: list[int] = []
            for token in generate_tokens(model, torch.tensor(prompt), max_new_tokens, sampling,
                                         stop_ids=tokenizer.eos_ids, generator=generator):
                if token in tokenizer.eos_ids:
                    break
                out.append(token)
                if stop_fn(0, out):
                    break
            texts[i] = cut_at_stop(tokenizer.decode(out, skip_special_tokens=True), stops)
            bar.update(1)
    bar.close()
    return texts


def _stop_on_text(tokenizer, stops: Sequence[str]) -> Callable[[int, list[int]], bool]:
    """stop_fn for `greedy_batch`: the row's text so far holds a stop string (only its tail is decoded again)."""
    if not stops:
        return lambda row, tokens: False
    tail = max(8, max(len(s) for s in stops))  # tokens: each holds at least one character

    def stop(row: int, tokens: list[int]) -> bool:
        text = tokenizer.decode(tokens[-tail:], skip_special_tokens=True)
        return any(s in text for s in stops)

    return stop


@torch.inference_mode()
def score_seq2seq(model, requests: Sequence[tuple[Sequence[int], Sequence[int]]], max_length: int,
                  batch_size: int = 16, progress: bool = False) -> list[tuple[float, bool]]:
    """(sum of log-probabilities of `continuation`, is it the greedy continuation) per (context, continuation) for an
    encoder-decoder, as lm-eval's `hf` backend with backend="seq2seq": the encoder reads context[-max_length:], the
    decoder reads the start token and continuation[:-1] and scores each continuation token.

    Requests with the same context whose decoder input starts another's are read off that one row (causal decoder:
    MMLU's four one-token answers are one decoder row of just the start token); a batch's distinct contexts run
    through the encoder once, right-padded with their attention mask; decoder rows are right-padded (never attended
    to by the positions before them). Log-softmax in fp32 at the scored positions only.
    """
    device = next(model.parameters()).device
    start, pad = model.config.decoder_start_token_id, model.config.pad_token_id
    keys: list[tuple[tuple[int, ...], tuple[int, ...]]] = []  # (encoder input, decoder input) per request
    for ctx, cont in requests:
        if not cont:
            raise ValueError("a loglikelihood request has an empty continuation")
        if not ctx:
            raise ValueError("a loglikelihood request has an empty context (the encoder needs at least one token)")
        if len(cont) > max_length:
            raise ValueError(f"a continuation of {len(cont)} tokens is longer than the model's {max_length}")
        keys.append((tuple(ctx[-max_length:]), (start, *cont[:-1])))
    unique = sorted(set(keys))
    host = {k: k for k in unique}
    for a, b in zip(reversed(unique[:-1]), reversed(unique[1:])):  # sorted: a prefix sits right before its host
        if a[0] == b[0] and b[1][:len(a[1])] == a[1]:
            host[a] = host[b]
    rows = sorted({host[k] for k in unique}, key=lambda k: (-len(k[0]), -len(k[1]), k))
    wanted: dict[tuple, list[int]] = {}
    for i, k in enumerate(keys):
        wanted.setdefault(host[k], []).append(i)
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    bar = tqdm(total=len(requests), desc="loglikelihood", unit="req", leave=False, disable=not progress,
               dynamic_ncols=True)
    for s in range(0, len(rows), batch_size):
        batch = rows[s:s + batch_size]
        contexts = list(dict.fromkeys(k[0] for k in batch))
        ids, mask = pad_inputs(contexts, pad, device=device)  # (E, S)
        enc = model.encode(ids, mask)
        enc_mask = model.encoder_mask(mask)
        index = {c: e for e, c in enumerate(contexts)}
        sel = torch.tensor([index[k[0]] for k in batch], device=device)  # (B,) each row's encoder output
        dec, _ = pad_inputs([k[1] for k in batch], pad, device=device)  # (B, T)
        hidden = model.decode(dec, enc[sel], enc_mask[sel], return_hidden=True)  # (B, T, C)
        row_idx, pos_idx, targets, owners = [], [], [], []
        for r, k in enumerate(batch):
            for i in wanted[k]:
                cont = list(requests[i][1])
                row_idx += [r] * len(cont)
                pos_idx += range(len(cont))
                targets += cont
                owners.append((i, len(cont)))
        h = hidden[torch.tensor(row_idx, device=device), torch.tensor(pos_idx, device=device)]  # (N, C)
        logp = model.head(h).float().log_softmax(-1)
        tgt = torch.tensor(targets, device=device)
        picked = logp.gather(-1, tgt[:, None]).squeeze(-1).cpu()
        greedy = (logp.argmax(-1) == tgt).cpu()
        k = 0
        for i, n in owners:
            results[i] = (float(picked[k:k + n].sum()), bool(greedy[k:k + n].all()))
            k += n
        bar.update(len(owners))
    bar.close()
    return results  # type: ignore[return-value]


def seq2seq_generate_until(model, tokenizer, prompts: Sequence[Sequence[int]], until: Sequence[str],
                           max_new_tokens: int, sampling: Sampling | None = None, batch_size: int = 16,
                           seed: int = 1234, progress: bool = False) -> list[str]:
    """`generate_until` for an encoder-decoder: batches of prompts of similar length through the encoder, decoded by
    `t5_generate` (greedy, or sampled from one seeded generator), a row ending at EOS or its first stop string."""
    stops = [s for s in until if s]
    pad = model.config.pad_token_id
    device = next(model.parameters()).device
    generator = None if sampling is None else torch.Generator(device=device).manual_seed(seed)
    stop_fn = _stop_on_text(tokenizer, stops) if stops else None
    texts = [""] * len(prompts)
    bar = tqdm(total=len(prompts), desc="generate_until", unit="req", leave=False, disable=not progress,
               dynamic_ncols=True)
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    for s in range(0, len(order), batch_size):
        rows = order[s:s + batch_size]
        ids, mask = pad_inputs([prompts[i] for i in rows], pad, device=device)
        out = t5_generate(model, ids, mask, max_new_tokens=max_new_tokens, sampling=sampling,
                          eos_ids=tokenizer.eos_ids, pad_id=pad, generator=generator, stop_fn=stop_fn)
        for i, row in zip(rows, out.tolist()):
            texts[i] = cut_at_stop(tokenizer.decode(row[1:], skip_special_tokens=True), stops)
        bar.update(len(rows))
    bar.close()
    return texts


def sampling_from_kwargs(kwargs: dict[str, Any]) -> Sampling | None:
    """lm-eval's generation kwargs as a `Sampling` (None: greedy, which `do_sample: false` means whatever the
    temperature says, as in transformers)."""
    temperature = float(kwargs.get("temperature", 0.0) or 0.0)
    if not kwargs.get("do_sample", temperature > 0):
        return None
    sampling = Sampling(temperature=temperature, top_k=kwargs.get("top_k"), top_p=float(kwargs.get("top_p", 1.0) or 1.0))
    return None if sampling.greedy else sampling  # Sampling's floor, as generate, chat and serve


def harness_lm(model, tokenizer, batch_size: int = 16, max_length: int | None = None, name: str = "leantune"):
    """An `lm_eval.api.model.LM` over a loaded leantune model (see `load_for_inference`), for
    `lm_eval.simple_evaluate(model=...)`: loglikelihood, loglikelihood_rolling and generate_until. The class is the
    model kind's: a decoder's (backend "causal") or an encoder-decoder's (backend "seq2seq")."""
    kind = kind_of(model)
    kind.check(LM_EVAL)
    require_lm_eval()
    if max_length is None and kind.seq2seq:
        max_length = kind.context_length(model.config) or DEFAULT_MAX_LENGTH
    cls = _seq2seq_lm_class() if kind.seq2seq else _lm_class()
    return cls(model, tokenizer, batch_size=batch_size, max_length=max_length, name=name)


@functools.cache
def _lm_class():
    """The LM class, built once on first use: it subclasses lm-eval's `TemplateLM`, which only exists with the extra."""
    from lm_eval.api.model import TemplateLM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    class LeantuneLM(TemplateLM):
        """lm-eval's model interface over a leantune decoder; requests are batched as described in the module."""

        backend = "causal"

        def __init__(self, model, tokenizer, batch_size: int = 16, max_length: int | None = None,
                     name: str = "leantune") -> None:
            super().__init__()
            self.model, self.tok, self.batch_size, self.name = model.eval(), tokenizer, batch_size, name
            self._max_length = max_length or model.max_tokens
            self.progress = True
            self.seconds = 0.0  # time spent answering requests (what examples/s is computed from)

        @property
        def eot_token_id(self) -> int:
            return self.tok.eos_id

        @property
        def prefix_token_id(self) -> int:
            return self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id

        @property
        def max_length(self) -> int:
            return self._max_length

        @property
        def tokenizer_name(self) -> str:
            return self.name

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len=None,
                       **kwargs) -> list[int]:
            ids = self.tok.encode(string, bos=False if add_special_tokens is False else None, eos=False)
            return ids[-left_truncate_len:] if left_truncate_len else ids

        def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
            return self.tok.decode([tokens] if isinstance(tokens, int) else tokens,
                                   skip_special_tokens=skip_special_tokens)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
            t0 = time.perf_counter()
            pairs = [(ctx, cont) for _, ctx, cont in requests]
            out = self._score(pairs, progress=self.progress and not disable_tqdm)
            for (key, _, _), answer in zip(requests, out):
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
            self.seconds += time.perf_counter() - t0
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            t0 = time.perf_counter()
            windows, owner = [], []
            for i, (text,) in enumerate(req.args for req in requests):
                for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                        token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                        max_seq_len=self.max_length, context_len=1)):
                    windows.append((ctx, cont))
                    owner.append(i)
            scores = self._score(windows, progress=self.progress and not disable_tqdm)
            totals = [0.0] * len(requests)
            for i, (logp, _) in zip(owner, scores):
                totals[i] += logp
            for req, total in zip(requests, totals):
                self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
            self.seconds += time.perf_counter() - t0
            return totals

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            t0 = time.perf_counter()
            groups: dict[str, list[int]] = {}
            for i, req in enumerate(requests):
                groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
            out = [""] * len(requests)
            eos = self.tok.decode([self.eot_token_id]) if self.eot_token_id is not None else None
            for members in groups.values():
                kwargs = dict(requests[members[0]].args[1])
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                if eos and eos not in until:
                    until.append(eos)
                max_new = int(kwargs.get("max_gen_toks", 256))
                prompts = [self.tok_encode(requests[i].args[0], left_truncate_len=self._prompt_room(max_new))
                           for i in members]
                texts = self._generate(prompts, until, max_new, sampling_from_kwargs(kwargs),
                                       progress=self.progress and not disable_tqdm)
                for i, text in zip(members, texts):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
            self.seconds += time.perf_counter() - t0
            return out

        def _score(self, pairs, progress: bool) -> list[tuple[float, bool]]:
            return score_continuations(self.model, pairs, self.max_length, self.batch_size, progress=progress)

        def _prompt_room(self, max_new: int) -> int:
            """Prompt tokens kept (the last ones): what max_new generated tokens leave of the context window."""
            if max_new >= self.max_length:
                raise ValueError(f"max_gen_toks {max_new} leaves no room for a prompt in the model's "
                                 f"{self.max_length} tokens")
            return self.max_length - max_new

        def _generate(self, prompts, until, max_new: int, sampling, progress: bool) -> list[str]:
            return generate_until(self.model, self.tok, prompts, until, max_new, sampling, self.batch_size,
                                  progress=progress)

        def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
            return self.tok.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

        def chat_template(self, chat_template: bool | str = False) -> str | None:
            return self.tok.chat_template if chat_template else None

    return LeantuneLM


@functools.cache
def _seq2seq_lm_class():
    """The LM class of an encoder-decoder: lm-eval's `hf` backend with backend="seq2seq", request for request."""

    class LeantuneSeq2SeqLM(_lm_class()):
        """Contexts go to the encoder (with the tokenizer's special tokens: T5 appends `</s>`), continuations are
        tokenized alone without them and scored by the decoder (`score_seq2seq`)."""

        backend = "seq2seq"

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len=None,
                       **kwargs) -> list[int]:
            if add_special_tokens is None and string.startswith(self.tok.decode([self.prefix_token_id])):
                add_special_tokens = False  # as the hf backend: a text that starts with the prefix token has it
            ids = self.tok.encode(string, bos=add_special_tokens, eos=add_special_tokens)
            return ids[-left_truncate_len:] if left_truncate_len else ids

        def _score(self, pairs, progress: bool) -> list[tuple[float, bool]]:
            return score_seq2seq(self.model, pairs, self.max_length, self.batch_size, progress=progress)

        def _prompt_room(self, max_new: int) -> int:
            return self.max_length  # the encoder's whole window: generated tokens go to the decoder

        def _generate(self, prompts, until, max_new: int, sampling, progress: bool) -> list[str]:
            return seq2seq_generate_until(self.model, self.tok, prompts, until, max_new, sampling, self.batch_size,
                                          progress=progress)

    return LeantuneSeq2SeqLM
