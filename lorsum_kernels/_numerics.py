"""The numerical policy in code (DESIGN.md "Numerical policy"), shared by the reference, the kernels'
launchers and the methods.

* ``math_dtype``: all optimizer and op arithmetic runs in fp32, or in fp64 when any input is fp64; bf16 and
  fp16 inputs are read as they are and upcast. The one place this rule is written.
* ``promoted_dtype``: the result dtype of the ops that return the inputs' promoted dtype.
* ``batch_scalar``: a Python number, a 0-d tensor or one value per layer, shaped to broadcast against a
  batch of matrices.
* The ridge rules of every r×r SPD factorisation (``RELATIVE_RIDGE``, ``FALLBACK_RIDGE``,
  ``ridged_cholesky``), which the reference and the Triton solve share (the native kernels use the same
  constants, csrc/).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["FALLBACK_RIDGE", "RELATIVE_RIDGE", "STEP_NOISE_FLOOR", "as_dtype", "batch_scalar", "decayed",
           "math_dtype", "promoted_dtype", "relative_ridge", "ridged_cholesky"]

# Ridge added to every r×r Gram before its Cholesky factorisation, relative to its mean diagonal, per
# math dtype: small enough to leave results unchanged at that dtype's working accuracy, large enough to
# make a rank-deficient but non-zero Gram factorisable. Where even that fails (an exactly singular Gram,
# or one indefinite by rounding), the fallback ridge is used instead, selected on the device without
# reading the status.
RELATIVE_RIDGE = {torch.float32: 1e-7, torch.float64: 1e-14}
FALLBACK_RIDGE = {torch.float32: 1e-4, torch.float64: 1e-8}

# normalize_step's statistics measure a step only above this many ε·‖A‖_F·‖B‖_F of its layer's factors (ε of
# the factors' math dtype): below, the step cannot be told from the factors' rounding (optim/
# step_normalization.py). The reference, the CPU kernel (csrc/cpu/step_normalization.cpp, kNoiseFloor) and
# the Triton finish take it.
STEP_NOISE_FLOOR = 16.0


def math_dtype(*items: Tensor | torch.dtype | None) -> torch.dtype:
    """fp64 when any of the tensors (or dtypes) is fp64, else fp32; None entries are skipped."""
    for item in items:
        if item is not None and (item if isinstance(item, torch.dtype) else item.dtype) == torch.float64:
            return torch.float64
    return torch.float32


def as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)``, without the call when ``t`` already has it (the step's per-layer path runs in
    backward, where every torch call costs tens of µs cold)."""
    return t if t.dtype == dtype else t.to(dtype)


def promoted_dtype(*tensors: Tensor) -> torch.dtype:
    """The promoted dtype of the tensors (torch.promote_types): the result dtype of the ops that return one."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def batch_scalar(value, like: Tensor) -> Tensor | float:
    """A scalar, or one value per batch element, shaped to broadcast against ``like``'s matrices."""
    if isinstance(value, Tensor) and value.ndim > 0:
        return value.to(like.dtype).reshape(*value.shape, 1, 1)
    if isinstance(value, Tensor):
        return value.to(like.dtype)
    return float(value)


def decayed(x: Tensor, lr, weight_decay) -> Tensor:
    """``x·(1 − lr·wd)``, decoupled weight decay (lr and wd scalars or one per batch element); ``x`` itself
    when wd is the number 0, as x·1 is x bit for bit, without the copy (on a GPU, a launch per factor)."""
    if not isinstance(weight_decay, Tensor) and float(weight_decay) == 0.0:
        return x
    return x * (1 - batch_scalar(lr, x) * batch_scalar(weight_decay, x))


def relative_ridge(dtype: torch.dtype) -> float:
    return RELATIVE_RIDGE.get(dtype, RELATIVE_RIDGE[torch.float32])


def ridged_cholesky(gram: Tensor, ridge) -> Tensor:
    """Cholesky factor of ``gram + ridge·mean(diag(gram))·I`` for a batch of symmetric PSD r×r matrices.

    The ridge is relative to the mean diagonal, so it means the same for any scale of the factors or of
    the metric. The mean diagonal is floored at ``sqrt(finfo.tiny)`` so that an all-zero Gram (B = 0 at
    the standard LoRA init) still gets a factorisable, normal-range matrix; its right-hand sides are zero
    then, and so are the solutions. ``ridge = 0`` is the exact factorisation wherever it exists. Where the
    factorisation fails, ``ridge + FALLBACK_RIDGE[dtype]`` is used instead, chosen per batch element on
    the device (no status is read on the host).
    """
    r = gram.shape[-1]
    eye = torch.eye(r, dtype=gram.dtype, device=gram.device)
    floor = torch.finfo(gram.dtype).tiny ** 0.5
    scale = gram.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(floor)[..., None, None]
    ridge = batch_scalar(ridge, gram)
    fallback = FALLBACK_RIDGE.get(gram.dtype, FALLBACK_RIDGE[torch.float32])
    chol, info = torch.linalg.cholesky_ex(gram + (ridge * scale) * eye)
    chol_fallback, _ = torch.linalg.cholesky_ex(gram + ((ridge + fallback) * scale) * eye)
    return torch.where((info == 0)[..., None, None], chol, chol_fallback)
