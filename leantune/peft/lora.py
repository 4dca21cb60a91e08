"""LoRA, QLoRA and DoRA as methods of the one training loop (the layer is in `lora_layers`, DoRA's math in
`lora_dora`, PEFT's format in `lora_peft`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from leantune.models.decoder.model import GPT
from leantune.peft.base import Method, PeftFormat
from leantune.peft.lora_layers import (
    TARGETS,
    DoRAArgs,
    LoRAArgs,
    LoRALinear,
    apply_dora,
    apply_lora,
    lora_params,
    merge_lora,
    present_targets,
    target_layers,
)
from leantune.peft.lora_peft import _read_config, export_peft, import_peft

__all__ = ["METHODS", "TARGETS", "DoRAArgs", "LoRAArgs", "LoRALinear", "apply_dora", "apply_lora", "lora_params",
           "merge_lora", "target_layers"]


def load_peft_lora(model: GPT, peft_dir: Path) -> LoRAArgs:
    """Apply a PEFT LoRA folder and return the LoRAArgs (DoRAArgs with `use_dora`) it amounts to (targets as present
    in the model)."""
    import_peft(model, peft_dir)
    pcfg = _read_config(Path(peft_dir))
    args_class = DoRAArgs if pcfg.get("use_dora") else LoRAArgs
    return args_class(r=int(pcfg["r"]), alpha=float(pcfg["lora_alpha"]), dropout=float(pcfg.get("lora_dropout") or 0.0),
                      rslora=bool(pcfg.get("use_rslora")), targets=present_targets(model))


LORA = Method(
    name="lora",
    summary="LoRA: low-rank updates B A on chosen linear layers (--lora.targets), mergeable, PEFT-exportable",
    args_class=LoRAArgs,
    apply=apply_lora,
    adapter_params=lora_params,
    default_lr=1e-3,
    merge=merge_lora,
    peft=PeftFormat(peft_type="LORA", export=export_peft, load=load_peft_lora),
)
QLORA = dataclasses.replace(
    LORA, name="qlora", summary="QLoRA: LoRA on a 4-bit NF4 double-quantized frozen base (--quantize bnb.nf4-dq)",
    default_quantize="bnb.nf4-dq", variant_of="lora", args_flag="lora")
DORA = Method(
    name="dora",
    summary="DoRA: LoRA's low-rank direction plus a learned magnitude per output row (--dora.targets), mergeable, "
            "PEFT-exportable (use_dora)",
    args_class=DoRAArgs,
    apply=apply_dora,
    adapter_params=lora_params,
    default_lr=1e-3,
    merge=merge_lora,
    peft=PeftFormat(peft_type="LORA", export=export_peft, load=load_peft_lora),
)
# LORA before DORA: a PEFT folder is read by the first record of its peft_type (`methods.peft_method`), and
# load_peft_lora reads both kinds (use_dora or not).
METHODS = (LORA, QLORA, DORA)
