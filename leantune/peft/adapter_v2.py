"""LLaMA-Adapter v2: the v1 gated prefix, plus a per-output scale and bias on every linear layer and trainable norms.

Each attention/MLP linear and the LM head become `AdapterV2Linear`: y = adapter_scale * (x W^T + b) + adapter_bias,
initialised to the identity (scale 1, bias 0) so step 0 is exactly the base model (Gao et al. 2023). The layer owns
the base `weight`/`bias` Parameters themselves (moved, not copied), so base keys, base checkpoints and a head tied to
the embedding are unaffected. Norm weights (and LayerNorm biases) are unfrozen; they add no parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from leantune.models.decoder.model import GPT
from leantune.models.quantize import QuantLinear, compute_dtype_of, is_quantized, quantized_linear
from leantune.peft.adapter import add_prefixes, prefix_params
from leantune.peft.base import Method, mark_trainable


@dataclass
class AdapterV2Args:
    # The same fields as AdapterArgs, declared again so each CLI flag keeps its own help text.
    prompt_length: int = 10
    """Learned prefix tokens per adapted block."""
    start_layer: int = 2
    """Index of the first block with a prefix; the scale/bias and norms are trained in every block regardless."""

    def __post_init__(self) -> None:
        if self.prompt_length < 1:
            raise ValueError(f"--adapter_v2.prompt_length must be >= 1, got {self.prompt_length}")
        if self.start_layer < 0:
            raise ValueError(f"--adapter_v2.start_layer must be >= 0, got {self.start_layer}")


class AdapterV2Linear(nn.Module):
    """A frozen linear layer followed by a trainable per-output affine map (LLaMA-Adapter v2's bias/scale tuning)."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        if type(base) not in (nn.Linear, QuantLinear):
            raise TypeError(f"adapter_v2 wraps plain or quantized linear layers, got {type(base).__name__}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the same Parameter object: ties and base keys are preserved
        self.bias = base.bias
        self.quantized = is_quantized(base.weight)
        factory = dict(device=base.weight.device, dtype=compute_dtype_of(base.weight))
        self.adapter_bias = nn.Parameter(torch.zeros(self.out_features, **factory))
        self.adapter_scale = nn.Parameter(torch.ones(self.out_features, **factory))

    def reset_parameters(self) -> None:
        """Back to the identity map (e.g. after `to_empty` on a model transformed on the meta device)."""
        nn.init.zeros_(self.adapter_bias)
        nn.init.ones_(self.adapter_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = quantized_linear(x, self.weight, self.bias) if self.quantized else F.linear(x, self.weight, self.bias)
        # adapter_bias + y * adapter_scale in one fused op; exact at init (y * 1 + 0 == y)
        return torch.addcmul(self.adapter_bias.to(y.dtype), y, self.adapter_scale.to(y.dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


def adapted_linears(model: GPT) -> list[tuple[nn.Module, str]]:
    """(parent module, attribute name) of every linear v2 adapts: attention, MLP and the LM head."""
    cfg = model.config
    mlp_names = ("fc_1", "fc_2", "proj") if cfg.mlp_class == "swiglu" else ("fc", "proj")
    chosen = []
    for block in model.transformer.h:
        chosen += [(block.attn, "qkv"), (block.attn, "proj")]
        chosen += [(block.mlp, n) for n in mlp_names]
    chosen.append((model, "lm_head"))
    return chosen


def norm_modules(model: GPT) -> list[nn.Module]:
    """Every normalisation layer: norm_1, norm_2 (absent with a shared attention norm) and ln_f."""
    norms = []
    for block in model.transformer.h:
        norms += [m for m in (block.norm_1, block.norm_2) if m is not None]
    norms.append(model.transformer.ln_f)
    return norms


def apply_adapter_v2(model: GPT, args: AdapterV2Args) -> list[str]:
    """Add v1's gated prefixes, swap the linears for AdapterV2Linear, unfreeze the norms, freeze the rest.
    Returns the trainable parameter names."""
    params = add_prefixes(model, args.prompt_length, args.start_layer)
    for parent, name in adapted_linears(model):
        layer = AdapterV2Linear(getattr(parent, name))
        setattr(parent, name, layer)
        params += [layer.adapter_bias, layer.adapter_scale]
    for norm in norm_modules(model):
        params += list(norm.parameters())
    return mark_trainable(model, params)


def adapter_v2_params(model: nn.Module) -> list[nn.Parameter]:
    """The prefixes, every AdapterV2Linear's scale and bias, and the norms."""
    params = prefix_params(model)
    for m in model.modules():
        if isinstance(m, AdapterV2Linear):
            params += [m.adapter_bias, m.adapter_scale]
    for norm in norm_modules(model):
        params += list(norm.parameters())
    return params


METHOD = Method(
    name="adapter_v2",
    summary="LLaMA-Adapter v2: v1's prefixes plus a per-output scale and bias on every linear layer, trainable norms",
    args_class=AdapterV2Args,
    apply=apply_adapter_v2,
    adapter_params=adapter_v2_params,
    default_lr=3e-3,
)
