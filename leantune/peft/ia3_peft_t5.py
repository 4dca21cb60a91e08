"""T5 IA3 adapters in HF PEFT's format (`peft_type: IA3`, `task_type: SEQ_2_SEQ_LM`), both ways.

T5's linears are plain layers, one PEFT `ia3_l` each, named as in transformers (`checkpoint.t5_hf.hf_name`:
`encoder.block.0.layer.0.SelfAttention.k`, `decoder.block.0.layer.2.DenseReluDense.wo`, ...): (out, 1) for an
output-scaled module, (1, in) for a `feedforward_modules` one (input-scaled), so a folder's shapes say each module's
mode. `target_modules` are the module names (k, v, wo, ...), which peft matches as suffixes: in T5 `k` names exactly
the keys of the encoder, decoder and cross-attention, as leantune's `key` target does.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from leantune.checkpoint.peft_dir import peft_weights, write_peft_dir
from leantune.checkpoint.t5_hf import hf_name, our_name
from leantune.models.t5.model import T5
from leantune.peft.ia3_layers import TARGETS, IA3Args, IA3Linear, apply_ia3

_PREFIX = "base_model.model."
# T5 module name -> leantune IA3 target (wi / wi_0 / wi_1 have none: leantune's mlp target is the down projection)
_TARGET_OF = {"q": "query", "k": "key", "v": "value", "o": "projection", "wo": "mlp"}


def export_t5_peft(model: T5, out_dir: str | Path, base_model_name_or_path: str, dtype: torch.dtype | None = None,
                   kind: str | None = None) -> Path:
    """Write a T5's (unmerged) IA3 vectors as a PEFT folder that `PeftModel.from_pretrained` loads on
    `T5ForConditionalGeneration`."""
    tensors: dict[str, torch.Tensor] = {}
    targets: set[str] = set()
    feedforward: set[str] = set()
    for name, mod in model.named_modules():
        if not isinstance(mod, IA3Linear):
            continue
        if mod.merged:
            raise ValueError(f"{name}: IA3 is merged into the weights; export the unmerged adapter")
        path = hf_name(name)
        module = path.rsplit(".", 1)[-1]
        targets.add(module)
        vec = mod.ia3_l.detach().cpu()
        if mod.feedforward:
            feedforward.add(module)
            vec = vec[None, :]  # (1, in)
        else:
            vec = vec[:, None]  # (out, 1)
        tensors[f"{_PREFIX}{path}.ia3_l"] = (vec.to(dtype) if dtype is not None else vec).contiguous().clone()
    if not tensors:
        raise ValueError("the model has no IA3 layers to export")
    config = {
        "peft_type": "IA3", "task_type": "SEQ_2_SEQ_LM", "base_model_name_or_path": base_model_name_or_path,
        "target_modules": sorted(targets), "feedforward_modules": sorted(feedforward), "fan_in_fan_out": False,
        "init_ia3_weights": True, "modules_to_save": None, "exclude_modules": None, "inference_mode": True,
        "revision": None,
    }
    return write_peft_dir(out_dir, config, tensors, kind)


@torch.no_grad()
def import_t5_peft(model: T5, peft_dir: str | Path) -> IA3Args:
    """Apply a PEFT IA3 folder made for `T5ForConditionalGeneration` (unmerged); returns the IA3Args it amounts to.

    Modules a target leaves out in some layers keep vectors of ones there (the identity), so outputs equal peft's.
    """
    peft_dir = Path(peft_dir)
    key_re = re.compile(rf"^{re.escape(_PREFIX)}(.+)\.ia3_l(?:\.default)?$")
    found: dict[str, torch.Tensor] = {}  # our module -> vector
    modes: dict[str, set[bool]] = {}  # target -> feedforward modes seen
    for key, t in peft_weights(peft_dir).items():
        m = key_re.match(key)
        if not m:
            raise ValueError(f"{peft_dir}: tensor {key} has no leantune equivalent")
        hf = m.group(1)
        target = _TARGET_OF.get(hf.rsplit(".", 1)[-1])
        try:
            ours = our_name(hf)
        except KeyError:
            ours = None
        if ours is None or target is None:
            raise ValueError(f"{peft_dir}: IA3 on {hf} has no leantune target (leantune's IA3 on T5 adapts q, k, v, o "
                             f"of the attentions and the feed-forward's wo: {', '.join(TARGETS)})")
        if t.dim() != 2 or 1 not in t.shape:
            raise ValueError(f"{peft_dir}: {key} has shape {tuple(t.shape)}; IA3 vectors are (out, 1) or (1, in)")
        feedforward = t.shape[0] == 1 and t.shape[1] != 1  # (1, in): peft's feedforward (input-scaled) module
        if feedforward and target in ("query", "key", "value"):
            raise ValueError(f"{peft_dir}: {hf} is a feedforward module (its input scaled); leantune's IA3 scales the "
                             "outputs of q, k and v")
        modes.setdefault(target, set()).add(feedforward)
        found[ours] = t.flatten()
    if not found:
        raise ValueError(f"{peft_dir}: no IA3 tensors found in the adapter")
    mixed = sorted(t for t, s in modes.items() if len(s) > 1)
    if mixed:
        raise ValueError(f"{peft_dir}: {mixed} scale their input in some layers and their output in others; leantune "
                         "uses one mode per target")
    args = IA3Args(targets=[t for t in TARGETS if t in modes], feedforward=[t for t, s in modes.items() if True in s])
    apply_ia3(model, args)  # vectors at one: modules the folder leaves out stay the identity
    for name, vec in found.items():
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{peft_dir}: {hf_name(name)} is not in this base (fewer blocks?); pass the "
                             "--checkpoint_dir the adapter was trained on") from None
        if vec.numel() != mod.ia3_l.numel():
            raise ValueError(f"{peft_dir}: {hf_name(name)}: an IA3 vector of {vec.numel()} entries does not fit this "
                             f"base's {mod.ia3_l.numel()}; pass the --checkpoint_dir the adapter was trained on")
        mod.ia3_l.copy_(vec.to(mod.ia3_l.dtype))
    return args
