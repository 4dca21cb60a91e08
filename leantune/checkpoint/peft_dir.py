"""HF PEFT adapter folders, method-agnostic: recognise one, read its config and tensors.

Each method's own mapping to and from these folders lives beside the method (e.g. `leantune.peft.lora_peft`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from leantune.checkpoint.io import atomic_dir, load_safetensors, save_safetensors, write_json
from leantune.checkpoint.safe_pickle import load_tensor_dict
from leantune.models.decoder.families import family_of

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def is_peft_dir(path: str | Path) -> bool:
    """True for a folder PEFT's `save_pretrained` wrote (it has adapter_config.json)."""
    return (Path(path) / CONFIG_FILE).is_file()


def read_peft_config(peft_dir: str | Path) -> dict[str, Any]:
    path = Path(peft_dir) / CONFIG_FILE
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); re-save the adapter with peft") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return cfg


def peft_weights(peft_dir: str | Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors: `adapter_model.safetensors`, else an old PEFT's `adapter_model.bin` (a torch pickle,
    read with weights_only: one that holds anything but named tensors is refused with UntrustedFileError)."""
    peft_dir = Path(peft_dir)
    if (peft_dir / WEIGHTS_FILE).is_file():
        return load_safetensors(peft_dir / WEIGHTS_FILE)
    if (peft_dir / "adapter_model.bin").is_file():
        return load_tensor_dict(peft_dir / "adapter_model.bin")
    raise FileNotFoundError(f"{peft_dir}: no {WEIGHTS_FILE} (or adapter_model.bin)")


def write_peft_dir(out_dir: str | Path, config: dict[str, Any], tensors: dict[str, torch.Tensor],
                   kind: str | None = None) -> Path:
    """Write a PEFT folder atomically: `adapter_config.json` + `adapter_model.safetensors` (kind: the output marker
    of a folder the user named, see `leantune.checkpoint.io.claim_output`)."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, kind=kind) as tmp:
        write_json(tmp / CONFIG_FILE, config)
        save_safetensors(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
    return out_dir


def hf_module_paths(model: nn.Module, layers: Iterable[nn.Module], what: str) -> list[tuple[str, nn.Module, int | None]]:
    """(HF module path, our layer, part index or None for the whole layer) for each of `layers`, the adapted layers of
    `model` (each with output `parts`): on a family whose HF layout splits q/k/v, each part of our fused qkv maps to
    its own projection; everything else maps to its one HF module. `what` names the method in errors."""
    cfg = model.config
    fam = family_of(cfg)
    hf_names = fam.linear_modules()  # our block linear -> its HF module(s), q/k/v order for a split qkv
    q, k, _v = cfg.qkv_sizes
    qkv_index = {0: 0, q: 1, q + k: 2}  # a part's first row -> q, k or v
    chosen = {id(m) for m in layers}
    out = []
    for name, mod in model.named_modules():
        if id(mod) not in chosen:
            continue
        if name == "lm_head":
            out.append((fam.peft_head_module(), mod, None))
            continue
        m = re.fullmatch(r"transformer\.h\.(\d+)\.(.+)", name)
        if not m:
            raise ValueError(f"{what} on {name} has no PEFT-format equivalent")
        i, ours = m.group(1), m.group(2)
        if ours == "attn.qkv" and fam.qkv_layout == "split":
            out.extend((f"{fam.layer_prefix}.{i}.{hf_names[ours][qkv_index[s]]}", mod, j)
                       for j, (s, _e) in enumerate(mod.parts))
        else:
            out.append((f"{fam.layer_prefix}.{i}.{hf_names[ours][0]}", mod, None))
    return out
