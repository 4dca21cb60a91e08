"""A model ready to answer: the base in the chosen precision (optionally quantized) with an optional adapter of
any method applied unmerged, and its tokenizer. Shared by generate, chat, evaluate and export."""

from __future__ import annotations

from pathlib import Path

import torch

from leantune.decode.generate import Sampling
from leantune.decode.packed import pack_block_linears
from leantune.decode.seq2seq import BeamSearch, t5_beam_search, t5_generate
from leantune.decode.woq import WEIGHT_ONLY_MODES
from leantune.download import ensure_checkpoint
from leantune.methods import load_any_adapter
from leantune.models.decoder.model import GPT
from leantune.models.kinds import WEIGHT_ONLY, kind_of_folder, load_model
from leantune.models.quantize import check_mode, quantize_for_inference
from leantune.models.t5.model import T5
from leantune.runtime import compute_dtype, default_device, resolve_precision, weight_dtype
from leantune.tokenizer import Tokenizer


def load_for_inference(checkpoint_dir: Path, precision: str | None = None, adapter: Path | None = None,
                       quantize: str | None = None) -> tuple[GPT | T5, Tokenizer, str, torch.device]:
    """(model in eval mode, tokenizer, precision, device): `adapter` is a leantune or PEFT adapter folder applied
    unmerged on the base, which `quantize` loads in 4/8 bits: a bitsandbytes mode (bnb.*, as QLoRA trains), or a
    weight-only decode mode (int8, int4: torch's CPU kernels, the base's linears and head quantized after loading,
    the adapter on top). The default model is imported on first use."""
    check_mode(quantize, inference=True)
    checkpoint_dir = ensure_checkpoint(Path(checkpoint_dir))
    device = default_device()
    precision = resolve_precision(precision, device)
    weight_only = quantize in WEIGHT_ONLY_MODES
    if weight_only:
        kind_of_folder(checkpoint_dir).check(WEIGHT_ONLY, f"--quantize {quantize}")
    tokenizer = Tokenizer(checkpoint_dir)
    model = load_model(checkpoint_dir, dtype=weight_dtype(precision), device=device,
                       quantize=None if weight_only else quantize, compute_dtype=compute_dtype(precision))
    if weight_only:
        quantize_for_inference(model, quantize)
    if adapter is not None:
        load_any_adapter(model, Path(adapter), checkpoint_dir)
    return model.eval(), tokenizer, precision, device


def pack_for_eager_decoding(model: GPT | T5) -> int:
    """A decoder decoded eagerly on CPU (generate, chat without --compile): swap its block linears for oneDNN-packed
    ones (`decode.packed`) in place; returns how many. On the default model in fp32 (64 greedy tokens, 3 alternating
    rounds, 2 threads) 24.4-25.1 against 17.9-18.7 tokens/s, the same tokens. The packed copy costs memory beside
    the plain weights (0.43 GB there), so past PACK_MAX_BYTES nothing is packed; nor are quantized layers, GPU
    weights or an encoder-decoder. A compiled decode step keeps plain linears (its few-row products are reductions)."""
    if not isinstance(model, GPT):
        return 0
    return pack_block_linears(model.transformer.h)


def seq2seq_answer(model: T5, tokenizer: Tokenizer, prompt: str, max_new_tokens: int, sampling: Sampling,
                   num_beams: int = 1, length_penalty: float = 1.0,
                   generator: torch.Generator | None = None) -> tuple[str, int]:
    """(text, generated token count) of an encoder-decoder for one prompt: the prompt (plus EOS, as in training) goes
    to the encoder; the decoder samples (`sampling`; greedy at temperature 0) or, with num_beams > 1, runs beam search
    with `length_penalty`."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else model.config.pad_token_id
    ids = torch.tensor([tokenizer.encode(prompt, bos=False, eos=True)], dtype=torch.long, device=device)  # (1, S)
    if num_beams > 1:
        out = t5_beam_search(model, ids, beams=BeamSearch(num_beams=num_beams, length_penalty=length_penalty),
                             max_new_tokens=max_new_tokens, eos_ids=tokenizer.eos_ids, pad_id=pad).sequences[0]
    else:
        out = t5_generate(model, ids, max_new_tokens=max_new_tokens, sampling=sampling, eos_ids=tokenizer.eos_ids,
                          pad_id=pad, generator=generator)[0]
    new = [t for t in out[1:].tolist() if t != pad]  # (n,) after the start token, without the finished-row padding
    return tokenizer.decode(new, skip_special_tokens=True), len(new)
