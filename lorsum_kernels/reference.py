"""Pure-PyTorch definitions of the package's hot-path ops: the single source of truth.

Every native or Triton implementation is tested against these functions, and every benchmark uses them
as the baseline. They are written for clarity, not speed, but never form an m×n gradient or a T×T Gram.

Conventions shared by all ops:

* Any tensor may carry leading batch dimensions (a group of ``L`` same-shape layers); matrices are the
  last two dimensions. Scalars (coefficients, ``lmbd``) are Python numbers, 0-d tensors, or tensors of
  the batch shape (one value per layer).
* Every op accepts the dtype mixes its native kernel accepts: each tensor float32, float64, bfloat16 or
  float16, independently. The arithmetic runs in fp32, or fp64 when any tensor input is fp64 (DESIGN.md
  "Numerical policy"); bf16/fp16 inputs are read as they are and upcast. Results come back in the dtype
  the native op returns (each op's docstring says which). Callers (``functional``) still cast to fp32, or
  keep fp64 for fp64 parameters, once on entry, so there the upcasts are no-ops.
* A factor pair ``(F_in, F_out)`` with ``F_in`` q×n and ``F_out`` m×q stands for ``F_out @ F_in``. The
  gradient pair is ``(X, S.mT)``: ``G = S.mT @ X``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import _half_steps
from ._numerics import (  # noqa: F401 (the ridge rules are the reference's too)
    FALLBACK_RIDGE,
    RELATIVE_RIDGE,
    batch_scalar,
    math_dtype,
    promoted_dtype,
    relative_ridge,
    ridged_cholesky,
)

Pair = tuple[Tensor, Tensor]


def spd_solve(gram: Tensor, rhs: Tensor, *, left: bool = True) -> Tensor:
    """Solve ``gram @ Z = rhs`` (``left``) or ``Z @ gram = rhs`` for a batch of symmetric PSD r×r matrices.

    Cholesky with the dtype's relative ridge (``ridged_cholesky``); no status is read on the host. Any
    float dtypes: solved in fp32 (fp64 if either is fp64), returned in their promoted dtype.
    """
    out_dtype = torch.promote_types(gram.dtype, rhs.dtype)
    acc = math_dtype(gram, rhs)
    gram, rhs = gram.to(acc), rhs.to(acc)
    chol = ridged_cholesky(gram, relative_ridge(acc))
    z = torch.cholesky_solve(rhs, chol) if left else torch.cholesky_solve(rhs.mT, chol).mT
    return z.to(out_dtype)


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

    Only r-wide intermediates are formed; the r×r system is solved by ``spd_solve`` (the algebra:
    ``_half_steps.update_in``). Any mix of float dtypes: arithmetic in fp32 (fp64 if any tensor is fp64),
    the result in A0's dtype (the native op's contract).
    """
    return _half_steps.update_in(B_hat, anchor, pairs, coeffs, lmbd, metrics, solve=spd_solve)


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

    Dtypes as ``lorsum_update_in``: the result is in A0's dtype, as the native op returns it.
    """
    return _half_steps.update_out(A_hat, anchor, pairs, coeffs, lmbd, metrics, solve=spd_solve)


def col_sq_sums(x: Tensor) -> Tensor:
    """Column sums of squares over the token dimension: ``(x**2).sum(-2)`` accumulated in fp32.

    ``x`` is (..., T, n); the result is (..., n), fp64 for fp64 input and fp32 otherwise. This is the
    diagonal K-FAC statistic (Σ_t x_t², Σ_t s_t²) of spec/lorsum.md §6.1.
    """
    acc = math_dtype(x)
    return x.to(acc).square().sum(-2)


def row_col_energies(X: Tensor, S: Tensor, *, block_size: int = 256) -> tuple[Tensor, Tensor]:
    """Row and column energies of ``G = Sᵀ X`` without ever holding G.

    ``X`` is (..., T, n) and ``S`` is (..., T, m). Returns ``(rows, cols)`` with ``rows[i] = Σ_j G_ij²``
    (= diag(G Gᵀ), shape (..., m)) and ``cols[j] = Σ_i G_ij²`` (= diag(Gᵀ G), shape (..., n)).

    G is produced ``block_size`` columns at a time (an m×block slab), squared and reduced: 2·T·m·n flops,
    one read of S per slab and one of X overall, and at most m·block_size transient numbers per batch
    element. No T×T matrix is formed, so the cost does not grow with T².
    """
    acc = math_dtype(X, S)
    n = X.shape[-1]
    S_t = S.to(acc).mT
    rows = torch.zeros(S.shape[:-2] + S.shape[-1:], dtype=acc, device=S.device)
    col_blocks = []
    for start in range(0, n, block_size):
        slab = (S_t @ X[..., start : start + block_size].to(acc)).square_()
        rows = rows + slab.sum(-1)
        col_blocks.append(slab.sum(-2))
        del slab  # one m×block slab alive at a time
    return rows, torch.cat(col_blocks, dim=-1)


# --------------------------------------------------------------------------------------------------
# AdaPreLoRA (spec/adaprelora.md): the H-weighted factor solve and the rank-2r surrogate energies.
# (The exact energies of G = SᵀX are ``row_col_energies`` above.)


def adaprelora_solve(
    A: Tensor, B: Tensor, g_A: Tensor, g_B: Tensor, p: Tensor, q: Tensor, *, ridge
) -> tuple[Tensor, Tensor]:
    """AdaPreLoRA's closed-form factor direction in the metric ``H(Y) = diag(p)·Y·diag(q)`` (spec §3.3–3.4).

    ``A`` (..., r, n), ``B`` (..., m, r); ``g_A = BᵀG`` and ``g_B = G·Aᵀ`` are the (unscaled) factor
    gradients; ``p`` (..., m) and ``q`` (..., n) are positive. With ``M_B = BᵀPB``, ``M_A = AQAᵀ`` (each
    plus the relative ``ridge``, see ``ridged_cholesky``) it returns

        dA = M_B⁻¹ g_A Q⁻¹ − ½ (M_B⁻¹ g_A Aᵀ) M_A⁻¹ A
        dB = P⁻¹ g_B M_A⁻¹ − ½ B M_B⁻¹ (Bᵀ P (P⁻¹ g_B M_A⁻¹))

    i.e. the member of the normal equations' solution family whose two contributions ``B·dA`` and
    ``dB·A`` split the overlap ``Π_B T Π_A`` evenly (T = P⁻¹GQ⁻¹); their sum is the H-orthogonal
    projection of T onto the tangent space at (B, A). The two r×r Grams are factored once each; every
    intermediate is r-wide (spec §3.7): O((m+n)r² + r³) flops, no m×n tensor.

    When ``g_A``/``g_B`` come from one G (no momentum) the two cross terms are the same r×r matrix
    ``M_B⁻¹ K M_A⁻¹`` with ``K = g_A Aᵀ = Bᵀ g_B``; each factor uses its own input as in spec §3.7.

    Any mix of float dtypes: arithmetic in fp32 (fp64 if any input is fp64), ``(dA, dB)`` in the promoted
    dtype of the six inputs, as the native op returns them.
    """
    out_dtype = promoted_dtype(A, B, g_A, g_B, p, q)
    acc = math_dtype(A, B, g_A, g_B, p, q)
    A, B, g_A, g_B, p, q = (t.to(acc) for t in (A, B, g_A, g_B, p, q))
    pB = B * p.unsqueeze(-1)  # P·B
    M_B = B.mT @ pB
    M_A = (A * q.unsqueeze(-2)) @ A.mT
    L_B = ridged_cholesky(M_B, ridge)
    L_A = ridged_cholesky(M_A, ridge)
    Y = torch.cholesky_solve(g_A, L_B)  # M_B⁻¹ g_A (r×n)
    # M_A is symmetric, so Z = P⁻¹ g_B M_A⁻¹ is the transpose of a left solve.
    Z = torch.cholesky_solve((g_B / p.unsqueeze(-1)).mT, L_A).mT  # (m×r)
    cross_A = torch.cholesky_solve((Y @ A.mT).mT, L_A).mT  # M_B⁻¹ K M_A⁻¹ from g_A
    cross_B = torch.cholesky_solve(pB.mT @ Z, L_B)  # M_B⁻¹ K M_A⁻¹ from g_B
    dA = Y / q.unsqueeze(-2) - 0.5 * (cross_A @ A)
    dB = Z - 0.5 * (B @ cross_B)
    return dA.to(out_dtype), dB.to(out_dtype)


def tangent_energies(B: Tensor, E: Tensor, F: Tensor, A: Tensor) -> tuple[Tensor, Tensor]:
    """Row and column energies of the rank-2r matrix ``B·E + F·A`` without forming it (spec §3.5 (b)).

    ``B``, ``F`` are (..., m, r); ``E``, ``A`` are (..., r, n). With ``Z = [B F]`` (m×2r) and
    ``W = [E; A]`` (2r×n) the matrix is ``Z·W``, so ``rows_i = z_iᵀ (W Wᵀ) z_i`` and
    ``cols_j = w_jᵀ (Zᵀ Z) w_j``: two 2r×2r Grams and two r-wide products, O((m+n)r²) flops and
    O((m+n)r) memory. AdaPreLoRA's surrogate is ``tangent_energies(B, g_A, g_B, A)``, the energies of
    ``G̃ = B g_A + g_B A``. Rounding can make an exact zero come out slightly negative; results are
    clamped at 0. Any mix of float dtypes: arithmetic in fp32 (fp64 if any input is fp64), results in the
    promoted dtype of the four inputs, as the native op returns them.
    """
    out_dtype = promoted_dtype(B, E, F, A)
    acc = math_dtype(B, E, F, A)
    Z = torch.cat([B.to(acc), F.to(acc)], dim=-1)
    W = torch.cat([E.to(acc), A.to(acc)], dim=-2)
    rows = ((Z @ (W @ W.mT)) * Z).sum(-1)
    cols = (((Z.mT @ Z) @ W) * W).sum(-2)
    return rows.clamp_min(0).to(out_dtype), cols.clamp_min(0).to(out_dtype)


# --------------------------------------------------------------------------------------------------
# Fused forms of the hot paths that the native kernels implement as one op (spec/lorsum.md §9 H2, §6.1).


def pair_products(
    f_in: Tensor, f_out: Tensor, W: Tensor | None = None, V: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The token products of one factor pair with (possibly wide) factors: ``(Wᵀ·F_out·F_in, F_out·F_in·Vᵀ)``.

    ``f_in`` is (..., q, n) and ``f_out`` (..., m, q); ``W`` is (..., m, w) and ``V`` (..., v, n). For the
    gradient pair ``(X, S.mT)`` the products are ``(S·W)ᵀ·X`` (w×n) and ``Sᵀ·(X·Vᵀ)`` (m×v): the data terms
    of LoRSum's A- and B-steps, several at once when the factors are placed side by side (``W = [B̂ | B̂_m]``
    serves the weight and the momentum A-steps, spec §9 H2). An absent ``W`` or ``V`` gives an empty
    (..., 0, n) or (..., m, 0) result. Computed in fp64 when any input is fp64, else fp32; parenthesised so
    that only q-by-w and q-by-v intermediates are formed.
    """
    acc = math_dtype(f_in, f_out, W, V)
    batch, n, m = f_in.shape[:-2], f_in.shape[-1], f_out.shape[-2]
    fi, fo = f_in.to(acc), f_out.to(acc)
    if W is None:
        P = torch.empty(batch + (0, n), dtype=acc, device=f_in.device)
    else:
        P = (W.to(acc).mT @ fo) @ fi
    if V is None:
        Q = torch.empty(batch + (m, 0), dtype=acc, device=f_in.device)
    else:
        Q = fo @ (fi @ V.to(acc).mT)
    return P, Q


def kfac_metric_update(
    X: Tensor, S: Tensor, v_in: Tensor, v_out: Tensor, beta: float, damping: float, power: float,
    scale_in: float, scale_out: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The diagonal K-FAC metric step (spec/lorsum.md §6.1): statistics, EMA, damping and power in one op.

    ``v ← β·v + (1−β)·scale·Σ_t x_t²`` for ``(v_in, X, scale_in)`` and ``(v_out, S, scale_out)``, then the
    effective metrics ``M = (v + δ)^p``. ``X`` is (..., T, n), ``S`` (..., T, m), ``v_in`` (..., n) and
    ``v_out`` (..., m) (fp32, or fp64). The sums accumulate as ``col_sq_sums`` does; the EMA and the power
    run in v's dtype. ``scale_in = 1/T`` and ``scale_out = T`` (mean loss) give ``kfac_statistics``.
    Returns ``(v_in, v_out, M_in, M_out)``.
    """
    new_in = v_in * beta + (col_sq_sums(X) * scale_in).to(v_in.dtype) * (1 - beta)
    new_out = v_out * beta + (col_sq_sums(S) * scale_out).to(v_out.dtype) * (1 - beta)
    return new_in, new_out, (new_in + damping).pow(power), (new_out + damping).pow(power)


def kfac_lorsum_update_in(
    B_hat: Tensor, anchor: Pair, pairs: Sequence[Pair], coeffs: Sequence, lmbd, v_in: Tensor, v_out: Tensor,
    beta: float, damping: float, power: float, scale_in: float, scale_out: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """ScaledLoRSum's first A-step in the diagonal K-FAC metric of this batch (spec/lorsum.md §6.1, §6.2).

    The metric step ``kfac_metric_update`` of the first pair ``pairs[0] = (X, Sᵀ)`` (the gradient pair, whose
    column sums of squares are the statistics) and the state ``(v_in, v_out)``, then ``lorsum_update_in`` in
    the new effective metrics; the other arguments as for ``lorsum_update_in``. Fused, the statistics are
    summed in the A-step's own passes over X and S. Returns ``(Â, v_in, v_out, M_in, M_out)``.
    """
    X, S_t = pairs[0]
    new_in, new_out, m_in, m_out = kfac_metric_update(X, S_t.mT, v_in, v_out, beta, damping, power, scale_in,
                                                      scale_out)
    return lorsum_update_in(B_hat, anchor, pairs, coeffs, lmbd, (m_in, m_out)), new_in, new_out, m_in, m_out


def finish_normalized_step(
    A: Sequence[Tensor], B: Sequence[Tensor], A_new: Sequence[Tensor], B_new: Sequence[Tensor],
    checked: Sequence[Tensor], v: Sequence[Tensor], t: Sequence[Tensor], scale: Sequence[Tensor],
    root: Tensor, layer_lr: Tensor, allowed: Tensor, balanced: bool, lr: float, beta: float,
) -> Tensor:
    """``normalize_step``'s finish and write for L layers, in place (optim/step_normalization.py, whose
    ``finish`` this applies to one layer at a time). Layer l: parameters ``A[l]`` (r, n), ``B[l]`` (m, r); new
    factors ``A_new[l]``, ``B_new[l]`` of those sizes, times ``root[l]`` = √s when ``balanced``; statistics
    ``v[l]``, ``t[l]``, ``scale[l]`` (one element each); ``layer_lr[l]`` the lr its step ran at; ``lr`` and
    ``beta`` the group's η and normalize_beta. The layer is written when ``allowed[l]`` holds and its
    unbalanced new factors and its ``checked`` tensors (``len(checked) // L`` per layer, layer by layer) are
    all finite: the factors move to ``update_clip.moved_by(old, new, α)``, α = min(1, η·scale_new /
    layer_lr), and the statistics take their new values. Returns the (L,) bool of the layers written."""
    from .optim.step_normalization import finish  # the optimizer's own definition (a late import: optim
    # imports this module through ops)

    written = allowed.clone()
    per_layer = len(checked) // len(A) if len(A) else 0
    for l in range(len(A)):
        A_n, B_n = A_new[l].reshape(A[l].shape), B_new[l].reshape(B[l].shape)
        if balanced:
            A_n, B_n = A_n / root[l], B_n / root[l]
        others = checked[l * per_layer:(l + 1) * per_layer]
        if not (bool(written[l]) and all(bool(x.isfinite().all()) for x in (A_n, B_n, *others))):
            written[l] = False
            continue
        old = {"step_norm_sq": v[l].reshape(1), "step_norm_count": t[l].reshape(1)}
        A_out, B_out, stats = finish(A[l][None], B[l][None], A_n[None], B_n[None], root[l].view(1, 1, 1), lr,
                                     beta, old, layer_lr[l:l + 1])
        A[l].copy_(A_out[0])
        B[l].copy_(B_out[0])
        for target, key in ((v[l], "step_norm_sq"), (t[l], "step_norm_count"), (scale[l], "step_norm_scale")):
            target.copy_(stats[key].reshape(target.shape))
    return written


def finish_normalized_stacked(
    A: Tensor, B: Tensor, A_new: Tensor, B_new: Tensor, root: Tensor, layer_lr: Tensor, v: Tensor, t: Tensor,
    lr: float, beta: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``normalize_step``'s statistics and shrink of L stacked layers, out of place (the function
    ``optim.step_normalization.finish``): old factors ``A`` (L, r, n), ``B`` (L, m, r) and new ones of the
    same shapes and dtype (unbalanced), ``root`` (L,) = √s, ``layer_lr`` (L,) the lr each step ran at, ``v``
    and ``t`` (L,) the statistics before the step, ``lr`` and ``beta`` the group's η and normalize_beta.
    Returns ``(A_out, B_out, v', t', scale')``: the factors moved by α = min(1, η·scale'/layer_lr) of their
    step and the statistics' new values."""
    from .optim.step_normalization import finish  # the optimizer's own definition (a late import: optim
    # imports this module through ops)

    L = A.shape[0]
    A_out, B_out, stats = finish(A, B, A_new, B_new, root.reshape(L, 1, 1), lr, beta,
                                 {"step_norm_sq": v.reshape(L), "step_norm_count": t.reshape(L)},
                                 layer_lr.reshape(L))
    return A_out, B_out, stats["step_norm_sq"], stats["step_norm_count"], stats["step_norm_scale"]


def adafactor_ema_scales(
    row_stat: Tensor, col_stat: Tensor, rows: Tensor, cols: Tensor, t: Tensor, beta2: float | None,
    decay_rate: float, eps1: float, dtype: torch.dtype, floor: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """AdaPreLoRA's Adafactor statistics step for L layers (spec/adaprelora.md §2), the functions of
    ``functional.adaprelora`` in turn: ``adafactor_ema`` of the states ``row_stat`` (L, m), ``col_stat`` (L, n)
    with this step's energies ``rows``, ``cols`` at step ``t`` (one value per layer, or one),
    ``adafactor_debias`` (a fixed ``beta2`` only) and ``adafactor_scales`` of the result cast to ``dtype``
    with ``floor``. Returns ``(R, C, p, q)``: the new states and the scales of the H-weighted solve."""
    from .functional.adaprelora import adafactor_debias, adafactor_ema, adafactor_scales  # a late import:
    # functional imports this module through ops

    R, C = adafactor_ema(row_stat, col_stat, rows, cols, t, beta2=beta2, decay_rate=decay_rate, eps1=eps1)
    R_hat, C_hat = adafactor_debias(R, C, t, beta2=beta2)
    p, q = adafactor_scales(R_hat.to(dtype), C_hat.to(dtype), floor=floor)
    return R, C, p, q
