"""`leantune merge`: fold one or several LoRA adapters (with weights) into the base and write an HF folder."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from leantune.finetune import DEFAULT_CHECKPOINT


def merge_adapters(model, adapters: list[Path], weights: list[float] | None = None, dequantize_base: bool = True):
    """Apply and fold each LoRA adapter in turn: W <- W + sum_i w_i * scale_i * B_i A_i.

    An adapter trained on a quantized base (QLoRA) learned its update against the dequantized weights, so with
    `dequantize_base` the float base is first replaced by quantize -> dequantize of itself (the exact weights
    training computed with); the result is written in float, never requantized.
    """
    from leantune.methods import apply_method, load_trainable, method_args_class, read_manifest
    from leantune.peft.lora import merge_lora

    weights = weights or [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise ValueError(f"{len(adapters)} adapters but {len(weights)} weights")
    from leantune.checkpoint.peft_format import import_peft, is_peft_dir

    if dequantize_base:
        _dequantized_base(model, [read_manifest(p) for p in adapters if not is_peft_dir(p)])
    for path, w in zip(adapters, weights):
        if is_peft_dir(path):  # a LoRA saved by peft
            import_peft(model, Path(path))
            merge_lora(model, weight=w)
            continue
        manifest = read_manifest(path)
        if manifest["method"] not in ("lora", "qlora"):
            raise ValueError(f"{path}: method {manifest['method']!r} cannot be merged into the weights; "
                             "only LoRA adapters can (load others with --adapter instead)")
        apply_method(model, "lora", method_args_class("lora")(**manifest["method_args"]))
        load_trainable(model, "lora", Path(path))
        merge_lora(model, weight=w)
    model.requires_grad_(False)
    return model


def _dequantized_base(model, manifests: list[dict]) -> None:
    from leantune.quantize import round_trip_
    from leantune.runtime import compute_dtype

    modes = {(m.get("quantize"), m.get("precision")) for m in manifests if m.get("quantize")}
    if len(modes) > 1:
        raise ValueError(f"the adapters were trained on differently quantized bases {sorted(modes)}; merge them "
                         "one at a time, or pass --dequantize_base false to merge into the full-precision weights")
    if modes:
        mode, precision = modes.pop()
        round_trip_(model, mode, compute_dtype(precision or "32-true"))
        print(f"merging into the base dequantized from {mode}, the weights the adapter was trained against")


def merge_command(
    adapter: Path | list[Path] | None = None,
    checkpoint_dir: Path = DEFAULT_CHECKPOINT,
    out_dir: Path | None = None,
    weights: list[float] | None = None,
    dtype: str | None = None,
    dequantize_base: bool = True,
) -> Path:
    """Fold LoRA adapters into the base model and write a Hugging Face folder transformers loads.

    Args:
        adapter: An adapter folder written by `leantune finetune lora` (its final/ or step-N/ folder), or a list
            of them, e.g. --adapter [out/a/final,out/b/final] --weights [0.7,0.3].
        checkpoint_dir: The base model the adapters were trained on.
        out_dir: Output folder (default: <first adapter>/merged).
        weights: One weight per adapter (default 1.0 each), e.g. to blend two adapters.
        dtype: float32, bfloat16 or float16 for the written weights (default: the base's dtype).
        dequantize_base: For an adapter trained on a quantized base (QLoRA): fold it into that base dequantized
            (the weights it was trained against, so the merged model reproduces the finetuned one; it keeps the
            quantization error) or, with false, into the original full-precision weights.
    """
    from leantune.checkpoint.hf import load_hf_checkpoint, save_hf_checkpoint

    if adapter is None:
        raise ValueError("merge needs --adapter DIR (a leantune LoRA checkpoint folder, e.g. out/finetune/lora/final)")
    adapters = [Path(a) for a in (adapter if isinstance(adapter, list | tuple) else [adapter])]
    out_dir = Path(out_dir or adapters[0] / "merged")
    model = load_hf_checkpoint(checkpoint_dir, dtype=torch.float32)
    merge_adapters(model, adapters, weights, dequantize_base)
    if dtype is None:  # keep the base's dtype: the copied config.json must describe the written weights
        with open(Path(checkpoint_dir) / "config.json", encoding="utf-8") as f:
            base = json.load(f)
        dtype = base.get("torch_dtype") or base.get("dtype") or "float32"
    torch_dtype = getattr(torch, dtype)
    save_hf_checkpoint(model, out_dir, source_dir=checkpoint_dir, dtype=torch_dtype)
    print(f"merged {len(adapters)} adapter(s) into {out_dir}")
    return out_dir
