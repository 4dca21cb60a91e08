"""Matrix-vector products for compiled decode steps on CPU.

A one-token decode step multiplies every weight by a handful of rows. Through a GEMM library (MKL, oneDNN) each such
product is an opaque call that reads its weight at 11-13 GB/s here; written as a plain reduction, inductor compiles it
into a vectorised C++ loop fused with the step's other work that reads at ~25 GB/s (default model, 2 threads, AMD
EPYC with AVX512): the 150 block products of a token took 15.2 ms in fp32 against 38.2 ms, 7.8 against 19.7 ms with
bfloat16 weights, and the 49152-row fp32 head 2.9 against 9.4 ms. Products of more rows keep the library, whose GEMMs
reuse each weight across rows.

`ReductionLinears` swaps `F.linear` for that reduction inside a traced step (the model's linears, PEFT layers' base
products and adapter factors, the LM head); weight-only int8 layers reduce over their codes with `row_products` too (`woq.weight_only_linear`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

GEMV_ROWS = 4
"""Calls of up to this many rows (a decode step of 1-4 sequences) become reductions under torch.compile. One
reduction per row: int8 codes measured 4.8 vs 9.8 ms at 1 row, 6.3 vs 11.4 ms at 2 and 9.8 vs 12.9 ms at 4 against
`_weight_int8pack_mm`; a broadcast (rows, out, in) product was slower from 2 rows on."""


def compiled_gemv_rows(x: torch.Tensor) -> bool:
    """Whether an (..., in) input is traced by torch.compile with static sizes and at most GEMV_ROWS rows."""
    return (torch.compiler.is_compiling() and all(isinstance(d, int) for d in x.shape)
            and math.prod(x.shape[:-1]) <= GEMV_ROWS)


def row_products(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., in) -> x W^T as (rows, out) fp32 sums, one reduction per row, for inductor to compile: W (float or int8
    codes) is widened inside its loop, never materialised."""
    w = weight.float()  # (out, in)
    return torch.stack([(w * row.float()).sum(-1) for row in x.reshape(-1, x.shape[-1]).unbind(0)])  # (M, out)


def float_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., in) -> x W^T + b (..., out) in x's dtype, accumulated in fp32 (as the GEMMs do)."""
    y = row_products(x, weight)  # (M, out)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def _reducible(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and weight.dtype == x.dtype and x.dtype in (torch.float32, torch.bfloat16)
            and weight.dim() == 2 and not weight.is_mkldnn and not torch.is_autocast_enabled("cpu")
            and compiled_gemv_rows(x))


class ReductionLinears(TorchFunctionMode):
    """Within a traced decode step: `F.linear` calls of few rows on CPU float weights are `float_gemv`. Entered only
    while compiling (`reduction_linears`), so eager code never pays for the mode or the reduction's temporaries."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], kwargs.get("weight", args[1] if len(args) > 1 else None)
            bias = kwargs.get("bias", args[2] if len(args) > 2 else None)
            if _reducible(x, weight):
                return float_gemv(x, weight, bias)
        return func(*args, **kwargs)
