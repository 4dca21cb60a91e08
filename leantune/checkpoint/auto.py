"""HF model folders of either kind: decoder-only (`checkpoint.hf`) or T5 (`checkpoint.t5_hf`), chosen by the folder's
config.json `model_type`, so commands and the recipe load, save and reload whole models without asking which."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from leantune.checkpoint.hf import hf_to_ours, iter_hf_tensors, load_hf_checkpoint, save_hf_checkpoint
from leantune.checkpoint.t5_hf import load_t5_checkpoint, save_t5_checkpoint, t5_from_hf_state_dict
from leantune.models.kinds import is_seq2seq, is_t5_folder


def load_model(checkpoint_dir: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
               quantize: str | None = None, compute_dtype: torch.dtype | None = None) -> nn.Module:
    """A `GPT` or a `T5` (in train mode like the decoder loader: callers set eval) from an HF folder."""
    if is_t5_folder(checkpoint_dir):
        if quantize:
            raise ValueError(f"--quantize {quantize}: quantized T5 bases are not supported yet; drop --quantize")
        return load_t5_checkpoint(checkpoint_dir, dtype=dtype, device=device).train()
    return load_hf_checkpoint(checkpoint_dir, dtype=dtype, device=device, quantize=quantize,
                              compute_dtype=compute_dtype)


def save_model(model: nn.Module, out_dir: str | Path, source_dir: str | Path | None = None,
               dtype: torch.dtype | None = None, kind: str | None = None) -> Path:
    """Write `model` as an HF folder of its kind (tokenizer files copied from source_dir; kind: the output marker of
    a folder the user named, see `leantune.checkpoint.io.claim_output`)."""
    save = save_t5_checkpoint if is_seq2seq(model) else save_hf_checkpoint
    return save(model, out_dir, source_dir=source_dir, dtype=dtype, kind=kind)


def read_model_state(folder: str | Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """An HF folder's tensors under `model`'s parameter names, a tied head listed once under the name
    `named_parameters` uses (to copy a full finetune's weights back into a built model)."""
    hf_sd = dict(iter_hf_tensors(Path(folder)))
    if is_seq2seq(model):
        sd, _ = t5_from_hf_state_dict(hf_sd, model.config)
        tied, names = model.config.tie_word_embeddings, ("shared.weight", "lm_head.weight")
    else:
        sd = hf_to_ours(hf_sd, model.config)
        tied, names = model.config.tie_embeddings, ("transformer.wte.weight", "lm_head.weight")
    if tied:  # one tensor, two names: keep the one named_parameters uses
        params = dict(model.named_parameters())
        found = [sd.pop(n) for n in names if n in sd]
        kept = next((n for n in names if n in params), None)
        if found and kept:
            sd[kept] = found[0]
    return sd
