"""`leantune export`: hand a finetune to the rest of the ecosystem as an HF folder, a PEFT adapter or a GGUF file."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from leantune.finetune import DEFAULT_CHECKPOINT

_DTYPES = ("float32", "bfloat16", "float16")


def _torch_dtype(dtype: str | None) -> torch.dtype | None:
    if dtype is None:
        return None
    if dtype not in _DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose among {', '.join(_DTYPES)}")
    return getattr(torch, dtype)


def export_command(
    adapter: Path | None = None,
    checkpoint_dir: Path = DEFAULT_CHECKPOINT,
    format: Literal["hf", "peft", "gguf"] = "hf",
    out_dir: Path | None = None,
    dtype: str | None = None,
    gguf_type: Literal["f16", "q8_0"] = "f16",
) -> Path:
    """Export a finetune (or the base model) in a format other tools load directly.

    Args:
        adapter: A leantune adapter folder (e.g. out/finetune/lora/final). Without it the base model is exported.
        checkpoint_dir: The base model (an HF folder) the adapter was trained on.
        format: hf = the model with LoRA adapters merged in, as a Hugging Face folder (weights, config, tokenizer,
            generation config, chat template) that transformers and vLLM load; peft = the LoRA adapter unmerged, as
            adapter_config.json + adapter_model.safetensors for peft.PeftModel.from_pretrained (LoRA/QLoRA only);
            gguf = the merged model as one GGUF file for llama.cpp.
        out_dir: Output folder (hf, peft) or .gguf file path (gguf). Default: <adapter>/export-<format> (or
            out/export/<base name>-<format> without an adapter), and model-<gguf_type>.gguf inside it for gguf.
        dtype: float32, bfloat16 or float16 for the written hf/peft weights (default: as loaded, float32).
        gguf_type: Weight type of the GGUF file: f16, or q8_0 (8-bit blocks, about half the size).
    """
    from leantune.checkpoint.hf import load_hf_checkpoint, save_hf_checkpoint

    checkpoint_dir = Path(checkpoint_dir)
    adapter = Path(adapter) if adapter is not None else None
    if format not in ("hf", "peft", "gguf"):
        raise ValueError(f"--format {format!r}: choose among hf, peft, gguf")
    torch_dtype = _torch_dtype(dtype)
    base = adapter if adapter is not None else Path("out") / "export" / checkpoint_dir.name
    out = Path(out_dir) if out_dir is not None else (
        base / f"export-{format}" if adapter is not None else base.with_name(f"{base.name}-{format}"))

    if format == "peft":
        from leantune.checkpoint.peft_format import export_peft
        from leantune.methods import load_adapter, method_args_class, read_manifest

        if adapter is None:
            raise ValueError("--format peft needs --adapter DIR (a leantune LoRA checkpoint folder)")
        method = read_manifest(adapter)["method"]
        if method not in ("lora", "qlora"):
            why = " (adapter/adapter_v2 have no PEFT-format equivalent)" if method in ("adapter", "adapter_v2") else ""
            raise ValueError(f"{adapter}: method {method!r} cannot be exported as PEFT; only lora/qlora adapters "
                             f"can{why}; use it with --adapter in generate/chat instead")
        model = load_hf_checkpoint(checkpoint_dir, dtype=torch.float32)
        # only the LoRA tensors are written: the base's quantization does not matter here
        manifest = load_adapter(model, adapter, checkpoint_dir, check_quantization=False)
        args = method_args_class("lora")(**manifest["method_args"])
        export_peft(model, out, str(checkpoint_dir), args, dtype=torch_dtype)
        print(f"exported PEFT adapter to {out}")
        return out

    model = load_hf_checkpoint(checkpoint_dir, dtype=torch.float32)
    if adapter is not None:
        from leantune.merge import merge_adapters

        merge_adapters(model, [adapter])
    model.eval()
    if format == "hf":
        save_hf_checkpoint(model, out, source_dir=checkpoint_dir, dtype=torch_dtype)
        print(f"exported HF model to {out}")
        return out
    from leantune.checkpoint.gguf_export import export_gguf

    path = out if out.suffix == ".gguf" else out / f"model-{gguf_type}.gguf"
    path.parent.mkdir(parents=True, exist_ok=True)
    result = export_gguf(model, checkpoint_dir, path, gguf_type=gguf_type)
    print(f"exported GGUF to {result}")
    return result
