"""HF PEFT adapter folders, method-agnostic: recognise one, read its config and tensors.

The mapping of each method's tensors to and from these folders is `leantune.peft.peft_format` (one translator,
per-method records, the module names from the model kind's `PeftLayout`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from leantune.checkpoint.io import atomic_dir, load_safetensors, save_safetensors, write_json
from leantune.checkpoint.safe_pickle import load_tensor_dict

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
