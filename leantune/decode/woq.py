"""Weight-only int8 / int4 quantization for fast inference (`--quantize int8|int4`): decode reads 4x / 8x fewer weight
bytes than fp32, which is what single-stream decoding on a CPU waits for.

- int8: symmetric per output channel, w ~ q * s with q in [-127, 127] and one scale per row.
- int4: asymmetric in groups of `INT4_GROUP` inputs, w ~ (q - 8) * s + z with q in [0, 15] (torch's int4 layout).

One-token steps of fewer than `DENSE_BATCH` sequences run torch's CPU kernels (`aten._weight_int8pack_mm`,
`aten._weight_int4pack_mm_for_cpu`): the activation goes in as bfloat16 (their vectorised path; an fp32 input takes a
scalar loop 60-80x slower on a 1536x576 layer, and a hi + lo bfloat16 split of it costs a second pass), each dot product is accumulated
in fp32 and the output comes back in the model's dtype, so norms, attention, the residual stream and the KV cache
stay in fp32 under `--precision 32-true`. Calls of `DENSE_BATCH` rows or more (a prompt's positions, batched
decoding) multiply with a prepacked bfloat16 copy of the layer instead (oneDNN's GEMM). Off CPU the weight is
dequantized per call (correct, not fast).

Under torch.compile (`--compile`, the decode step compiled whole) int8 steps of up to `gemv.GEMV_ROWS` sequences skip the
kernel: the product is written as a plain reduction over the codes and the fp32 activations (`gemv.row_products`), which
inductor compiles into vectorised loops fused with the step's other work, twice as fast on the default model, and
exact up to summation order (no bfloat16 rounding).

Where greedy agreement with fp32 goes (default model, 50 Demo prompts x 32 tokens, identical continuations): the
bfloat16 activation rounding costs about nothing (int8 through the kernels 30/50, the same dequantized weights in
fp32 32/50, hi + lo split 29/50); the int8 weights do: the blocks alone 36/50, the LM head alone 40/50 (per-group int8
scales in groups of 32 would give the blocks 38/50). So the head's greedy picks are scored from the float embedding
table when the model ties it (`add_screen`): int8 36/50 (from 30/50), int4 34/50 (bench/decode_cpu.py).

Weights are quantized once after loading and never trained: `finetune` refuses these modes (its quantized bases are
bitsandbytes' `bnb.*`).

The block linears and the LM head are quantized (the head is a quarter of a small model's bytes; it stays int8 under
int4, see `quantize.quantize_for_inference`); a tied input embedding keeps its float table (a lookup reads one row per token), so the head gets its own quantized copy. A layer
is a `leantune.models.quantize.QuantLinear` whose `weight` Parameter carries a `WeightOnly` record (`weight.weight_only`),
so every PEFT layer that wraps quantized linears (LoRA, DoRA, IA3, LoHa, LoKr, AdaLoRA, adapter v2) runs unmerged on
top through `quantize.quantized_linear`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from leantune.decode.gemv import compiled_gemv_rows, row_products

WEIGHT_ONLY_MODES = ("int8", "int4")
INT4_GROUP = 32  # inputs per int4 scale/zero pair (torch's kernel takes 32, 64, 128 or 256)
KERNEL_DTYPE = torch.bfloat16  # the activation dtype of the kernels' vectorised path
DENSE_BATCH = 8
"""From this many rows in one call (a prompt's positions, or batched decoding's sequences: serve, greedy_batch,
evaluate) a layer multiplies with a bfloat16 dense copy instead (oneDNN's GEMM, fp32 accumulation): the int8/int4
kernels are matrix-vector loops whose cost grows with the rows (on the default model a prompt cost about what the
fp32 GEMMs do, ~1.5 ms a row), a dense GEMM's barely does. The copy costs +2 bytes per weight, made once on the first
such call and kept: dequantizing per call instead would cost a pass over every weight per prompt, as much as the
GEMMs of a short prompt. An int8 copy holds the codes themselves (exact in bfloat16), the per-row scales applied to
the fp32-accumulated product, so it multiplies with exactly the weights the kernel uses; an int4 copy holds the
dequantized weights rounded to bfloat16. One-token decode steps of one sequence never read it. On CPU the copy is
stored in oneDNN's blocked layout (prepacked once): `F.linear` would reorder a plain weight on every call, which made
the 16-row GEMMs of a decode step about 1.4x slower."""


@dataclass
class WeightOnly:
    """What a weight-only quantized Parameter needs beyond its packed data."""

    mode: str  # "int8" or "int4"
    shape: tuple[int, int]  # (out, in) of the float weight
    scales: torch.Tensor  # int8: (out,) per-row scales; int4: (in / group, out, 2) scales and zeros
    compute_dtype: torch.dtype  # the model's float dtype: outputs, biases and adapters on top use it
    group_size: int = 0  # int4 only
    dense: torch.Tensor | None = None  # (out, in) KERNEL_DTYPE copy for calls of many rows, made on first use
    screen: tuple[torch.Tensor, torch.Tensor] | None = None  # an int8 head's int4 copy (packed codes, scales_zeros)
    exact_rows: torch.Tensor | None = None  # (out, in) float rows that score screened candidates: a tied embedding


class WeightOnlyParameter(nn.Parameter):
    """A frozen Parameter of packed codes that carries its `WeightOnly` record as `.weight_only` (kept by deepcopy)."""

    def __new__(cls, data: torch.Tensor, record: WeightOnly | None = None, requires_grad: bool = False):
        p = super().__new__(cls, data, requires_grad=False)
        p.weight_only = record
        return p

    def __deepcopy__(self, memo):
        out = type(self)(self.data.clone(), copy.deepcopy(self.weight_only, memo))
        memo[id(self)] = out
        return out

    def __reduce_ex__(self, proto):
        return type(self), (self.data, self.weight_only)


def kernel_fits(mode: str, out_features: int, in_features: int) -> bool:
    """Shapes torch's CPU kernels accept: int8 needs in % 16 == 0; int4 needs out % 16 == 0 and in % group == 0."""
    if mode == "int8":
        return in_features % 16 == 0
    return out_features % 16 == 0 and in_features % INT4_GROUP == 0


def int8_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> (q int8 (out, in), scales (out,) in KERNEL_DTYPE) with w ~ q * scales[:, None].

    The scale is rounded to the kernel's dtype before q is computed, so q * scale is exactly the weight it uses.
    """
    w = w.detach().float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).to(KERNEL_DTYPE)  # (out,)
    q = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def int4_quantize(w: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> (q int32 (out, in) in [0, 15], scales_zeros (in / group, out, 2) in KERNEL_DTYPE) with
    w ~ (q - 8) * scale + zero per group; scale and zero are rounded to the kernel's dtype first (see int8_quantize)."""
    N, K = w.shape
    g = w.detach().float().reshape(N, K // group, group)  # (out, groups, group)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)  # (out, groups)
    scale = ((hi - lo) / 15).clamp(min=1e-6).to(KERNEL_DTYPE)
    zero = (lo + 8 * scale.float()).to(KERNEL_DTYPE)  # the value of code 8, so codes 0..15 span lo..hi
    q = torch.round((g - zero.float()[..., None]) / scale.float()[..., None] + 8).clamp(0, 15)
    sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()  # (groups, out, 2)
    return q.reshape(N, K).to(torch.int32), sz


def int4_dequantize_codes(q: torch.Tensor, scales_zeros: torch.Tensor) -> torch.Tensor:
    """(out, in) codes and (groups, out, 2) scales/zeros -> the (out, in) fp32 weight they stand for."""
    N, K = q.shape
    groups = scales_zeros.shape[0]
    s = scales_zeros[..., 0].t().float()[..., None]  # (out, groups, 1)
    z = scales_zeros[..., 1].t().float()[..., None]
    return ((q.float().reshape(N, groups, K // groups) - 8) * s + z).reshape(N, K)


def quantize_weight_only(w: torch.Tensor, mode: str, compute_dtype: torch.dtype) -> WeightOnlyParameter:
    """(out, in) float weight -> a frozen Parameter of packed codes carrying its `WeightOnly` record."""
    N, K = w.shape
    if mode == "int8":
        data, scales = int8_quantize(w)
        record = WeightOnly("int8", (N, K), scales, compute_dtype)
    elif mode == "int4":
        q, scales = int4_quantize(w)
        data = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.cpu(), 1).to(w.device)  # (out, in / 2) uint8
        record = WeightOnly("int4", (N, K), scales.to(w.device), compute_dtype, INT4_GROUP)
    else:
        raise ValueError(f"weight-only mode {mode!r} is not one of {', '.join(WEIGHT_ONLY_MODES)}")
    return WeightOnlyParameter(data, record)


def weight_only_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., in) -> x W^T + b (..., out) in x's dtype, W weight-only quantized."""
    st: WeightOnly = weight.weight_only
    N, K = st.shape
    lead = x.shape[:-1]
    if x.device.type == "cpu":
        x2 = x.reshape(-1, K).to(KERNEL_DTYPE)  # (M, in): the kernels take 2-D bfloat16 and accumulate in fp32
        if st.mode == "int8" and compiled_gemv_rows(x):  # a compiled decode step: inductor's fused loop, fp32 input
            y = row_products(x, weight) * st.scales.float()  # the codes' products times their row scales
        elif x2.shape[0] >= DENSE_BATCH:  # a prompt's positions or many sequences: the dense GEMM
            y = dense_product(x2, weight)
        elif st.mode == "int8":
            y = torch.ops.aten._weight_int8pack_mm(x2, weight, st.scales)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, weight, st.group_size, st.scales)
        y = y.to(x.dtype).reshape(*lead, N)  # (..., out)
    else:
        y = F.linear(x, dequantize_weight_only(weight).to(x.dtype))
    return y if bias is None else y + bias.to(y.dtype)


def dense_product(x2: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x2 (M, in) KERNEL_DTYPE -> x2 W^T (M, out) through the layer's dense copy (made here on first use)."""
    st: WeightOnly = weight.weight_only
    if st.dense is None:
        st.dense = prepack(dense_weight(weight))
    y = dense_linear(x2, st.dense)  # (M, out)
    return y.float() * st.scales.float() if st.mode == "int8" else y  # int8: the codes' product times row scales


SCREEN_CANDIDATES = 64
"""Tokens an LM head's int4 copy keeps for `screened_argmax` to score exactly. On the default model, over ~2000
positions of Demo prompts, the int8 head's argmax was among them every time (the differences from the full int8
head's argmax were all ties of its bfloat16-rounded logits)."""


def add_screen(weight: torch.Tensor, exact_rows: torch.Tensor | None = None) -> None:
    """Give an int8 LM-head weight on CPU an int4 copy for greedy picks (`screened_argmax`), when the int4 kernel
    takes its shape: the copy reads half the bytes of the int8 head, which is a quarter of a small model's bytes per
    token. Off CPU the weight is dequantized per call, and `quantize.greedy_tokens` never screens: no copy.

    `exact_rows` (out, in): the float table the head was quantized from when the model keeps it anyway (a tied input
    embedding). The candidates are then scored from it, so a greedy pick is the float head's own: on the default model
    the int8 head alone took greedy agreement with fp32 from 100% of 50 Demo prompts to 80%."""
    st: WeightOnly = weight.weight_only
    N, K = st.shape
    if weight.device.type != "cpu" or st.mode != "int8" or not kernel_fits("int4", N, K) or N <= SCREEN_CANDIDATES:
        return
    if exact_rows is not None:
        w = exact_rows.detach().float()  # (out, in): screen what the exact scores use
    else:
        w = weight.data.float() * st.scales.float()[:, None]
    q, scales = int4_quantize(w)
    st.screen = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), scales
    st.exact_rows = exact_rows


def screened_argmax(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (B, in) -> argmax over the head's logits x W^T + b (B,), computed in fp32, reading ~1/3 of its bytes.

    The head's int4 copy (`add_screen`) ranks every token; the SCREEN_CANDIDATES best are scored exactly, in fp32,
    from their float rows where the head has them (`exact_rows`, a tied embedding) or else from their int8 rows
    (codes * scales), and the best of those wins. The full head's kernel rounds its logits to bfloat16, where
    near-equal logits tie; these scores do not."""
    st: WeightOnly = weight.weight_only
    packed, scales_zeros = st.screen
    coarse = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(KERNEL_DTYPE), packed, INT4_GROUP, scales_zeros)  # (B, V)
    if bias is not None:
        coarse = coarse + bias.to(coarse.dtype)
    candidates = coarse.topk(SCREEN_CANDIDATES, dim=-1).indices  # (B, k)
    table = st.exact_rows if st.exact_rows is not None else weight  # float rows, or the int8 codes
    rows = table[candidates].float()  # (B, k, in): the candidates' rows
    exact = torch.bmm(rows, x.float()[:, :, None]).squeeze(-1)  # (B, k)
    if st.exact_rows is None:
        exact = exact * st.scales[candidates].float()  # the codes' products times their row scales
    if bias is not None:
        exact = exact + bias.float()[candidates]
    return candidates.gather(-1, exact.argmax(-1, keepdim=True)).squeeze(-1)


def onednn_packs(w: torch.Tensor) -> bool:
    """Whether `prepack` reorders this weight: a CPU fp32 one, or bfloat16 where oneDNN runs bfloat16 here."""
    return (w.device.type == "cpu" and torch.backends.mkldnn.is_available()
            and (w.dtype == torch.float32
                 or (w.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())))


def prepack(w: torch.Tensor) -> torch.Tensor:
    """(out, in) fp32 or bfloat16 -> the same weight in oneDNN's blocked layout where `onednn_packs` (else as is),
    reordered for calls of about 2 * DENSE_BATCH rows."""
    return torch.ops.mkldnn._reorder_linear_weight(w, 2 * DENSE_BATCH) if onednn_packs(w) else w


def dense_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, in) @ w^T (+ bias) for a weight from `prepack` -> (M, out) in x's dtype."""
    if w.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")
    return F.linear(x, w, bias)


def dense_weight(weight: torch.Tensor) -> torch.Tensor:
    """The (out, in) KERNEL_DTYPE matrix `dense_product` multiplies with: int8 codes as they are (exact, the scales
    come after the product); int4 weights rounded to KERNEL_DTYPE (read back through the kernel, one exact term
    per entry)."""
    st: WeightOnly = weight.weight_only
    if st.mode == "int8":
        return weight.data.to(KERNEL_DTYPE)
    N, K = st.shape
    eye = torch.eye(K, dtype=KERNEL_DTYPE, device=weight.device)
    rows = [torch.ops.aten._weight_int4pack_mm_for_cpu(eye[i:i + 256], weight, st.group_size, st.scales)
            for i in range(0, K, 256)]  # each (<=256, out)
    return torch.cat(rows).t().contiguous()


def dequantize_weight_only(weight: torch.Tensor) -> torch.Tensor:
    """The (out, in) weight in its compute dtype, exactly as the kernels see it (scales/zeros in KERNEL_DTYPE)."""
    st: WeightOnly = weight.weight_only
    if st.mode == "int8":
        return (weight.data.float() * st.scales.float()[:, None]).to(st.compute_dtype)
    # int4 codes sit in the kernel's private packed layout: read them back through the kernel on an identity input,
    # in fp32 (one non-zero term per output, so each entry is (q - 8) * s + z exactly), a block of rows at a time.
    N, K = st.shape
    packed, sz = weight.data.cpu(), st.scales.float().cpu()
    rows = [torch.ops.aten._weight_int4pack_mm_for_cpu(torch.eye(K)[i:i + 256], packed, st.group_size, sz)
            for i in range(0, K, 256)]  # each (<=256, out)
    return torch.cat(rows).t().contiguous().to(device=weight.device, dtype=st.compute_dtype)


def weight_only_numel(weight: torch.Tensor) -> int:
    n, k = weight.weight_only.shape
    return n * k
