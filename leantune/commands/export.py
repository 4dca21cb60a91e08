"""`leantune export`: a finetune as an HF folder, a PEFT adapter folder or a GGUF file."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from leantune.checkpoint.io import HF_MODEL_FILES, PEFT_ADAPTER_FILES, claimed_output, claimed_output_file
from leantune.download import DEFAULT_CHECKPOINT, ensure_checkpoint
from leantune.export import export_gguf_file, export_hf, export_peft_adapter, torch_dtype

KINDS = {"hf": ("hf-export", HF_MODEL_FILES), "peft": ("peft-adapter", PEFT_ADAPTER_FILES)}


def default_out(adapter: Path | None, checkpoint_dir: Path, format: str) -> Path:
    """out/export/<run>-<checkpoint>-<format> (e.g. lora-final-peft), outside the run folder a later run may replace;
    out/export/<base name>-<format> for the base alone."""
    name = f"{adapter.parent.name}-{adapter.name}" if adapter is not None else checkpoint_dir.name
    return Path("out") / "export" / f"{name}-{format}"


def export(
    adapter: Path | None = None,
    checkpoint_dir: Path = DEFAULT_CHECKPOINT,
    format: Literal["hf", "peft", "gguf"] = "hf",
    out_dir: Path | None = None,
    dtype: str | None = None,
    gguf_type: Literal["f16", "q8_0"] = "f16",
    overwrite: bool = False,
) -> Path:
    """Export a finetune (or the base model) in a format other tools load directly.

    Args:
        adapter: An adapter folder (e.g. out/finetune/lora/final). Without it the base model is exported.
        checkpoint_dir: The base model (an HF folder) the adapter was trained on.
        format: hf = the model with the adapter merged in, as a Hugging Face folder (weights, config, tokenizer,
            generation config, chat template) that transformers and vLLM load; peft = the adapter unmerged, as
            adapter_config.json + adapter_model.safetensors for peft.PeftModel.from_pretrained (methods with a
            PEFT equivalent: lora, qlora); gguf = the merged model as one GGUF file for llama.cpp.
        out_dir: Output folder (hf, peft) or .gguf file path (gguf). Default: out/export/<run>-<checkpoint>-<format>
            (e.g. out/export/lora-final-peft; out/export/<base name>-<format> without an adapter), and
            model-<gguf_type>.gguf inside it for gguf.
        dtype: float32, bfloat16 or float16 for the written hf/peft weights (default: as loaded, float32).
        gguf_type: Weight type of the GGUF file: f16, or q8_0 (8-bit blocks, about half the size).
        overwrite: Replace leantune's own earlier export at out_dir (a folder with other files is never touched).
    """
    if format not in ("hf", "peft", "gguf"):
        raise ValueError(f"--format {format!r}: choose among hf, peft, gguf")
    if gguf_type not in ("f16", "q8_0"):
        raise ValueError(f"--gguf_type {gguf_type!r}: choose among f16, q8_0")
    dt = torch_dtype(dtype)
    adapter = Path(adapter) if adapter is not None else None
    if format == "peft" and adapter is None:
        raise ValueError("--format peft needs --adapter DIR (an adapter folder)")
    if adapter is not None and not adapter.is_dir():
        raise FileNotFoundError(f"--adapter {adapter}: no such folder")
    checkpoint_dir = ensure_checkpoint(Path(checkpoint_dir))
    out = Path(out_dir) if out_dir is not None else default_out(adapter, checkpoint_dir, format)
    if format == "gguf":  # checked before any model loads; the lock keeps a second export out until this one ends
        path = out if out.suffix == ".gguf" else out / f"model-{gguf_type}.gguf"
        claimed = claimed_output_file(path, overwrite, magic=b"GGUF")
    else:
        kind, legacy = KINDS[format]
        claimed = claimed_output(out, kind, overwrite, legacy_files=legacy if out_dir is None else ())
    with claimed:
        return _export(format, adapter, checkpoint_dir, out, dt, out if format != "gguf" else path, gguf_type)


def _export(format: str, adapter: Path | None, checkpoint_dir: Path, out: Path, dt, path: Path, gguf_type: str) -> Path:
    if format == "peft":
        result = export_peft_adapter(adapter, checkpoint_dir, out, dt, kind=KINDS["peft"][0])
        print(f"exported PEFT adapter to {result}")
    elif format == "hf":
        result = export_hf(checkpoint_dir, adapter, out, dt, kind=KINDS["hf"][0])
        print(f"exported HF model to {result}")
    else:
        result = export_gguf_file(checkpoint_dir, adapter, path, gguf_type)
        print(f"exported GGUF to {result}")
    return result
