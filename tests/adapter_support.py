"""A random (non-zero) LoRA adapter saved on a checkpoint: shared by the evaluate suites (a helper module, not a
test module)."""

from __future__ import annotations

from pathlib import Path

import torch

from leantune.checkpoint.hf import load_hf_checkpoint
from leantune.methods import apply_method, build_manifest, save_checkpoint
from leantune.peft.lora import LoRAArgs
from leantune.tokenizer import Tokenizer


def random_lora(checkpoint: Path, out: Path, prompt_style: str = "alpaca") -> Path:
    """LoRA r=2 on every target with B != 0 (so it changes the model), saved to `out` with `prompt_style`."""
    model = load_hf_checkpoint(checkpoint, dtype=torch.float32)
    args = LoRAArgs(r=2, targets="all")
    trainable = apply_method(model, "lora", args)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in trainable:
                p.add_(torch.randn_like(p) * 0.5)
    manifest = build_manifest("lora", args, checkpoint, Tokenizer(checkpoint), prompt_style, "32-true", model=model)
    out.mkdir(parents=True)
    save_checkpoint(out, model, "lora", trainable, manifest, checkpoint)
    return out
