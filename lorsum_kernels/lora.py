"""Finds the LoRA factor pairs of any model and the scale each one is applied with.

A LoRA layer computes ``y = base(x) + s · B(A(x))`` with ``A`` (r×n) and ``B`` (m×r). Three layouts are
recognised, always pairing A with B through their module, never through parameter order or names:

* PEFT layers: ``module.lora_A`` / ``module.lora_B`` are ``nn.ModuleDict`` keyed by adapter name, the
  scale is ``module.scaling[adapter]`` (α/r, or α/√r for rsLoRA). Every adapter whose factors are
  trainable is a pair; frozen (inactive) adapters are skipped.
* This package's ``LoRALinear``.
* Any module with ``lora_A`` and ``lora_B`` ``nn.Linear`` children; the scale is its ``scaling``
  attribute when that is a number, else 1.

``capture`` takes X as the input of ``lora_A`` (after LoRA dropout: what the LoRA path saw) and S as the
gradient of the module's output, so ``G = SᵀX`` is the gradient that the factors' gradients come from
(``∂L/∂A = s·BᵀG``, ``∂L/∂B = s·GAᵀ``); without dropout it is the gradient of the merged weight
``W0 + s·B·A``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["LoRALayer", "LoRALinear", "find_lora_layers"]


@dataclass(eq=False)
class LoRALayer:
    """One LoRA factor pair and the module it lives in."""

    name: str
    module: nn.Module
    A: nn.Parameter  # r×n, the "in" factor (lora_A.weight)
    B: nn.Parameter  # m×r, the "out" factor (lora_B.weight)
    scale: float
    A_module: nn.Module | None = None  # the lora_A Linear: its input is the X the LoRA path saw
    B_module: nn.Module | None = None  # the lora_B Linear
    # PEFT adds s·B·A to a weight in forward instead of running lora_B(lora_A(x)): a LoRA on a parameter
    # (target_parameters, ParamWrapper) or on nn.MultiheadAttention (in_proj and out_proj). No LoRA path
    # runs on an input, so there is no X or S to capture (the methods that step from .grad work as usual).
    merged_in_forward: bool = False

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def in_features(self) -> int:
        return self.A.shape[1]

    @property
    def out_features(self) -> int:
        return self.B.shape[0]


class LoRALinear(nn.Module):
    """``base(x) + (α/r) · lora_B(lora_A(dropout(x)))`` around a frozen ``nn.Linear``.

    ``lora_A`` is initialised like PEFT's default (Kaiming-uniform with a=√5), ``lora_B`` at zero, so the
    wrapped layer starts equal to ``base``. ``alpha`` defaults to ``r`` (scale 1).
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float | None = None, *, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        if not 0 < r <= min(base.in_features, base.out_features):
            raise ValueError(
                f"rank r={r} must be in [1, min(in, out) = {min(base.in_features, base.out_features)}]"
            )
        self.base = base
        self.base.requires_grad_(False)
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(base.in_features, r, bias=False, **kw)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, **kw)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = float(r if alpha is None else alpha) / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    def extra_repr(self) -> str:
        return f"r={self.lora_A.out_features}, scaling={self.scaling:g}"


def _scale_of(module: nn.Module, adapter: str | None) -> float:
    scaling = getattr(module, "scaling", 1.0)
    if isinstance(scaling, dict):
        scaling = scaling.get(adapter, 1.0)
    if isinstance(scaling, torch.Tensor):
        scaling = scaling.item()
    if not isinstance(scaling, (int, float)):
        scaling = 1.0
    scaling = float(scaling)
    if not (math.isfinite(scaling) and scaling > 0):
        raise ValueError(f"LoRA scale of {type(module).__name__} (adapter {adapter!r}) must be > 0, got {scaling}")
    return scaling


# PEFT LoRA classes that merge s·B·A into a weight for the forward (LoRALayer.merged_in_forward); their
# submodules' LoRA layers too (the out_proj of a LoRA-wrapped nn.MultiheadAttention: its forward never
# runs).
_MERGED_IN_FORWARD = ("ParamWrapper", "MultiheadAttention")


def find_lora_layers(model: nn.Module) -> list[LoRALayer]:
    """Every trainable LoRA pair in ``model``, in module order. Raises for PEFT variants (DoRA, KaSA, ...)."""
    layers: list[LoRALayer] = []
    merging: list[str] = []  # names of the modules that merge their LoRA (and their submodules') in forward
    for name, module in model.named_modules():
        lora_A, lora_B = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if isinstance(lora_A, nn.ModuleDict) and isinstance(lora_B, nn.ModuleDict):
            candidates = [(k, lora_A[k], lora_B[k]) for k in lora_A.keys() if k in lora_B]
        elif isinstance(lora_A, nn.Linear) and isinstance(lora_B, nn.Linear):
            candidates = [(None, lora_A, lora_B)]
        else:
            continue
        if type(module).__name__ in _MERGED_IN_FORWARD and type(module).__module__.startswith("peft."):
            merging.append(name)
        merged = any(name == n or name.startswith(n + ".") for n in merging)
        for adapter, a_mod, b_mod in candidates:
            if not (isinstance(a_mod, nn.Linear) and isinstance(b_mod, nn.Linear)):
                continue  # Conv/Embedding LoRA: not a Linear pair; its params stay with the other optimizer
            if not (a_mod.weight.requires_grad and b_mod.weight.requires_grad):
                continue
            if getattr(module, "use_dora", {}).get(adapter, False):
                raise NotImplementedError(
                    f"{name}: DoRA adapters are not supported (the magnitude vector changes the gradient)"
                )
            # PEFT routes DoRA, KaSA, aLoRA, ... through lora_variant: each changes ΔW = s·B·A or which
            # tokens it applies to, so G = SᵀX would no longer be the factors' merged gradient.
            variant = getattr(module, "lora_variant", {}).get(adapter) if adapter is not None else None
            if variant is not None:
                raise NotImplementedError(
                    f"{name}: the PEFT LoRA variant {type(variant).__name__} is not supported (it changes "
                    "the update s·B·A that the optimizers are defined on)"
                )
            label = name if adapter is None else f"{name}[{adapter}]"
            layers.append(LoRALayer(label, module, a_mod.weight, b_mod.weight, _scale_of(module, adapter),
                                    a_mod, b_mod, merged_in_forward=merged))
    return layers
