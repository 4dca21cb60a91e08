"""Prompt tuning, P-tuning and prefix tuning in HF PEFT's folder format, both ways.

PEFT saves one tensor, `prompt_embeddings`: the virtual embeddings (P, n_embd) for prompt tuning and P-tuning (the
prompt encoder's output: the encoder itself is not saved), or the flat prefix (P, n_layer * 2 * kv width) for prefix
tuning (the projection MLP's output). PEFT loads a folder with `inference_mode` and uses that tensor as is, so these
folders always say `inference_mode: true` and, for prefix tuning, `prefix_projection: false`. For grouped-query
models PEFT sizes a prefix by the key/value heads (`num_attention_heads` = kv heads, `token_dim` = their width).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from leantune.checkpoint.peft_dir import CONFIG_FILE, peft_weights, read_peft_config, write_peft_dir
from leantune.models.decoder.model import GPT
from leantune.models.kinds import is_seq2seq
from leantune.peft.virtual import PrefixKV, PromptEmbeddings

TENSOR = "prompt_embeddings"
# Fields of adapter_config.json whose non-default values we cannot represent.
_UNSUPPORTED = {"num_transformer_submodules": (None, 1), "modules_to_save": (None,)}


def _common(model: GPT, peft_type: str, base_model_name_or_path: str, n_virtual: int) -> dict[str, Any]:
    c = model.config
    if is_seq2seq(model):  # PEFT sizes seq2seq prompts for encoder and decoder (2 submodules), uses the first P
        task, dim, heads, layers, parts = "SEQ_2_SEQ_LM", c.d_model, c.num_heads, c.num_layers, 2
    else:
        task, dim, heads, layers, parts = "CAUSAL_LM", c.n_embd, c.n_head, c.n_layer, 1
    return {"peft_type": peft_type, "task_type": task, "base_model_name_or_path": base_model_name_or_path,
            "num_virtual_tokens": n_virtual, "token_dim": dim, "num_transformer_submodules": parts,
            "num_attention_heads": heads, "num_layers": layers, "inference_mode": True, "revision": None}


def _write(model: GPT, out_dir, config: dict, tensor: torch.Tensor, dtype, kind) -> Path:
    tensor = tensor.detach().cpu().contiguous().clone()
    if config["num_transformer_submodules"] == 2:  # (2P, C): PEFT's seq2seq table; rows P.. are never read
        tensor = torch.cat([tensor, torch.zeros_like(tensor)])
    return write_peft_dir(out_dir, config, {TENSOR: tensor.to(dtype) if dtype is not None else tensor}, kind)


def _prompt(model: GPT) -> PromptEmbeddings:
    if not isinstance(model.virtual, PromptEmbeddings):
        raise ValueError("the model has no prompt-tuning or P-tuning virtual tokens to export")
    return model.virtual


@torch.no_grad()
def export_prompt_tuning(model: GPT, out_dir: str | Path, base_model_name_or_path: str, args: Any = None,
                         dtype: torch.dtype | None = None, kind: str | None = None) -> Path:
    """Prompt tuning as a PEFT folder (PROMPT_TUNING): the virtual embeddings."""
    prompt = _prompt(model)
    config = _common(model, "PROMPT_TUNING", base_model_name_or_path, prompt.n_virtual)
    # the weights are loaded over the init, so any init reads back equal; RANDOM needs no tokenizer in PEFT
    config.update(prompt_tuning_init="RANDOM", prompt_tuning_init_text=None, tokenizer_name_or_path=None,
                  tokenizer_kwargs=None)
    return _write(model, out_dir, config, prompt.embeddings(), dtype, kind)


@torch.no_grad()
def export_p_tuning(model: GPT, out_dir: str | Path, base_model_name_or_path: str, args: Any = None,
                    dtype: torch.dtype | None = None, kind: str | None = None) -> Path:
    """P-tuning as a PEFT folder (P_TUNING): the prompt encoder's output; the encoder's shape is recorded."""
    prompt = _prompt(model)
    config = _common(model, "P_TUNING", base_model_name_or_path, prompt.n_virtual)
    encoder = getattr(args, "encoder", "mlp")
    config.update(encoder_reparameterization_type="LSTM" if encoder == "lstm" else "MLP",
                  encoder_hidden_size=getattr(args, "encoder_hidden_size", None) or config["token_dim"],
                  encoder_num_layers=getattr(args, "encoder_num_layers", 2),
                  encoder_dropout=getattr(args, "encoder_dropout", 0.0))
    return _write(model, out_dir, config, prompt.embeddings(), dtype, kind)


@torch.no_grad()
def export_prefix(model: GPT, out_dir: str | Path, base_model_name_or_path: str, args: Any = None,
                  dtype: torch.dtype | None = None, kind: str | None = None) -> Path:
    """Prefix tuning as a PEFT folder: the flat prefix after the projection, sized by the key/value heads."""
    prefix = model.virtual
    if not isinstance(prefix, PrefixKV):
        raise ValueError("the model has no prefix-tuning prefix to export")
    c = model.config
    config = _common(model, "PREFIX_TUNING", base_model_name_or_path, prefix.n_virtual)
    config.update(token_dim=c.n_query_groups * c.head_size, num_attention_heads=c.n_query_groups,
                  encoder_hidden_size=getattr(args, "hidden_size", None) or c.n_query_groups * c.head_size,
                  prefix_projection=False)
    return _write(model, out_dir, config, prefix.flat(), dtype, kind)


def read_virtual(peft_dir: str | Path, peft_type: str, model: GPT) -> tuple[dict[str, Any], torch.Tensor]:
    """A PEFT folder's config and its `prompt_embeddings` (P, width), checked against this base."""
    peft_dir = Path(peft_dir)
    path = peft_dir / CONFIG_FILE
    cfg = read_peft_config(peft_dir)
    if cfg.get("peft_type") != peft_type:
        raise ValueError(f"{path}: peft_type {cfg.get('peft_type')!r} is not {peft_type}")
    unsupported = {**_UNSUPPORTED, "num_transformer_submodules": (None, 2)} if is_seq2seq(model) else _UNSUPPORTED
    bad = [f"{k}={cfg[k]!r}" for k, ok in unsupported.items() if k in cfg and cfg[k] not in ok]
    if bad:
        raise ValueError(f"{path}: unsupported options {', '.join(bad)} (leantune's decoder models take one prompt)")
    tensors = peft_weights(peft_dir)
    if set(tensors) != {TENSOR}:
        raise ValueError(f"{peft_dir}: expected one tensor {TENSOR!r}, found {sorted(tensors)[:5]}")
    t = tensors[TENSOR]
    c = model.config
    ours = c.num_layers if is_seq2seq(model) else c.n_layer
    n_layers = cfg.get("num_layers")
    if n_layers is not None and n_layers != ours:
        raise ValueError(f"{path}: made for a {n_layers}-layer model, this base has {ours} layers; pass the "
                         "--checkpoint_dir it was trained on")
    P, parts = cfg.get("num_virtual_tokens"), cfg.get("num_transformer_submodules") or 1
    if t.dim() != 2 or (P is not None and t.shape[0] != P * parts):
        raise ValueError(f"{peft_dir}: {TENSOR} has shape {tuple(t.shape)}, expected (num_virtual_tokens {P} x "
                         f"{parts}, width)")
    return cfg, t[: t.shape[0] // parts]  # seq2seq: the encoder's P rows (PEFT never reads the rest)


@torch.no_grad()
def load_into(virtual: nn.Module, tensor: torch.Tensor, peft_dir: str | Path) -> None:
    w = virtual.embedding.weight
    if tuple(tensor.shape) != tuple(w.shape):
        raise ValueError(f"{peft_dir}: {TENSOR} has shape {tuple(tensor.shape)}, this base needs {tuple(w.shape)}: "
                         "the adapter was trained on another model; pass the --checkpoint_dir it was trained on")
    w.copy_(tensor.to(w.dtype))
