"""HF PEFT adapter folders (`adapter_config.json` + `adapter_model.safetensors`), both ways: one translator for every
method and model kind, driven by per-method records.

The model kind says where each module PEFT can adapt lives (`ModelKind.peft`: `PeftSite`s naming the HF module and
ours, the q/k/v rows a split projection covers, the row order of a fused one). A method's `PeftRecord` says what PEFT
stores per module (LoRA's lora_A/lora_B, IA3's ia3_l, AdaLoRA's lora_A/lora_E/lora_B, LoHa's hada_w*, LoKr's
lokr_w*) and which config fields it writes and reads. The translator does the rest once: the `base_model.model.`
prefix, the one unsupported-field check, `target_modules`, locating a module by its HF name, the safetensors file.
A fused HF qkv over which leantune keeps separate q/k/v updates is written exactly where the method can (`part` is
None: LoRA as one block-diagonal LoRA, IA3 with ones on rows it leaves alone, LoHa block-diagonal) and refused
otherwise. Prompt, P- and prefix tuning hold one tensor, `prompt_embeddings`, and share the config handling.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from leantune.checkpoint.peft_dir import CONFIG_FILE, peft_weights, read_peft_config, write_peft_dir
from leantune.models.kinds import PeftLayout, PeftSite, kind_of
from leantune.models.quantize import dequantize_weight
from leantune.peft.adalora_layers import AdaLoRAArgs, AdaLoRALinear, adalora_layers, apply_adalora
from leantune.peft.base import PeftFormat
from leantune.peft.ia3_layers import TARGETS as IA3_TARGETS
from leantune.peft.ia3_layers import IA3Args, apply_ia3, ia3_layers
from leantune.peft.lora_dora import squared_row_norms
from leantune.peft.lora_layers import TARGETS, DoRAArgs, LoRAArgs, apply_lora, lora_layers
from leantune.peft.lycoris import layers_of
from leantune.peft.virtual import PrefixKV, PromptEmbeddings

PREFIX = "base_model.model."
MAGNITUDE = "lora_magnitude_vector"  # PEFT's DoRA key: saved without ".weight"
PROMPT = "prompt_embeddings"
Tensors = dict[str, torch.Tensor]
_ABSENT = object()


@dataclass
class Entry:
    """One HF module of an export: its site, our layer, the part (None: all its parts), the tensors PEFT keeps."""

    site: PeftSite
    layer: nn.Module
    part: int | None
    tensors: Tensors
    rank: int | None  # a rank other than the config's (a fused module's parts * r), else None


@dataclass(frozen=True)
class PeftRecord:
    """What the translator needs to know about one method's PEFT layout."""

    peft_type: str
    flag: str  # the method's CLI group, for messages
    tensor_names: tuple[str, ...]  # PEFT's tensors per module (keys may add `.weight` / `.default`)
    layers: Callable[[nn.Module], list[nn.Module]]  # the adapted layers of a model
    apply: Callable[[nn.Module, Any], Any]
    export_site: Callable[[nn.Module, int | None, PeftSite, Any], tuple[Tensors, int | None]]
    """(layer, part index or None for all its parts on one fused HF module, site, args) -> (tensors, rank)."""
    import_site: Callable[[nn.Module, int | None, Tensors, PeftSite, str, dict], None]
    """(layer, part, the folder's tensors, site, where (for messages), adapter_config) copies them in."""
    config_fields: Callable[[Any, list[Entry]], dict[str, Any]]  # the method's own adapter_config.json fields
    args_from_config: Callable[[dict, list[str], list[tuple[PeftSite, Tensors]], Path], Any]
    """(adapter_config, targets, the folder's tensors per site, folder) -> the method's args."""
    unsupported: Mapping[str, tuple]  # fields whose other values leantune cannot represent -> the values it can
    uniform_rank: tuple[str, str] | None = None  # (rank, alpha) fields rank_pattern/alpha_pattern must agree with
    mode: Callable[[nn.Module], bool] | None = None  # IA3: the layer scales its input (feedforward_modules)
    conv1d: bool = True  # PEFT wraps transformers' Conv1D (and the config says fan_in_fan_out)

    def export(self, model: nn.Module, out_dir: str | Path, base_model_name_or_path: str, args: Any = None,
               dtype: torch.dtype | None = None, kind: str | None = None) -> Path:
        return export_peft(self, model, out_dir, base_model_name_or_path, args, dtype, kind)

    def load(self, model: nn.Module, peft_dir: str | Path) -> Any:
        return import_peft(self, model, peft_dir)

    @property
    def format(self) -> PeftFormat:
        return PeftFormat(peft_type=self.peft_type, export=self.export, load=self.load)


# ---- the translator ------------------------------------------------------------------------------------------------
def layout_of(model: nn.Module, what: str = "an adapter") -> PeftLayout:
    """The model kind's PEFT layout; a kind PEFT has none for is refused naming the method and the kind."""
    kind = kind_of(model)
    if kind.peft is None:
        raise ValueError(f"PEFT has no layout for {what} on {kind.name} models; keep the leantune adapter")
    return kind.peft


def _parts(layer: nn.Module) -> list[tuple[int, int]]:
    return getattr(layer, "parts", None) or [(0, layer.out_features)]


def _part(layer: nn.Module, site: PeftSite) -> int | None | object:
    """The index of the part of `layer` the site is; None: the site is the whole layer and the layer adapts several
    (or some) parts of it; _ABSENT: the layer does not adapt the site's rows."""
    parts = _parts(layer)
    if site.rows is not None:
        return parts.index(site.rows) if site.rows in parts else _ABSENT
    return 0 if parts == [(0, layer.out_features)] else None


def peft_modules(model: nn.Module, record: PeftRecord) -> list[tuple[PeftSite, nn.Module, int | None]]:
    """(site, our layer, part) for each HF module the record's adapted layers amount to."""
    chosen = {id(m) for m in record.layers(model)}
    by_ours: dict[str, dict] = {}
    for s in layout_of(model, record.peft_type).sites(model):
        by_ours.setdefault(s.ours, {}).setdefault(s.rows, s)  # the first name wins (the head's current one)
    out = []
    for name, layer in model.named_modules():
        if id(layer) not in chosen:
            continue
        if name not in by_ours:
            raise ValueError(f"{record.peft_type} on {name} has no PEFT-format equivalent")
        out += [(s, layer, p) for s in by_ours[name].values() if (p := _part(layer, s)) is not _ABSENT]
    return out


def target_modules(modes: dict[str, Any], every: list[str]) -> dict[str, str]:
    """PEFT's `target_modules` entry per adapted HF module: the shortest path suffix that selects only adapted modules
    of the same mode (PEFT matches suffixes, so GPT-2's attention-only c_proj is `attn.c_proj`, not `c_proj`)."""
    out = {}
    for path, mode in modes.items():
        parts = path.split(".")
        for n in range(1, len(parts) + 1):
            s = ".".join(parts[-n:])
            if all(modes.get(q, _ABSENT) == mode for q in every if q == s or q.endswith("." + s)):
                out[path] = s
                break
    return out


@torch.no_grad()
def export_peft(record: PeftRecord, model: nn.Module, out_dir: str | Path, base_model_name_or_path: str,
                args: Any = None, dtype: torch.dtype | None = None, kind: str | None = None) -> Path:
    """Write `model`'s (unmerged) adapter as a PEFT folder that `PeftModel.from_pretrained` loads with equal outputs."""
    layout = layout_of(model, record.peft_type)
    fan_in_fan_out = layout.fan_in_fan_out(model.config)
    if fan_in_fan_out and not record.conv1d:
        raise ValueError(f"this model stores its linears as transformers Conv1D, which PEFT's {record.peft_type} does "
                         "not support; keep the leantune adapter or merge it (`leantune merge`)")
    entries = []
    for site, layer, part in peft_modules(model, record):
        if layer.merged:
            raise ValueError(f"{site.ours}: the adapter is merged into the weights; export the unmerged adapter")
        entries.append(Entry(site, layer, part, *record.export_site(layer, part, site, args)))
    if not entries:
        raise ValueError(f"the model has no {record.peft_type} layers to export")
    fields = record.config_fields(args, entries)  # may prune the entries' tensors (AdaLoRA's rank pattern)
    modes = {e.site.hf: record.mode(e.layer) if record.mode else None for e in entries}
    names = target_modules(modes, [s.hf for s in layout.sites(model)])
    config = {"peft_type": record.peft_type, "task_type": layout.task_type,
              "base_model_name_or_path": base_model_name_or_path, "target_modules": sorted(set(names.values()))}
    if record.mode:
        config["feedforward_modules"] = sorted({names[h] for h, m in modes.items() if m})
    if record.conv1d:
        config["fan_in_fan_out"] = fan_in_fan_out
    config.update(fields, modules_to_save=None, inference_mode=True, revision=None)
    tensors = {f"{PREFIX}{e.site.hf}.{n}": _out(t, dtype) for e in entries for n, t in e.tensors.items()}
    return write_peft_dir(out_dir, config, tensors, kind)


def _out(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    t = t.detach().cpu()
    return (t.to(dtype) if dtype is not None else t).contiguous().clone()


def read_config(peft_dir: Path, peft_type: str, unsupported: Mapping[str, tuple],
                uniform_rank: tuple[str, str] | None = None) -> dict[str, Any]:
    """adapter_config.json, refused in one line when it is another method's or asks for what leantune lacks."""
    path = Path(peft_dir) / CONFIG_FILE
    cfg = read_peft_config(peft_dir)
    if cfg.get("peft_type", "LORA") != peft_type:
        raise ValueError(f"{path}: peft_type {cfg.get('peft_type')!r} is not {peft_type}")
    bad = [f"{k}={cfg[k]!r}" for k, ok in unsupported.items() if cfg.get(k) not in (*ok, None, [], {})]
    if bad:
        raise ValueError(f"{path}: unsupported {peft_type} options {', '.join(bad)}: leantune cannot represent them")
    for key, field in zip(("rank_pattern", "alpha_pattern"), uniform_rank or ()):
        differing = {k: v for k, v in (cfg.get(key) or {}).items() if v != cfg.get(field)}
        if differing:
            raise ValueError(f"{path}: per-module {key} {differing} differs from the global value {cfg.get(field)}; "
                             f"leantune's {peft_type} uses one rank and alpha for every layer")
    return cfg


def _folder_tensors(record: PeftRecord, model: nn.Module, peft_dir: Path, sites: dict[str, PeftSite]) -> dict:
    """The folder's tensors per HF module; a tensor of another method or of a module this base lacks is refused."""
    names = "|".join(map(re.escape, record.tensor_names))
    key_re = re.compile(rf"^{re.escape(PREFIX)}(.+)\.({names})(?:\.default)?(?:\.weight)?$")
    found: dict[str, Tensors] = {}
    for key, t in peft_weights(peft_dir).items():
        if ".base_layer." in key:
            continue  # base weights PEFT saves beside a head adapter: the base checkpoint already holds them
        m = key_re.match(key)
        if not m:
            raise ValueError(f"{peft_dir}: tensor {key} has no leantune equivalent")
        if m.group(1) not in sites:
            kind = kind_of(model)
            raise ValueError(f"{peft_dir}: {key}: this base ({kind.name}, {len(kind.blocks(model))} blocks) has no "
                             f"linear {m.group(1)}; pass the --checkpoint_dir the adapter was trained on")
        found.setdefault(m.group(1), {})[m.group(2)] = t
    if not found:
        raise ValueError(f"{peft_dir}: no {record.peft_type} tensors found in the adapter")
    return found


@torch.no_grad()
def import_peft(record: PeftRecord, model: nn.Module, peft_dir: str | Path) -> Any:
    """Apply a PEFT folder to `model` (unmerged) and return the method args it amounts to. Modules a target group
    leaves out keep the method's identity init (zero update, unit vectors), so the outputs equal PEFT's."""
    peft_dir = Path(peft_dir)
    pcfg = read_config(peft_dir, record.peft_type, record.unsupported, record.uniform_rank)
    sites = {s.hf: s for s in layout_of(model, record.peft_type).sites(model)}
    found = _folder_tensors(record, model, peft_dir, sites)
    targets = [t for t in TARGETS if any(t in sites[h].targets for h in found)]
    args = record.args_from_config(pcfg, targets, [(sites[h], t) for h, t in found.items()], peft_dir)
    record.apply(model, args)
    chosen = {id(m) for m in record.layers(model)}
    for hf, tensors in found.items():
        site, where = sites[hf], f"{peft_dir}: {hf}"
        layer = model.get_submodule(site.ours)
        part = _part(layer, site) if id(layer) in chosen else _ABSENT
        if part is _ABSENT:
            raise ValueError(f"{where}: {record.peft_type} here has no leantune target (--{record.flag}.targets "
                             f"adapts {', '.join(args.targets)} as leantune defines them)")
        record.import_site(layer, part, tensors, site, where, pcfg)
    return args


# ---- helpers the records share ------------------------------------------------------------------------------------
def expect(t: torch.Tensor, shape: tuple[int, ...], where: str, name: str) -> torch.Tensor:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{where}: {name} has shape {tuple(t.shape)}, this base needs {tuple(shape)}: the adapter was "
                         "trained on another model; pass the --checkpoint_dir it was trained on")
    return t


def put(dest: torch.Tensor, src: torch.Tensor, where: str, name: str) -> None:
    """Copy a folder's tensor into ours (a parameter or a view of one) once its shape is checked."""
    dest.copy_(expect(src, dest.shape, where, name).to(dest.dtype))


def rows_of(layer: nn.Module, j: int) -> slice:
    """Part j's rows in a layer's per-part concatenation (LoRA's B, a DoRA magnitude, IA3's vector)."""
    parts = _parts(layer)
    off = sum(e - s for s, e in parts[:j])
    return slice(off, off + parts[j][1] - parts[j][0])


def gather(t: torch.Tensor, parts: list[tuple[int, int]]) -> torch.Tensor:
    """A whole layer's rows -> the concatenation of the parts' rows."""
    return torch.cat([t[s:e] for s, e in parts])


def _hf_rows(site: PeftSite, t: torch.Tensor) -> torch.Tensor:
    """Our rows of a tensor over the site's whole HF module -> the HF order (a split q/k/v's: as they are)."""
    return site.to_hf(t) if site.rows is None else t


def _hf_from(site: PeftSite, t: torch.Tensor) -> torch.Tensor:
    return site.from_hf(t) if site.rows is None else t


def _patterns(entries: list[Entry], alpha_of: Callable[[int], float]) -> dict[str, dict]:
    """rank_pattern / alpha_pattern for modules whose rank is not the config's (fused q/k/v), keyed by module name."""
    pattern: dict[str, dict] = {"rank_pattern": {}, "alpha_pattern": {}}
    for e in entries:
        if e.rank is not None:
            leaf = e.site.hf.rsplit(".", 1)[-1]
            pattern["rank_pattern"][leaf], pattern["alpha_pattern"][leaf] = e.rank, alpha_of(e.rank)
    return pattern


_LAYERS_DEFAULTS = {"layers_to_transform": None, "layers_pattern": None}
_LORA_UNSUPPORTED = {"bias": ("none",), "modules_to_save": (), "layer_replication": (), "target_parameters": (),
                     "trainable_token_indices": ()}


# ---- LoRA and DoRA (lora, qlora, dora) ----------------------------------------------------------------------------
def _lora_export(layer, part, site, args) -> tuple[Tensors, int | None]:
    if layer.r != args.r or not math.isclose(layer.scaling, args.scaling, rel_tol=1e-6):
        raise ValueError(f"{site.ours}: rank {layer.r} / scaling {layer.scaling} differ from the adapter's args")
    factors, r = layer.part_factors(), layer.r
    if part is not None:
        _, a, b = factors[part]
    else:  # our parts on one fused HF module: one LoRA of rank parts * r, the A stacked, B block-diagonal
        a, b = layer.lora_A, layer.lora_B.new_zeros(layer.out_features, len(factors) * r)
        for j, ((s, e), _, bj) in enumerate(factors):
            b[s:e, j * r:(j + 1) * r] = bj
    out = {"lora_A.weight": a, "lora_B.weight": _hf_rows(site, b)}
    if layer.lora_magnitude is not None:
        out[MAGNITUDE] = _hf_rows(site, _magnitude(layer, part))
    return out, None if part is not None else len(factors) * r


def _magnitude(layer, part: int | None) -> torch.Tensor:
    """DoRA's magnitude over part `part`, or over every row of the layer with ||W_r|| on rows we do not adapt (PEFT's
    m / ||W_r + 0|| is then 1 there, as our pass-through)."""
    m = layer.lora_magnitude.detach()
    if part is not None:
        return m[rows_of(layer, part)]
    w = dequantize_weight(layer.weight) if layer.quantized else layer.weight
    full = squared_row_norms(w.detach()).sqrt().to(m.dtype)  # (out,)
    for j, (s, e) in enumerate(layer.parts):
        full[s:e] = m[rows_of(layer, j)]
    return full


def _lora_import(layer, part, t: Tensors, site, where, pcfg) -> None:
    dora = layer.lora_magnitude is not None
    want = {"lora_A", "lora_B"} | ({MAGNITUDE} if dora else set())
    if set(t) != want:
        what = f"use_dora is {str(dora).lower()} but " if (set(t) ^ want) & {MAGNITUDE} else ""
        raise ValueError(f"{where}: {what}found {sorted(t)}, expected {sorted(want)}")
    a, b, m = t["lora_A"], t["lora_B"], t.get(MAGNITUDE)
    if part is None:  # one LoRA over a fused HF module: each of our parts takes the same A and its rows of B
        n, out = len(layer.parts), layer.out_features
        put(layer.lora_A, expect(a, (layer.r, layer.in_features), where, "lora_A").repeat(n, 1), where, "lora_A")
        put(layer.lora_B, gather(site.from_hf(expect(b, (out, layer.r), where, "lora_B")), layer.parts), where, "lora_B")
        if dora:
            m = gather(site.from_hf(expect(m, (out,), where, MAGNITUDE)), layer.parts)
            put(layer.lora_magnitude, m, where, MAGNITUDE)
        return
    _, A, B = layer.part_factors()[part]
    put(A, a, where, "lora_A")
    put(B, _hf_from(site, expect(b, B.shape, where, "lora_B")), where, "lora_B")
    if dora:
        M = layer.lora_magnitude[rows_of(layer, part)]
        put(M, _hf_from(site, expect(m, M.shape, where, MAGNITUDE)), where, MAGNITUDE)


def _lora_fields(args, entries: list[Entry]) -> dict[str, Any]:
    dora = {e.layer.lora_magnitude is not None for e in entries}
    if len(dora) > 1:
        raise ValueError("cannot export a mix of LoRA and DoRA layers as one PEFT adapter")
    return {"r": int(args.r), "lora_alpha": float(args.alpha), "lora_dropout": float(args.dropout),
            "use_rslora": bool(args.rslora),
            **_patterns(entries, lambda rank: args.scaling * (math.sqrt(rank) if args.rslora else rank)),
            "bias": "none", "use_dora": dora.pop(), "init_lora_weights": True, **_LAYERS_DEFAULTS}


def _lora_args(pcfg, targets, found, peft_dir) -> LoRAArgs:
    """LoRAArgs, or DoRAArgs for a folder with use_dora (the record `methods` resumes it as)."""
    cls = DoRAArgs if pcfg.get("use_dora") else LoRAArgs
    return cls(r=int(pcfg["r"]), alpha=float(pcfg["lora_alpha"]), dropout=float(pcfg.get("lora_dropout") or 0.0),
               rslora=bool(pcfg.get("use_rslora")), targets=targets)


LORA = PeftRecord(
    peft_type="LORA", flag="lora", tensor_names=("lora_A", "lora_B", MAGNITUDE), layers=lora_layers,
    apply=lambda model, args: apply_lora(model, args, dora=isinstance(args, DoRAArgs)),
    export_site=_lora_export, import_site=_lora_import, config_fields=_lora_fields, args_from_config=_lora_args,
    unsupported={**_LORA_UNSUPPORTED, "lora_bias": (False,), "use_qalora": (False,), "alora_invocation_tokens": ()},
    uniform_rank=("r", "lora_alpha"))


# ---- IA3 ------------------------------------------------------------------------------------------------------------
def _ia3_export(layer, part, site, args) -> tuple[Tensors, None]:
    """(1, in) for a layer that scales its input (feedforward), else (out, 1): the whole module's rows, with ones on
    rows of a fused HF module we leave alone (equal outputs; peft would then train those rows too)."""
    if layer.feedforward:
        return {"ia3_l": layer.ia3_l[None, :]}, None
    v = layer.scale() if part is None else layer.ia3_l[rows_of(layer, part)]
    return {"ia3_l": _hf_rows(site, v)[:, None]}, None


def _ia3_import(layer, part, t: Tensors, site, where, pcfg) -> None:
    v = t["ia3_l"].flatten()
    if layer.feedforward:
        return put(layer.ia3_l, v, where, "ia3_l")
    if site.rows is None:
        v = site.from_hf(expect(v, (layer.out_features,), where, "ia3_l"))  # the whole module's rows
    if part is None:
        return put(layer.ia3_l, gather(v, layer.parts), where, "ia3_l")
    put(layer.ia3_l[rows_of(layer, part)], v, where, "ia3_l")


def _ia3_args(pcfg, targets, found, peft_dir) -> IA3Args:
    """The targets and, from each vector's shape, which scale their input: (1, in) is peft's feedforward module."""
    modes: dict[str, set[bool]] = {}
    for site, t in found:
        v = t["ia3_l"]
        if v.dim() != 2 or 1 not in v.shape:
            raise ValueError(f"{peft_dir}: {site.hf}.ia3_l has shape {tuple(v.shape)}; IA3 vectors are (out, 1) or "
                             "(1, in)")
        feedforward = v.shape[0] == 1 and v.shape[1] != 1
        if feedforward and set(site.targets) & {"query", "key", "value"}:
            raise ValueError(f"{peft_dir}: {site.hf} is a feedforward module (its input scaled); leantune's IA3 scales "
                             "the outputs of q, k and v (a fused qkv layer shares one input between them)")
        for target in site.targets:
            modes.setdefault(target, set()).add(feedforward)
    mixed = sorted(t for t, s in modes.items() if len(s) > 1)
    if mixed:
        raise ValueError(f"{peft_dir}: {mixed} scale their input in some layers and their output in others; leantune "
                         "uses one mode per target")
    chosen = [t for t in IA3_TARGETS if t in modes]
    if not chosen:
        raise ValueError(f"{peft_dir}: IA3 on {', '.join(sorted(modes))} has no leantune target (leantune's IA3 "
                         f"adapts {', '.join(IA3_TARGETS)})")
    return IA3Args(targets=chosen, feedforward=[t for t in chosen if True in modes[t]])


IA3 = PeftRecord(
    peft_type="IA3", flag="ia3", tensor_names=("ia3_l",), layers=ia3_layers, apply=apply_ia3,
    export_site=_ia3_export, import_site=_ia3_import, args_from_config=_ia3_args,
    config_fields=lambda args, entries: {"init_ia3_weights": True, "exclude_modules": None},
    unsupported={"modules_to_save": (), "layers_to_transform": (), "target_parameters": ()},
    mode=lambda layer: layer.feedforward)


# ---- AdaLoRA --------------------------------------------------------------------------------------------------------
def adalora_triplet(layer: AdaLoRALinear, j: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Part j's A (r, in), E (r, 1), B (width, r): views that may be written in place."""
    r = layer.r
    return layer.lora_A[j * r:(j + 1) * r], layer.lora_E[j * r:(j + 1) * r], layer.part_B()[j]


def _adalora_export(layer, part, site, args) -> tuple[Tensors, None]:
    if part is None:
        raise ValueError(f"{site.hf}: this model fuses q/k/v into one HF layer, which PEFT adapts as a whole: an "
                         "AdaLoRA on only part of it has no PEFT equivalent (train with --adalora.targets "
                         "query,key,value to export)")
    a, e, b = adalora_triplet(layer, part)
    return {"lora_A": a, "lora_E": e, "lora_B": _hf_rows(site, b)}, None


def _adalora_fields(args, entries: list[Entry]) -> dict[str, Any]:
    """PEFT saves only the triplets its rank pattern keeps (module -> init_r booleans); ours keeps all with the
    pruned ones' E at zero, so the pattern is E != 0 (an untrained adapter, all E zero, has none)."""
    keeps = [(e.tensors["lora_E"] != 0).view(-1) for e in entries]
    rank_pattern = {}
    if any(not k.all() for k in keeps) and any(k.any() for k in keeps):
        for e, keep in zip(entries, keeps):
            rank_pattern[f"{e.site.hf}.lora_E"] = keep.tolist()
            t = e.tensors
            t.update(lora_A=t["lora_A"][keep], lora_E=t["lora_E"][keep], lora_B=t["lora_B"][:, keep])
    tinit, tfinal = args.tinit or 0, args.tfinal or 0
    return {
        "r": 8,  # LoraConfig's default: AdaLoRA ignores it and warns about any other value
        "init_r": int(args.init_r), "target_r": int(args.target_r), "lora_alpha": float(args.alpha),
        "lora_dropout": float(args.dropout),
        # the schedule only matters for training; PEFT insists on a valid one (total_step > tinit + tfinal)
        "tinit": tinit, "tfinal": tfinal, "deltaT": int(args.delta_t),
        "total_step": int(args.total_step or tinit + tfinal + 1),
        "beta1": float(args.beta1), "beta2": float(args.beta2), "orth_reg_weight": float(args.orth_reg_weight),
        "rank_pattern": rank_pattern or None, "bias": "none", "use_dora": False, "use_rslora": False,
        "init_lora_weights": True, **_LAYERS_DEFAULTS}


def _adalora_import(layer, part, t: Tensors, site, where, pcfg) -> None:
    """Kept triplets back at their positions; pruned ones (and modules the folder leaves out) get E = 0."""
    if set(t) != {"lora_A", "lora_E", "lora_B"}:
        raise ValueError(f"{where}: found only {sorted(t)}")
    r = layer.r
    keep = torch.tensor((pcfg.get("rank_pattern") or {}).get(f"{site.hf}.lora_E", [True] * r), dtype=torch.bool)
    if keep.numel() != r:
        raise ValueError(f"{where}: rank_pattern has {keep.numel()} entries, init_r is {r}")
    A, E, B = adalora_triplet(layer, part)
    n = int(keep.sum())
    a = expect(t["lora_A"], (n, layer.in_features), where, "lora_A")
    e = expect(t["lora_E"], (n, 1), where, "lora_E")
    b = _hf_from(site, expect(t["lora_B"], (B.shape[0], n), where, "lora_B"))
    A.zero_(), E.zero_(), B.zero_()
    A[keep], E[keep] = a.to(A.dtype), e.to(E.dtype)
    B[:, keep] = b.to(B.dtype)


def _adalora_args(pcfg, targets, found, peft_dir) -> AdaLoRAArgs:
    """The args; the schedule (tinit, tfinal, total_step) is left to the run that continues training it."""
    return AdaLoRAArgs(init_r=int(pcfg["init_r"]), target_r=int(pcfg["target_r"]), alpha=float(pcfg["lora_alpha"]),
                       dropout=float(pcfg.get("lora_dropout") or 0.0), targets=targets,
                       delta_t=int(pcfg.get("deltaT", 1)), beta1=float(pcfg.get("beta1", 0.85)),
                       beta2=float(pcfg.get("beta2", 0.85)), orth_reg_weight=float(pcfg.get("orth_reg_weight", 0.5)))


ADALORA = PeftRecord(
    peft_type="ADALORA", flag="adalora", tensor_names=("lora_A", "lora_E", "lora_B"), layers=adalora_layers,
    apply=apply_adalora, export_site=_adalora_export, import_site=_adalora_import, config_fields=_adalora_fields,
    args_from_config=_adalora_args, unsupported={**_LORA_UNSUPPORTED, "use_dora": (False,)})


# ---- LoHa and LoKr --------------------------------------------------------------------------------------------------
def copy_factors(factors: nn.Module, tensors: Tensors, where: str) -> None:
    """Copy PEFT's tensors into one factor module, after checking that names and shapes agree exactly."""
    params = dict(factors.named_parameters())
    if set(tensors) != set(params) or any(tensors[n].shape != p.shape for n, p in params.items()):
        have = {n: tuple(t.shape) for n, t in tensors.items()}
        want = {n: tuple(p.shape) for n, p in params.items()}
        raise ValueError(f"{where}: adapter tensors {have} do not fit this base and config ({want}): the adapter was "
                         "trained on another model; pass the --checkpoint_dir it was trained on")
    for n, p in params.items():
        p.copy_(tensors[n].to(p.dtype))


def lycoris_record(peft_type: str, flag: str, factor_type: type, tensor_names: tuple[str, ...],
                   apply: Callable[[nn.Module, Any], Any], config_fields: Callable[[Any], dict[str, Any]],
                   args_from_config: Callable[[dict[str, Any], list[str]], Any],
                   fuse: Callable[[nn.Module, PeftSite], tuple[Tensors, int]] | None = None,
                   split: Callable[[nn.Module, Tensors, PeftSite, str], None] | None = None) -> PeftRecord:
    """A LyCORIS method's record: PEFT's factor names per part; `fuse` writes our q/k/v parts as one adapter over a
    fused HF qkv exactly, `split` reads one back (None: no exact map, refused)."""

    def export_site(layer, part, site, args) -> tuple[Tensors, int | None]:
        fields = config_fields(args)
        if not math.isclose(layer.scaling, fields["alpha"] / fields["r"], rel_tol=1e-6):
            raise ValueError(f"{site.ours}: scaling {layer.scaling} differs from the adapter's args")
        if part is not None:
            f = layer.factors[part]
            return {n: getattr(f, n) for n in tensor_names if isinstance(getattr(f, n, None), nn.Parameter)}, None
        if fuse is None:
            raise ValueError(f"{site.hf}: this model fuses q/k/v into one layer, and PEFT's {peft_type} over it cannot "
                             f"express separate query/key/value factors exactly; export without query/key/value in "
                             f"--{flag}.targets (or merge the adapter instead)")
        return fuse(layer, site)

    def import_site(layer, part, tensors, site, where, pcfg) -> None:
        if part is not None:
            return copy_factors(layer.factors[part], tensors, where)
        if split is None:
            raise ValueError(f"{where} has no exact leantune equivalent: {peft_type} over a fused q/k/v (leantune "
                             "keeps separate query/key/value factors)")
        split(layer, tensors, site, where)

    def fields(args, entries: list[Entry]) -> dict[str, Any]:
        f = config_fields(args)
        return {**f, **_patterns(entries, lambda rank: f["alpha"] / f["r"] * rank), "init_weights": True,
                "use_effective_conv2d": False, "exclude_modules": None, **_LAYERS_DEFAULTS}

    return PeftRecord(
        peft_type=peft_type, flag=flag, tensor_names=tensor_names, layers=lambda model: layers_of(model, factor_type),
        apply=apply, export_site=export_site, import_site=import_site, config_fields=fields,
        args_from_config=lambda pcfg, targets, found, peft_dir: args_from_config(pcfg, targets),
        unsupported={"modules_to_save": (), "use_effective_conv2d": (False,), "layer_replication": (),
                     "target_parameters": (), "trainable_token_indices": ()},
        uniform_rank=("r", "alpha"), conv1d=False)


# ---- prompt tuning, P-tuning, prefix tuning ------------------------------------------------------------------------
# PEFT saves one tensor: the virtual embeddings (P, width) for prompt and P-tuning (the prompt encoder's output: the
# encoder is not saved), the flat prefix (P, n_layer * 2 * kv width) for prefix tuning (the projection's output). It
# uses that tensor as is when a folder says `inference_mode`, so these folders always do. A seq2seq table has rows for
# the encoder and the decoder (2P); PEFT reads the encoder's P only.
def _virtual_write(model, out_dir, peft_type: str, base: str, tensor: torch.Tensor, fields: dict, dtype, kind) -> Path:
    layout = layout_of(model)
    prompt = layout.prompt_fields(model.config)
    config = {"peft_type": peft_type, "task_type": layout.task_type, "base_model_name_or_path": base,
              "num_virtual_tokens": tensor.shape[0], **prompt, "inference_mode": True, "revision": None, **fields}
    tensor = tensor.detach().cpu().contiguous().clone()
    if prompt["num_transformer_submodules"] == 2:  # rows P.. are never read
        tensor = torch.cat([tensor, torch.zeros_like(tensor)])
    return write_peft_dir(out_dir, config, {PROMPT: tensor.to(dtype) if dtype is not None else tensor}, kind)


def _prompt(model: nn.Module) -> PromptEmbeddings:
    if not isinstance(model.virtual, PromptEmbeddings):
        raise ValueError("the model has no prompt-tuning or P-tuning virtual tokens to export")
    return model.virtual


@torch.no_grad()
def export_prompt_tuning(model: nn.Module, out_dir: str | Path, base_model_name_or_path: str, args: Any = None,
                         dtype: torch.dtype | None = None, kind: str | None = None) -> Path:
    """PROMPT_TUNING: the virtual embeddings (loaded over the init, so any init reads back equal; RANDOM needs no
    tokenizer in PEFT)."""
    fields = dict(prompt_tuning_init="RANDOM", prompt_tuning_init_text=None, tokenizer_name_or_path=None,
                  tokenizer_kwargs=None)
    return _virtual_write(model, out_dir, "PROMPT_TUNING", base_model_name_or_path, _prompt(model).embeddings(),
                          fields, dtype, kind)


@torch.no_grad()
def export_p_tuning(model: nn.Module, out_dir: str | Path, base_model_name_or_path: str, args: Any = None,
                    dtype: torch.dtype | None = None, kind: str | None = None) -> Path:
    """P_TUNING: the prompt encoder's output; the encoder's shape is recorded."""
    width = layout_of(model).prompt_fields(model.config)["token_dim"]
    fields = dict(encoder_reparameterization_type="LSTM" if getattr(args, "encoder", "mlp") == "lstm" else "MLP",
                  encoder_hidden_size=getattr(args, "encoder_hidden_size", None) or width,
                  encoder_num_layers=getattr(args, "encoder_num_layers", 2),
                  encoder_dropout=getattr(args, "encoder_dropout", 0.0))
    return _virtual_write(model, out_dir, "P_TUNING", base_model_name_or_path, _prompt(model).embeddings(), fields,
                          dtype, kind)


@torch.no_grad()
def export_prefix(model: nn.Module, out_dir: str | Path, base_model_name_or_path: str, args: Any = None,
                  dtype: torch.dtype | None = None, kind: str | None = None) -> Path:
    """PREFIX_TUNING: the flat prefix after the projection, sized by the key/value heads as PEFT sizes a
    grouped-query model's (`num_attention_heads` = kv heads, `token_dim` = their width)."""
    prefix = model.virtual
    if not isinstance(prefix, PrefixKV):
        raise ValueError("the model has no prefix-tuning prefix to export")
    c = model.config
    kv = c.n_query_groups * c.head_size
    fields = dict(token_dim=kv, num_attention_heads=c.n_query_groups,
                  encoder_hidden_size=getattr(args, "hidden_size", None) or kv, prefix_projection=False)
    return _virtual_write(model, out_dir, "PREFIX_TUNING", base_model_name_or_path, prefix.flat(), fields, dtype, kind)


def read_virtual(peft_dir: str | Path, peft_type: str, model: nn.Module) -> tuple[dict[str, Any], torch.Tensor]:
    """A PEFT folder's config and its `prompt_embeddings` (P, width), checked against this base."""
    peft_dir = Path(peft_dir)
    prompt = layout_of(model).prompt_fields(model.config)
    parts = prompt["num_transformer_submodules"]
    cfg = read_config(peft_dir, peft_type, {"num_transformer_submodules": (parts,), "modules_to_save": ()})
    tensors = peft_weights(peft_dir)
    if set(tensors) != {PROMPT}:
        raise ValueError(f"{peft_dir}: expected one tensor {PROMPT!r}, found {sorted(tensors)[:5]}")
    t = tensors[PROMPT]
    n_layers = cfg.get("num_layers")
    if n_layers is not None and n_layers != prompt["num_layers"]:
        raise ValueError(f"{peft_dir / CONFIG_FILE}: made for a {n_layers}-layer model, this base has "
                         f"{prompt['num_layers']} layers; pass the --checkpoint_dir it was trained on")
    P, parts = cfg.get("num_virtual_tokens"), cfg.get("num_transformer_submodules") or 1
    if t.dim() != 2 or (P is not None and t.shape[0] != P * parts):
        raise ValueError(f"{peft_dir}: {PROMPT} has shape {tuple(t.shape)}, expected (num_virtual_tokens {P} x "
                         f"{parts}, width)")
    return cfg, t[: t.shape[0] // parts]  # seq2seq: the encoder's P rows


@torch.no_grad()
def load_into(virtual: nn.Module, tensor: torch.Tensor, peft_dir: str | Path) -> None:
    put(virtual.embedding.weight, tensor, str(peft_dir), PROMPT)
