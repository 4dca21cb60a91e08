"""An adapter layer's scale (LoRA's alpha / r and its kin) as eager code and compiled graphs each want it."""

from __future__ import annotations

import torch


class GraphScale:
    """Mixin for adapter layers: `scaling` is a float, and `scale_on(device)` is that float eager and a 0-d fp32 tensor
    under torch.compile. A float read in a compiled graph is baked in as a constant, guarded on its value, so an
    adapter with another alpha or r would compile a graph of its own (and miss inductor's cache); the tensor is a
    graph input. A plain attribute, not a buffer: no state_dict key, untouched by .to(dtype) and to_empty."""

    @property
    def scaling(self) -> float:
        return self._scaling

    @scaling.setter
    def scaling(self, value: float) -> None:
        self._scaling = float(value)
        self._scale = torch.tensor(self._scaling, dtype=torch.float32)

    def scale_on(self, device: torch.device) -> float | torch.Tensor:
        return self._scale.to(device) if torch.compiler.is_compiling() else self._scaling
