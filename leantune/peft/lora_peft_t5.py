"""T5 LoRA adapters in HF PEFT's format (`task_type: SEQ_2_SEQ_LM`), both ways.

T5's linears are plain layers, one PEFT LoRA each, named as in transformers (`checkpoint.t5_hf.hf_name`:
`encoder.block.0.layer.0.SelfAttention.q`, `decoder.block.0.layer.1.EncDecAttention.v`, ...). `target_modules` are
the module names (q, v, wo, ...), which peft matches as suffixes: in T5 `q` names exactly the attention queries of
the encoder, the decoder and the cross-attention, as leantune's `query` target does.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from leantune.checkpoint.peft_dir import peft_weights, write_peft_dir
from leantune.checkpoint.t5_hf import hf_name, our_name
from leantune.models.t5.model import T5
from leantune.peft.lora_layers import TARGETS, LoRAArgs, LoRALinear, apply_lora

_PREFIX = "base_model.model."
# T5 module name -> leantune LoRA target
_TARGET_OF = {"q": "query", "k": "key", "v": "value", "o": "projection", "wi": "mlp", "wi_0": "mlp", "wi_1": "mlp",
              "wo": "mlp", "lm_head": "head"}


def export_t5_peft(model: T5, out_dir: str | Path, base_model_name_or_path: str, lora_args: Any,
                   dtype: torch.dtype | None = None, kind: str | None = None) -> Path:
    """Write a T5's (unmerged) LoRA as a PEFT folder that `PeftModel.from_pretrained` loads on
    `T5ForConditionalGeneration`."""
    tensors: dict[str, torch.Tensor] = {}
    targets: set[str] = set()
    for name, mod in model.named_modules():
        if not isinstance(mod, LoRALinear):
            continue
        if mod.merged:
            raise ValueError(f"{name}: LoRA is merged into the weights; export the unmerged adapter")
        if mod.lora_magnitude is not None:
            raise ValueError("DoRA on T5 has no PEFT export yet; export a LoRA adapter")
        (_, a, b), = mod.part_factors()  # a plain linear: one part, the whole output
        path = "lm_head" if name == "lm_head" else hf_name(name)
        targets.add(path.rsplit(".", 1)[-1])
        for key, t in ((f"{path}.lora_A.weight", a), (f"{path}.lora_B.weight", b)):
            t = t.detach().cpu()
            tensors[_PREFIX + key] = (t.to(dtype) if dtype is not None else t).clone()
    if not tensors:
        raise ValueError("the model has no LoRA layers to export")
    config = {
        "peft_type": "LORA", "task_type": "SEQ_2_SEQ_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": int(lora_args.r), "lora_alpha": float(lora_args.alpha), "lora_dropout": float(lora_args.dropout),
        "use_rslora": bool(lora_args.rslora), "target_modules": sorted(targets), "rank_pattern": {},
        "alpha_pattern": {}, "fan_in_fan_out": False, "bias": "none", "use_dora": False, "modules_to_save": None,
        "init_lora_weights": True, "inference_mode": True, "layers_to_transform": None, "layers_pattern": None,
        "revision": None,
    }
    return write_peft_dir(out_dir, config, tensors, kind)


@torch.no_grad()
def import_t5_peft(model: T5, peft_dir: str | Path, pcfg: dict[str, Any]) -> list[str]:
    """Apply a PEFT LoRA folder made for `T5ForConditionalGeneration` (unmerged); returns the trainable names.

    The folder must adapt every layer its targets select (leantune adapts a target everywhere); layers it leaves out
    would otherwise get a zero update, which is also what they have, so they are allowed.
    """
    peft_dir = Path(peft_dir)
    if pcfg.get("use_dora"):
        raise ValueError(f"{peft_dir}: DoRA on T5 is not supported yet; only LoRA adapters import")
    key_re = re.compile(rf"^{re.escape(_PREFIX)}(.+)\.(lora_A|lora_B)(?:\.default)?\.weight$")
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in peft_weights(peft_dir).items():
        if ".base_layer." in key:
            continue
        m = key_re.match(key)
        if not m:
            raise ValueError(f"{peft_dir}: tensor {key} has no leantune equivalent")
        hf = m.group(1)
        try:
            ours = "lm_head" if hf == "lm_head" else our_name(hf)
        except KeyError:
            raise ValueError(f"{peft_dir}: LoRA on {hf} has no leantune equivalent") from None
        found.setdefault(ours, {})[m.group(2)] = t
    if not found:
        raise ValueError(f"{peft_dir}: no LoRA tensors found in the adapter")
    targets = {_TARGET_OF.get(name.rsplit(".", 1)[-1]) for name in found}
    if None in targets:
        raise ValueError(f"{peft_dir}: LoRA on {sorted(found)[:3]} has no leantune target")
    r = int(pcfg["r"])
    args = LoRAArgs(r=r, alpha=float(pcfg["lora_alpha"]), dropout=float(pcfg.get("lora_dropout") or 0.0),
                    rslora=bool(pcfg.get("use_rslora")), targets=[t for t in TARGETS if t in targets])
    trainable = apply_lora(model, args)  # B = 0: the identity until the folder's tensors are copied in
    for name, ab in found.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise ValueError(f"{peft_dir}: {name}: found {sorted(ab)}, expected lora_A and lora_B")
        mod = model.get_submodule(name)
        a, b = ab["lora_A"], ab["lora_B"]
        if tuple(a.shape) != tuple(mod.lora_A.shape) or tuple(b.shape) != tuple(mod.lora_B.shape):
            raise ValueError(f"{peft_dir}: {name}: LoRA shapes A {tuple(a.shape)}, B {tuple(b.shape)} do not fit this "
                             f"base's A {tuple(mod.lora_A.shape)}, B {tuple(mod.lora_B.shape)} (r={r}); pass the "
                             "--checkpoint_dir it was trained on")
        mod.lora_A.copy_(a.to(mod.lora_A.dtype))
        mod.lora_B.copy_(b.to(mod.lora_B.dtype))
    return trainable
