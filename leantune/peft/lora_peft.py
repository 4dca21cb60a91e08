"""LoRA adapters in HF PEFT's format (`adapter_config.json` + `adapter_model.safetensors`), both ways.

Our LoRA on the fused qkv keeps one rank-r pair per part (q, k, v). Families whose HF layout splits q/k/v
(`Family.qkv_layout == "split"`) get one PEFT LoRA per projection; families with a fused HF qkv layer get one LoRA
of rank parts*r on it: the stacked A as is, and a block-diagonal B whose rows follow the HF qkv row order; its
rank and alpha go in `rank_pattern`/`alpha_pattern` so PEFT's alpha/rank equals our scaling.
DoRA is the same LoRA plus `use_dora: true` and one `lora_magnitude_vector` (out,) per PEFT module: on a fused HF qkv
the rows we do not adapt get ||W_r||, which makes PEFT's m / ||W_r + 0|| equal 1 there.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from leantune.checkpoint.hf import blocked_to_grouped, grouped_to_blocked
from leantune.checkpoint.peft_dir import CONFIG_FILE, hf_module_paths, peft_weights, read_peft_config, write_peft_dir
from leantune.models.decoder.families import family_of
from leantune.models.decoder.model import GPT
from leantune.models.kinds import is_seq2seq
from leantune.models.quantize import dequantize_weight
from leantune.peft.lora_dora import squared_row_norms
from leantune.peft.lora_layers import TARGETS, LoRAArgs, LoRALinear, apply_lora
from leantune.peft.lora_peft_t5 import export_t5_peft, import_t5_peft

_PREFIX = "base_model.model."
_MAGNITUDE = "lora_magnitude_vector"  # PEFT's DoRA key: saved without ".weight"
# Fields of adapter_config.json whose non-default values we cannot represent.
_UNSUPPORTED = {"bias": "none", "modules_to_save": None, "lora_bias": False,
                "layer_replication": None, "target_parameters": None, "trainable_token_indices": None,
                "use_qalora": False, "alora_invocation_tokens": None}


def export_peft(model: GPT, out_dir: str | Path, base_model_name_or_path: str, lora_args: Any,
                dtype: torch.dtype | None = None, kind: str | None = None) -> Path:
    """Write `model`'s (unmerged) LoRA as a PEFT adapter folder that `PeftModel.from_pretrained` loads."""
    if is_seq2seq(model):
        return export_t5_peft(model, out_dir, base_model_name_or_path, lora_args, dtype, kind)
    cfg = model.config
    fam = family_of(cfg)
    modules = hf_module_paths(model, [m for m in model.modules() if isinstance(m, LoRALinear)], "LoRA")
    if not modules:
        raise ValueError("the model has no LoRA layers to export")
    r, rslora = int(lora_args.r), bool(lora_args.rslora)
    dora = any(mod.lora_magnitude is not None for _, mod, _ in modules)
    tensors: dict[str, torch.Tensor] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for path, mod, idx in modules:
        if mod.merged:
            raise ValueError(f"{path}: LoRA is merged into the weights; export the unmerged adapter")
        if mod.r != r or not math.isclose(mod.scaling, lora_args.scaling, rel_tol=1e-6):
            raise ValueError(f"{path}: rank {mod.r} / scaling {mod.scaling} differ from the adapter's args")
        factors = mod.part_factors()
        if idx is not None:  # one of several separate HF projections
            _, a, b = factors[idx]
        elif len(factors) == 1 and factors[0][0] == (0, mod.out_features):
            _, a, b = factors[0]
        else:  # partial or multi-part LoRA on a fused HF layer: one block-diagonal LoRA of rank parts*r
            rank = len(factors) * r
            a = mod.lora_A.detach()
            b = torch.zeros(mod.out_features, rank, dtype=a.dtype)
            for j, ((s, e), _, bj) in enumerate(factors):
                b[s:e, j * r:(j + 1) * r] = bj.detach().cpu()
            if fam.qkv_layout == "grouped":
                b = blocked_to_grouped(b, cfg)
            if rank != r:
                name = path.rsplit(".", 1)[-1]
                rank_pattern[name] = rank
                alpha_pattern[name] = mod.scaling * (math.sqrt(rank) if rslora else rank)
        named = {f"{path}.lora_A.weight": a, f"{path}.lora_B.weight": b}
        if dora:
            named[f"{path}.{_MAGNITUDE}"] = _peft_magnitude(mod, idx, cfg if fam.qkv_layout == "grouped" else None)
        for key, t in named.items():
            t = t.detach().cpu()
            tensors[_PREFIX + key] = (t.to(dtype) if dtype is not None else t).clone()
    target_modules = sorted({path.rsplit(".", 1)[-1] for path, _, _ in modules})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": float(lora_args.alpha),
        "lora_dropout": float(lora_args.dropout),
        "use_rslora": rslora,
        "target_modules": target_modules,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "fan_in_fan_out": fam.transposed_linears,  # GPT-2's Conv1D stores (in, out)
        "bias": "none",
        "use_dora": dora,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }
    return write_peft_dir(out_dir, config, tensors, kind)


def _peft_magnitude(mod: LoRALinear, idx: int | None, grouped: Any) -> torch.Tensor:
    """The `lora_magnitude_vector` of one PEFT module: part `idx` of ours, or all `out` rows of the layer in HF row
    order, with the norm of W on rows we do not adapt (PEFT's m / norm is then 1 there, as our pass-through).
    `grouped`: the model config when the HF qkv rows are grouped per kv head (NeoX, Falcon), else None."""
    if mod.lora_magnitude is None:
        raise ValueError("cannot export a mix of LoRA and DoRA layers as one PEFT adapter")
    m = mod.lora_magnitude.detach()
    if idx is not None:
        off = sum(e - s for s, e in mod.parts[:idx])
        return m[off:off + mod.parts[idx][1] - mod.parts[idx][0]]
    if mod._full:
        return m
    w = dequantize_weight(mod.weight) if mod.quantized else mod.weight
    full = squared_row_norms(w.detach()).sqrt().to(m.dtype)  # (out,)
    off = 0
    for s, e in mod.parts:
        full[s:e] = m[off:off + e - s]
        off += e - s
    return blocked_to_grouped(full, grouped) if grouped is not None else full  # only a qkv has parts


def _read_config(peft_dir: Path) -> dict[str, Any]:
    path = peft_dir / CONFIG_FILE
    cfg = read_peft_config(peft_dir)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {cfg.get('peft_type')!r} is not supported; only LORA adapters import")
    bad = [f"{k}={cfg[k]!r}" for k, ok in _UNSUPPORTED.items() if cfg.get(k) not in (ok, None, [], {})]
    if bad:
        raise ValueError(f"{path}: unsupported LoRA options {', '.join(bad)} (supported: LoRA and DoRA, bias none, "
                         "no modules_to_save)")
    r, alpha = cfg["r"], cfg["lora_alpha"]
    for key, default in (("rank_pattern", r), ("alpha_pattern", alpha)):
        differing = {k: v for k, v in (cfg.get(key) or {}).items() if v != default}
        if differing:
            raise ValueError(f"{path}: per-module {key} {differing} differs from the global value {default}; "
                             "leantune LoRA uses one rank and alpha for every layer")
    return cfg


@torch.no_grad()
def import_peft(model: GPT, peft_dir: str | Path) -> list[str]:
    """Apply a PEFT LoRA adapter folder to `model` (unmerged) and return the trainable parameter names.

    Layers the adapter leaves out inside a target group (e.g. gate_proj when only up/down were adapted) get a zero
    update, so the outputs equal PEFT's exactly (with DoRA: a magnitude equal to their row norms, the identity).
    """
    peft_dir = Path(peft_dir)
    pcfg = _read_config(peft_dir)
    if is_seq2seq(model):
        return import_t5_peft(model, peft_dir, pcfg)
    cfg = model.config
    fam = family_of(cfg)
    prefix, layer_map = fam.layer_prefix, fam.layer_map
    r = int(pcfg["r"])
    dora = bool(pcfg.get("use_dora"))
    kinds = {"lora_A", "lora_B", _MAGNITUDE} if dora else {"lora_A", "lora_B"}
    head_names = {fam.head_module, fam.head_module_before_v5} - {None}
    split_qkv = fam.linear_modules()["attn.qkv"] if fam.qkv_layout == "split" else ()  # q, k, v HF modules
    fused_qkv = None if split_qkv else fam.linear_modules()["attn.qkv"][0]
    found: dict[tuple[int | None, str, int | None], dict[str, torch.Tensor]] = {}
    targets: set[str] = set()
    layer_re = re.compile(rf"^{re.escape(_PREFIX + prefix)}\.(\d+)\.(.+)\.(lora_A|lora_B|{_MAGNITUDE})(?:\.default)?(?:\.weight)?$")
    for key, t in peft_weights(peft_dir).items():
        if ".base_layer." in key:
            continue  # base weights PEFT saves alongside a head LoRA: the base checkpoint already holds them
        m = layer_re.match(key)
        if m:
            i, hf_mod, kind = int(m.group(1)), m.group(2), m.group(3)
            if i >= cfg.n_layer:
                raise ValueError(f"{peft_dir}: {key} is for layer {i}, but this base has {cfg.n_layer} layers; "
                                 "pass the --checkpoint_dir the adapter was trained on")
            if hf_mod in split_qkv:
                part = split_qkv.index(hf_mod)
                targets.add(("query", "key", "value")[part])
                found.setdefault((i, "attn.qkv", part), {})[kind] = t
                continue
            if hf_mod == fused_qkv:
                targets.update(("query", "key", "value"))
                found.setdefault((i, "attn.qkv", None), {})[kind] = t
                continue
            ours = layer_map.get(hf_mod)
            if ours is None or not ours.startswith(("attn.proj", "mlp.")):
                raise ValueError(f"{peft_dir}: LoRA on {hf_mod} has no leantune equivalent")
            targets.add("projection" if ours == "attn.proj" else "mlp")
            found.setdefault((i, ours, None), {})[kind] = t
            continue
        m = re.match(rf"^{re.escape(_PREFIX)}(\w+)\.(lora_A|lora_B|{_MAGNITUDE})(?:\.default)?(?:\.weight)?$", key)
        if m and m.group(1) in head_names:
            targets.add("head")
            found.setdefault((None, "lm_head", None), {})[m.group(2)] = t
            continue
        raise ValueError(f"{peft_dir}: tensor {key} has no leantune equivalent")
    if not found:
        raise ValueError(f"{peft_dir}: no LoRA tensors found in the adapter")
    alpha = float(pcfg["lora_alpha"])
    args = LoRAArgs(r=r, alpha=alpha, dropout=float(pcfg.get("lora_dropout") or 0.0), rslora=bool(pcfg.get("use_rslora")),
                    targets=[t for t in TARGETS if t in targets])
    trainable = apply_lora(model, args, dora=dora)  # B = 0 (and DoRA's m = the row norms): the identity
    for (i, ours, part), ab in found.items():
        if set(ab) != kinds:
            what = f"use_dora is {str(dora).lower()} but " if (set(ab) ^ kinds) & {_MAGNITUDE} else ""
            raise ValueError(f"{peft_dir}: layer {i} {ours}: {what}found {sorted(ab)}, expected {sorted(kinds)}")
        a, b = ab["lora_A"], ab["lora_B"]
        if a.shape[0] != r or b.shape[1] != r:
            raise ValueError(f"{peft_dir}: layer {i} {ours}: rank {a.shape[0]} differs from r={r}")
        mod = model.lm_head if i is None else model.transformer.h[i].get_submodule(ours)
        width = (cfg.qkv_sizes[part] if part is not None else mod.out_features)
        if a.shape[1] != mod.in_features or b.shape[0] != width:
            raise ValueError(f"{peft_dir}: layer {i} {ours}: LoRA shapes A {tuple(a.shape)}, B {tuple(b.shape)} do not "
                             f"fit this base's ({mod.in_features} in, {width} out): the adapter was trained on another "
                             "model; pass the --checkpoint_dir it was trained on")
        if part is not None:  # q/k/v index -> position among the parts this LoRALinear adapts
            j = [s for s, _ in mod.parts].index(sum(cfg.qkv_sizes[:part]))
            mod.lora_A[j * r:(j + 1) * r] = a.to(mod.lora_A.dtype)
            off = sum(e - s for s, e in mod.parts[:j])
            mod.lora_B[off:off + b.shape[0]] = b.to(mod.lora_B.dtype)
            if dora:
                mod.lora_magnitude[off:off + b.shape[0]] = _magnitude(ab, width, peft_dir, i, ours)
        elif ours == "attn.qkv":  # one fused LoRA: the same A for each of our q/k/v parts, B rows split
            mag = _magnitude(ab, width, peft_dir, i, ours) if dora else None
            if fam.qkv_layout == "grouped":
                b = grouped_to_blocked(b, cfg)
                mag = grouped_to_blocked(mag, cfg) if dora else None
            mod.lora_A.copy_(a.repeat(len(mod.parts), 1))
            mod.lora_B.copy_(b)
            if dora:
                mod.lora_magnitude.copy_(mag)
        else:
            mod.lora_A.copy_(a)
            mod.lora_B.copy_(b)
            if dora:
                mod.lora_magnitude.copy_(_magnitude(ab, width, peft_dir, i, ours))
    return trainable


def _magnitude(ab: dict[str, torch.Tensor], width: int, peft_dir: Path, i: int | None, ours: str) -> torch.Tensor:
    m = ab[_MAGNITUDE]
    if tuple(m.shape) != (width,):
        raise ValueError(f"{peft_dir}: layer {i} {ours}: {_MAGNITUDE} has shape {tuple(m.shape)}, this base needs "
                         f"({width},): the adapter was trained on another model")
    return m
