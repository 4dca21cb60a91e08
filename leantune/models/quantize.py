"""bitsandbytes quantization of the frozen base: NF4 / FP4 (optionally double-quantized) and LLM.int8 weights.

Only the transformer blocks' linear layers (attention qkv/proj, MLP) are quantized, as transformers does by default:
embeddings, norms and the LM head (often tied to the embedding) stay in the compute dtype. Each weight is quantized
as it streams out of the checkpoint (`load_hf_checkpoint(..., quantize=...)`), on the target device, so the whole
model never sits in memory in 16/32-bit.

A quantized layer is a `QuantLinear` whose `weight` is bitsandbytes' own Parameter (`Params4bit` carrying its
`quant_state`, or `Int8Params` carrying its row scales `SCB`); LoRA and LLaMA-Adapter v2 wrap it like a plain linear
and call `quantized_linear` for the frozen product. Weights are never requantized after training: merging
dequantizes (see `dequantize_weight`).

The inference-only weight-only modes `int8` / `int4` (`leantune.decode.woq`, torch's CPU kernels) reuse `QuantLinear` and
the helpers below, so adapters apply on top of them the same way; `finetune` refuses them.
"""

from __future__ import annotations

import math
import re
import warnings
from types import ModuleType

import torch
import torch.nn as nn

from leantune.decode.woq import (
    DENSE_BATCH,
    WEIGHT_ONLY_MODES,
    add_screen,
    dequantize_weight_only,
    kernel_fits,
    quantize_weight_only,
    screened_argmax,
    weight_only_linear,
    weight_only_numel,
)

QUANT_MODES = ("bnb.nf4", "bnb.nf4-dq", "bnb.fp4", "bnb.fp4-dq", "bnb.int8")
BLOCKSIZE = 64  # 4-bit absmax block, as QLoRA and transformers use
INT8_THRESHOLD = 6.0  # LLM.int8 outlier threshold (transformers' and LitGPT's default)
_QUANTIZABLE = re.compile(
    r"^transformer\.h\.\d+\.(attn\.(qkv|proj)|mlp\.(fc_1|fc_2|fc|proj))\.weight$"  # the decoder's block linears
    r"|^(encoder|decoder)\.block\.\d+\.((cross_)?attn\.(q|k|v|o)|ff\.(wi|wi_0|wi_1))\.weight$")  # T5's
"""State-dict keys of the linears a quantized base stores in 4/8 bits. T5's feed-forward `wo` stays float: transformers
keeps it so (`_keep_in_fp32_modules`) and skips it when it quantizes a T5 with bitsandbytes."""


def check_mode(mode: str | None, inference: bool = False) -> str | None:
    """A training (bitsandbytes) mode, or with `inference` also a weight-only decode mode (int8, int4)."""
    if mode in WEIGHT_ONLY_MODES and not inference:
        raise ValueError(f"--quantize {mode} is weight-only quantization for inference (generate, chat, evaluate, "
                         f"serve); to train on a quantized base use one of {', '.join(QUANT_MODES)}")
    if mode is not None and mode not in QUANT_MODES + (WEIGHT_ONLY_MODES if inference else ()):
        choices = QUANT_MODES + (WEIGHT_ONLY_MODES if inference else ())
        raise ValueError(f"--quantize {mode!r} is not one of {', '.join(choices)}")
    return mode


def bnb() -> ModuleType:
    """bitsandbytes, imported on first use (it is a dependency, but a broken install should fail clearly)."""
    try:
        import bitsandbytes
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError(f"--quantize needs bitsandbytes (pip install bitsandbytes): {e}") from e
    return bitsandbytes


def is_quantizable(key: str) -> bool:
    """Whether a state-dict key (of either model kind) is a weight the quantized base stores in 4/8 bits."""
    return bool(_QUANTIZABLE.match(key))


def quantize_weight(w: torch.Tensor, mode: str, device: torch.device | str, compute_dtype: torch.dtype) -> nn.Parameter:
    """(out, in) float weight -> a frozen bitsandbytes Parameter on `device`, quantized there."""
    b = bnb()
    w = w.to(device=device, dtype=compute_dtype)
    if mode == "bnb.int8":
        # Int8Params quantizes row-wise (absmax / 127) when it is moved to its device.
        p = b.nn.Int8Params(w.cpu(), requires_grad=False, has_fp16_weights=False)
        p = p.to(device)
        p.compute_dtype = compute_dtype
        return p
    quant_type = "nf4" if mode.startswith("bnb.nf4") else "fp4"
    packed, state = b.functional.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type=quant_type,
                                              compress_statistics=mode.endswith("-dq"))
    return b.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=BLOCKSIZE,
                           compress_statistics=mode.endswith("-dq"), quant_type=quant_type, bnb_quantized=True)


def is_quantized(weight: torch.Tensor) -> bool:
    return hasattr(weight, "quant_state") or hasattr(weight, "SCB") or hasattr(weight, "weight_only")


def compute_dtype_of(weight: torch.Tensor) -> torch.dtype:
    """The float dtype a (possibly quantized) weight computes in."""
    if hasattr(weight, "weight_only"):
        return weight.weight_only.compute_dtype
    state = getattr(weight, "quant_state", None)
    return state.dtype if state is not None else getattr(weight, "compute_dtype", weight.dtype)


def logical_numel(p: torch.Tensor) -> int:
    """Parameters a tensor stands for: a packed 4-bit weight holds two per byte (its quant_state has the shape)."""
    if hasattr(p, "weight_only"):
        return weight_only_numel(p)
    state = getattr(p, "quant_state", None)
    return math.prod(state.shape) if state is not None else p.numel()


def storage_tensors(weight: torch.Tensor) -> list[torch.Tensor]:
    """Every tensor a (quantized) weight keeps in memory: packed data plus its scales, code tables and nested state."""
    if hasattr(weight, "weight_only"):
        return [weight.data, weight.weight_only.scales, *(weight.weight_only.screen or ())]
    state = getattr(weight, "quant_state", None)
    if state is not None:
        out = [weight.data, state.absmax, state.code]
        if state.nested:
            out += [state.offset, state.state2.absmax, state.state2.code]
        return [t for t in out if isinstance(t, torch.Tensor)]
    if hasattr(weight, "SCB"):
        return [weight.data, weight.SCB]
    return [weight]


def quantized_nbytes(out_features: int, in_features: int, mode: str) -> int:
    """Bytes a (out, in) weight takes quantized with `mode`, as bitsandbytes stores it (what `estimate` counts)."""
    n = out_features * in_features
    if mode == "bnb.int8":
        return n + 4 * out_features  # int8 weights + one fp32 absmax per row
    blocks = -(-n // BLOCKSIZE)
    packed = -(-n // 2) + 16 * 4  # two 4-bit codes per byte, plus the 16-entry fp32 code table
    if mode.endswith("-dq"):  # uint8 block scales, quantized again in blocks of 256 with their own fp32 code
        return packed + blocks + 4 * -(-blocks // 256) + 256 * 4 + 4
    return packed + 4 * blocks


def dequantize_weight(weight: torch.Tensor) -> torch.Tensor:
    """The (out, in) float weight the quantized base actually computes with (its compute dtype)."""
    if hasattr(weight, "weight_only"):
        return dequantize_weight_only(weight)
    state = getattr(weight, "quant_state", None)
    if state is not None:
        return bnb().functional.dequantize_4bit(weight.data, state)
    if hasattr(weight, "SCB"):
        return (weight.data.float() * (weight.SCB.float() / 127.0)[:, None]).to(compute_dtype_of(weight))
    return weight


def _int8_state(weight: torch.Tensor):
    """bitsandbytes' matmul state for an Int8Params, made once and kept on the parameter itself."""
    state = getattr(weight, "lt_state", None)
    if state is None:
        state = bnb().MatmulLtState()
        state.has_fp16_weights = False
        state.threshold = INT8_THRESHOLD
        state.CB, state.SCB = weight.data, weight.SCB
        weight.lt_state = state
    return state


def quantized_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T + b for a bitsandbytes weight (gradients flow to x, the weight is frozen) or a weight-only one."""
    if hasattr(weight, "weight_only"):
        return weight_only_linear(x, weight, bias)
    b = bnb()
    state = getattr(weight, "quant_state", None)
    if state is not None:
        dtype = state.dtype  # the compute dtype the weight was quantized from
        y = b.matmul_4bit(x.to(dtype), weight.t(), quant_state=state, bias=None if bias is None else bias.to(dtype))
        return y.to(x.dtype)
    return b.matmul(x, weight, bias=None if bias is None else bias.to(x.dtype), state=_int8_state(weight))


class QuantLinear(nn.Module):
    """A frozen linear layer whose weight bitsandbytes stores in 4 or 8 bits."""

    def __init__(self, in_features: int, out_features: int, weight: nn.Parameter, bias: nn.Parameter | None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = weight
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        kind = getattr(getattr(self.weight, "quant_state", None), "quant_type", "int8")
        if hasattr(self.weight, "weight_only"):
            kind = f"{self.weight.weight_only.mode} weight-only"
        return f"in={self.in_features}, out={self.out_features}, {kind}, bias={self.bias is not None}"


def greedy_tokens(head: nn.Module, x: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
    """x (B, in) -> the argmax of head(x) (B,). A weight-only head on CPU with few rows takes `woq.screened_argmax`
    (its int4 copy screens, the tied float table or the int8 rows decide: ~1.2 ms instead of ~3.4 ms of a compiled
    int4 token on the default model); any other head (float, bitsandbytes, or wrapped by an adapter) takes the argmax
    of its logits, `logits` (head(x), when the caller has them already) or computed here."""
    st = getattr(head.weight, "weight_only", None) if type(head) is QuantLinear else None
    if st is not None and st.screen is not None and x.device.type == "cpu" and x.shape[0] < DENSE_BATCH:
        return screened_argmax(x, head.weight, head.bias)
    return (head(x) if logits is None else logits).argmax(-1)


def quantized_module_names(model: nn.Module) -> list[str]:
    return [n.removesuffix(".weight") for n, _ in model.named_parameters(remove_duplicate=False) if is_quantizable(n)]


def _swap(model: nn.Module, name: str, make) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    setattr(parent, attr, make(getattr(parent, attr)))


def quantize_model(model: nn.Module, mode: str, compute_dtype: torch.dtype, weights: dict[str, torch.Tensor] | None = None,
                   device: torch.device | str | None = None) -> nn.Module:
    """Swap every quantizable block linear for a QuantLinear, in place.

    `weights` maps their state-dict keys to float or already quantized weights (as `load_hf_checkpoint` streams
    them); without it the layers' own weights are quantized (models built in memory). Records `model.quantize`.
    """
    check_mode(mode)
    for name in quantized_module_names(model):
        def make(layer: nn.Module, key=f"{name}.weight") -> QuantLinear:
            w = weights.pop(key) if weights is not None else layer.weight.detach()
            dev = device if device is not None else w.device
            q = w if is_quantized(w) else quantize_weight(w, mode, dev, compute_dtype)
            return QuantLinear(layer.in_features, layer.out_features, q, layer.bias)
        _swap(model, name, make)
    model.quantize = mode
    return model


@torch.no_grad()
def quantize_for_inference(model: nn.Module, mode: str) -> nn.Module:
    """Swap a float GPT's block linears and LM head for weight-only `mode` (int8, int4) QuantLinears, in place.

    Quantize before applying an adapter (it then wraps these layers). A tied input embedding keeps its float table;
    the head gets its own quantized copy, in int8 under int4 too (as llama.cpp keeps its output matrix at higher
    precision: on the default model an int4 head took greedy agreement with fp32 from ~66% of prompts to ~19%, for
    ~10% more speed). The int8 head also keeps an int4 copy that only screens greedy picks (`greedy_tokens`), whose
    winner is then scored from the int8 rows, or from the float rows of a tied input embedding, which the model keeps
    anyway (greedy picks are then the float head's: no extra memory). Layers
    whose shape the kernels refuse stay float, counted in one warning.
    """
    if mode not in WEIGHT_ONLY_MODES:
        raise ValueError(f"--quantize {mode!r} is not one of {', '.join(WEIGHT_ONLY_MODES)}")
    kept: list[str] = []
    head = model.get_submodule("lm_head")
    tied = next((p for n, p in model.named_parameters(remove_duplicate=False)
                 if n != "lm_head.weight" and p is head.weight), None)  # a tied input embedding's table
    for name in [*quantized_module_names(model), "lm_head"]:
        layer = model.get_submodule(name)
        if type(layer) is not nn.Linear:
            raise TypeError(f"{name}: --quantize {mode} swaps plain nn.Linear layers, got {type(layer).__name__} "
                            "(quantize the base before applying an adapter)")
        layer_mode = "int8" if name == "lm_head" else mode
        if not kernel_fits(layer_mode, layer.out_features, layer.in_features):
            kept.append(f"{name} {tuple(layer.weight.shape)}")
            continue

        def make(layer: nn.Linear, layer_mode=layer_mode, head=name == "lm_head") -> QuantLinear:
            bias = None if layer.bias is None else nn.Parameter(layer.bias.detach(), requires_grad=False)
            weight = quantize_weight_only(layer.weight.detach(), layer_mode, layer.weight.dtype)
            if head:
                add_screen(weight, exact_rows=tied)
            return QuantLinear(layer.in_features, layer.out_features, weight, bias)
        _swap(model, name, make)
    if kept:
        warnings.warn(f"--quantize {mode}: {len(kept)} layer(s) kept in float, their shapes do not fit torch's "
                      f"{mode} kernel (e.g. {kept[:3]})", stacklevel=2)
    model.quantize = mode
    return model.requires_grad_(False)


@torch.no_grad()
def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every QuantLinear by a plain nn.Linear holding its dequantized weight (no requantization ever)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            def make(layer: QuantLinear) -> nn.Linear:
                linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
                linear.weight = nn.Parameter(dequantize_weight(layer.weight).clone(), requires_grad=False)
                linear.bias = layer.bias
                return linear
            _swap(model, name, make)
    model.quantize = None
    return model


@torch.no_grad()
def round_trip_(model: nn.Module, mode: str, compute_dtype: torch.dtype) -> nn.Module:
    """Replace each quantizable weight by quantize -> dequantize of itself, keeping plain layers and their dtype:
    the float weights a base loaded with `mode` from `compute_dtype` computes with (how a QLoRA adapter is merged)."""
    params = dict(model.named_parameters())
    for name in quantized_module_names(model):
        w = params[f"{name}.weight"]
        q = quantize_weight(w.detach(), mode, w.device, compute_dtype)
        w.copy_(dequantize_weight(q).to(w.dtype))
    return model
