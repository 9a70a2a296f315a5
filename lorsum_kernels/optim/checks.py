"""Argument checks shared by the optimizers: they raise before any state changes (DESIGN.md "Bad input")."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

__all__ = ["check_lr", "check_positive"]


def check_positive(name: str, value, *, allow_zero: bool = False) -> None:
    """A finite real number > 0 (>= 0 with ``allow_zero``): a Python or NumPy number, or a one-element
    tensor (read on the host: call it where a sync is acceptable, or see ``check_lr``)."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"invalid {name}: a tensor must hold one real number, got {value!r}")
        value = value.item()
    elif isinstance(value, (bool, str, bytes)) or not isinstance(value, numbers.Real):
        raise TypeError(f"invalid {name}: {value!r} is not a real number")
    value = float(value)
    if not (math.isfinite(value) and (value > 0 or (allow_zero and value == 0))):
        raise ValueError(f"invalid {name}: {value} (must be finite and {'>= 0' if allow_zero else '> 0'})")


def check_lr(name: str, value) -> Tensor | None:
    """Validates a group's lr before a step. Numbers and CPU tensors are checked on the host (no device
    synchronisation); for a tensor on an accelerator, returns a device flag, true when it is not finite or
    negative, that skips the step (counted) instead of raising, so the step never waits on the device."""
    if isinstance(value, Tensor) and value.device.type not in ("cpu", "meta"):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"invalid {name}: a tensor must hold one real number, got {value!r}")
        return ~(value.isfinite() & (value >= 0)).reshape(())
    check_positive(name, value, allow_zero=True)
    return None
