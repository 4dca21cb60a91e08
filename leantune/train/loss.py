"""Cross-entropy only where it is needed, without keeping the logits alive.

The LM head is a large share of a small model's FLOPs and its fp32 logits (tokens x vocab) dominate activation
memory. Masked prompt tokens need no logits at all, so only supervised positions are projected. For a plain
linear head the loss and its gradients are computed chunk by chunk in one pass (softmax minus one-hot, then the
two matmuls), so no (tokens x vocab) tensor is kept for the backward pass and no log-softmax backward is needed
(on the CPU the chunk's scratch buffers are reused from step to step, see `workspace`).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i W^T + b, y_i); gradients for h, W, b are produced during the forward pass, chunk by chunk.

    Per chunk: one GEMM into a reused fp32 buffer, one row-wise softmax in place (each row is read from memory
    once and stays in cache for max, sum and scale), loss = -log p_y, then (softmax - one-hot) @ W. Nothing
    (chunk x vocab)-sized is allocated per chunk, which matters on CPU where such buffers are fresh, page-faulted
    mmaps. Rows whose p_y underflows get the exact logsumexp from recomputed logits (a few rows at most).
    """

    @staticmethod
    def forward(ctx, h, weight, bias, y, chunk_size):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        gh = torch.empty_like(h) if need_h else None
        gw = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        gb = torch.zeros_like(bias, dtype=torch.float32) if need_b and bias is not None else None
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        rows_max = min(chunk_size, h.shape[0])
        probs_buf = workspace(rows_max, weight.shape[0], torch.float32, h.device)  # (n, V), reused
        # the products run in the weight's dtype: a bf16 head (bf16-mixed) gets bf16 GEMMs with fp32 accumulation,
        # its logits and softmax-minus-one-hot rounded to bf16 in a second reused (n, V) buffer, as autocast would
        low = weight.dtype if weight.dtype != torch.float32 else None
        low_buf = workspace(rows_max, weight.shape[0], low, h.device) if low else None
        for s in range(0, h.shape[0], chunk_size):
            hc, yc = h[s:s + chunk_size], y[s:s + chunk_size]
            hc = hc.to(weight.dtype)
            n = hc.shape[0]
            probs = probs_buf[:n]
            if bias is None and low is None:
                torch.mm(hc, weight.t(), out=probs)  # logits, then softmax in place
                torch.softmax(probs, dim=-1, out=probs)
            elif bias is None:
                torch.mm(hc, weight.t(), out=low_buf[:n])  # (n, V) bf16 logits
                # widen, then softmax in place: the same values as softmax(dtype=float32), which on CPU took ~3x as
                # long as the copy and the fp32 softmax together
                torch.softmax(probs.copy_(low_buf[:n]), dim=-1, out=probs)
            else:
                torch.softmax(F.linear(hc, weight, bias), dim=-1, dtype=torch.float32, out=probs)
            rows = torch.arange(n, device=yc.device)
            p_y = probs[rows, yc]  # (n,)
            ce = -p_y.log()
            tiny = p_y < 1e-30  # -log(p_y) loses precision (or is inf) only where p_y underflows
            if bool(tiny.any()):
                bad = F.linear(hc[tiny], weight, bias).float()  # (k, V)
                ce[tiny] = torch.logsumexp(bad, dim=-1) - bad.gather(1, yc[tiny][:, None]).squeeze(1)
            loss += ce.sum()
            if gh is None and gw is None and gb is None:
                continue
            probs[rows, yc] -= 1.0  # d loss / d logits = softmax - one-hot
            g = low_buf[:n].copy_(probs) if low else probs.to(hc.dtype)
            if gh is not None and gh.dtype == g.dtype:
                torch.mm(g, weight, out=gh[s:s + n])  # (n, C)
            elif gh is not None:
                gh[s:s + n] = g @ weight  # (n, C) in the head's dtype, stored in h's
            if gw is not None:
                gw += (g.t() @ hc).float()  # (V, C)
            if gb is not None:
                gb += probs.sum(0)
        ctx.save_for_backward(*(t if t is not None else torch.empty(0) for t in (gh, gw, gb)))
        ctx.present = (gh is not None, gw is not None, gb is not None)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        gh, gw, gb = ctx.saved_tensors
        has_h, has_w, has_b = ctx.present
        return (gh * grad_loss.to(gh.dtype) if has_h else None,
                (gw * grad_loss).to(ctx.dtypes[0]) if has_w else None,
                (gb * grad_loss).to(ctx.dtypes[1]) if has_b else None, None, None)


_frozen_copies: dict[torch.dtype, tuple[weakref.ref, tuple, torch.Tensor]] = {}


def frozen_copy(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`weight` in `dtype`, cast once and reused while the same tensor holds the same values (its storage and version
    unchanged). A frozen head tied to the fp32 embedding table (SmolLM2's) is otherwise copied to bf16 every step
    under bf16-mixed: 28 M values, ~15 ms of a ~0.6 s CPU step on the default model. One copy is kept per dtype;
    `release_head_caches` frees it when training ends."""
    if weight.dtype == dtype:
        return weight
    key = (weight.data_ptr(), weight._version, weight.shape)
    held = _frozen_copies.get(dtype)
    if held is None or held[0]() is not weight or held[1] != key:
        held = (weakref.ref(weight), key, weight.detach().to(dtype))
        _frozen_copies[dtype] = held
    return held[2]


_workspaces: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def workspace(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised (rows, cols) scratch buffer for the fused head loss, kept between steps on the CPU: a fresh
    one there is a new mmap whose pages fault in on first touch, every step (the default model's 1020 x 49152 logits
    in fp32 and bf16: ~300 MB, ~73k page faults a step). The head runs while the forward's activations are alive, so
    keeping it raises no peak. CUDA's caching allocator reuses memory by itself. One call's buffers at a time: the
    loss is never re-entered. `release_head_caches` frees them."""
    if device.type != "cpu":
        return torch.empty(rows, cols, dtype=dtype, device=device)
    key = (dtype, device)
    held = _workspaces.get(key)
    if held is None or held.numel() < rows * cols:
        _workspaces.pop(key, None)  # the smaller one goes before the larger one is made
        held = _workspaces[key] = torch.empty(rows * cols, dtype=dtype, device=device)
    return held[:rows * cols].view(rows, cols)


def release_head_caches() -> None:
    """Free what the head loss keeps between steps: the frozen head's low-precision copy and its CPU workspaces."""
    _frozen_copies.clear()
    _workspaces.clear()


def supervised_ce_sum(hidden: torch.Tensor, lm_head: torch.nn.Module, labels: torch.Tensor,
                      chunk_size: int = 1024) -> torch.Tensor:
    """Sum of token cross-entropies. hidden (B, T, C), labels (B, T) pre-shifted with -100 = ignore."""
    keep = labels != -100  # (B, T)
    h = hidden[keep]  # (N, C): only supervised positions
    y = labels[keep]  # (N,)
    if h.shape[0] == 0:  # through the head all the same: its trained tensors get zero gradients, not None, so that
        return lm_head(h).sum()  # every FSDP rank reduce-scatters the same tensors (torch < 2.12 cannot skip unused)
    if type(lm_head) is torch.nn.Linear:
        if not torch.is_grad_enabled():
            return _plain(h, lm_head, y, chunk_size)
        weight, bias = lm_head.weight, lm_head.bias
        amp = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else None
        if amp is not None and not weight.requires_grad:  # a frozen head under autocast: its GEMMs in the amp dtype
            weight = frozen_copy(weight, amp)  # a no-op for a head stored in it; cast once for an fp32 (tied) one
            bias = bias.to(amp) if bias is not None and not bias.requires_grad else bias
        return _FusedLinearCrossEntropy.apply(h, weight, bias, y, chunk_size)
    # A PEFT layer on the head (LoRA, adapter v2): call it as a module; recompute per chunk to bound memory.
    pieces = list(zip(h.split(chunk_size), y.split(chunk_size)))
    if len(pieces) == 1 or not torch.is_grad_enabled():
        return _plain(h, lm_head, y, chunk_size)
    return sum(checkpoint(_chunk_ce, lm_head, hc, yc, use_reentrant=False) for hc, yc in pieces)


def _chunk_ce(lm_head, hc, yc):
    return F.cross_entropy(lm_head(hc).float(), yc, reduction="sum")  # logits (n, V) live only here


def _plain(h, lm_head, y, chunk_size):
    return sum(_chunk_ce(lm_head, hc, yc) for hc, yc in zip(h.split(chunk_size), y.split(chunk_size)))



def seq2seq_ce_sum(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Summed cross-entropy of an encoder-decoder batch (`leantune.data.seq2seq`: input_ids and attention_mask for
    the encoder, decoder_input_ids, labels aligned with them), through the same fused head loss as decoder batches:
    the model gives the decoder output and `head_input` applies its pre-head rescale (T5's d_model**-0.5)."""
    hidden = model(batch["input_ids"], batch["decoder_input_ids"], attention_mask=batch.get("attention_mask"),
                   return_hidden=True)  # (B, T, C)
    return supervised_ce_sum(model.head_input(hidden), model.lm_head, batch["labels"])


def is_seq2seq_batch(batch: dict) -> bool:
    """Encoder-decoder batches carry the decoder's inputs; decoder-only batches do not."""
    return "decoder_input_ids" in batch
