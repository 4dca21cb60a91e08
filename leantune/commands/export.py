"""`leantune export`: a finetune as an HF folder, a PEFT adapter folder or a GGUF file."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from leantune.download import DEFAULT_CHECKPOINT, ensure_checkpoint
from leantune.export import export_gguf_file, export_hf, export_peft_adapter, torch_dtype


def export(
    adapter: Path | None = None,
    checkpoint_dir: Path = DEFAULT_CHECKPOINT,
    format: Literal["hf", "peft", "gguf"] = "hf",
    out_dir: Path | None = None,
    dtype: str | None = None,
    gguf_type: Literal["f16", "q8_0"] = "f16",
) -> Path:
    """Export a finetune (or the base model) in a format other tools load directly.

    Args:
        adapter: An adapter folder (e.g. out/finetune/lora/final). Without it the base model is exported.
        checkpoint_dir: The base model (an HF folder) the adapter was trained on.
        format: hf = the model with the adapter merged in, as a Hugging Face folder (weights, config, tokenizer,
            generation config, chat template) that transformers and vLLM load; peft = the adapter unmerged, as
            adapter_config.json + adapter_model.safetensors for peft.PeftModel.from_pretrained (methods with a
            PEFT equivalent: lora, qlora); gguf = the merged model as one GGUF file for llama.cpp.
        out_dir: Output folder (hf, peft) or .gguf file path (gguf). Default: <adapter>/export-<format> (or
            out/export/<base name>-<format> without an adapter), and model-<gguf_type>.gguf inside it for gguf.
        dtype: float32, bfloat16 or float16 for the written hf/peft weights (default: as loaded, float32).
        gguf_type: Weight type of the GGUF file: f16, or q8_0 (8-bit blocks, about half the size).
    """
    dt = torch_dtype(dtype)
    checkpoint_dir = ensure_checkpoint(Path(checkpoint_dir))
    adapter = Path(adapter) if adapter is not None else None
    base = adapter if adapter is not None else Path("out") / "export" / checkpoint_dir.name
    out = Path(out_dir) if out_dir is not None else (
        base / f"export-{format}" if adapter is not None else base.with_name(f"{base.name}-{format}"))
    if format == "peft":
        if adapter is None:
            raise ValueError("--format peft needs --adapter DIR (an adapter folder)")
        result = export_peft_adapter(adapter, checkpoint_dir, out, dt)
        print(f"exported PEFT adapter to {result}")
    elif format == "hf":
        result = export_hf(checkpoint_dir, adapter, out, dt)
        print(f"exported HF model to {result}")
    else:
        path = out if out.suffix == ".gguf" else out / f"model-{gguf_type}.gguf"
        result = export_gguf_file(checkpoint_dir, adapter, path, gguf_type)
        print(f"exported GGUF to {result}")
    return result
