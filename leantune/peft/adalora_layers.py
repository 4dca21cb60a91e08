"""AdaLoRA's layer: W x + alpha / init_r * B diag(E) A x (LoRA in SVD form), as a module swap that keeps base keys.

`AdaLoRALinear` owns the base `weight`/`bias` (the same Parameter objects: ties and base keys survive) plus the
triplets: `lora_A` (right singular vectors), `lora_E` (singular values, the only thing the rank allocator masks) and
`lora_B` (left singular vectors). As in LoRA, each adapted output range of GPT's fused qkv (`parts`) gets its own
init_r triplets, stored stacked: A (parts * r, in), E (parts * r, 1), B (sum of part widths, r). Each part is one
PEFT module (q_proj, v_proj, ...); a family whose HF checkpoint fuses q/k/v (GPT-NeoX, Falcon, GPT-2) adapts its
whole qkv as one part when query, key and value are all targeted, exactly as PEFT adapts `query_key_value`.
The allocator's averages live here too, as non-persistent buffers (see `leantune.peft.adalora`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from leantune.models.decoder.families import FAMILIES
from leantune.models.decoder.model import GPT
from leantune.models.ops import Dropout
from leantune.models.quantize import compute_dtype_of, is_quantized, quantized_linear
from leantune.peft.base import mark_trainable, merge_into_linears, params_of
from leantune.peft.lora_layers import TARGETS, parts_matrix, target_layers
from leantune.peft.scale import GraphScale

STATE_BUFFERS = ("ipt_A", "unc_A", "ipt_E", "unc_E", "ipt_B", "unc_B", "rank_mask")
"""Per layer: EMA of the sensitivity |p * grad| and of its uncertainty for A, E and B, and the final rank mask."""


@dataclass
class AdaLoRAArgs:
    init_r: int = 12
    """Initial rank of every adapted matrix (PEFT's init_r)."""
    target_r: int = 8
    """Average rank left per adapted matrix after the budget schedule (PEFT's target_r)."""
    alpha: float = 32.0
    """Scale numerator: the update is multiplied by alpha / init_r (PEFT's lora_alpha / ranknum)."""
    dropout: float = 0.05
    """Dropout on the adapter branch input (on CPU, p is applied rounded to a multiple of 2^-16: 0.05 -> 0.0500031)."""
    targets: list[str] | str = field(default_factory=lambda: ["query", "value"])
    """Layers to adapt: a list or comma-separated string among query, key, value, projection, mlp, head; or all."""
    tinit: int | None = None
    """Warmup steps before any rank is pruned (default: 10% of total_step)."""
    tfinal: int | None = None
    """Final steps with the rank pattern fixed (default: 20% of total_step, so the pattern is fixed before the end)."""
    delta_t: int = 1
    """Steps between two budget allocations (PEFT's deltaT)."""
    beta1: float = 0.85
    """EMA coefficient of the sensitivity |w * grad|."""
    beta2: float = 0.85
    """EMA coefficient of the sensitivity's uncertainty."""
    orth_reg_weight: float = 0.5
    """Weight of the orthogonality penalty ||A A^T - I|| + ||B^T B - I|| added to the loss."""
    total_step: int | None = None
    """Length of the budget schedule in optimizer steps (default: the run's planned number of steps)."""

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        if self.targets == ["all"]:
            self.targets = list(TARGETS)
        bad = sorted(set(self.targets) - set(TARGETS))
        if bad or not self.targets:
            raise ValueError(f"--adalora.targets {bad or '(empty)'}: choose among {', '.join(TARGETS)} or all")
        if not 1 <= self.target_r <= self.init_r:
            raise ValueError(f"--adalora.target_r must be in [1, --adalora.init_r {self.init_r}], got {self.target_r}")
        if not 0 < self.alpha < math.inf:
            raise ValueError(f"--adalora.alpha must be a finite number > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--adalora.dropout must be in [0, 1), got {self.dropout}")
        for name in ("beta1", "beta2"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"--adalora.{name} must be in (0, 1), got {getattr(self, name)}")
        if not 0 <= self.orth_reg_weight < math.inf:
            raise ValueError(f"--adalora.orth_reg_weight must be >= 0, got {self.orth_reg_weight}")
        if self.delta_t < 1:
            raise ValueError(f"--adalora.delta_t must be >= 1, got {self.delta_t}")
        for name in ("tinit", "tfinal"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"--adalora.{name} must be >= 0, got {getattr(self, name)}")
        if self.total_step is not None:
            self.schedule(self.total_step)

    @property
    def scaling(self) -> float:
        return self.alpha / (self.init_r + 1e-5)  # PEFT: lora_alpha / (ranknum + 1e-5), ranknum = init_r always

    def schedule(self, planned_steps: int) -> tuple[int, int, int]:
        """(tinit, tfinal, total_step) for a run of `planned_steps`; PEFT needs a budgeting phase in between."""
        total = self.total_step if self.total_step is not None else planned_steps
        tinit = self.tinit if self.tinit is not None else round(0.1 * total)
        tfinal = self.tfinal if self.tfinal is not None else round(0.2 * total)
        if total < 1 or tinit >= total - tfinal:
            raise ValueError(f"AdaLoRA's schedule has no budgeting phase: --adalora.tinit {tinit} must be below "
                             f"total_step {total} - --adalora.tfinal {tfinal}; lower tinit/tfinal or train longer")
        return tinit, tfinal, total


class AdaLoRALinear(GraphScale, nn.Module):
    """A linear layer with SVD-form updates on one or more contiguous output ranges (`parts`)."""

    def __init__(self, base: nn.Module, parts: list[tuple[int, int]], args: AdaLoRAArgs) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the same Parameter object: ties and base keys are preserved
        self.bias = base.bias
        self.parts = parts
        self.quantized = is_quantized(base.weight)
        self.args = args  # the schedule and penalty settings the allocator reads
        self.r = args.init_r
        self.scaling = args.scaling
        self.dropout = Dropout(args.dropout) if args.dropout > 0 else nn.Identity()
        factory = dict(device=base.weight.device, dtype=compute_dtype_of(base.weight))
        n = len(parts) * self.r
        self.lora_A = nn.Parameter(torch.empty(n, self.in_features, **factory))
        self.lora_E = nn.Parameter(torch.zeros(n, 1, **factory))
        self.lora_B = nn.Parameter(torch.empty(sum(e - s for s, e in parts), self.r, **factory))
        for name in STATE_BUFFERS:
            self.register_buffer(name, None, persistent=False)
        self.merged = False
        if not self.lora_A.is_meta:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """PEFT's init: E zero (the update starts at zero), A and B normal with std 0.02."""
        nn.init.zeros_(self.lora_E)
        nn.init.normal_(self.lora_A, mean=0.0, std=0.02)
        nn.init.normal_(self.lora_B, mean=0.0, std=0.02)

    def part_B(self) -> list[torch.Tensor]:
        """Each part's B_i (width_i, r), in part order (plain row slices: views that may be written in place)."""
        out, off = [], 0
        for s, e in self.parts:
            out.append(self.lora_B[off:off + e - s])
            off += e - s
        return out

    def update_matrix(self) -> torch.Tensor:
        """scaling * B as one (out, parts * r) matrix: B_i at part i's rows and columns i*r..(i+1)*r, zeros elsewhere."""
        B = self.lora_B * self.scale_on(self.lora_B.device)
        full = len(self.parts) == 1 and self.parts[0] == (0, self.out_features)
        return B if full else parts_matrix(B, self.parts, self.r, self.out_features)

    def delta_weight(self) -> torch.Tensor:
        """The full (out, in) update, computed in fp32."""
        return (self.update_matrix().float() @ (self.lora_A.float() * self.lora_E.float())).to(self.lora_A.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = quantized_linear(x, self.weight, self.bias) if self.quantized else F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        a = F.linear(self.dropout(x), (self.lora_A * self.lora_E).to(x.dtype))  # (..., parts * r)
        return y + F.linear(a, self.update_matrix().to(x.dtype))  # (..., out)

    def orth_penalty(self) -> list[torch.Tensor]:
        """||A_i A_i^T - I||_F and ||B_i^T B_i - I||_F for each part (PEFT counts each as one term)."""
        r = self.r
        eye = torch.eye(r, device=self.lora_A.device, dtype=self.lora_A.dtype)
        A = self.lora_A.view(len(self.parts), r, self.in_features)  # (parts, r, in)
        terms = list(torch.linalg.matrix_norm(A @ A.transpose(1, 2) - eye))  # (parts,) Frobenius norms
        terms += [torch.linalg.matrix_norm(b.T @ b - eye) for b in self.part_B()]
        return terms

    @torch.no_grad()
    def merge(self) -> None:
        if self.quantized:
            raise ValueError("cannot merge AdaLoRA into a quantized weight in place (that would requantize); "
                             "use merge_adalora, which writes a dequantized float weight")
        if not self.merged:
            self.weight.add_(self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.sub_(self.delta_weight())
            self.merged = False

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, init_r={self.r}, parts={self.parts}"


def adalora_layers(model: nn.Module) -> list[AdaLoRALinear]:
    return [m for m in model.modules() if isinstance(m, AdaLoRALinear)]


def adalora_params(model: nn.Module) -> list[nn.Parameter]:
    """AdaLoRA's trained tensors: every AdaLoRALinear's A, E and B."""
    return params_of(adalora_layers(model), "lora_A", "lora_E", "lora_B")


def fuses_qkv(model: GPT) -> bool:
    """True when the model's HF family stores q/k/v as one linear (PEFT then adapts it as one module)."""
    family = FAMILIES.get(model.config.hf_model_type)
    return family is not None and family.qkv_layout != "split"


def adalora_targets(model: GPT, targets: list[str]) -> list[tuple[nn.Module, str, list[tuple[int, int]]]]:
    """LoRA's target layers, except that a fused-qkv family's fully targeted qkv is one part (one PEFT module)."""
    chosen = target_layers(model, targets)
    has_qkv = any(n == "qkv" for _, n, _ in chosen)  # a fused q/k/v linear (the decoder); T5's are separate
    if has_qkv and {"query", "key", "value"} <= set(targets) and fuses_qkv(model):
        chosen = [(p, n, [(0, getattr(p, n).out_features)] if n == "qkv" else parts) for p, n, parts in chosen]
    return chosen


def apply_adalora(model: GPT, args: AdaLoRAArgs) -> list[str]:
    """Swap the targeted linears for AdaLoRALinear; freeze everything else. Returns trainable parameter names."""
    for parent, name, parts in adalora_targets(model, args.targets):
        base = getattr(parent, name)
        if isinstance(base, AdaLoRALinear):
            raise ValueError(f"{name} already has AdaLoRA applied")
        setattr(parent, name, AdaLoRALinear(base, parts, args))
    return mark_trainable(model, adalora_params(model))


def orth_regularizer(model: nn.Module) -> torch.Tensor | None:
    """orth_reg_weight * the mean of every part's ||A A^T - I|| and ||B^T B - I|| (PEFT's regulariser)."""
    layers = adalora_layers(model)
    if not layers or layers[0].args.orth_reg_weight == 0:
        return None
    terms = [t for m in layers for t in m.orth_penalty()]
    return layers[0].args.orth_reg_weight * (torch.stack(terms).sum() / len(terms))


def merge_adalora(model: GPT, weight: float = 1.0) -> GPT:
    """Fold every AdaLoRA update (times `weight`) into its base weight and put plain nn.Linear layers back (see
    `merge_into_linears`)."""
    layers = [m for m in model.modules() if isinstance(m, AdaLoRALinear)]
    return merge_into_linears(model, layers, lambda layer, _w: layer.delta_weight(), weight)
