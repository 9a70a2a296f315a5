"""Pure-PyTorch definitions of the package's hot-path ops: the single source of truth.

Every native or Triton implementation is tested against these functions, and every benchmark uses them
as the baseline. They are written for clarity, not speed, but never form an m×n gradient or a T×T Gram.

Conventions shared by all ops:

* Any tensor may carry leading batch dimensions (a group of ``L`` same-shape layers); matrices are the
  last two dimensions. Scalars (coefficients, ``lmbd``) are Python numbers, 0-d tensors, or tensors of
  the batch shape (one value per layer).
* The ops compute in the dtype they are given. Callers (``functional``) cast to fp32, or keep fp64 for
  fp64 parameters, once on entry; see DESIGN.md "Numerical policy".
* A factor pair ``(F_in, F_out)`` with ``F_in`` q×n and ``F_out`` m×q stands for ``F_out @ F_in``. The
  gradient pair is ``(X, S.mT)``: ``G = S.mT @ X``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

# Ridge added to every r×r Gram before its Cholesky factorisation, relative to its mean diagonal. Small
# enough to leave fp32 results unchanged at the 1e-7 level, large enough to make a rank-deficient but
# non-zero Gram factorisable. When even that fails (an exactly singular or indefinite-by-rounding
# matrix), the fallback ridge is used instead, selected on the device without reading the status.
RELATIVE_RIDGE = 1e-7
FALLBACK_RIDGE = 1e-4

Pair = tuple[Tensor, Tensor]


def batch_scalar(value, like: Tensor) -> Tensor | float:
    """A scalar, or one value per batch element, shaped to broadcast against ``like``'s matrices."""
    if isinstance(value, Tensor) and value.ndim > 0:
        return value.to(like.dtype).reshape(*value.shape, 1, 1)
    if isinstance(value, Tensor):
        return value.to(like.dtype)
    return float(value)


def spd_solve(gram: Tensor, rhs: Tensor, *, left: bool = True) -> Tensor:
    """Solve ``gram @ Z = rhs`` (``left``) or ``Z @ gram = rhs`` for a batch of symmetric PSD r×r matrices.

    Cholesky with a ridge relative to the mean diagonal; where the factorisation fails the fallback ridge
    is used, chosen per batch element with ``torch.where`` so no status is read on the host.
    """
    r = gram.shape[-1]
    eye = torch.eye(r, dtype=gram.dtype, device=gram.device)
    scale = gram.diagonal(dim1=-2, dim2=-1).mean(-1, keepdim=True).unsqueeze(-1)
    # A zero Gram (B = 0 and lmbd = 0) still gets a factorisable matrix; its right side is then zero.
    scale = scale.clamp_min(torch.finfo(gram.dtype).tiny)
    chol, info = torch.linalg.cholesky_ex(gram + (RELATIVE_RIDGE * scale) * eye)
    chol_fallback, _ = torch.linalg.cholesky_ex(gram + (FALLBACK_RIDGE * scale) * eye)
    chol = torch.where((info == 0).reshape(*info.shape, 1, 1), chol, chol_fallback)
    return torch.cholesky_solve(rhs, chol) if left else torch.cholesky_solve(rhs.mT, chol).mT


def lorsum_update_in(
    B_hat: Tensor,
    anchor: Pair,
    pairs: Sequence[Pair],
    coeffs: Sequence,
    lmbd,
    metrics: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """LoRSum's A half-step: the exact minimiser over A of the proximal sub-problem with B̂ fixed.

    ``anchor = (A0, B0)`` is pair 0 (warm start and prox anchor), ``pairs`` are the remaining factor pairs
    and ``coeffs = [c0, c1, ...]`` their coefficients. With ``metrics = (m_in, m_out)`` (effective
    diagonal metrics, shapes (..., n) and (..., m)) this is the scaled half-step of spec/lorsum.md §6.2:

        (B̂ᵀ M_out B̂ + λI) Â = λ A0 + c0 (B̂ᵀ M_out B0) A0 + Σ_j c_j (B̂ᵀ F_out_j)(F_in_j M_in⁻¹)

    Only r-wide intermediates are formed.
    """
    A0, B0 = anchor
    weighted_B = B_hat if metrics is None else B_hat * metrics[1].unsqueeze(-1)
    lam = batch_scalar(lmbd, A0)
    gram = weighted_B.mT @ B_hat
    gram = gram + lam * torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    rhs = (weighted_B.mT @ B0) @ A0 * batch_scalar(coeffs[0], A0) + lam * A0
    data = None
    for (f_in, f_out), c in zip(pairs, coeffs[1:]):
        term = (B_hat.mT @ f_out) @ f_in * batch_scalar(c, A0)
        data = term if data is None else data + term
    if data is not None:
        rhs = rhs + (data if metrics is None else data / metrics[0].unsqueeze(-2))
    return spd_solve(gram, rhs, left=True)


def lorsum_update_out(
    A_hat: Tensor,
    anchor: Pair,
    pairs: Sequence[Pair],
    coeffs: Sequence,
    lmbd,
    metrics: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """LoRSum's B half-step: the exact minimiser over B with Â fixed (see ``lorsum_update_in``).

        B̂ (Â M_in Âᵀ + λI) = λ B0 + c0 B0 (A0 M_in Âᵀ) + Σ_j c_j (M_out⁻¹ F_out_j)(F_in_j Âᵀ)
    """
    A0, B0 = anchor
    weighted_A = A_hat if metrics is None else A_hat * metrics[0].unsqueeze(-2)
    lam = batch_scalar(lmbd, B0)
    gram = weighted_A @ A_hat.mT
    gram = gram + lam * torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    rhs = B0 @ (A0 @ weighted_A.mT) * batch_scalar(coeffs[0], B0) + lam * B0
    data = None
    for (f_in, f_out), c in zip(pairs, coeffs[1:]):
        term = f_out @ (f_in @ A_hat.mT) * batch_scalar(c, B0)
        data = term if data is None else data + term
    if data is not None:
        rhs = rhs + (data if metrics is None else data / metrics[1].unsqueeze(-1))
    return spd_solve(gram, rhs, left=False)


def col_sq_sums(x: Tensor) -> Tensor:
    """Column sums of squares over the token dimension: ``(x**2).sum(-2)`` accumulated in fp32.

    ``x`` is (..., T, n); the result is (..., n), fp64 for fp64 input and fp32 otherwise. This is the
    diagonal K-FAC statistic (Σ_t x_t², Σ_t s_t²) of spec/lorsum.md §6.1.
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.to(acc).square().sum(-2)


def row_col_energies(X: Tensor, S: Tensor, *, block_size: int = 256) -> tuple[Tensor, Tensor]:
    """Row and column energies of ``G = Sᵀ X`` without ever holding G.

    ``X`` is (..., T, n) and ``S`` is (..., T, m). Returns ``(rows, cols)`` with ``rows[i] = Σ_j G_ij²``
    (= diag(G Gᵀ), shape (..., m)) and ``cols[j] = Σ_i G_ij²`` (= diag(Gᵀ G), shape (..., n)).

    G is produced ``block_size`` columns at a time (an m×block slab), squared and reduced: 2·T·m·n flops,
    one read of S per slab and one of X overall, and at most m·block_size transient numbers per batch
    element. No T×T matrix is formed, so the cost does not grow with T².
    """
    acc = torch.float64 if torch.float64 in (X.dtype, S.dtype) else torch.float32
    n = X.shape[-1]
    S_t = S.to(acc).mT
    rows = torch.zeros(S.shape[:-2] + S.shape[-1:], dtype=acc, device=S.device)
    col_blocks = []
    for start in range(0, n, block_size):
        slab = (S_t @ X[..., start : start + block_size].to(acc)).square()
        rows = rows + slab.sum(-1)
        col_blocks.append(slab.sum(-2))
    return rows, torch.cat(col_blocks, dim=-1)
