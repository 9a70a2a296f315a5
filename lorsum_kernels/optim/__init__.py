"""torch.optim optimizers of the package and ``create_optimizer`` for the Hugging Face Trainer."""

from __future__ import annotations

import torch
from torch import nn

from .adaprelora import AdaPreLoRA
from .base import LoRAOptimizer
from .lorsum import LoRSum, ScaledLoRSum
from .riemannian import ScaledAdamW, ScaledGD
from .svdlora import SVDLoRA

__all__ = ["OPTIMIZERS", "AdaPreLoRA", "LoRAOptimizer", "LoRSum", "SVDLoRA", "ScaledAdamW", "ScaledGD",
           "ScaledLoRSum", "create_optimizer"]

# snake_case class name -> class; "adamw" is the plain LoRA + torch AdamW baseline.
OPTIMIZERS: dict[str, type] = {
    "lorsum": LoRSum,
    "scaled_lorsum": ScaledLoRSum,
    "svdlora": SVDLoRA,
    "adaprelora": AdaPreLoRA,
    "scaled_gd": ScaledGD,
    "scaled_adamw": ScaledAdamW,
}


def create_optimizer(model: nn.Module, name: str, **kwargs) -> torch.optim.Optimizer:
    """Build optimizer ``name`` for ``model``: ``Trainer(model, optimizers=(create_optimizer(...), sched))``.

    ``name`` is the snake_case class name (``"lorsum"``, ``"scaled_lorsum"``, ...) or ``"adamw"`` for
    torch AdamW over all trainable parameters. Under FSDP the Trainer refuses a pre-built optimizer: mix
    ``lorsum_kernels.hf.LoRAOptimizerMixin`` into the Trainer class, whose ``create_optimizer`` calls this.
    """
    key = name.lower()
    if key == "adamw":
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], **kwargs)
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose from {sorted([*OPTIMIZERS, 'adamw'])}")
    return OPTIMIZERS[key](model, **kwargs)
