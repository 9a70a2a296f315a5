"""Triton-backend LoRSum half-steps: ``lorsum_update_in`` and ``lorsum_update_out``.

Contract: the signatures, dtypes and semantics of ``reference.lorsum_update_in`` / ``lorsum_update_out``
(read their docstrings): batch dimensions broadcast, coefficients and λ are numbers, 0-d tensors or
per-layer tensors, ``metrics`` optional; the result is in the dtype of the inputs, which must share one.

What runs where: the skinny products (``B̂ᵀF_out``, ``(·)F_in``, the r×r Grams and the residuals) go
through torch matmul, i.e. cuBLAS on a GPU, as in the reference; no Triton kernel fuses them (yet). The
batched r×r solve goes through the Triton ``spd_solve`` (``spd.py``): one launch factors every matrix with
the relative ridge, takes the fallback ridge per matrix on the device where needed and substitutes. Like
the reference, the step reads no status on the host; it differs from it only in that solve (within
rounding, and NaN where even the fallback factorisation fails, as the native kernels).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..reference import batch_scalar
from .spd import spd_solve


def _eye_like(gram: Tensor) -> Tensor:
    return torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)


def lorsum_update_in(
    B_hat: Tensor,
    anchor: tuple[Tensor, Tensor],
    pairs: Sequence[tuple[Tensor, Tensor]],
    coeffs: Sequence,
    lmbd,
    metrics: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """LoRSum's A half-step (``reference.lorsum_update_in``), its r×r solve in Triton."""
    A0, B0 = anchor
    weighted_B = B_hat if metrics is None else B_hat * metrics[1].unsqueeze(-1)
    gram = weighted_B.mT @ B_hat
    gram = gram + batch_scalar(lmbd, A0) * _eye_like(gram)
    # Solved for the change from the prox anchor, as in the reference.
    residual = (weighted_B.mT @ (B0 * batch_scalar(coeffs[0], B0) - B_hat)) @ A0
    data = None
    for (f_in, f_out), c in zip(pairs, coeffs[1:]):
        term = (B_hat.mT @ f_out) @ f_in * batch_scalar(c, A0)
        data = term if data is None else data + term
    if data is not None:
        residual = residual + (data if metrics is None else data / metrics[0].unsqueeze(-2))
    return A0 + spd_solve(gram, residual, left=True)


def lorsum_update_out(
    A_hat: Tensor,
    anchor: tuple[Tensor, Tensor],
    pairs: Sequence[tuple[Tensor, Tensor]],
    coeffs: Sequence,
    lmbd,
    metrics: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """LoRSum's B half-step (``reference.lorsum_update_out``), its r×r solve in Triton."""
    A0, B0 = anchor
    weighted_A = A_hat if metrics is None else A_hat * metrics[0].unsqueeze(-2)
    gram = weighted_A @ A_hat.mT
    gram = gram + batch_scalar(lmbd, B0) * _eye_like(gram)
    residual = B0 @ ((A0 * batch_scalar(coeffs[0], A0) - A_hat) @ weighted_A.mT)
    data = None
    for (f_in, f_out), c in zip(pairs, coeffs[1:]):
        term = f_out @ (f_in @ A_hat.mT) * batch_scalar(c, B0)
        data = term if data is None else data + term
    if data is not None:
        residual = residual + (data if metrics is None else data / metrics[1].unsqueeze(-1))
    return B0 + spd_solve(gram, residual, left=False)
