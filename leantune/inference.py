"""A model ready to answer: the base in the chosen precision (optionally quantized) with an optional adapter of
any method applied unmerged, and its tokenizer. Shared by generate, chat, evaluate and export."""

from __future__ import annotations

from pathlib import Path

import torch

from leantune.checkpoint.hf import load_hf_checkpoint
from leantune.download import ensure_checkpoint
from leantune.methods import load_any_adapter
from leantune.model import GPT
from leantune.runtime import compute_dtype, default_device, resolve_precision, weight_dtype
from leantune.tokenizer import Tokenizer


def load_for_inference(checkpoint_dir: Path, precision: str | None = None, adapter: Path | None = None,
                       quantize: str | None = None) -> tuple[GPT, Tokenizer, str, torch.device]:
    """(model in eval mode, tokenizer, precision, device): `adapter` is a leantune or PEFT adapter folder applied
    unmerged on the base, which `quantize` loads in 4/8 bits. The default model is imported on first use."""
    checkpoint_dir = ensure_checkpoint(Path(checkpoint_dir))
    device = default_device()
    precision = resolve_precision(precision, device)
    tokenizer = Tokenizer(checkpoint_dir)
    model = load_hf_checkpoint(checkpoint_dir, dtype=weight_dtype(precision), device=device, quantize=quantize,
                               compute_dtype=compute_dtype(precision))
    if adapter is not None:
        load_any_adapter(model, Path(adapter), checkpoint_dir)
    return model.eval(), tokenizer, precision, device
