"""KV-cache sampling: greedy, temperature, top-k, top-p; stop on EOS ids and stop strings; streaming."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from leantune.model import GPT


@dataclass
class Sampling:
    temperature: float = 0.0
    """0 means greedy decoding."""
    top_k: int | None = None
    top_p: float = 1.0


def sample(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,)."""
    if s.temperature <= 0:
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
) -> Iterator[int]:
    """Yield new token ids one at a time for a 1-D prompt; stops after a stop id (which is yielded) or the budget.

    With use_cache=False every step recomputes the whole sequence (reference path for tests).
    """
    sampling = sampling or Sampling()
    device = model.lm_head.weight.device
    prompt = prompt.to(device)
    T = prompt.shape[0]
    max_len = min(T + max_new_tokens, model.config.block_size)
    if T >= model.config.block_size:
        raise ValueError(f"prompt has {T} tokens; the model's block size is {model.config.block_size}")
    stop = set(stop_ids)
    if use_cache:
        model.set_kv_cache(1, max_len, device=device)
    try:
        tokens = prompt[None]  # (1, T)
        input_pos = torch.arange(T, device=device)
        x = tokens
        for _ in range(max_len - T):
            if use_cache:
                hidden = model(x, input_pos=input_pos, return_hidden=True)
            else:
                hidden = model(tokens, return_hidden=True)
            logits = model.lm_head(hidden[:, -1])  # (1, V): project only the last position
            nxt = sample(logits, sampling, generator)  # (1,)
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


def generate_command(
    prompt: str = "What is the capital of France?",
    checkpoint_dir: Path = Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"),
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_k: int | None = 50,
    top_p: float = 0.9,
    stop: list[str] | None = None,
    raw: bool = False,
    system: str | None = None,
    precision: str | None = None,
    adapter: Path | None = None,
    quantize: str | None = None,
    seed: int = 1234,
    threads: int | None = None,
) -> str:
    """Generate text from a prompt with the KV cache, streaming tokens to the terminal.

    Args:
        prompt: The prompt. Instruct checkpoints get their chat template applied unless --raw.
        checkpoint_dir: A Hugging Face model folder (see `leantune download`).
        max_new_tokens: Most tokens to generate.
        temperature: Sampling temperature; 0 means greedy decoding.
        top_k: Sample only among the k most likely tokens (None: all).
        top_p: Nucleus sampling mass (1.0: off).
        stop: Extra stop strings; generation also stops on the checkpoint's EOS ids.
        raw: Send the prompt as is, without the chat template.
        system: Optional system message for the chat template.
        precision: 32-true, bf16-true, 16-true (default: fastest safe one for the device).
        adapter: A leantune adapter folder (e.g. out/finetune/lora/final) or a PEFT LoRA folder, applied unmerged.
        quantize: Load the base's block linears in 4/8 bits: bnb.nf4, bnb.nf4-dq, bnb.fp4, bnb.fp4-dq, bnb.int8
            (use the mode a QLoRA adapter was trained with).
        seed: Random seed for sampling.
        threads: CPU threads for torch (default: torch's choice).
    """
    if threads:
        torch.set_num_threads(threads)
    model, tokenizer, precision, device = load_for_inference(checkpoint_dir, precision, adapter, quantize)
    ids = torch.tensor(encode_prompt(tokenizer, prompt, raw=raw, system=system), dtype=torch.long)
    generator = torch.Generator(device=device).manual_seed(seed)
    text, n, t0 = _stream(model, tokenizer, ids, max_new_tokens, Sampling(temperature, top_k, top_p), stop, generator)
    dt = time.perf_counter() - t0
    print(f"\n[{n} tokens in {dt:.2f} s: {n / dt:.1f} tokens/s, prompt {len(ids)} tokens, {precision}]", file=sys.stderr)
    return text


def load_for_inference(checkpoint_dir: Path, precision: str | None = None, adapter: Path | None = None,
                       quantize: str | None = None):
    """(model in eval mode, tokenizer, precision, device) with an optional unmerged adapter on the base, which
    `quantize` loads in 4/8 bits."""
    from leantune.checkpoint.hf import load_hf_checkpoint
    from leantune.runtime import compute_dtype, default_device, resolve_precision, weight_dtype
    from leantune.tokenizer import Tokenizer

    checkpoint_dir = Path(checkpoint_dir)
    if not (checkpoint_dir / "config.json").is_file():
        raise FileNotFoundError(f"{checkpoint_dir}: no config.json. Import a model first: leantune download <repo_id>")
    device = default_device()
    precision = resolve_precision(precision, device)
    tokenizer = Tokenizer(checkpoint_dir)
    model = load_hf_checkpoint(checkpoint_dir, dtype=weight_dtype(precision), device=device, quantize=quantize,
                               compute_dtype=compute_dtype(precision))
    if adapter is not None:  # a leantune adapter folder or a PEFT-format LoRA folder
        from leantune.checkpoint.peft_format import load_any_adapter

        load_any_adapter(model, Path(adapter), checkpoint_dir)
    return model.eval(), tokenizer, precision, device


def _stream(model, tokenizer, ids, max_new_tokens, sampling, stop, generator):
    """Print tokens as they are decoded; returns (text, tokens generated, start time)."""
    decoder = tokenizer.stream_decoder()
    stops = StopStringFilter(stop or [])
    eos = set(tokenizer.eos_ids)
    pieces, n = [], 0
    t0 = time.perf_counter()
    for token in generate_tokens(model, ids, max_new_tokens, sampling, stop_ids=tokenizer.eos_ids, generator=generator):
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
