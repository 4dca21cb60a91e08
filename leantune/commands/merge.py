"""`leantune merge`: fold adapters into the base and write a Hugging Face folder."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from leantune.checkpoint.io import HF_MODEL_FILES, claimed_output
from leantune.commands.flags import check_weights
from leantune.download import DEFAULT_CHECKPOINT, ensure_checkpoint
from leantune.merge import merge_adapters
from leantune.models.kinds import load_model, save_model


def merge(
    adapter: Path | list[Path] | None = None,
    checkpoint_dir: Path = DEFAULT_CHECKPOINT,
    out_dir: Path | None = None,
    weights: list[float] | None = None,
    dtype: str | None = None,
    dequantize_base: bool = True,
    overwrite: bool = False,
) -> Path:
    """Fold adapters into the base model and write a Hugging Face folder transformers loads.

    Args:
        adapter: An adapter folder of a mergeable method (lora, qlora, dora, ia3, loha, lokr, adalora; e.g.
            out/finetune/lora/final) or a PEFT folder of one, or a list of them, e.g. --adapter
            [out/a/final,out/b/final] --weights [0.7,0.3].
        checkpoint_dir: The base model the adapters were trained on.
        out_dir: Output folder (default: out/merged/<run>-<checkpoint>, e.g. out/merged/lora-final).
        weights: One weight per adapter (default 1.0 each), e.g. to blend two adapters.
        dtype: float32, bfloat16 or float16 for the written weights (default: the base's dtype).
        dequantize_base: For an adapter trained on a quantized base (QLoRA): fold it into that base dequantized
            (the weights it was trained against, so the merged model reproduces the finetuned one; it keeps the
            quantization error) or, with false, into the original full-precision weights.
        overwrite: Replace leantune's own earlier merge at out_dir (a folder with other files is never touched).
    """
    if adapter is None:
        raise ValueError("merge needs --adapter DIR (an adapter folder, e.g. out/finetune/lora/final)")
    adapters = [Path(a) for a in (adapter if isinstance(adapter, list | tuple) else [adapter])]
    missing = [a for a in adapters if not a.is_dir()]
    if missing:
        raise FileNotFoundError(f"--adapter {missing[0]}: no such folder")
    check_weights(weights, len(adapters))
    checkpoint_dir = ensure_checkpoint(Path(checkpoint_dir))
    default = Path("out") / "merged" / f"{adapters[0].parent.name}-{adapters[0].name}"
    legacy = HF_MODEL_FILES if out_dir is None else ()  # only a folder leantune itself named may be unmarked
    out_dir = Path(out_dir or default)
    with claimed_output(out_dir, "merged-model", overwrite, legacy_files=legacy):  # a second merge here is refused
        _merge(adapters, checkpoint_dir, out_dir, weights, dtype, dequantize_base)
    print(f"merged {len(adapters)} adapter(s) into {out_dir}")
    return out_dir


def _merge(adapters: list[Path], checkpoint_dir: Path, out_dir: Path, weights: list[float] | None, dtype: str | None,
           dequantize_base: bool) -> None:
    if dtype is None:  # keep the base's dtype: the copied config.json must describe the written weights
        try:
            base = json.loads((checkpoint_dir / "config.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{checkpoint_dir / 'config.json'}:{e.lineno}: not valid JSON ({e.msg})") from e
        dtype = base.get("torch_dtype") or base.get("dtype") or "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype {dtype!r}: choose among float32, bfloat16, float16")
    model = load_model(checkpoint_dir, dtype=torch.float32)
    merge_adapters(model, adapters, weights, dequantize_base, checkpoint_dir=checkpoint_dir)
    save_model(model, out_dir, source_dir=checkpoint_dir, dtype=getattr(torch, dtype), kind="merged-model")
