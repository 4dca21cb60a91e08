"""The finetuning methods as data: how each one transforms a model and how its checkpoints are written.

A PEFT method saves only its trainable tensors (`adapter.safetensors`) plus the manifest; `full` saves an HF
folder. Loading an adapter re-applies the method with the manifest's hyperparameters, then loads the tensors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
from pathlib import Path
from typing import Any

import torch

from leantune.checkpoint.hf import hf_to_ours, iter_hf_tensors, save_hf_checkpoint, weight_files
from leantune.checkpoint.io import load_safetensors, save_safetensors, write_json
from leantune.model import GPT

ADAPTER_FILE = "adapter.safetensors"
MANIFEST_FILE = "leantune.json"
PEFT_METHODS = ("lora", "qlora", "adapter", "adapter_v2")
METHODS = (*PEFT_METHODS, "full")


def apply_method(model: GPT, method: str, args: Any) -> list[str]:
    """Transform `model` in place for `method`; returns the names of its trainable parameters."""
    if method in ("lora", "qlora"):
        from leantune.peft.lora import apply_lora

        return apply_lora(model, args)
    if method == "adapter":
        from leantune.peft.adapter import apply_adapter

        return apply_adapter(model, args)
    if method == "adapter_v2":
        from leantune.peft.adapter_v2 import apply_adapter_v2

        return apply_adapter_v2(model, args)
    if method == "full":
        model.requires_grad_(True)
        return [n for n, _ in model.named_parameters()]
    raise ValueError(f"unknown method {method!r}; choose among {', '.join(METHODS)}")


def method_args_class(method: str):
    if method in ("lora", "qlora"):
        from leantune.peft.lora import LoRAArgs

        return LoRAArgs
    if method == "adapter":
        from leantune.peft.adapter import AdapterArgs

        return AdapterArgs
    if method == "adapter_v2":
        from leantune.peft.adapter_v2 import AdapterV2Args

        return AdapterV2Args
    return None


def base_identity(checkpoint_dir: Path) -> dict[str, Any]:
    """A cheap fingerprint of the base checkpoint: sha256 over config.json and each weight file's name, size
    and first MiB (hashing every byte of a 14 GB model on each save would cost minutes)."""
    checkpoint_dir = Path(checkpoint_dir)
    h = hashlib.sha256((checkpoint_dir / "config.json").read_bytes())
    for f in weight_files(checkpoint_dir):
        h.update(f.name.encode())
        h.update(str(f.stat().st_size).encode())
        with open(f, "rb") as fh:
            h.update(fh.read(2**20))
    return {"path": str(checkpoint_dir), "name": checkpoint_dir.name, "fingerprint": h.hexdigest()}


def build_manifest(method: str, args: Any, checkpoint_dir: Path, tokenizer, prompt_style: str | None,
                   precision: str, quantize: str | None = None, extra: dict | None = None) -> dict[str, Any]:
    import leantune

    versions = {"leantune": leantune.__version__, "torch": torch.__version__, "python": platform.python_version()}
    return {
        "format": "leantune-adapter/1",
        "method": method,
        "method_args": dataclasses.asdict(args) if dataclasses.is_dataclass(args) else {},
        "base_checkpoint": base_identity(checkpoint_dir),
        "prompt_style": prompt_style,
        "special_tokens": {"bos_id": tokenizer.bos_id, "eos_ids": list(tokenizer.eos_ids), "pad_id": tokenizer.pad_id},
        "precision": precision,
        "quantize": quantize,
        "versions": versions,
        **(extra or {}),
    }


def save_checkpoint(out: Path, model: GPT, method: str, trainable: list[str], manifest: dict,
                    checkpoint_dir: Path) -> None:
    """Write a checkpoint into the (temporary, then atomically renamed) folder `out`."""
    if method == "full":
        save_hf_checkpoint(model, out / "model", source_dir=checkpoint_dir)
    else:
        params = dict(model.named_parameters())
        tensors = {n: params[n].detach().cpu().contiguous() for n in trainable}
        save_safetensors(tensors, out / ADAPTER_FILE, metadata={"method": method})
    write_json(out / MANIFEST_FILE, manifest)


@torch.no_grad()
def load_trainable(model: GPT, method: str, ckpt: Path) -> None:
    """Copy a checkpoint's trained tensors into an already transformed model (in place: optimizer refs stay)."""
    if method == "full":
        sd = hf_to_ours(dict(iter_hf_tensors(ckpt / "model")), model.config)
    else:
        sd = load_safetensors(ckpt / ADAPTER_FILE)
    params = dict(model.named_parameters())
    unknown = sorted(set(sd) - set(params))
    if unknown:
        raise KeyError(f"{ckpt}: tensors not in this model: {unknown[:10]}; was it trained with other method args?")
    for n, t in sd.items():
        params[n].copy_(t)


def read_manifest(adapter_dir: Path) -> dict[str, Any]:
    path = Path(adapter_dir) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a leantune checkpoint (no {MANIFEST_FILE})")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _describe(quantize: str | None) -> str:
    return f"quantized with {quantize}" if quantize else "in full precision"


def load_adapter(model: GPT, adapter_dir: Path, checkpoint_dir: Path | None = None,
                 check_quantization: bool = True) -> dict[str, Any]:
    """Apply a saved PEFT adapter (unmerged) to a base model; warns when the base differs from training's."""
    import warnings

    manifest = read_manifest(adapter_dir)
    method = manifest["method"]
    if method == "full":
        raise ValueError(f"{adapter_dir} is a full finetune: pass its model/ folder as --checkpoint_dir instead")
    args = method_args_class(method)(**manifest["method_args"])
    apply_method(model, method, args)
    load_trainable(model, method, Path(adapter_dir))
    model.requires_grad_(False)
    trained_q, loaded_q = manifest.get("quantize"), getattr(model, "quantize", None)
    if check_quantization and trained_q != loaded_q:
        warnings.warn(f"{adapter_dir} was trained on a base {_describe(trained_q)} but is being loaded onto a base "
                      f"{_describe(loaded_q)}; outputs will differ from training's (pass --quantize {trained_q} to match)"
                      if trained_q else
                      f"{adapter_dir} was trained on a full-precision base but the base is {_describe(loaded_q)}; "
                      "outputs will differ from training's", stacklevel=2)
    if checkpoint_dir is not None:
        fp = base_identity(checkpoint_dir)["fingerprint"]
        if fp != manifest["base_checkpoint"]["fingerprint"]:
            warnings.warn(f"{adapter_dir} was trained on base {manifest['base_checkpoint']['name']} "
                          f"(fingerprint {manifest['base_checkpoint']['fingerprint'][:12]}), not on {checkpoint_dir}",
                          stacklevel=2)
    return manifest
