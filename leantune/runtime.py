"""Device and precision choices shared by every command."""

from __future__ import annotations

from typing import Literal

import torch

Precision = Literal["32-true", "bf16-true", "bf16-mixed", "16-true", "16-mixed"]
PRECISIONS = ("32-true", "bf16-true", "bf16-mixed", "16-true", "16-mixed")


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_precision(device: torch.device) -> str:
    """The fastest safe precision: bf16 weights on a GPU that supports them, fp32 on CPU."""
    if device.type == "cuda":
        return "bf16-true" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def resolve_precision(precision: str | None, device: torch.device) -> str:
    precision = precision or default_precision(device)
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if device.type == "cpu" and precision.startswith("16"):
        raise ValueError("--precision 16-* needs a GPU; use 32-true or bf16-true on CPU")
    return precision


def weight_dtype(precision: str) -> torch.dtype:
    """dtype the weights are stored in: -true stores in the named type, -mixed keeps fp32 master weights."""
    return {"32-true": torch.float32, "bf16-true": torch.bfloat16, "16-true": torch.float16}.get(precision, torch.float32)


def autocast_dtype(precision: str) -> torch.dtype | None:
    return {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)


def compute_dtype(precision: str) -> torch.dtype:
    """dtype the matmuls run in: the autocast dtype of a -mixed precision, else the weights' dtype."""
    return autocast_dtype(precision) or weight_dtype(precision)
