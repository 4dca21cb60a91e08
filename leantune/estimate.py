"""`leantune estimate`: trainable/total parameters and a training memory estimate, on the meta device.

Memory model (bytes), for a frozen or trained base:
  weights      = frozen params x weight bytes (+ trainable in their dtype; 4-bit: 0.5 byte + block scales)
  gradients    = trainable x 4 (fp32 master) or x weight bytes for -true precisions
  optimizer    = trainable x state bytes (AdamW: two fp32 moments = 8; SGD: 0, or 4 with momentum)
  activations  = per layer and token, what backward keeps: the block input, the norm outputs, q/k/v, the
                 attention output (SDPA keeps no T x T matrix), the MLP intermediates; plus the LM head's logits
                 for the supervised tokens of one chunk (leantune never materialises all logits).
It is an estimate: allocator fragmentation and framework workspaces come on top.
"""

from __future__ import annotations

from pathlib import Path

import torch

from leantune.config import Config
from leantune.model import GPT
from leantune.peft.adapter import AdapterArgs
from leantune.peft.lora import LoRAArgs

DTYPE_BYTES = {"32-true": 4, "bf16-true": 2, "16-true": 2, "bf16-mixed": 4, "16-mixed": 4}
QUANT_BYTES = {"bnb.nf4": 0.5 + 4 / 64, "bnb.fp4": 0.5 + 4 / 64, "bnb.nf4-dq": 0.5 + 1 / 64 + 4 / (64 * 256),
               "bnb.fp4-dq": 0.5 + 1 / 64 + 4 / (64 * 256), "bnb.int8": 1 + 4 / 4096}


def resolve_config(model: str) -> Config:
    path = Path(model)
    if (path / "config.json").is_file():
        return Config.from_checkpoint(path)
    return Config.from_name(model)


def estimate(config: Config, method: str, method_args=None, precision: str = "bf16-true", quantize: str | None = None,
             micro_batch_size: int = 1, max_seq_length: int = 2048, optimizer: str = "AdamW",
             activation_checkpointing: bool = False) -> dict:
    from leantune.methods import apply_method, method_args_class

    if method_args is None and method_args_class(method) is not None:
        method_args = method_args_class(method)()
    with torch.device("meta"):
        model = GPT(config)
        trainable_names = set(apply_method(model, method, method_args))
    unique = {}
    for n, p in model.named_parameters():
        unique.setdefault(id(p), (n, p))
    total = sum(p.numel() for _, p in unique.values())
    trainable = sum(p.numel() for n, p in unique.values() if n in trainable_names)
    frozen_linear = sum(p.numel() for n, p in unique.values() if n not in trainable_names and p.dim() == 2
                        and "wte" not in n)
    frozen_other = total - trainable - frozen_linear
    wbytes = DTYPE_BYTES[precision] if precision.endswith("true") else 4
    if quantize:
        weights = frozen_linear * QUANT_BYTES[quantize] + frozen_other * 2 + trainable * wbytes
    else:
        weights = (total - trainable) * wbytes + trainable * wbytes
    grads = trainable * (4 if precision.endswith("mixed") else wbytes)
    state = {"AdamW": 8, "Adam": 8, "SGD": 0, "bnb.AdamW8bit": 2, "bnb.PagedAdamW8bit": 2, "bnb.PagedAdamW": 8}
    optim = trainable * state.get(optimizer, 8)
    act_bytes = 2 if precision != "32-true" else 4
    c = config
    tokens = micro_batch_size * max_seq_length
    qkv = sum(c.qkv_sizes)
    mlp = (3 if c.mlp_class == "swiglu" else 2) * c.intermediate_size
    per_token_layer = 3 * c.n_embd + qkv + c.n_head * c.head_size + mlp  # input, norms, qkv, attn out, mlp
    layers = 1 if activation_checkpointing else c.n_layer
    activations = tokens * (layers * per_token_layer + (c.n_layer * c.n_embd if activation_checkpointing else 0))
    activations = activations * act_bytes + min(tokens, 2048) * c.padded_vocab_size * 4 * 2  # one logits chunk + grad
    gib = 2**30
    return dict(
        trainable_params=trainable, total_params=total, trainable_percent=round(100 * trainable / total, 4),
        weights_gb=round(weights / gib, 3), gradients_gb=round(grads / gib, 3), optimizer_gb=round(optim / gib, 3),
        activations_gb=round(activations / gib, 3), total_gb=round((weights + grads + optim + activations) / gib, 3),
    )


def estimate_command(
    model: str = "HuggingFaceTB/SmolLM2-135M-Instruct",
    method: str = "lora",
    precision: str = "bf16-true",
    quantize: str | None = None,
    micro_batch_size: int = 1,
    max_seq_length: int = 2048,
    optimizer: str = "AdamW",
    activation_checkpointing: bool = False,
    lora: LoRAArgs = LoRAArgs(),
    adapter: AdapterArgs = AdapterArgs(),
) -> dict:
    """Parameter counts and a memory estimate for finetuning, without loading any weights.

    Args:
        model: A preset name (see `leantune download list`) or a checkpoint folder.
        method: lora, qlora, adapter, adapter_v2 or full.
        precision: 32-true, bf16-true, 16-true, bf16-mixed, 16-mixed.
        quantize: bnb.nf4, bnb.nf4-dq, bnb.fp4, bnb.fp4-dq, bnb.int8 for the frozen base.
        micro_batch_size: Samples per forward/backward pass.
        max_seq_length: Tokens per sample.
        optimizer: AdamW, SGD, bnb.AdamW8bit, bnb.PagedAdamW, bnb.PagedAdamW8bit.
        activation_checkpointing: Estimate with block recomputation.
        lora: LoRA hyperparameters (--lora.r, --lora.targets, ...).
        adapter: LLaMA-Adapter hyperparameters.
    """
    from leantune.finetune import _method_args

    if method == "qlora" and quantize is None:
        quantize = "bnb.nf4-dq"
    cfg = resolve_config(model)
    result = estimate(cfg, method, _method_args(method, lora, adapter), precision, quantize, micro_batch_size,
                      max_seq_length, optimizer, activation_checkpointing)
    width = max(len(k) for k in result)
    print(f"{cfg.name or model}: {method}" + (f" + {quantize}" if quantize else "") + f", {precision}, "
          f"batch {micro_batch_size} x {max_seq_length} tokens")
    for k, v in result.items():
        print(f"  {k:<{width}}  {v:,}" if isinstance(v, int) else f"  {k:<{width}}  {v}")
    return result
