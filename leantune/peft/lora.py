"""LoRA, QLoRA and DoRA as methods of the one training loop (the layer is in `lora_layers`, DoRA's math in
`lora_dora`, PEFT's format in `peft_format`)."""

from __future__ import annotations

import dataclasses

from leantune.peft.base import Method
from leantune.peft.lora_layers import (
    TARGETS,
    DoRAArgs,
    LoRAArgs,
    LoRALinear,
    apply_dora,
    apply_lora,
    lora_params,
    merge_lora,
    target_layers,
)
from leantune.peft.peft_format import LORA as LORA_PEFT

__all__ = ["METHODS", "TARGETS", "DoRAArgs", "LoRAArgs", "LoRALinear", "apply_dora", "apply_lora", "lora_params",
           "merge_lora", "target_layers"]


LORA = Method(
    name="lora",
    summary="LoRA: low-rank updates B A on chosen linear layers (--lora.targets), mergeable, PEFT-exportable",
    args_class=LoRAArgs,
    apply=apply_lora,
    adapter_params=lora_params,
    default_lr=1e-3,
    merge=merge_lora,
    peft=LORA_PEFT.format,
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
    peft=LORA_PEFT.format,
)
# LORA before DORA: a PEFT folder is read by the first record of its peft_type (`methods.peft_method`), and its
# load reads both kinds (DoRAArgs for use_dora).
METHODS = (LORA, QLORA, DORA)
