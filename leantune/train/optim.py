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
    """Peak learning rate (default: the method's, see `leantune finetune <method> --help`)."""
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    momentum: float = 0.0
    """SGD momentum (ignored by optimizers without it)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Further keyword arguments for the optimizer class."""

    def __post_init__(self) -> None:
        if self.lr is not None and not 0 < self.lr <= torch.finfo(torch.float32).max:  # `not <` also refuses NaN
            raise ValueError(f"--optimizer.lr must be a finite (float32) number > 0, got {self.lr}")
        if not 0 <= self.weight_decay < float("inf"):
            raise ValueError(f"--optimizer.weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"--optimizer.betas must be two numbers in [0, 1), got {self.betas}")
        if not self.momentum >= 0:
            raise ValueError(f"--optimizer.momentum must be >= 0, got {self.momentum}")



def optimizer_class(name: str):
    if name.startswith("bnb."):
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise ImportError(f"optimizer {name} needs bitsandbytes: pip install bitsandbytes") from e
        cls = getattr(bnb.optim, name[4:], None)
    else:
        cls = getattr(torch.optim, name, None)
    if cls is None or cls is torch.optim.Optimizer or not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
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
