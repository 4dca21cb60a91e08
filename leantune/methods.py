"""The method table: every finetuning method as one record (`leantune.peft.base.Method`), and the method-agnostic
checkpoint I/O built on it.

Each module of `leantune.peft` that defines `METHOD` (or `METHODS`) is registered here; nothing else in leantune
asks for a method by name. A PEFT method saves only its trainable tensors (`adapter.safetensors`) plus the manifest;
a method with `saves_full_model` saves an HF folder. Loading an adapter re-applies the method with the manifest's
hyperparameters, checks that the saved tensors cover exactly what it made, then copies them in. Every load first
runs on a meta-device skeleton of the base (`check_adapter`), so an adapter that does not fit is refused before
anything of its declared size is allocated.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib
import json
import pkgutil
import platform
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

import leantune.peft
from leantune.checkpoint.hf import weight_files
from leantune.checkpoint.io import load_safetensors, save_safetensors, write_json
from leantune.checkpoint.peft_dir import is_peft_dir, read_peft_config
from leantune.decode.woq import WEIGHT_ONLY_MODES
from leantune.models.decoder.model import GPT
from leantune.models.kinds import architecture, read_model_state, save_model
from leantune.models.quantize import is_quantized
from leantune.peft.base import Method, mark_trainable

ADAPTER_FILE = "adapter.safetensors"
MANIFEST_FILE = "leantune.json"


def _discover() -> dict[str, Method]:
    found: dict[str, Method] = {}
    for info in sorted(pkgutil.iter_modules(leantune.peft.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"leantune.peft.{info.name}")
        records = getattr(module, "METHODS", None) or ((module.METHOD,) if hasattr(module, "METHOD") else ())
        for m in records:
            if m.name in found:
                raise RuntimeError(f"method {m.name!r} is defined twice ({module.__name__})")
            found[m.name] = m
    return found


METHODS: dict[str, Method] = _discover()


def register(method: Method) -> Method:
    """Add a method defined outside `leantune.peft` (a plugin, or a test); it then appears in every command."""
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose among {', '.join(METHODS)}") from None


def apply_method(model: GPT, method: str | Method, args: Any) -> list[str]:
    """Transform `model` in place for `method`; returns the names of its trainable parameters (all else frozen)."""
    m = method if isinstance(method, Method) else get_method(method)
    m.apply(model, m.make_args(args))
    return mark_trainable(model, m.adapter_params(model))


def method_args_class(method: str) -> type | None:
    return get_method(method).args_class


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


def base_architecture(model: GPT) -> dict[str, Any]:
    """The shape facts an adapter depends on, recorded in its manifest and checked before it touches a base."""
    return architecture(model)


def build_manifest(method: str, args: Any, checkpoint_dir: Path, tokenizer, prompt_style: str | None,
                   precision: str, quantize: str | None = None, extra: dict | None = None,
                   model: GPT | None = None) -> dict[str, Any]:
    versions = {"leantune": leantune.__version__, "torch": torch.__version__, "python": platform.python_version()}
    return {
        "format": "leantune-adapter/1",
        "method": method,
        "method_args": dataclasses.asdict(args) if dataclasses.is_dataclass(args) else {},
        "base_checkpoint": base_identity(checkpoint_dir),
        **({"base_architecture": base_architecture(model)} if model is not None else {}),
        "prompt_style": prompt_style,
        "special_tokens": {"bos_id": tokenizer.bos_id, "eos_ids": list(tokenizer.eos_ids), "pad_id": tokenizer.pad_id},
        "precision": precision,
        "quantize": quantize,
        "versions": versions,
        **(extra or {}),
    }


def save_checkpoint(out: Path, model: GPT, method: str | Method, trainable: list[str], manifest: dict,
                    checkpoint_dir: Path) -> None:
    """Write a checkpoint into the (temporary, then atomically renamed) folder `out`."""
    m = method if isinstance(method, Method) else get_method(method)
    if m.saves_full_model:
        save_model(model, out / "model", source_dir=checkpoint_dir)
    else:
        params = dict(model.named_parameters())
        tensors = {n: params[n].detach().cpu().contiguous() for n in trainable}
        save_safetensors(tensors, out / ADAPTER_FILE, metadata={"method": m.name})
    write_json(out / MANIFEST_FILE, manifest)


@torch.no_grad()
def load_trainable(model: GPT, method: str | Method, ckpt: Path, expected: list[str] | None = None) -> None:
    """Copy a checkpoint's trained tensors into an already transformed model (in place: optimizer refs stay).

    Every tensor is checked before any is copied: none unknown, none missing from `expected` (default: the
    method's trainable tensors), every shape equal. A mismatch means another base or other method args.
    """
    m = method if isinstance(method, Method) else get_method(method)
    ckpt = Path(ckpt)
    source = ckpt / "model" if m.saves_full_model else ckpt / ADAPTER_FILE
    sd = read_model_state(source, model) if m.saves_full_model else load_safetensors(source)
    params = dict(model.named_parameters())
    if expected is None:
        chosen = {id(p) for p in m.adapter_params(model)}
        expected = [n for n, p in params.items() if id(p) in chosen]
    unknown = sorted(set(sd) - set(params))
    missing = sorted(set(expected) - set(sd))
    shapes = [f"{n} {tuple(sd[n].shape)} vs {tuple(params[n].shape)}" for n in sorted(set(sd) & set(params))
              if sd[n].shape != params[n].shape]
    if unknown or missing or shapes:
        what = "; ".join(x for x in (
            f"{len(unknown)} tensors this model lacks (e.g. {unknown[:3]})" if unknown else "",
            f"{len(missing)} tensors missing (e.g. {missing[:3]})" if missing else "",
            f"{len(shapes)} with other shapes (e.g. {shapes[:2]})" if shapes else "") if x)
        raise ValueError(f"{source}: does not fit this model: {what}. It was trained on another base model or with "
                         "other method args; pass the --checkpoint_dir it was trained on")
    for n, t in sd.items():
        params[n].copy_(t)


def read_manifest(adapter_dir: Path) -> dict[str, Any]:
    path = Path(adapter_dir) / MANIFEST_FILE
    if not path.is_file():
        hint = " (a PEFT folder has adapter_config.json)" if Path(adapter_dir).is_dir() else ""
        raise FileNotFoundError(f"{path}: not a leantune checkpoint (no {MANIFEST_FILE}){hint}")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); the checkpoint is damaged") from e
    if not isinstance(manifest, dict) or "method" not in manifest:
        raise ValueError(f"{path}: not a leantune manifest (no \"method\")")
    return manifest


def check_base(manifest: dict[str, Any], model: GPT, adapter_dir: Path) -> None:
    """Refuse an adapter recorded for another architecture before touching the base."""
    recorded = manifest.get("base_architecture")
    if not recorded:
        return  # older manifests: load_trainable's tensor checks still apply
    here = base_architecture(model)
    diff = [f"{k} {recorded[k]} vs {here[k]}" for k in recorded if k in here and recorded[k] != here[k]]
    if diff:
        raise ValueError(f"{adapter_dir} was trained on a different base model ({', '.join(diff)}; adapter vs this "
                         f"base {model.config.name or ''}); pass the --checkpoint_dir it was trained on "
                         f"({manifest.get('base_checkpoint', {}).get('path', '?')})")


def _describe(quantize: str | None) -> str:
    return f"quantized with {quantize}" if quantize else "in full precision"


def load_adapter(model: GPT, adapter_dir: Path, checkpoint_dir: Path | None = None,
                 check_quantization: bool = True) -> dict[str, Any]:
    """Apply a saved leantune adapter (unmerged) to a base model; warns when the base differs from training's."""
    manifest = read_manifest(adapter_dir)
    m = get_method(manifest["method"])
    if m.saves_full_model:
        raise ValueError(f"{adapter_dir} is a {m.name} finetune: pass its model/ folder as --checkpoint_dir instead")
    check_base(manifest, model, Path(adapter_dir))
    apply_method(model, m, m.make_args(manifest["method_args"]))
    load_trainable(model, m, Path(adapter_dir))
    model.requires_grad_(False)
    trained_q, loaded_q = manifest.get("quantize"), getattr(model, "quantize", None)
    chosen_for_decode = trained_q is None and loaded_q in WEIGHT_ONLY_MODES  # --quantize int8/int4: asked for speed
    if check_quantization and trained_q != loaded_q and not chosen_for_decode:
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


def peft_method(peft_type: str) -> Method:
    """The registered method whose adapters PEFT saves with this `peft_type`."""
    for m in METHODS.values():
        if m.peft is not None and m.peft.peft_type == peft_type and m.variant_of is None:
            return m
    known = sorted({m.peft.peft_type for m in METHODS.values() if m.peft})
    raise ValueError(f"PEFT adapters of type {peft_type!r} are not supported; supported: {', '.join(known)}")


def load_any_adapter(model: GPT, path: str | Path, checkpoint_dir: str | Path | None = None,
                     check_quantization: bool = True) -> dict[str, Any]:
    """Load a leantune adapter folder or a PEFT adapter folder onto `model` (unmerged, frozen); returns a manifest.

    For a PEFT folder the returned dict mimics a leantune manifest (method, its args) so callers need not care.
    The folder is checked on a meta skeleton first (`check_adapter`): a refused adapter allocates nothing.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"--adapter {path}: no such folder")
    check_adapter(model, path)
    return _load_any(model, path, checkpoint_dir, check_quantization)


def meta_skeleton(model: nn.Module) -> nn.Module | None:
    """A copy of `model`'s module tree whose every tensor is on the meta device (shapes and dtypes, no storage),
    ~40 ms for the default model; None when a tensor cannot go to meta (a bitsandbytes weight's own class)."""
    if any(is_quantized(p) for p in model.parameters()):
        return None  # packed storage (bitsandbytes, int8/int4 weight-only): its meta copy is a plain integer tensor
        # the method cannot wrap; the real load's own shape checks apply
    memo: dict[int, object] = {}

    def visit(v: object) -> None:
        if isinstance(v, torch.Tensor):
            if id(v) not in memo:
                m = v.detach().to("meta")
                memo[id(v)] = nn.Parameter(m, requires_grad=v.requires_grad) if isinstance(v, nn.Parameter) else m
        elif isinstance(v, tuple | list):
            for x in v:
                visit(x)
        elif isinstance(v, dict):
            for x in v.values():
                visit(x)

    try:
        for module in model.modules():
            for value in vars(module).values():  # _parameters, _buffers and plain tensor attributes (caches)
                visit(value)
        return copy.deepcopy(model, memo)
    except Exception:  # noqa: BLE001 - any tensor type meta cannot hold: the real load's own checks still apply
        return None


def check_adapter(model: nn.Module, path: Path) -> None:
    """Load the adapter at `path` onto a meta skeleton of `model`: the method is applied with the folder's declared
    args (manifest or adapter_config.json) and every name and shape is checked against the saved tensors, all
    without storage, so a folder declaring `r: 8192` over rank-8 tensors is refused before the real load allocates
    8192 ranks (a server would keep that memory). Raises ValueError (or what the real load raises) for a misfit."""
    skeleton = meta_skeleton(model)
    if skeleton is None:
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the real load warns once
            _load_any(skeleton, path, None, check_quantization=False)
    except NotImplementedError as e:
        if "meta" in str(e).lower():
            return  # an op with no meta kernel: nothing learnt, the real load checks as it always did
        raise
    except (TypeError, RuntimeError, IndexError, AttributeError, OverflowError) as e:  # declared args the method cannot take
        raise ValueError(f"{path}: the adapter does not fit this base ({type(e).__name__}: {e}); check its "
                         "manifest or adapter_config.json, or pass the --checkpoint_dir it was trained on") from None


def _load_any(model: GPT, path: Path, checkpoint_dir: str | Path | None, check_quantization: bool) -> dict[str, Any]:
    if not is_peft_dir(path):
        return load_adapter(model, path, Path(checkpoint_dir) if checkpoint_dir is not None else None,
                            check_quantization=check_quantization)
    pcfg = read_peft_config(path)
    m = peft_method(pcfg.get("peft_type", "LORA"))
    args = m.peft.load(model, path)
    # several methods may share a peft_type (LORA: lora, and dora with use_dora): the args say which one it was
    m = next((x for x in METHODS.values() if x.variant_of is None and type(args) is x.args_class), m)
    model.requires_grad_(False)
    return {"format": "peft", "method": m.name, "method_args": dataclasses.asdict(args) if args is not None else {},
            "base_checkpoint": {"path": pcfg.get("base_model_name_or_path")}}
