"""The algebra of LoRSum's half-steps around a batched r×r solve (spec/lorsum.md §3.3, §6.2).

``update_in`` / ``update_out`` form the r-wide Gram and right-hand side of the A- or B-step and hand them
to the ``solve`` they are given. Shared by the reference (``reference.lorsum_update_in/out``, with its own
``spd_solve``), the Triton half-steps (with Triton's solve) and the data-parallel half-step of ``ops``
(with the backend's solve and the rank-averaged token product as ``extra``), so all three compute the same
thing; the native kernels implement the same algebra in C++/CUDA and are tested against the reference.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from ._numerics import batch_scalar, math_dtype

Pair = tuple[Tensor, Tensor]

__all__ = ["update_in", "update_out"]


def update_in(
    B_hat: Tensor,
    anchor: Pair,
    pairs: Sequence[Pair],
    coeffs: Sequence,
    lmbd,
    metrics: tuple[Tensor, Tensor] | None = None,
    *,
    solve: Callable[..., Tensor],
    extra: Tensor | None = None,
) -> Tensor:
    """LoRSum's A half-step: the exact minimiser over A of the proximal sub-problem with B̂ fixed.

    ``anchor = (A0, B0)`` is pair 0 (warm start and prox anchor), ``pairs`` are the remaining factor pairs
    and ``coeffs = [c0, c1, ...]`` their coefficients. With ``metrics = (m_in, m_out)`` (effective
    diagonal metrics, shapes (..., n) and (..., m)) this is the scaled half-step of spec/lorsum.md §6.2:

        (B̂ᵀ M_out B̂ + λI) Â = λ A0 + c0 (B̂ᵀ M_out B0) A0 + Σ_j c_j (B̂ᵀ F_out_j)(F_in_j M_in⁻¹)

    Only r-wide intermediates are formed. ``solve(gram, rhs, left=)`` is the batched r×r solve (the
    reference's ``spd_solve``, or another backend's, with its ridge rules); ``extra`` an r-wide data term
    already summed over tokens (c·(S·B̂)ᵀX, e.g. averaged over ranks), added to the data terms before the
    metric. Any mix of float dtypes: arithmetic in fp32 (fp64 if any tensor is fp64), the result in A0's
    dtype (the native op's contract).
    """
    out_dtype = anchor[0].dtype
    B_hat, anchor, pairs, metrics = _half_step_in_math_dtype(B_hat, anchor, pairs, metrics)
    A0, B0 = anchor
    weighted_B = B_hat if metrics is None else B_hat * metrics[1].unsqueeze(-1)
    lam = batch_scalar(lmbd, A0)
    gram = _plus_ridge(weighted_B.mT @ B_hat, lam)
    # Solved for the change from the anchor: the right side minus gram·A0 is B̂ᵀM_out(c0·B0 − B̂)·A0 plus
    # the data terms, so the ridge pulls toward the prox anchor (not toward 0) and a first A-step from
    # B̂ = B0 with c0 = 1 sees the data terms alone.
    residual = (weighted_B.mT @ (B0 * batch_scalar(coeffs[0], B0) - B_hat)) @ A0
    data = extra
    for (f_in, f_out), c in zip(pairs, coeffs[1:]):
        term = (B_hat.mT @ f_out) @ f_in * batch_scalar(c, A0)
        data = term if data is None else data + term
    if data is not None:
        residual = residual + (data if metrics is None else data / metrics[0].unsqueeze(-2))
    return (A0 + solve(gram, residual, left=True)).to(out_dtype)


def update_out(
    A_hat: Tensor,
    anchor: Pair,
    pairs: Sequence[Pair],
    coeffs: Sequence,
    lmbd,
    metrics: tuple[Tensor, Tensor] | None = None,
    *,
    solve: Callable[..., Tensor],
    extra: Tensor | None = None,
) -> Tensor:
    """LoRSum's B half-step: the exact minimiser over B with Â fixed (see ``update_in``; ``extra`` is m×r).

        B̂ (Â M_in Âᵀ + λI) = λ B0 + c0 B0 (A0 M_in Âᵀ) + Σ_j c_j (M_out⁻¹ F_out_j)(F_in_j Âᵀ)

    Dtypes as ``update_in``: the result is in A0's dtype, as the native op returns it.
    """
    out_dtype = anchor[0].dtype
    A_hat, anchor, pairs, metrics = _half_step_in_math_dtype(A_hat, anchor, pairs, metrics)
    A0, B0 = anchor
    weighted_A = A_hat if metrics is None else A_hat * metrics[0].unsqueeze(-2)
    lam = batch_scalar(lmbd, B0)
    gram = _plus_ridge(weighted_A @ A_hat.mT, lam)
    # Solved for the change from the anchor, as in update_in: B0·(c0·A0 − Â)·M_in·Âᵀ + data terms.
    residual = B0 @ ((A0 * batch_scalar(coeffs[0], A0) - A_hat) @ weighted_A.mT)
    data = extra
    for (f_in, f_out), c in zip(pairs, coeffs[1:]):
        term = f_out @ (f_in @ A_hat.mT) * batch_scalar(c, B0)
        data = term if data is None else data + term
    if data is not None:
        residual = residual + (data if metrics is None else data / metrics[1].unsqueeze(-1))
    return (B0 + solve(gram, residual, left=False)).to(out_dtype)


def _plus_ridge(gram: Tensor, lam) -> Tensor:
    """``gram + λI`` (λ a number, or a tensor shaped by ``batch_scalar``), added to the fresh ``gram``'s
    diagonal in place: the same numbers as adding ``λ·eye`` without building it."""
    if isinstance(lam, Tensor) and lam.ndim > 0:
        if lam.shape[:-2] != gram.shape[:-2]:  # λ per layer of factors shared by the layers: broadcast
            return gram + lam * torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
        lam = lam.squeeze(-1)
    gram.diagonal(dim1=-2, dim2=-1).add_(lam)
    return gram


def _half_step_in_math_dtype(hat, anchor, pairs, metrics):
    """The half-steps' tensors in their arithmetic dtype (``math_dtype`` of all of them); no copy of a
    tensor that already has it."""
    tensors = [hat, *anchor, *(t for pair in pairs for t in pair), *(metrics or ())]
    acc = math_dtype(*tensors)
    if all(t.dtype == acc for t in tensors):
        return hat, anchor, pairs, metrics
    hat = hat.to(acc)
    anchor = (anchor[0].to(acc), anchor[1].to(acc))
    pairs = [(f_in.to(acc), f_out.to(acc)) for f_in, f_out in pairs]
    if metrics is not None:
        metrics = (metrics[0].to(acc), metrics[1].to(acc))
    return hat, anchor, pairs, metrics
