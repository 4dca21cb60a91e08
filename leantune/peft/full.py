"""Full finetuning: every parameter trains; checkpoints are whole HF model folders."""

from __future__ import annotations

import torch.nn as nn

from leantune.peft.base import Method


def _unchanged(model: nn.Module, args: None) -> None:
    """Full finetuning adds nothing to the model."""


def all_params(model: nn.Module) -> list[nn.Parameter]:
    return list(model.parameters())


METHOD = Method(
    name="full",
    summary="Full finetuning: every weight trains; checkpoints are Hugging Face model folders",
    args_class=None,
    apply=_unchanged,
    adapter_params=all_params,
    default_lr=3e-5,
    saves_full_model=True,
    accepts_quantized_base=False,
)
