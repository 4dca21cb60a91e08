"""What a finetuning method is, as one record: the registry (`leantune.methods`) holds one per module of this package.

A method transforms a built `GPT` in place (`apply`) and names its trained tensors by what it added or chose
(`adapter_params`: found by module type, never by matching parameter-name suffixes). Everything else a command
needs (checkpoint kind, merge, PEFT-format mapping, default learning rate, which bases it accepts) is a field here,
so no command or loop asks for a method by name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from leantune.models.quantize import dequantize_weight


@dataclass(frozen=True)
class PeftFormat:
    """How a method's adapter maps onto HF PEFT's folder format (`adapter_config.json` + safetensors)."""

    peft_type: str
    """PEFT's `peft_type` value, e.g. LORA."""
    export: Callable[..., Path]
    """export(model, out_dir, base_model_name_or_path, args, dtype=None, kind=None) writes the folder (kind: the
    output marker of a folder the user named, see `leantune.checkpoint.io.claim_output`)."""
    load: Callable[[nn.Module, Path], Any]
    """load(model, peft_dir) applies the folder's adapter (unmerged) and returns the method args it implies."""


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    """One line for `leantune finetune --help`."""
    args_class: type | None
    """Dataclass of the method's hyperparameters (its field docstrings become --<name>.* help), or None."""
    apply: Callable[[nn.Module, Any], None]
    """Transform the model in place for these args (swap modules, add parameters)."""
    adapter_params: Callable[[nn.Module], list[nn.Parameter]]
    """The tensors the method trains in an already transformed model."""
    default_lr: float
    saves_full_model: bool = False
    """True: checkpoints are HF model folders (`model/`); False: only the trained tensors (`adapter.safetensors`)."""
    merge: Callable[[nn.Module, float], nn.Module] | None = None
    """merge(model, weight) folds the (weighted) update into the base weights and removes the method's modules."""
    peft: PeftFormat | None = None
    accepts_quantized_base: bool = True
    default_quantize: str | None = None
    """--quantize mode used when none is given (qlora: bnb.nf4-dq)."""
    variant_of: str | None = None
    """Another method whose checkpoints this one shares (qlora is lora on a quantized base)."""
    args_flag: str | None = None
    """CLI group of the args (`--lora.r`); default: the method name."""
    prepare: Callable[[nn.Module, Any, Any], None] | None = None
    """prepare(model, args, tokenizer) once after `apply` when a run starts (not when an adapter is loaded): the
    initialisation that needs the tokenizer, e.g. prompt tuning's init from a text."""
    regularizer: Callable[[nn.Module], torch.Tensor | None] | None = None
    """regularizer(model): an extra loss term the loop adds once per optimizer step (not per micro-batch, so the
    update stays accumulation-invariant), e.g. AdaLoRA's orthogonality penalty; None: nothing to add."""
    on_step: Callable[[nn.Module, int, int], None] | None = None
    """on_step(model, step, total_steps) right after optimizer.step() and before the gradients are zeroed (they are
    still readable), with `step` the 0-based index of the step just taken: e.g. AdaLoRA's rank allocation."""
    train_state: Callable[[nn.Module], dict[str, torch.Tensor]] | None = None
    """State the method keeps between steps outside the trained tensors (e.g. importance averages): the loop saves
    it beside each checkpoint and gives it back to `load_train_state` on resume."""
    load_train_state: Callable[[nn.Module, dict[str, torch.Tensor]], None] | None = None

    @property
    def kind(self) -> str:
        """Methods with the same kind read each other's checkpoints."""
        return self.variant_of or self.name

    @property
    def flag(self) -> str:
        return self.args_flag or self.name

    def make_args(self, given: Any = None) -> Any:
        """The method's args from a dataclass, a dict or None (defaults)."""
        if self.args_class is None:
            return None
        if given is None:
            return self.args_class()
        if isinstance(given, self.args_class):
            return given
        return self.args_class(**(given if isinstance(given, dict) else vars(given)))


def switchable_layers(model: nn.Module, trainable: list[str]) -> list[nn.Module] | None:
    """The layers holding every trained tensor, when each of them can be switched off (`adapter_enabled`, e.g.
    LoRALinear); None when any trained tensor lives elsewhere: then switching off would not give the base model."""
    layers = {name: m for name, m in model.named_modules() if hasattr(m, "adapter_enabled")}
    found: dict[str, nn.Module] = {}
    for t in trainable:
        owner = t.rpartition(".")[0]
        if owner not in layers:
            return None
        found[owner] = layers[owner]
    return list(found.values()) or None


@contextlib.contextmanager
def adapter_off(layers: list[nn.Module]) -> Iterator[None]:
    """Run the base model: the given layers compute without their adapter for the duration (no weight copy)."""
    for m in layers:
        m.adapter_enabled = False
    try:
        yield
    finally:
        for m in layers:
            m.adapter_enabled = True


def mark_trainable(model: nn.Module, params: list[nn.Parameter]) -> list[str]:
    """Freeze the model except `params`; returns their `named_parameters()` names (tied tensors listed once)."""
    model.requires_grad_(False)
    chosen = {id(p) for p in params}
    names = []
    for n, p in model.named_parameters():
        if id(p) in chosen:
            p.requires_grad_(True)
            names.append(n)
    return names


def params_of(modules: list[nn.Module], *attrs: str) -> list[nn.Parameter]:
    """The named attributes of each module that are Parameters (e.g. lora_A, lora_B)."""
    out = []
    for m in modules:
        for a in attrs:
            p = getattr(m, a, None)
            if isinstance(p, torch.nn.Parameter):
                out.append(p)
    return out


@torch.no_grad()
def merge_into_linears(model: nn.Module, layers: list[nn.Module],
                       delta: Callable[[nn.Module, torch.Tensor], torch.Tensor], weight: float = 1.0) -> nn.Module:
    """Fold each adapted layer's update (times `weight`) into its base weight and put a plain nn.Linear back: the
    merge of every additive method. `delta(layer, w)` gives the (out, in) update added to the float weight `w` (DoRA's
    depends on it). A head tied to the embedding is untied first (the merged head differs from the embedding); a
    quantized weight is merged into its dequantized copy in the compute dtype, never requantized; a non-finite update
    is refused before it touches the weight (PEFT's safe_merge)."""
    chosen = {id(m) for m in layers}
    head = model.lm_head
    if id(head) in chosen and head.weight is model.transformer.wte.weight:
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        model.config = model.config.replace(tie_embeddings=False)
        for block in model.transformer.h:
            block.config = block.attn.config = model.config
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if id(child) not in chosen:
                continue
            w = nn.Parameter(dequantize_weight(child.weight).clone(), requires_grad=False) if child.quantized \
                else child.weight
            if not child.merged:
                d = delta(child, w)
                if not torch.isfinite(d).all():
                    raise ValueError(f"{name}: the adapter's update is not finite; refusing to merge a broken adapter")
                w.add_(d.to(w.dtype) * weight)
            linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
            linear.weight, linear.bias = w, child.bias
            setattr(module, name, linear)
    return model
