"""LoHa and LoKr adapters in HF PEFT's format (`adapter_config.json` + `adapter_model.safetensors`), both ways.

Each part of our fused qkv maps to its own projection in a split-qkv family (q_proj, k_proj, v_proj), with PEFT's
tensor names unchanged (`hada_w1_a`, `lokr_w1`, ...). A family with a fused HF qkv layer has one PEFT adapter over
the whole layer: a method maps our parts onto it only where that is exact (`LycorisSpec.fuse`/`split`: LoHa yes,
LoKr no, since one Kronecker product cannot hold three independent ones). PEFT's LoHa/LoKr do not wrap GPT-2's
Conv1D layers at all, so families with transposed linears are refused.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from leantune.checkpoint.peft_dir import CONFIG_FILE, hf_module_paths, peft_weights, read_peft_config, write_peft_dir
from leantune.models.decoder.families import Family, family_of
from leantune.models.decoder.model import GPT
from leantune.peft.lycoris import LycorisLinear, layers_of

_PREFIX = "base_model.model."
# adapter_config.json fields whose non-default values we cannot represent
_UNSUPPORTED = {"modules_to_save": None, "use_effective_conv2d": False, "layer_replication": None,
                "target_parameters": None, "trainable_token_indices": None}


@dataclass(frozen=True)
class LycorisSpec:
    """What the generic PEFT mapping needs to know about one LyCORIS method."""

    peft_type: str
    flag: str
    """The method's CLI group, for messages."""
    factor_type: type
    tensor_names: tuple[str, ...]
    """PEFT's names of the factor tensors (attributes of `factor_type`)."""
    apply: Callable[[GPT, Any], list[str]]
    config_fields: Callable[[Any], dict[str, Any]]
    """args -> the method's own adapter_config.json fields (r, alpha, ...)."""
    args_from_config: Callable[[dict[str, Any], list[str]], Any]
    """(adapter_config.json, targets) -> args."""
    fuse: Callable[[LycorisLinear, GPT, Family], tuple[dict[str, torch.Tensor], int]] | None = None
    """Our multi-part qkv -> (tensors of one adapter over the whole fused HF layer, its rank); None: no exact map."""
    split: Callable[[LycorisLinear, dict[str, torch.Tensor], GPT, Family], None] | None = None
    """Copy one adapter over a fused HF qkv layer into our qkv parts (the inverse of `fuse`)."""


def _hf_modules(model: GPT, spec: LycorisSpec) -> list[tuple[str, LycorisLinear, int | None]]:
    """(HF module path, our layer, qkv part index or None for the whole layer) for each adapted layer."""
    cfg = model.config
    if family_of(cfg).transposed_linears:
        raise ValueError(f"{cfg.hf_model_type} stores its linears as transformers Conv1D, which PEFT's {spec.peft_type} "
                         "does not support; keep the leantune adapter or merge it (`leantune merge`)")
    return hf_module_paths(model, layers_of(model, spec.factor_type), spec.peft_type)


def export_lycoris(model: GPT, out_dir: str | Path, base_model_name_or_path: str, args: Any, spec: LycorisSpec,
                   dtype: torch.dtype | None = None, kind: str | None = None) -> Path:
    """Write `model`'s (unmerged) adapter as a PEFT folder that `PeftModel.from_pretrained` loads."""
    fam = family_of(model.config)
    modules = _hf_modules(model, spec)
    if not modules:
        raise ValueError(f"the model has no {spec.peft_type} layers to export")
    fields = spec.config_fields(args)
    scaling = fields["alpha"] / fields["r"]
    tensors: dict[str, torch.Tensor] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for path, mod, idx in modules:
        if mod.merged:
            raise ValueError(f"{path}: the adapter is merged into the weights; export the unmerged adapter")
        if not math.isclose(mod.scaling, scaling, rel_tol=1e-6):
            raise ValueError(f"{path}: scaling {mod.scaling} differs from the adapter's args ({scaling})")
        whole = len(mod.parts) == 1 and mod.parts[0] == (0, mod.out_features)
        if idx is not None or whole:
            f = mod.factors[idx or 0]
            found = {n: getattr(f, n) for n in spec.tensor_names if isinstance(getattr(f, n, None), nn.Parameter)}
        else:  # some or all of q/k/v on one fused HF layer
            if spec.fuse is None:
                raise ValueError(f"{path}: {fam.model_type} fuses q/k/v into one layer, and PEFT's {spec.peft_type} "
                                 "over it cannot express separate query/key/value factors exactly; export without "
                                 f"query/key/value in --{spec.flag}.targets (or merge the adapter instead)")
            found, rank = spec.fuse(mod, model, fam)
            if rank != fields["r"]:
                leaf = path.rsplit(".", 1)[-1]
                rank_pattern[leaf], alpha_pattern[leaf] = rank, mod.scaling * rank
        for n, t in found.items():
            t = t.detach().cpu()
            tensors[f"{_PREFIX}{path}.{n}"] = (t.to(dtype) if dtype is not None else t).contiguous().clone()
    config = {
        "peft_type": spec.peft_type,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        **fields,
        "target_modules": sorted({path.rsplit(".", 1)[-1] for path, _, _ in modules}),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "init_weights": True,
        "use_effective_conv2d": False,
        "modules_to_save": None,
        "exclude_modules": None,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }
    return write_peft_dir(out_dir, config, tensors, kind)


def read_lycoris_config(peft_dir: Path, spec: LycorisSpec) -> dict[str, Any]:
    path = Path(peft_dir) / CONFIG_FILE
    cfg = read_peft_config(peft_dir)
    if cfg.get("peft_type") != spec.peft_type:
        raise ValueError(f"{path}: peft_type {cfg.get('peft_type')!r} is not {spec.peft_type}")
    bad = [f"{k}={cfg[k]!r}" for k, ok in _UNSUPPORTED.items() if cfg.get(k) not in (ok, None, [], {})]
    if bad:
        raise ValueError(f"{path}: unsupported {spec.peft_type} options {', '.join(bad)}")
    for key, default in (("rank_pattern", cfg.get("r")), ("alpha_pattern", cfg.get("alpha"))):
        differing = {k: v for k, v in (cfg.get(key) or {}).items() if v != default}
        if differing:
            raise ValueError(f"{path}: per-module {key} {differing} differs from the global value {default}; leantune "
                             f"{spec.peft_type} uses one rank and alpha for every layer")
    return cfg


@torch.no_grad()
def import_lycoris(model: GPT, peft_dir: str | Path, spec: LycorisSpec) -> Any:
    """Apply a PEFT LoHa/LoKr folder to `model` (unmerged) and return the args it amounts to.

    Layers the adapter leaves out inside a target group (e.g. gate_proj when only up/down were adapted) keep their
    initial zero update, so the outputs equal PEFT's exactly."""
    peft_dir = Path(peft_dir)
    pcfg = read_lycoris_config(peft_dir, spec)
    cfg = model.config
    fam = family_of(cfg)
    head_names = {fam.head_module, fam.head_module_before_v5} - {None}
    split_qkv = fam.linear_modules()["attn.qkv"] if fam.qkv_layout == "split" else ()  # q, k, v HF modules
    fused_qkv = None if split_qkv else fam.linear_modules()["attn.qkv"][0]
    names = "|".join(spec.tensor_names)
    layer_re = re.compile(rf"^{re.escape(_PREFIX + fam.layer_prefix)}\.(\d+)\.(.+)\.({names})(?:\.default)?$")
    head_re = re.compile(rf"^{re.escape(_PREFIX)}(\w+)\.({names})(?:\.default)?$")
    found: dict[tuple[int | None, str, int | None], dict[str, torch.Tensor]] = {}
    targets: set[str] = set()
    for key, t in peft_weights(peft_dir).items():
        if ".base_layer." in key:
            continue  # base weights PEFT saves alongside a head adapter: the base checkpoint already holds them
        if m := layer_re.match(key):
            i, hf_mod, tname = int(m.group(1)), m.group(2), m.group(3)
            if i >= cfg.n_layer:
                raise ValueError(f"{peft_dir}: {key} is for layer {i}, but this base has {cfg.n_layer} layers; "
                                 "pass the --checkpoint_dir the adapter was trained on")
            if hf_mod in split_qkv:
                part = split_qkv.index(hf_mod)
                targets.add(("query", "key", "value")[part])
                found.setdefault((i, "attn.qkv", part), {})[tname] = t
            elif hf_mod == fused_qkv:
                if spec.split is None:
                    raise ValueError(f"{peft_dir}: {spec.peft_type} on the fused {hf_mod} has no exact leantune "
                                     "equivalent (leantune keeps separate query/key/value factors)")
                targets.update(("query", "key", "value"))
                found.setdefault((i, "attn.qkv", None), {})[tname] = t
            else:
                ours = fam.layer_map.get(hf_mod)
                if ours is None or not ours.startswith(("attn.proj", "mlp.")):
                    raise ValueError(f"{peft_dir}: {spec.peft_type} on {hf_mod} has no leantune equivalent")
                targets.add("projection" if ours == "attn.proj" else "mlp")
                found.setdefault((i, ours, None), {})[tname] = t
        elif (m := head_re.match(key)) and m.group(1) in head_names:
            targets.add("head")
            found.setdefault((None, "lm_head", None), {})[m.group(2)] = t
        else:
            raise ValueError(f"{peft_dir}: tensor {key} has no leantune equivalent")
    if not found:
        raise ValueError(f"{peft_dir}: no {spec.peft_type} tensors found in the adapter")
    args = spec.args_from_config(pcfg, sorted(targets))
    spec.apply(model, args)
    for (i, ours, part), tensors in found.items():
        mod = model.lm_head if i is None else model.transformer.h[i].get_submodule(ours)
        if part is None and ours == "attn.qkv":
            spec.split(mod, tensors, model, fam)
            continue
        j = 0 if part is None else [s for s, _ in mod.parts].index(sum(cfg.qkv_sizes[:part]))
        copy_factors(mod.factors[j], tensors, f"{peft_dir}: layer {i} {ours}")
    return args


def copy_factors(factors: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Copy PEFT's tensors into one factor module, after checking that names and shapes agree exactly."""
    params = dict(factors.named_parameters())
    if set(tensors) != set(params) or any(tensors[n].shape != p.shape for n, p in params.items()):
        have = {n: tuple(t.shape) for n, t in tensors.items()}
        want = {n: tuple(p.shape) for n, p in params.items()}
        raise ValueError(f"{where}: adapter tensors {have} do not fit this base and config ({want}): the adapter was "
                         "trained on another model; pass the --checkpoint_dir it was trained on")
    for n, p in params.items():
        p.copy_(tensors[n].to(p.dtype))
