"""The two model kinds (decoder-only `GPT`, encoder-decoder `T5`): the one place that tells them apart.

Callers ask a question of the model (is it seq2seq? which token starts its decoder? what shape facts does an adapter
depend on?) instead of checking its class, so adding a kind touches this file, not every command.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch.nn as nn

from leantune.models.decoder.model import GPT
from leantune.models.t5.model import T5, T5Config


def is_seq2seq(model: nn.Module) -> bool:
    """True for an encoder-decoder model (its batches carry encoder inputs and decoder labels)."""
    return isinstance(model, T5)


def decoder_start_id(model: nn.Module) -> int | None:
    """The first decoder input token of an encoder-decoder model; None for a decoder-only model (what
    `DataModule.connect(decoder_start_id=...)` takes)."""
    return model.config.decoder_start_token_id if is_seq2seq(model) else None


def folder_model_type(checkpoint_dir: str | Path) -> str | None:
    """config.json's model_type of an HF folder (None when absent or unreadable: the decoder loader says why)."""
    path = Path(checkpoint_dir) / "config.json"
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh).get("model_type")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def is_t5_folder(checkpoint_dir: str | Path) -> bool:
    return folder_model_type(checkpoint_dir) == "t5"


def folder_decoder_start_id(checkpoint_dir: str | Path) -> int | None:
    """`decoder_start_id` of the model an HF folder holds, read from config.json before any weight loads (so data
    can be checked first); None for a decoder-only model."""
    if not is_t5_folder(checkpoint_dir):
        return None
    with open(Path(checkpoint_dir) / "config.json", encoding="utf-8") as fh:
        return T5Config.from_hf(json.load(fh)).decoder_start_token_id


def architecture(model: nn.Module) -> dict[str, Any]:
    """The shape facts an adapter depends on (recorded in its manifest, checked before it touches a base)."""
    c = model.config
    if isinstance(model, GPT):
        return {"model_type": c.hf_model_type, "n_layer": c.n_layer, "n_embd": c.n_embd, "n_head": c.n_head,
                "n_query_groups": c.n_query_groups, "head_size": c.head_size,
                "intermediate_size": c.intermediate_size, "vocab_size": c.padded_vocab_size}
    return {"model_type": "t5", "num_layers": c.num_layers, "num_decoder_layers": c.num_decoder_layers,
            "d_model": c.d_model, "num_heads": c.num_heads, "d_kv": c.d_kv, "d_ff": c.d_ff,
            "is_gated_act": c.is_gated_act, "vocab_size": c.vocab_size}
