"""The LoRSum primitive and its statistics as pure functions of tensors (spec/lorsum.md §3–6, §9): the
rank-r projection of an implicit sum of factor pairs (``low_rank_sum``, scaled, over ranks), the diagonal
metrics, the clip norm and the SVDLoRA step (with the rotation that aligns its factors to the previous
ones). The optimizer step built on them is ``lorsum_step``.

Every tensor may carry leading batch dimensions (a group of same-shape layers). Math runs in fp32, or
fp64 when any input factor is fp64; results come back in the dtype of pair 0. Nothing here reads a value
on the host, so a step built from these functions can be captured in a CUDA graph.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor

from .. import ops
from .._numerics import as_dtype, batch_scalar, math_dtype

Pair = tuple[Tensor, Tensor]
# Data-parallel mode: averages a list of tensors over ranks and returns the averages
# (lorsum_kernels.distributed.RankAverage); None is single-process training.
Reduce = Callable[[list[Tensor]], list[Tensor]]

__all__ = [
    "compute_dtype",
    "low_rank_sum",
    "low_rank_sums_over_ranks",
    "LoRSumProblem",
    "scaled_low_rank_sum",
    "kfac_scaled_low_rank_sum",
    "kfac_statistics",
    "kfac_from_token_sums",
    "shampoo_statistics",
    "ema",
    "effective_metric",
    "gradient_norm",
    "svdlora_step",
    "align_factors",
]


# fp64 if any tensor is fp64, else fp32: the dtype of all optimizer math (DESIGN.md; the rule's one home
# is _numerics.math_dtype).
compute_dtype = math_dtype


def data_operand(t: Tensor, dt: torch.dtype, backend) -> Tensor:
    """``t`` (a token-sized X or S) as the half-steps should receive it: the native kernels read bf16/fp16
    and convert in registers, so they get it as it is; the torch reference needs it in the math dtype
    (one copy, as large as the data itself)."""
    if dt == torch.float32 and t.dtype in (torch.bfloat16, torch.float16):
        if ops.implementation(backend, t.device, "lorsum_update_in") == "native":
            return t
    return as_dtype(t, dt)


def _check_pairs(pairs: Sequence[Pair], coeffs: Sequence, iters: int) -> None:
    if len(pairs) == 0:
        raise ValueError("low_rank_sum needs at least one factor pair: pairs[0] = (A0, B0)")
    if len(coeffs) != len(pairs):
        raise ValueError(f"got {len(pairs)} factor pairs but {len(coeffs)} coefficients")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be an integer >= 0, got {iters!r}")
    A0, B0 = pairs[0]
    if A0.ndim < 2 or B0.ndim < 2 or A0.shape[-2] != B0.shape[-1]:
        raise ValueError(
            f"pairs[0] must be (A0 (r×n), B0 (m×r)); got shapes {tuple(A0.shape)} and {tuple(B0.shape)}"
        )
    n, m = A0.shape[-1], B0.shape[-2]
    for j, (f_in, f_out) in enumerate(pairs):
        if f_in.shape[-1] != n or f_out.shape[-2] != m or f_in.shape[-2] != f_out.shape[-1]:
            raise ValueError(
                f"pairs[{j}] = (F_in {tuple(f_in.shape)}, F_out {tuple(f_out.shape)}) does not stand for an "
                f"{m}×{n} matrix F_out @ F_in"
            )
    _check_batch_shapes([t.shape[:-2] for pair in pairs for t in pair], "factor pairs")


def _check_batch_shapes(shapes, what: str) -> None:
    """Leading (layer) dimensions must broadcast; say so here rather than deep inside a matmul."""
    if all(shape == shapes[0] for shape in shapes[1:]):
        return  # the optimizers' case: nothing to broadcast (torch.broadcast_shapes costs ~25 us)
    try:
        torch.broadcast_shapes(*shapes)
    except RuntimeError:
        raise ValueError(
            f"the leading (layer) dimensions of the {what} do not match: {[tuple(s) for s in shapes]}"
        ) from None


def _in_math_dtype(pairs, backend):
    """The anchor and the other pairs as the half-steps take them (factors in the math dtype, token data as
    ``data_operand`` gives it), and that dtype."""
    dt = compute_dtype(*(t for pair in pairs for t in pair))
    anchor = (as_dtype(pairs[0][0], dt), as_dtype(pairs[0][1], dt))
    rest = [(data_operand(f_in, dt, backend), data_operand(f_out, dt, backend)) for f_in, f_out in pairs[1:]]
    return anchor, rest, dt


def _lorsum(pairs, coeffs, metrics, lmbd, iters, backend, reduce=None) -> Pair:
    _check_pairs(pairs, coeffs, iters)
    if reduce is not None and len(pairs) < 2:
        raise ValueError("with reduce, pairs[1] must be this rank's token pair (X, S.mT)")
    out_dtype = pairs[0][0].dtype
    anchor, rest, dt = _in_math_dtype(pairs, backend)
    if metrics is not None:
        metrics = (as_dtype(metrics[0], dt), as_dtype(metrics[1], dt))
    if reduce is not None:
        problem = LoRSumProblem(anchor, rest[1:], list(coeffs), metrics, lmbd)
        ((A_new, B_new),) = low_rank_sums_over_ranks([problem], rest[0], iters=iters, reduce=reduce,
                                                     backend=backend)
        return A_new.to(out_dtype), B_new.to(out_dtype)
    A_new, B_new = _als_rounds(anchor, rest, coeffs, lmbd, metrics, iters, backend)
    return as_dtype(A_new, out_dtype), as_dtype(B_new, out_dtype)


def _als_rounds(anchor, rest, coeffs, lmbd, metrics, iters, backend, first_A=None) -> Pair:
    """The half-steps of ``iters`` ALS rounds from the anchor (one Jacobi round for ``iters = 0``: both
    half-steps from the anchor, spec §3.4; the official plain code returns its input there, spec §11 P1).
    ``first_A``: the first A-step's result, already computed (it is the one from B̂ = B0 either way)."""
    return ops.lorsum_rounds(anchor, rest, coeffs, lmbd, iters, metrics, backend=backend, first_A=first_A)


class LoRSumProblem(NamedTuple):
    """One LoRSum of ``low_rank_sums_over_ranks``: the single-process ``pairs`` minus the token pair.

    ``coeffs = [c_anchor, c_token, *c_replicated]``, as for ``pairs = [anchor, token pair, *replicated]``;
    ``metrics`` as in ``scaled_low_rank_sum`` (or None); ``lmbd`` the proximal weight. Every tensor is in
    the math dtype and identical on all ranks.
    """

    anchor: Pair
    replicated: list
    coeffs: list
    metrics: tuple[Tensor, Tensor] | None
    lmbd: object


def low_rank_sums_over_ranks(
    problems: Sequence[LoRSumProblem], token_pair: Pair, *, iters: int, reduce: Reduce,
    backend: str | None = "auto",
) -> list[Pair]:
    """LoRSums that share this rank's token pair ``(X, S.mT)``, in data-parallel mode (spec/lorsum.md §12).

    The token pair enters each half-step only through an r-wide sum over tokens: ``(S·B̂)ᵀ·X`` (r×n) in the
    A-step, ``Sᵀ·(X·Âᵀ)`` (m×r) in the B-step. Those are computed locally (``ops.pair_products``), averaged
    over ranks by ``reduce``, and the half-step solves with the average in their place; anchors,
    replicated pairs and metrics are used as they are. The problems run in lock step, so one collective
    carries a half-step's products of all of them (the weight and the momentum buffer), and for ``iters=0``
    (both half-steps from the anchors) one collective carries the whole step. Returns the new ``(A, B)``
    of each problem, in the math dtype. With ``R = 1`` this is ``low_rank_sum`` up to rounding.
    """
    X, S_t = token_pair

    def averaged_products(B_hats: list | None, A_hats: list | None) -> tuple[list, list]:
        """Each problem's A-step product (with its B̂) and B-step product (with its Â), averaged over ranks;
        an absent side gives an empty list. The wide factors sit side by side: one read of X and S for all
        problems, and one collective."""
        W = None if B_hats is None else torch.cat(B_hats, -1)
        V = None if A_hats is None else torch.cat(A_hats, -2)
        P, Q = ops.pair_products(X, S_t, W, V, backend=backend)
        present = [t for t, side in ((P, W), (Q, V)) if side is not None]
        averaged = iter(reduce(present))
        ranks = [p.anchor[0].shape[-2] for p in problems]
        P = [] if W is None else list(next(averaged).split(ranks, dim=-2))
        Q = [] if V is None else list(next(averaged).split(ranks, dim=-1))
        return P, Q

    def half_step(p: LoRSumProblem, side: str, hat: Tensor, product: Tensor) -> Tensor:
        """The A-step (``side="in"``, ``hat`` = B̂) or the B-step (``"out"``, ``hat`` = Â) of problem p, with
        the averaged token product in place of the local one (preconditioned as the reference does)."""
        return ops.lorsum_update_with_token_product(
            side, hat, p.anchor, p.replicated, [p.coeffs[0], *p.coeffs[2:]], p.lmbd, p.metrics,
            product * batch_scalar(p.coeffs[1], product), backend=backend)

    if iters == 0:  # Jacobi: both half-steps from the anchors, so all products in one collective
        P, Q = averaged_products([p.anchor[1] for p in problems], [p.anchor[0] for p in problems])
        return [(half_step(p, "in", p.anchor[1], Pp), half_step(p, "out", p.anchor[0], Qp))
                for p, Pp, Qp in zip(problems, P, Q)]
    B_hats = [p.anchor[1] for p in problems]
    for _ in range(iters):
        P, _ = averaged_products(B_hats, None)
        A_hats = [half_step(p, "in", B_hat, Pp) for p, B_hat, Pp in zip(problems, B_hats, P)]
        _, Q = averaged_products(None, A_hats)
        B_hats = [half_step(p, "out", A_hat, Qp) for p, A_hat, Qp in zip(problems, A_hats, Q)]
    return list(zip(A_hats, B_hats))


def low_rank_sum(
    pairs: Sequence[Pair], coeffs: Sequence, *, lmbd=0.0, iters: int = 1, backend: str | None = "auto",
    reduce: Reduce | None = None,
) -> Pair:
    """Rank-r compression of the implicit sum ``Σ_j c_j F_out_j @ F_in_j`` by proximal ALS (LoRSum).

    Args:
        pairs: factor pairs ``(F_in (q×n), F_out (m×q))``; ``pairs[0] = (A0, B0)`` is the warm start and
            the proximal anchor. The gradient enters as ``(X, S.mT)``.
        coeffs: one coefficient per pair (float, 0-d tensor, or one value per batch element).
        lmbd: the proximal weight λ itself (the optimizers pass ``lr * lmbd``).
        iters: k ALS rounds, A-step first (Gauss–Seidel); ``0`` is one Jacobi round, i.e. the
            Riemannian-preconditioned (RPLoRA) step.
        backend: "auto", "native", "triton" or "torch".
        reduce: data-parallel mode (``distributed.RankAverage``): ``pairs[1]`` is then this rank's token
            pair ``(X, S.mT)``, whose products are averaged over ranks each half-step
            (``low_rank_sums_over_ranks``); the other pairs must be identical on every rank.

    Returns:
        ``(A, B)``: the new factors, in the dtype of ``A0``.
    """
    return _lorsum(pairs, coeffs, None, lmbd, iters, backend, reduce)


def scaled_low_rank_sum(
    pairs: Sequence[Pair],
    coeffs: Sequence,
    metrics: tuple[Tensor, Tensor],
    *,
    lmbd=0.0,
    iters: int = 1,
    backend: str | None = "auto",
    reduce: Reduce | None = None,
) -> Pair:
    """LoRSum in the diagonal metric ``metrics = (m_in (n,), m_out (m,))`` (spec/lorsum.md §6.2).

    The metrics are the effective ones (``effective_metric``), strictly positive. Pair 0 is the anchor and
    is not preconditioned; every other pair is mapped to ``M_out⁻¹ F_out F_in M_in⁻¹``. With unit metrics
    this equals ``low_rank_sum``. ``reduce`` as in ``low_rank_sum`` (the metrics must be replicated).
    """
    m_in, m_out = metrics
    A0, B0 = pairs[0]
    if m_in.shape[-1] != A0.shape[-1] or m_out.shape[-1] != B0.shape[-2]:
        raise ValueError(
            f"metrics must be (m_in ({A0.shape[-1]},), m_out ({B0.shape[-2]},)); got "
            f"{tuple(m_in.shape)} and {tuple(m_out.shape)}"
        )
    _check_batch_shapes([A0.shape[:-2], m_in.shape[:-1], m_out.shape[:-1]], "factors and metrics")
    return _lorsum(pairs, coeffs, (m_in, m_out), lmbd, iters, backend, reduce)


def kfac_scaled_low_rank_sum(
    pairs: Sequence[Pair],
    coeffs: Sequence,
    metric_state: tuple[Tensor, Tensor],
    kfac: tuple[float, float, float, float, float],
    *,
    lmbd=0.0,
    iters: int = 1,
    backend: str | None = "auto",
) -> tuple[Pair, tuple[Tensor, Tensor]]:
    """``scaled_low_rank_sum`` in the diagonal K-FAC metric of this batch, with the metric step: the state
    ``metric_state = (v_in, v_out)`` takes the statistics of ``pairs[1] = (X, Sᵀ)`` as
    ``ops.kfac_metric_update`` does with ``kfac = (β2, δ, p, scale_in, scale_out)``, and the LoRSum runs in the
    new effective metrics. The same numbers as those two in turn (to rounding), with the statistics summed in
    the first A-step's own passes over X and S where the backend has the fused op (``ops.kfac_lorsum_update_in``;
    the CPU): one read of the tokens fewer. Single process. Returns ``((A, B), (v_in, v_out))``.
    """
    _check_pairs(pairs, coeffs, iters)
    if len(pairs) < 2:
        raise ValueError("pairs[1] must be the token pair (X, S.mT) whose statistics the metric takes")
    out_dtype = pairs[0][0].dtype
    anchor, rest, _ = _in_math_dtype(pairs, backend)
    A_new, B_new, v_in, v_out = ops.kfac_lorsum_rounds(anchor, rest, coeffs, lmbd, iters, *metric_state, *kfac,
                                                       backend=backend)
    return (as_dtype(A_new, out_dtype), as_dtype(B_new, out_dtype)), (v_in, v_out)


def kfac_statistics(
    X: Tensor, S: Tensor, *, loss_reduction: str = "mean", backend: str | None = "auto"
) -> tuple[Tensor, Tensor]:
    """Diagonal K-FAC statistics of one batch: ``(E[x²] (n,), c·Σ_t s_t² (m,))`` (spec §6.1).

    ``c`` is T for a mean-reduced loss (each row of S carries the 1/T factor) and 1/T for a sum, so both
    give the mean squared per-token output gradient. One read of X and of S: 2·T·(m+n) flops.
    """
    T = X.shape[-2]
    return kfac_from_token_sums(ops.col_sq_sums(X, backend=backend), ops.col_sq_sums(S, backend=backend), T,
                                loss_reduction=loss_reduction)


def kfac_from_token_sums(sum_in: Tensor, sum_out: Tensor, tokens, *, loss_reduction: str = "mean"):
    """``kfac_statistics`` from its token sums ``(Σ_t x_t², Σ_t s_t²)`` over ``tokens`` tokens (an int, or a
    tensor of the batch shape). The sums add over micro-batches and ranks; the statistics do not (their
    normalisation depends on the token count), so data-parallel mode and gradient accumulation combine the
    sums and the token counts and normalise once."""
    if loss_reduction not in ("mean", "sum"):
        raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
    if isinstance(tokens, Tensor):
        tokens = tokens.unsqueeze(-1)
        count = tokens.clamp_min(1)
    else:
        count = max(tokens, 1)
    return sum_in / count, sum_out * (tokens if loss_reduction == "mean" else 1.0 / count)


def shampoo_statistics(
    X: Tensor, S: Tensor, *, loss_reduction: str = "mean", backend: str | None = "auto"
) -> tuple[Tensor, Tensor]:
    """Diagonal Shampoo statistics ``(c·diag(GᵀG) (n,), c·diag(GGᵀ) (m,))`` of ``G = SᵀX`` (spec §6.1).

    Computed as the column and row energies of G, produced in m×256 slabs and reduced at once: 2·T·m·n
    flops and m·256 transient numbers per layer. The official code's ``X ⊙ (S Sᵀ X)`` needs a T×T Gram
    and 2·T²·(m+n) flops; this never forms it. ``c`` is as in ``kfac_statistics``.
    """
    T = X.shape[-2]
    if loss_reduction not in ("mean", "sum"):
        raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
    scale = T if loss_reduction == "mean" else 1.0 / max(T, 1)
    rows, cols = ops.row_col_energies(X, S, backend=backend)
    return cols * scale, rows * scale


def ema(v: Tensor, stat: Tensor, beta) -> Tensor:
    """``β·v + (1−β)·stat``: the metrics' exponential moving average (no bias correction, spec §6.1), as
    ``stat + β·(v − stat)`` by ``torch.lerp``: one kernel on a GPU where the formula takes four (β a tensor
    in the β2 warm-up: two products, 1 − β and the sum), once per layer and side in the streamed step."""
    stat = stat.to(v.dtype)
    if isinstance(beta, Tensor) and not (beta.ndim == 0 and beta.device != v.device):
        return torch.lerp(stat, v, beta.to(v.dtype))
    return torch.lerp(stat, v, float(beta))  # a number, or a 0-d tensor on the host (read there, no wait)


def effective_metric(v: Tensor, damping: float, power: float) -> Tensor:
    """``(v + δ)^p``, elementwise: damping is added before the fractional power (spec §6.1)."""
    return (v + damping).pow(power)


def gradient_norm(X: Tensor, S: Tensor, *, backend: str | None = "auto") -> Tensor:
    """``‖Sᵀ X‖_F`` per batch element, never forming G nor a T×T Gram.

    When ``T·(m+n) < m·n`` the identity ‖SᵀX‖² = ⟨XXᵀ, SSᵀ⟩ is summed over 256×256 token blocks
    (2·T²·(m+n) flops, 256² transient numbers); otherwise G's row energies are summed slab by slab
    (2·T·m·n flops, m·256 transient numbers). Either way the cheaper exact formula is used.
    """
    T, n, m = X.shape[-2], X.shape[-1], S.shape[-1]
    dt = compute_dtype(X, S)
    if T * (m + n) >= m * n:
        rows, _ = ops.row_col_energies(X, S, backend=backend)
        return rows.sum(-1).sqrt()
    Xc, Sc = X.to(dt), S.to(dt)
    block = 256
    total = torch.zeros(X.shape[:-2], dtype=dt, device=X.device)
    for i in range(0, T, block):
        for j in range(0, T, block):
            xx = Xc[..., i : i + block, :] @ Xc[..., j : j + block, :].mT
            ss = Sc[..., i : i + block, :] @ Sc[..., j : j + block, :].mT
            total = total + (xx * ss).sum((-2, -1))
    return total.clamp_min(0).sqrt()


def svdlora_step(A: Tensor, B: Tensor, grad: Tensor, lr) -> Pair:
    """The SVDLoRA step LoRSum approximates: ``Π_r(B·A − lr·grad)`` refactored as ``(Σ^½Vᵀ, UΣ^½)``.

    This baseline forms the m×n matrix and takes a full SVD (spec §2); it exists for tests and demos.
    """
    r = A.shape[-2]
    dt = compute_dtype(A, B, grad)
    W = B.to(dt) @ A.to(dt) - batch_scalar(lr, A.to(dt)) * grad.to(dt)
    bad, (U, sig, Vh) = _svd_where_finite(W)
    root = sig[..., :r].sqrt()
    A_new = torch.where(bad, float("nan"), root.unsqueeze(-1) * Vh[..., :r, :])
    B_new = torch.where(bad, float("nan"), U[..., :, :r] * root.unsqueeze(-2))
    return A_new.to(A.dtype), B_new.to(B.dtype)


def align_factors(A: Tensor, B: Tensor, A_new: Tensor, B_new: Tensor) -> Pair:
    """``(R·A_new, B_new·Rᵀ)`` with the orthogonal r×r ``R`` that brings the new factors nearest the old,
    ``min ‖R·A_new − A‖² + ‖B_new·Rᵀ − B‖²``: ``R = V·Uᵀ`` for ``A_new·Aᵀ + B_newᵀ·B = U·Σ·Vᵀ``.

    ``B_new·A_new`` is unchanged (RᵀR = I) and balanced factors stay balanced. A re-factorisation (the SVD
    of ``svdlora_step``) picks each singular vector's sign, and the basis within a repeated singular
    value, arbitrarily (differently on another device or in another dtype); after the rotation the factors
    depend only on the product and the old factors (where the r×r matrix is non-singular), so that
    whatever compares the factors with the old ones (``max_update_norm``'s bound and its move by α of the
    step, optim/update_clip.py) sees the weights' change, not the gauge's. Non-finite factors stay
    non-finite (their R is computed from zeros: LAPACK refuses NaN)."""
    dt = compute_dtype(A, B, A_new, B_new)
    A_new_dt, B_new_dt = A_new.to(dt), B_new.to(dt)
    _, (U, _, Vh) = _svd_where_finite(A_new_dt @ A.to(dt).mT + B_new_dt.mT @ B.to(dt))
    R = Vh.mT @ U.mT
    return (R @ A_new_dt).to(A_new.dtype), (B_new_dt @ R.mT).to(B_new.dtype)


def _svd_where_finite(W: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """``(bad, svd)``: ``bad`` (…, 1, 1) marks the matrices with a non-finite entry, and the thin SVD is of
    zeros in their place. LAPACK refuses non-finite input; the caller hands NaN back where ``bad``, decided
    on the device."""
    bad = ~W.isfinite().flatten(-2).all(-1).view(*W.shape[:-2], 1, 1)
    return bad, torch.linalg.svd(torch.where(bad, 0.0, W), full_matrices=False)
