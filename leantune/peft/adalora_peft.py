"""AdaLoRA adapters in HF PEFT's format (`adapter_config.json` + `adapter_model.safetensors`), both ways.

Each part of an `AdaLoRALinear` is one PEFT module (q_proj, v_proj, a fused family's query_key_value...). PEFT saves
only the triplets its rank pattern keeps (`rank_pattern`: module -> init_r booleans) and rescales by alpha / init_r
whatever rank is left. Our adapter keeps all init_r triplets with the pruned ones' E at zero, so export writes the
pattern E != 0 (nothing changes the outputs) and import puts the kept triplets back at their positions.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from leantune.checkpoint.hf import blocked_to_grouped, grouped_to_blocked
from leantune.checkpoint.peft_dir import CONFIG_FILE, hf_module_paths, peft_weights, read_peft_config, write_peft_dir
from leantune.models.decoder.families import family_of
from leantune.models.decoder.model import GPT
from leantune.peft.adalora_layers import TARGETS, AdaLoRAArgs, AdaLoRALinear, apply_adalora

_PREFIX = "base_model.model."
_UNSUPPORTED = {"use_dora": False, "bias": "none", "modules_to_save": None, "layer_replication": None,
                "target_parameters": None, "trainable_token_indices": None}


def _hf_modules(model: GPT) -> list[tuple[str, AdaLoRALinear, int]]:
    """(HF module path, our layer, part index) for each PEFT module the model's AdaLoRA layers amount to."""
    out = []
    for path, mod, j in hf_module_paths(model, [m for m in model.modules() if isinstance(m, AdaLoRALinear)], "AdaLoRA"):
        if j is None and mod.parts != [(0, mod.out_features)]:
            fam = family_of(model.config)
            raise ValueError(f"{fam.model_type} fuses q/k/v into one HF layer, which PEFT adapts as a whole: an "
                             "AdaLoRA on only part of it has no PEFT equivalent (train with --adalora.targets "
                             "query,key,value to export)")
        out.append((path, mod, 0 if j is None else j))
    return out


def _target_modules(model: GPT, chosen: list[str]) -> list[str]:
    """PEFT's target_modules: a module name where every block linear of that name is adapted, else full paths (PEFT
    matches names as suffixes, so GPT-2's attention-only "c_proj" would also adapt the MLP's c_proj)."""
    fam = family_of(model.config)
    every = [f"{fam.layer_prefix}.{i}.{m}" for i in range(model.config.n_layer)
             for mods in fam.linear_modules().values() for m in mods]
    picked = set(chosen)
    out = set()
    for path in chosen:
        name = path.rsplit(".", 1)[-1]
        out.add(name if all(p in picked for p in every if p.rsplit(".", 1)[-1] == name) else path)
    return sorted(out)


def _triplet(mod: AdaLoRALinear, j: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Part j's A (r, in), E (r, 1), B (width, r)."""
    r = mod.r
    return mod.lora_A[j * r:(j + 1) * r], mod.lora_E[j * r:(j + 1) * r], mod.part_B()[j]


@torch.no_grad()
def export_peft(model: GPT, out_dir: str | Path, base_model_name_or_path: str, args: Any,
                dtype: torch.dtype | None = None, kind: str | None = None) -> Path:
    """Write `model`'s (unmerged) AdaLoRA as a PEFT folder that `PeftModel.from_pretrained` loads with equal outputs."""
    cfg = model.config
    fam = family_of(cfg)
    modules = _hf_modules(model)
    if not modules:
        raise ValueError("the model has no AdaLoRA layers to export")
    qkv_layers = {id(blk.attn.qkv) for blk in model.transformer.h}
    triplets = []
    for path, mod, j in modules:
        if mod.merged:
            raise ValueError(f"{path}: AdaLoRA is merged into the weights; export the unmerged adapter")
        a, e, b = (t.detach().cpu() for t in _triplet(mod, j))
        if fam.qkv_layout == "grouped" and id(mod) in qkv_layers:
            b = blocked_to_grouped(b, cfg)  # our [Q; K; V] rows -> HF's per-kv-group rows
        triplets.append((path, a, e, b))
    keeps = [(e != 0).view(-1) for _, _, e, _ in triplets]
    pruned = any(not k.all() for k in keeps) and any(k.any() for k in keeps)  # untrained (all E zero): no pattern
    tensors: dict[str, torch.Tensor] = {}
    rank_pattern: dict[str, list[bool]] = {}
    for (path, a, e, b), keep in zip(triplets, keeps):
        if pruned:
            rank_pattern[f"{path}.lora_E"] = keep.tolist()
            a, e, b = a[keep], e[keep], b[:, keep]
        for factor, t in (("lora_A", a), ("lora_E", e), ("lora_B", b)):
            tensors[f"{_PREFIX}{path}.{factor}"] = (t.to(dtype) if dtype is not None else t).contiguous().clone()
    tinit, tfinal = args.tinit or 0, args.tfinal or 0
    config = {
        "peft_type": "ADALORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": 8,  # LoraConfig's default: AdaLoRA ignores it and warns about any other value
        "init_r": int(args.init_r),
        "target_r": int(args.target_r),
        "lora_alpha": float(args.alpha),
        "lora_dropout": float(args.dropout),
        # the schedule only matters for training; PEFT insists on a valid one (total_step > tinit + tfinal)
        "tinit": tinit, "tfinal": tfinal, "deltaT": int(args.delta_t),
        "total_step": int(args.total_step or tinit + tfinal + 1),
        "beta1": float(args.beta1), "beta2": float(args.beta2), "orth_reg_weight": float(args.orth_reg_weight),
        "rank_pattern": rank_pattern or None,
        "target_modules": _target_modules(model, [path for path, _, _ in modules]),
        "fan_in_fan_out": fam.transposed_linears,
        "bias": "none",
        "use_dora": False,
        "use_rslora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }
    return write_peft_dir(out_dir, config, tensors, kind)


def _read_config(peft_dir: Path) -> dict[str, Any]:
    path = peft_dir / CONFIG_FILE
    cfg = read_peft_config(peft_dir)
    if cfg.get("peft_type") != "ADALORA":
        raise ValueError(f"{path}: peft_type {cfg.get('peft_type')!r} is not ADALORA")
    bad = [f"{k}={cfg[k]!r}" for k, ok in _UNSUPPORTED.items() if cfg.get(k) not in (ok, None, [], {})]
    if bad:
        raise ValueError(f"{path}: unsupported AdaLoRA options {', '.join(bad)} (supported: bias none, no "
                         "modules_to_save)")
    return cfg


def _locate(model: GPT, hf_mod: str | None) -> tuple[str, int | None, str]:
    """An HF module within a block (None: the head) -> (our module, q/k/v index or None, our target name)."""
    fam = family_of(model.config)
    if hf_mod is None:
        return "lm_head", None, "head"
    split = fam.linear_modules()["attn.qkv"] if fam.qkv_layout == "split" else ()
    if hf_mod in split:
        part = split.index(hf_mod)
        return "attn.qkv", part, ("query", "key", "value")[part]
    ours = fam.layer_map.get(hf_mod)
    if ours == "attn.qkv":
        return ours, None, "qkv"
    if ours is None or not ours.startswith(("attn.proj", "mlp.")):
        raise ValueError(f"AdaLoRA on {hf_mod} has no leantune equivalent")
    return ours, None, "projection" if ours == "attn.proj" else "mlp"


@torch.no_grad()
def import_peft(model: GPT, peft_dir: str | Path) -> AdaLoRAArgs:
    """Apply a PEFT AdaLoRA folder to `model` (unmerged) and return the args it amounts to. Triplets its rank
    pattern pruned, and layers of a target group it left out, get E = 0: the outputs equal PEFT's. The schedule
    (tinit, tfinal, total_step) is left to the run that continues training it."""
    peft_dir = Path(peft_dir)
    pcfg = _read_config(peft_dir)
    cfg = model.config
    fam = family_of(cfg)
    heads = {fam.head_module, fam.head_module_before_v5} - {None}
    layer_re = re.compile(rf"^{re.escape(_PREFIX + fam.layer_prefix)}\.(\d+)\.(.+)\.(lora_[AEB])(?:\.default)?$")
    head_re = re.compile(rf"^{re.escape(_PREFIX)}(\w+)\.(lora_[AEB])(?:\.default)?$")
    found: dict[tuple[int | None, str], dict[str, torch.Tensor]] = {}
    targets: set[str] = set()
    for key, t in peft_weights(peft_dir).items():
        if ".base_layer." in key:
            continue  # base weights PEFT saves beside a head adapter: the base checkpoint already holds them
        m, h = layer_re.match(key), head_re.match(key)
        if m and int(m.group(1)) >= cfg.n_layer:
            raise ValueError(f"{peft_dir}: {key} is for layer {m.group(1)}, but this base has {cfg.n_layer} layers; "
                             "pass the --checkpoint_dir the adapter was trained on")
        if m:
            layer, hf_mod, factor = int(m.group(1)), m.group(2), m.group(3)
        elif h and h.group(1) in heads:
            layer, hf_mod, factor = None, h.group(1), h.group(2)
        else:
            raise ValueError(f"{peft_dir}: tensor {key} has no leantune equivalent")
        target = _locate(model, hf_mod if layer is not None else None)[2]
        targets.update(("query", "key", "value") if target == "qkv" else (target,))
        found.setdefault((layer, hf_mod), {})[factor] = t
    if not found:
        raise ValueError(f"{peft_dir}: no AdaLoRA tensors found in the adapter")
    args = AdaLoRAArgs(init_r=int(pcfg["init_r"]), target_r=int(pcfg["target_r"]), alpha=float(pcfg["lora_alpha"]),
                       dropout=float(pcfg.get("lora_dropout") or 0.0), targets=[t for t in TARGETS if t in targets],
                       delta_t=int(pcfg.get("deltaT", 1)), beta1=float(pcfg.get("beta1", 0.85)),
                       beta2=float(pcfg.get("beta2", 0.85)), orth_reg_weight=float(pcfg.get("orth_reg_weight", 0.5)))
    apply_adalora(model, args)
    pattern = pcfg.get("rank_pattern") or {}
    r = args.init_r
    for (layer, hf_mod), t in found.items():
        if set(t) != {"lora_A", "lora_E", "lora_B"}:
            raise ValueError(f"{peft_dir}: {hf_mod} of layer {layer}: found only {sorted(t)}")
        path = f"{fam.layer_prefix}.{layer}.{hf_mod}" if layer is not None else hf_mod
        keep = torch.tensor(pattern.get(f"{path}.lora_E", [True] * r), dtype=torch.bool)
        ours, part, _ = _locate(model, hf_mod if layer is not None else None)
        mod: AdaLoRALinear = model.lm_head if layer is None else model.transformer.h[layer].get_submodule(ours)
        j = 0 if part is None else [s for s, _ in mod.parts].index(sum(cfg.qkv_sizes[:part]))
        width = mod.parts[j][1] - mod.parts[j][0]
        a, e, b = t["lora_A"], t["lora_E"], t["lora_B"]
        n = int(keep.sum())
        if keep.numel() != r or a.shape != (n, mod.in_features) or e.shape != (n, 1) or b.shape != (width, n):
            raise ValueError(f"{peft_dir}: {path}: shapes A {tuple(a.shape)}, E {tuple(e.shape)}, B {tuple(b.shape)} "
                             f"do not fit init_r={r}, {int(keep.sum())} kept, {mod.in_features} in, {width} out: the "
                             "adapter was trained on another model; pass the --checkpoint_dir it was trained on")
        if ours == "attn.qkv" and part is None and fam.qkv_layout == "grouped":
            b = grouped_to_blocked(b, cfg)
        A, E, B = _triplet(mod, j)
        A.zero_(), E.zero_(), B.zero_()
        A[keep], E[keep] = a.to(A.dtype), e.to(E.dtype)
        B[:, keep] = b.to(B.dtype)
    return args
