"""Device and precision choices shared by every command."""

from __future__ import annotations

import functools
from typing import Literal

import torch

Precision = Literal["auto", "32-true", "bf16-true", "bf16-mixed", "16-true", "16-mixed"]
PRECISIONS = ("auto", "32-true", "bf16-true", "bf16-mixed", "16-true", "16-mixed")


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def cpu_bf16_units() -> str | None:
    """The CPU's bfloat16 matrix units as torch's own capability checks report them ("AMX" or "AVX512-BF16"), or
    None where bf16 matmuls would be emulated (slower than fp32). Detected by instruction set, never by CPU name."""
    cpu = torch.cpu
    if getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        return "AMX"
    if getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "AVX512-BF16"
    return None


@functools.cache
def cpu_has_amx() -> bool:
    """`cpu_bf16_units() == "AMX"`, checked once per process: the bf16 attention choices (training's and serve's)
    read it on every call, and only AMX makes CPU bf16 attention faster than fp32."""
    return cpu_bf16_units() == "AMX"


def default_precision(device: torch.device, training: bool = False) -> str:
    """The fastest safe precision (what `--precision auto` picks): bf16 weights on a GPU that supports them. On a CPU,
    training takes bf16-mixed where the CPU has bf16 matrix units (AMX or AVX512-BF16: bf16 matmuls ~2x the fp32 rate)
    over a bf16 frozen base with fp32 trained tensors and optimizer state; inference on a CPU stays fp32 (greedy
    tokens equal to transformers'; `--quantize int8|int4` is the fast CPU decoding path)."""
    if device.type == "cuda":
        return "bf16-true" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if training and cpu_bf16_units() else "32-true"


def describe_precision(requested: str | None, precision: str, device: torch.device) -> str:
    """One phrase for a run header: the precision and, when `auto` chose it, why."""
    if requested not in (None, "auto"):
        return precision
    if device.type == "cpu" and precision == "bf16-mixed":
        return f"{precision} (auto: the CPU has {cpu_bf16_units()})"
    if device.type == "cpu":
        return f"{precision} (auto: this CPU has no bf16 matrix units)"
    return f"{precision} (auto)"


def resolve_precision(precision: str | None, device: torch.device, training: bool = False) -> str:
    """The concrete precision a run uses: `auto` (or unset) becomes `default_precision(device, training)`."""
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision in (None, "auto"):
        precision = default_precision(device, training)
    if device.type == "cpu" and precision.startswith("16"):
        raise ValueError("--precision 16-* needs a GPU; use 32-true or bf16-true on CPU")
    return precision


def cast_frozen_matrices(model: torch.nn.Module, trainable: list[str], dtype: torch.dtype) -> dict[str, torch.dtype]:
    """Store the frozen matrices of the model (its linear layers' weights, whichever module holds them) in `dtype`
    (a -mixed precision's autocast dtype): autocast casts them to it on every call anyway, so the products are the
    same while a step skips those copies and the frozen base takes half the memory. Trained tensors stay fp32
    masters; vectors (norms, biases) stay as they are; an embedding table (and a head tied to it) keeps its dtype so
    the residual stream stays fp32; packed quantized weights are not floating and are left alone. Returns
    {name: original dtype} for `restore_dtypes`."""
    trained = set(trainable)
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    cast: dict[str, torch.dtype] = {}
    for name, p in model.named_parameters():  # shared Parameters are listed once
        if (name in trained or p.requires_grad or p.ndim < 2 or not p.is_floating_point() or p.dtype == dtype
                or id(p) in embedded):
            continue
        cast[name] = p.dtype
        p.data = p.data.to(dtype)
    return cast


def restore_dtypes(model: torch.nn.Module, cast: dict[str, torch.dtype]) -> None:
    """Undo `cast_frozen_matrices`: the named parameters back in their original dtypes."""
    params = dict(model.named_parameters())
    for name, dtype in cast.items():
        params[name].data = params[name].data.to(dtype)


def weight_dtype(precision: str) -> torch.dtype:
    """dtype the weights are stored in: -true stores in the named type, -mixed keeps fp32 master weights."""
    return {"32-true": torch.float32, "bf16-true": torch.bfloat16, "16-true": torch.float16}.get(precision, torch.float32)


def autocast_dtype(precision: str) -> torch.dtype | None:
    return {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)


def compute_dtype(precision: str) -> torch.dtype:
    """dtype the matmuls run in: the autocast dtype of a -mixed precision, else the weights' dtype."""
    return autocast_dtype(precision) or weight_dtype(precision)
