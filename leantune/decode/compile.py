"""Regional torch.compile: compile one transformer Block's forward and let every layer reuse the graph.

Compiling the whole model makes one huge graph (slow to build, recompiled whenever anything outside the blocks
changes); compiling each Block separately gives N identical graphs. `nn.Module.compile` on every block shares
one Dynamo cache entry keyed by Block.forward's code, because parameters are graph inputs rather than
constants, so the cost is one forward + backward graph (two: the first block sees an input that needs no grad).
Inductor fuses RMSNorm, RoPE, SwiGLU, the residual adds and the LoRA branch's dropout/scale into a few C++
loops around the GEMMs. On CPU inductor needs a C++ compiler; without one, or if compilation fails, the blocks
stay eager and the caller is told why.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
from collections.abc import Sequence

import torch
import torch.nn as nn

from leantune.decode.gemv import ReductionLinears
from leantune.decode.woq import DENSE_BATCH, WeightOnlyParameter
from leantune.models.quantize import greedy_tokens

log = logging.getLogger(__name__)


def compile_unavailable_reason(device: torch.device | str = "cpu") -> str | None:
    """Why inductor cannot compile for `device` here, or None when it can."""
    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    if torch.device(device).type == "cpu":
        return _cpu_compiler_problem()
    return None


@functools.cache
def _cpu_compiler_problem() -> str | None:
    """Why inductor finds no working C++ compiler, or None. The probe runs the compiler (~0.3 s), so it runs once per
    process, not on every `generate_tokens(compiled=True)` (each chat answer, each batch)."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as e:  # InvalidCxxCompiler, or an inductor without cpp_builder
        cxx = os.environ.get("CXX", "g++")
        return f"no working C++ compiler for inductor ({cxx} {'found' if shutil.which(cxx) else 'not found'}: {e})"
    return None


def compile_blocks(blocks: Sequence[nn.Module], *, dynamic: bool | None = None, mode: str | None = None) -> bool:
    """Compile each of a model's repeated blocks in place (its kind's `blocks`: the same graph serves every layer).
    Returns False (blocks untouched) if not possible.

    Call after PEFT layers are swapped in (the graph traces them too) and before the first forward. The first
    step pays the compile time (about a minute on 2 CPU cores); later steps reuse the graphs. Evaluation under
    no_grad and new sequence lengths compile further graphs (new lengths go dynamic after the first change).
    """
    device = next(blocks[0].parameters()).device
    reason = compile_unavailable_reason(device)
    if reason is not None:
        log.warning("torch.compile disabled, running eager: %s", reason)
        return False
    use_persistent_cache()
    for block in blocks:
        block.compile(dynamic=dynamic, mode=mode)
    return True


def uncompile_blocks(blocks: Sequence[nn.Module]) -> None:
    """Undo compile_blocks: the blocks run eager again (e.g. after a compile error)."""
    for block in blocks:
        block._compiled_call_impl = None


STATIC_CACHE_STEP = 128
"""A compiled decode step sees a KV cache of fixed length: the length is rounded up to a multiple of this, so prompts
of similar size reuse one graph instead of compiling one per length (a second length compiles once more, with the
length symbolic). Each step's attention reads the whole buffer: on the default model 128 more positions cost ~0.3 ms
of a ~11 ms int4 token."""


def static_cache_length(tokens: int, limit: int) -> int:
    """The static KV-cache length for `tokens` positions: the next multiple of STATIC_CACHE_STEP, at most `limit`."""
    return min(limit, -(-tokens // STATIC_CACHE_STEP) * STATIC_CACHE_STEP)


def decode_step(model: nn.Module, idx: torch.Tensor, input_pos: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One KV-cache step: idx (B, T) at input_pos (T,) -> logits (B, padded_vocab) of the last position."""
    with reduction_linears():
        return model.lm_head(_last_hidden(model, idx, input_pos, position_ids, attention_mask))


def greedy_decode_step(model: nn.Module, idx: torch.Tensor, input_pos: torch.Tensor,
                       position_ids: torch.Tensor | None = None,
                       attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """`decode_step` for greedy decoding: -> the next token ids (B,), through `quantize.greedy_tokens` (a weight-only
    head screens with its int4 copy instead of computing every logit in int8)."""
    with reduction_linears():
        return greedy_tokens(model.lm_head, _last_hidden(model, idx, input_pos, position_ids, attention_mask))


def reduction_linears():
    """While compiling a decode step: its few-row float products as fused reductions (`gemv.ReductionLinears`)."""
    return ReductionLinears() if torch.compiler.is_compiling() else contextlib.nullcontext()


def _last_hidden(model, idx, input_pos, position_ids, attention_mask) -> torch.Tensor:
    hidden = model.decode(idx, input_pos, position_ids=position_ids, attention_mask=attention_mask,
                          return_hidden=True)  # (B, T, C)
    return hidden[:, -1]  # (B, C)


@functools.cache
def _compiled(step):
    return torch.compile(step)


COMPILE_MIN_TOKENS = 1024
"""Unset --compile compiles the decode step only for answers allowed at least this many tokens. On the default model (2
CPU cores, 128 greedy tokens, bench/results/compile_cpu.json) compiling saves ~23 ms a token in fp32 (~24.5 tokens/s
eager with packed linears -> 54), ~10.5 ms under int8 (53 -> 119) and ~17 ms under int4 (38 -> 108), against 8-10 s
for a compile from inductor's cache (the step is traced again in each process) and 14-38 s for a first one. So a
cached compile is won back after ~350 (fp32), ~560 (int4) and ~940 (int8) tokens, a first one only after 900-3600. The budget is an upper
bound (most answers stop at EOS well before it) and a run cannot tell cheaply whether the cache holds its graph, so
the threshold stays where every mode wins back even a first compile in most runs."""


def wants_compile(requested: bool | None, max_new_tokens: int, device: torch.device | str = "cpu") -> bool:
    """--compile as given; unset (None): compile only when the token budget can win back the compile time. False
    where inductor cannot compile for `device` (logged when --compile true asked for it), so the caller prepares
    eager decoding (packed linears) instead of falling back to unprepared eager steps."""
    wanted = requested if requested is not None else max_new_tokens >= COMPILE_MIN_TOKENS
    if not wanted:
        return False
    reason = compile_unavailable_reason(device)
    if reason is not None:
        (log.warning if requested else log.info)("--compile ignored, decoding eager: %s", reason)
        return False
    return True


def use_persistent_cache() -> str:
    """Keep inductor's compiled graphs in the user's cache folder ($XDG_CACHE_HOME or ~/.cache, then
    leantune/inductor) instead of the temp folder, which a reboot empties; TORCHINDUCTOR_CACHE_DIR, when set, wins.
    Returns the folder."""
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(base, "leantune", "inductor")
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


def compiled_decode_step(model: nn.Module, batch_size: int = 1, greedy: bool = False):
    """`decode_step` (with greedy=True `greedy_decode_step`) compiled whole by inductor, bound to `model` (with a
    static KV cache: `set_kv_cache(static=True)`), or None when inductor cannot compile here (the reason is logged).

    One graph covers all layers, the LM head and the elementwise work between the matrix products, so a one-token
    step runs a few fused C++ loops around the weight kernels instead of ~20 small eager ops per layer; that per-op
    overhead, not the weights, is most of an eager step of a small model on a CPU (see bench/decode_cpu.py). The first
    (batch, cache length) compiles a static graph, about a minute on 2 CPU cores the first time and seconds later from
    inductor's on-disk cache; a second shape compiles once more with those sizes symbolic, which then serves all.
    An adapter's tensors and LoRA's scale are graph inputs and eval skips its dropout, so another adapter of the same
    shapes (other weights, alpha or dropout) runs the same graph: in this process without a recompile, in a new one
    from the cache (tests/test_compile_cache.py).

    Also None for `batch_size` >= woq.DENSE_BATCH rows of a weight-only quantized model: those steps run its prepacked
    oneDNN weights (opaque to the compiler) and are bound by the GEMMs, so they stay eager."""
    reason = compile_unavailable_reason(next(model.parameters()).device)
    if reason is not None:
        log.warning("--compile ignored, decoding eager: %s", reason)
        return None
    if batch_size >= DENSE_BATCH and any(isinstance(p, WeightOnlyParameter) for p in model.parameters()):
        return None
    use_persistent_cache()
    return functools.partial(_compiled(greedy_decode_step if greedy else decode_step), model)
