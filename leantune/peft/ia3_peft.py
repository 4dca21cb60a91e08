"""IA3 adapters in HF PEFT's format (`adapter_config.json` + `adapter_model.safetensors`, peft_type IA3), both ways.

PEFT keeps one `ia3_l` per HF module: (out, 1) for an output-scaled module, (1, in) for a `feedforward_modules` one
(input-scaled); so a folder's tensor shapes say which mode each module uses. Families whose HF qkv is split get one
vector per adapted projection (q/k/v). Families whose HF qkv is one fused module (GPT-NeoX, Falcon: rows grouped per
kv head; GPT-2: blocked) get one vector over all its rows: rows we leave unscaled (q by default) are written as ones
(equal outputs; peft would then train those rows too), and such a folder imports as query+key+value.
`target_modules` name in-block module paths (`mlp.down_proj`, `mlp.c_proj`) so peft's suffix match picks exactly the
adapted modules (GPT-2's bare `c_proj` would match both attention's and the MLP's).
T5 (one plain linear per PEFT module, `task_type: SEQ_2_SEQ_LM`) is handled by `ia3_peft_t5`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from leantune.checkpoint.hf import blocked_to_grouped, grouped_to_blocked
from leantune.checkpoint.peft_dir import CONFIG_FILE, peft_weights, read_peft_config, write_peft_dir
from leantune.models.decoder.families import family_of
from leantune.models.decoder.model import GPT
from leantune.models.kinds import is_seq2seq
from leantune.models.t5.model import T5
from leantune.peft.ia3_layers import TARGETS, IA3Args, IA3Linear, apply_ia3
from leantune.peft.ia3_peft_t5 import export_t5_peft, import_t5_peft

_PREFIX = "base_model.model."
_OURS = {"attn.proj": "projection", "mlp.proj": "mlp"}  # our whole-layer targets (qkv parts are handled apart)
# Fields of adapter_config.json whose non-default values we cannot represent.
_UNSUPPORTED = {"modules_to_save": None, "layers_to_transform": None, "target_parameters": None}


def export_peft(model: GPT | T5, out_dir: str | Path, base_model_name_or_path: str, args: Any = None,
                dtype: torch.dtype | None = None, kind: str | None = None) -> Path:
    """Write `model`'s (unmerged) IA3 vectors as a PEFT adapter folder that `PeftModel.from_pretrained` loads."""
    if is_seq2seq(model):
        return export_t5_peft(model, out_dir, base_model_name_or_path, dtype, kind)
    cfg = model.config
    fam = family_of(cfg)
    hf = fam.linear_modules()  # our block linear -> its HF module(s), q/k/v order for a split qkv
    q, k, _v = cfg.qkv_sizes
    part_index = {0: 0, q: 1, q + k: 2}
    tensors: dict[str, torch.Tensor] = {}
    targets: set[str] = set()
    feedforward: set[str] = set()
    for name, mod in model.named_modules():
        if not isinstance(mod, IA3Linear):
            continue
        if mod.merged:
            raise ValueError(f"{name}: IA3 is merged into the weights; export the unmerged adapter")
        m = re.fullmatch(r"transformer\.h\.(\d+)\.(.+)", name)
        if not m or m.group(2) not in hf:
            raise ValueError(f"IA3 on {name} has no PEFT-format equivalent")
        i, ours = m.group(1), m.group(2)
        vec = mod.ia3_l.detach().cpu()
        if ours == "attn.qkv" and fam.qkv_layout == "split":
            off = 0
            for s, e in mod.parts:  # one (width, 1) vector per adapted projection
                entries = [(hf[ours][part_index[s]], vec[off:off + e - s, None])]
                off += e - s
                _add(tensors, targets, fam.layer_prefix, i, entries)
            continue
        if ours == "attn.qkv":  # one vector over every row of the fused HF module, ones where we do not scale
            full = mod.scale().detach().cpu()
            vec = (blocked_to_grouped(full, cfg) if fam.qkv_layout == "grouped" else full)[:, None]  # (out, 1)
        elif mod.feedforward:
            vec = vec[None, :]  # (1, in)
            feedforward.add(hf[ours][0])
        else:
            vec = vec[:, None]  # (out, 1)
        _add(tensors, targets, fam.layer_prefix, i, [(hf[ours][0], vec)])
    if not tensors:
        raise ValueError("the model has no IA3 layers to export")
    if dtype is not None:
        tensors = {n: t.to(dtype) for n, t in tensors.items()}
    config = {
        "peft_type": "IA3",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "target_modules": sorted(targets),
        "feedforward_modules": sorted(feedforward),
        "fan_in_fan_out": fam.transposed_linears,  # GPT-2's Conv1D stores (in, out)
        "init_ia3_weights": True,
        "modules_to_save": None,
        "exclude_modules": None,
        "inference_mode": True,
        "revision": None,
    }
    return write_peft_dir(out_dir, config, tensors, kind)


def _add(tensors: dict, targets: set, prefix: str, layer: str, entries: list[tuple[str, torch.Tensor]]) -> None:
    for hf_mod, t in entries:
        tensors[f"{_PREFIX}{prefix}.{layer}.{hf_mod}.ia3_l"] = t.contiguous().clone()
        targets.add(hf_mod)


def _read_config(peft_dir: Path) -> dict[str, Any]:
    path = peft_dir / CONFIG_FILE
    cfg = read_peft_config(peft_dir)
    if cfg.get("peft_type") != "IA3":
        raise ValueError(f"{path}: peft_type {cfg.get('peft_type')!r} is not IA3")
    bad = [f"{k}={cfg[k]!r}" for k, ok in _UNSUPPORTED.items() if cfg.get(k) not in (ok, [], {})]
    if bad:
        raise ValueError(f"{path}: unsupported IA3 options {', '.join(bad)} (supported: IA3 vectors only, no "
                         "modules_to_save)")
    return cfg


@torch.no_grad()
def import_peft(model: GPT | T5, peft_dir: str | Path) -> IA3Args:
    """Apply a PEFT IA3 folder to `model` (unmerged) and return the IA3Args it amounts to.

    Modules a target group leaves out in some layers keep vectors of ones there (the identity), so the outputs equal
    peft's exactly.
    """
    peft_dir = Path(peft_dir)
    _read_config(peft_dir)
    if is_seq2seq(model):
        return import_t5_peft(model, peft_dir)
    cfg = model.config
    fam = family_of(cfg)
    split_qkv = fam.linear_modules()["attn.qkv"] if fam.qkv_layout == "split" else ()  # q, k, v HF modules
    fused_qkv = None if split_qkv else fam.linear_modules()["attn.qkv"][0]
    key_re = re.compile(rf"^{re.escape(_PREFIX + fam.layer_prefix)}\.(\d+)\.(.+)\.ia3_l(?:\.default)?$")
    found: dict[tuple[int, str, int | None], torch.Tensor] = {}  # (layer, our module, q/k/v part) -> vector
    targets: set[str] = set()
    modes: dict[str, set[bool]] = {}  # target -> feedforward modes seen
    for key, t in peft_weights(peft_dir).items():
        m = key_re.match(key)
        if not m:
            raise ValueError(f"{peft_dir}: tensor {key} has no leantune equivalent (leantune's IA3 adapts the "
                             f"attention and MLP output projections and q/k/v: {', '.join(TARGETS)})")
        i, hf_mod = int(m.group(1)), m.group(2)
        if i >= cfg.n_layer:
            raise ValueError(f"{peft_dir}: {key} is for layer {i}, but this base has {cfg.n_layer} layers; pass the "
                             "--checkpoint_dir the adapter was trained on")
        if t.dim() != 2 or 1 not in t.shape:
            raise ValueError(f"{peft_dir}: {key} has shape {tuple(t.shape)}; IA3 vectors are (out, 1) or (1, in)")
        feedforward = t.shape[0] == 1 and t.shape[1] != 1  # (1, in): peft's feedforward (input-scaled) module
        vec = t.flatten()
        if hf_mod in split_qkv or hf_mod == fused_qkv:
            if feedforward:
                raise ValueError(f"{peft_dir}: {hf_mod} is a feedforward module (its input scaled); leantune's fused "
                                 "qkv layer shares one input between q, k and v, so only their outputs can be scaled")
            part = split_qkv.index(hf_mod) if split_qkv else None
            targets.update(("query", "key", "value") if part is None else (("query", "key", "value")[part],))
            found[(i, "attn.qkv", part)] = vec
            continue
        ours = fam.layer_map.get(hf_mod)
        if ours not in _OURS:
            raise ValueError(f"{peft_dir}: IA3 on {hf_mod} has no leantune target (leantune's IA3 adapts q/k/v, the "
                             "attention output projection and the MLP's down projection)")
        targets.add(_OURS[ours])
        modes.setdefault(_OURS[ours], set()).add(feedforward)
        found[(i, ours, None)] = vec
    if not found:
        raise ValueError(f"{peft_dir}: no IA3 tensors found in the adapter")
    mixed = sorted(t for t, s in modes.items() if len(s) > 1)
    if mixed:
        raise ValueError(f"{peft_dir}: {mixed} scale their input in some layers and their output in others; leantune "
                         "uses one mode per target")
    args = IA3Args(targets=[t for t in TARGETS if t in targets], feedforward=[t for t, s in modes.items() if True in s])
    apply_ia3(model, args)
    for (i, ours, part), vec in found.items():
        mod = model.transformer.h[i].get_submodule(ours)
        if ours == "attn.qkv" and part is None:  # the fused module's rows, reordered to our [Q; K; V]
            width, off = mod.out_features, 0
            if vec.numel() == width and fam.qkv_layout == "grouped":
                vec = grouped_to_blocked(vec, cfg)
        elif ours == "attn.qkv":
            start = sum(cfg.qkv_sizes[:part])
            j = [s for s, _ in mod.parts].index(start)
            width, off = cfg.qkv_sizes[part], sum(e - s for s, e in mod.parts[:j])
        else:
            width, off = mod.ia3_l.numel(), 0
        if vec.numel() != width:
            raise ValueError(f"{peft_dir}: layer {i} {ours}: an IA3 vector of {vec.numel()} entries does not fit this "
                             f"base's {width}: the adapter was trained on another model; pass the --checkpoint_dir it "
                             "was trained on")
        mod.ia3_l[off:off + width] = vec.to(mod.ia3_l.dtype)
    return args
