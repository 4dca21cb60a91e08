"""IA3 as a method of the one training loop (the layer is in `ia3_layers`, PEFT's format in `peft_format`).

Learned vectors, initialised to ones, rescale the keys and values (rows of the fused qkv output) and the MLP's inner
activations (the down projection's input): a few thousand parameters per layer, mergeable into the weights, and
usable on a quantized base (the vectors scale the quantized matmul's input or output; merge then writes the
dequantized weight scaled, never requantized).
"""

from __future__ import annotations

from leantune.peft.base import Method
from leantune.peft.ia3_layers import TARGETS, IA3Args, IA3Linear, apply_ia3, ia3_params, merge_ia3, target_layers
from leantune.peft.peft_format import IA3

__all__ = ["METHOD", "TARGETS", "IA3Args", "IA3Linear", "apply_ia3", "ia3_params", "merge_ia3", "target_layers"]

METHOD = Method(
    name="ia3",
    summary="IA3: learned vectors scaling keys, values and MLP activations (--ia3.targets), mergeable, PEFT-exportable",
    args_class=IA3Args,
    apply=apply_ia3,
    adapter_params=ia3_params,
    default_lr=1e-2,  # ~60k parameters on SmolLM2-135M: vectors near 1 need larger steps than LoRA (1e-3)
    merge=merge_ia3,
    peft=IA3.format,
)
