"""Fold one or several adapters (with weights) into the base weights, for every method whose record can merge."""

from __future__ import annotations

from pathlib import Path

from leantune.checkpoint.peft_dir import is_peft_dir
from leantune.methods import METHODS, get_method, load_any_adapter, read_manifest
from leantune.models.decoder.model import GPT
from leantune.models.quantize import round_trip_
from leantune.runtime import compute_dtype


def merge_adapters(model: GPT, adapters: list[Path], weights: list[float] | None = None, dequantize_base: bool = True,
                   checkpoint_dir: Path | None = None) -> GPT:
    """Apply and fold each adapter in turn: W <- W + sum_i w_i * delta_i.

    Every adapter is checked before the base is touched: its method must merge, and it must fit the base (same
    architecture, every tensor present with its shape). An adapter trained on a quantized base (QLoRA) learned its
    update against the dequantized weights, so with `dequantize_base` the float base is first replaced by
    quantize -> dequantize of itself (the exact weights training computed with); the result stays float.
    """
    adapters = [Path(a) for a in adapters]
    weights = list(weights) if weights is not None else [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise ValueError(f"{len(adapters)} adapters but {len(weights)} weights")
    manifests = {}
    for path in adapters:
        if not Path(path).is_dir():
            raise FileNotFoundError(f"--adapter {path}: no such folder")
        if not is_peft_dir(path):
            manifests[path] = read_manifest(path)
            m = get_method(manifests[path]["method"])
            if m.merge is None:
                raise ValueError(f"{path}: {m.name} adapters cannot be merged into the weights; mergeable methods: "
                                 f"{', '.join(n for n, r in _mergeable().items() if r)} (load others with --adapter)")
    if dequantize_base:
        _dequantized_base(model, list(manifests.values()))
    for path, w in zip(adapters, weights):
        loaded = load_any_adapter(model, path, checkpoint_dir, check_quantization=False)
        get_method(loaded["method"]).merge(model, w)
    model.requires_grad_(False)
    return model


def _mergeable() -> dict[str, bool]:
    return {n: m.merge is not None for n, m in METHODS.items()}


def _dequantized_base(model: GPT, manifests: list[dict]) -> None:
    modes = {(m.get("quantize"), m.get("precision")) for m in manifests if m.get("quantize")}
    if len(modes) > 1:
        raise ValueError(f"the adapters were trained on differently quantized bases {sorted(modes)}; merge them "
                         "one at a time, or pass --dequantize_base false to merge into the full-precision weights")
    if modes:
        mode, precision = modes.pop()
        round_trip_(model, mode, compute_dtype(precision or "32-true"))
        print(f"merging into the base dequantized from {mode}, the weights the adapter was trained against")
