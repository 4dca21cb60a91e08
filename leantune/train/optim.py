"""Any torch.optim (or bitsandbytes) optimizer by name, with only the arguments it accepts."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class OptimizerArgs:
    name: str = "AdamW"
    """A torch.optim class name (AdamW, SGD, Adam, ...) or bnb.<name> for bitsandbytes optimizers."""
    lr: float | None = None
    """Peak learning rate (default per method: lora/qlora 1e-3, adapter/adapter_v2 3e-3, full 3e-5)."""
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    momentum: float = 0.0
    """SGD momentum (ignored by optimizers without it)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Further keyword arguments for the optimizer class."""


DEFAULT_LR = {"lora": 1e-3, "qlora": 1e-3, "adapter": 3e-3, "adapter_v2": 3e-3, "full": 3e-5}


def optimizer_class(name: str):
    if name.startswith("bnb."):
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise ImportError(f"optimizer {name} needs bitsandbytes: pip install bitsandbytes") from e
        cls = getattr(bnb.optim, name[4:], None)
    else:
        cls = getattr(torch.optim, name, None)
    if cls is None or not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(f"--optimizer.name {name!r} is not a torch.optim optimizer (e.g. AdamW, SGD, Adam)")
    return cls


def build_optimizer(params, args: OptimizerArgs) -> torch.optim.Optimizer:
    cls = optimizer_class(args.name)
    accepted = inspect.signature(cls.__init__).parameters
    if args.lr is None:
        raise ValueError("OptimizerArgs.lr is unset: resolve the method's default first")
    candidates = dict(lr=args.lr, weight_decay=args.weight_decay, betas=tuple(args.betas), momentum=args.momentum)
    kwargs = {k: v for k, v in candidates.items() if k in accepted}
    kwargs.update(args.extra)
    return cls(params, **kwargs)
