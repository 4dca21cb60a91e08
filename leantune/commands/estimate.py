"""`leantune estimate`: parameter counts and a training memory estimate on the meta device, without weights."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from typing import Literal

import torch

from leantune.commands.flags import check_at_least
from leantune.estimate import estimate, estimate_t5, resolve_config
from leantune.methods import METHODS
from leantune.models.quantize import check_mode
from leantune.models.t5.model import T5Config
from leantune.runtime import PRECISIONS, default_precision
from leantune.train.optim import optimizer_class


def _estimate(model: str = "HuggingFaceTB/SmolLM2-135M-Instruct", method: str = "lora", precision: str = "bf16-true",
              quantize: str | None = None, micro_batch_size: int = 1, max_seq_length: int = 2048,
              optimizer: str = "AdamW", activation_checkpointing: bool = False,
              device: Literal["cuda", "cpu"] = "cuda", objective: Literal["sft", "dpo", "ipo", "orpo", "simpo"] = "sft",
              reference: Literal["adapter_off", "precomputed"] = "adapter_off", **method_flags) -> dict:
    m = METHODS.get(method)
    if m is None:
        raise ValueError(f"--method {method!r}: choose among {', '.join(METHODS)}")
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "auto":  # what finetune's auto picks on that device (a CPU: this machine's)
        precision = "bf16-true" if device == "cuda" else default_precision(torch.device("cpu"), training=True)
    check_at_least("micro_batch_size", micro_batch_size, 1)
    check_at_least("max_seq_length", max_seq_length, 1)
    try:
        optimizer_class(optimizer)  # refuses a name torch.optim (or bitsandbytes) does not have
    except ValueError as e:
        raise ValueError(str(e).replace("--optimizer.name", "--optimizer")) from None
    quantize = check_mode(quantize if quantize is not None else m.default_quantize)
    cfg = resolve_config(model)
    if isinstance(cfg, T5Config):  # encoder-decoder: counts and parameter memory (activations not modelled yet)
        if quantize:
            raise ValueError(f"--quantize {quantize}: quantized T5 bases are not supported yet")
        result = estimate_t5(cfg, method, method_flags.get(m.flag), precision, optimizer)
    else:
        result = estimate(cfg, method, method_flags.get(m.flag), precision, quantize, micro_batch_size,
                          max_seq_length, optimizer, activation_checkpointing, device, objective, reference)
    width = max(len(k) for k in result)
    print(f"{cfg.name or model}: {method}" + (f" + {quantize}" if quantize else "") + f", {precision}, "
          f"batch {micro_batch_size} x {max_seq_length} tokens")
    for k, v in result.items():
        print(f"  {k:<{width}}  {v:,}" if isinstance(v, int) else f"  {k:<{width}}  {v}")
    return result


def _build() -> Callable[..., dict]:
    """`_estimate` with one --<flag>.* group per method that has hyperparameters (from the method table)."""
    hints = typing.get_type_hints(_estimate)
    base = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints.get(p.name, p.annotation))
            for p in inspect.signature(_estimate).parameters.values() if p.kind != p.VAR_KEYWORD]
    groups = {m.flag: m.args_class for m in METHODS.values() if m.args_class is not None}
    params = base + [inspect.Parameter(flag, inspect.Parameter.KEYWORD_ONLY, default=cls(), annotation=cls)
                     for flag, cls in groups.items()]

    def command(**kwargs) -> dict:
        return _estimate(**kwargs)

    command.__signature__ = inspect.Signature(params, return_annotation=dict)
    command.__name__ = command.__qualname__ = "estimate"
    command.__doc__ = "\n".join([
        "Parameter counts and a memory estimate for finetuning, without loading any weights.", "", "Args:",
        "    model: A preset name (see `leantune download list`) or a checkpoint folder.",
        f"    method: One of {', '.join(METHODS)}.",
        "    precision: 32-true, bf16-true, 16-true, bf16-mixed, 16-mixed, or auto (what finetune picks on --device).",
        "    quantize: bnb.nf4, bnb.nf4-dq, bnb.fp4, bnb.fp4-dq, bnb.int8 for the frozen base (default: the method's).",
        "    micro_batch_size: Samples per forward/backward pass.",
        "    max_seq_length: Tokens per sample.",
        "    optimizer: AdamW, SGD, bnb.AdamW8bit, bnb.PagedAdamW, bnb.PagedAdamW8bit.",
        "    activation_checkpointing: Estimate with block recomputation.",
        "    device: cuda or cpu (CPU dropout keeps a wider mask; CUDA's AdamW updates all tensors at once).",
        "    objective: sft, or a preference objective (dpo, ipo, orpo, simpo): micro_batch_size pairs are twice as",
        "        many rows, and dpo/ipo count the reference pass (reference_pass_gb).",
        "    reference: dpo/ipo's reference: adapter_off (an extra no-grad forward) or precomputed (none while training).",
        *(f"    {flag}: Hyperparameters of {flag} (--{flag}.*)." for flag in groups),
    ])
    return command


estimate_command = _build()
