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

from torch import Tensor

from .. import _half_steps
from .spd import spd_solve


def lorsum_update_in(
    B_hat: Tensor,
    anchor: tuple[Tensor, Tensor],
    pairs: Sequence[tuple[Tensor, Tensor]],
    coeffs: Sequence,
    lmbd,
    metrics: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """LoRSum's A half-step (``reference.lorsum_update_in``'s algebra), its r×r solve in Triton."""
    return _half_steps.update_in(B_hat, anchor, pairs, coeffs, lmbd, metrics, solve=spd_solve)


def lorsum_update_out(
    A_hat: Tensor,
    anchor: tuple[Tensor, Tensor],
    pairs: Sequence[tuple[Tensor, Tensor]],
    coeffs: Sequence,
    lmbd,
    metrics: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """LoRSum's B half-step (``reference.lorsum_update_out``'s algebra), its r×r solve in Triton."""
    return _half_steps.update_out(A_hat, anchor, pairs, coeffs, lmbd, metrics, solve=spd_solve)
