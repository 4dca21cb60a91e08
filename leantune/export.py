"""Hand a finetune to the rest of the ecosystem: a merged HF folder, a PEFT adapter folder, or a GGUF file."""

from __future__ import annotations

from pathlib import Path

import torch

from leantune.checkpoint.gguf_export import export_gguf
from leantune.merge import merge_adapters
from leantune.methods import METHODS, get_method, load_adapter, read_manifest
from leantune.models.kinds import GGUF, kind_of_folder, load_model, save_model

DTYPES = ("float32", "bfloat16", "float16")


def torch_dtype(dtype: str | None) -> torch.dtype | None:
    if dtype is None:
        return None
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose among {', '.join(DTYPES)}")
    return getattr(torch, dtype)


def export_peft_adapter(adapter: Path, checkpoint_dir: Path, out: Path, dtype: torch.dtype | None = None,
                        kind: str | None = None) -> Path:
    """The adapter, unmerged, in PEFT's folder format (for methods whose record maps to one)."""
    m = get_method(read_manifest(adapter)["method"])
    if m.peft is None:
        can = ", ".join(n for n, r in METHODS.items() if r.peft is not None)
        raise ValueError(f"{adapter}: {m.name} adapters have no PEFT-format equivalent (exportable: {can}); "
                         "use the folder with --adapter in generate/chat, or --format hf to merge it")
    model = load_model(checkpoint_dir, dtype=torch.float32)
    # only the adapter's tensors are written: the base's quantization does not matter here
    manifest = load_adapter(model, adapter, checkpoint_dir, check_quantization=False)
    return m.peft.export(model, out, str(checkpoint_dir), m.make_args(manifest["method_args"]), dtype=dtype, kind=kind)


def merged_model(checkpoint_dir: Path, adapter: Path | None):
    """The base with `adapter` (if any) merged in, float32, in eval mode."""
    model = load_model(checkpoint_dir, dtype=torch.float32)
    if adapter is not None:
        merge_adapters(model, [adapter], checkpoint_dir=checkpoint_dir)
    return model.eval()


def export_hf(checkpoint_dir: Path, adapter: Path | None, out: Path, dtype: torch.dtype | None = None,
              kind: str | None = None) -> Path:
    return save_model(merged_model(checkpoint_dir, adapter), out, source_dir=checkpoint_dir, dtype=dtype, kind=kind)


def export_gguf_file(checkpoint_dir: Path, adapter: Path | None, path: Path, gguf_type: str = "f16") -> Path:
    kind_of_folder(checkpoint_dir).check(GGUF)
    path.parent.mkdir(parents=True, exist_ok=True)
    return export_gguf(merged_model(checkpoint_dir, adapter), checkpoint_dir, path, gguf_type=gguf_type)
