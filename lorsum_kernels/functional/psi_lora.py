"""One PSI-LoRA / Scaled PSI-LoRA optimizer step as a pure function (spec/lorsum.md §5.1, §6.4).

Inputs are a bucket of L same-shape layers: balanced factors ``A`` (L,r,n) and ``B`` (L,m,r) in the math
dtype (``√s·A``, ``√s·B``, so that ``B·A`` is the merged LoRA weight ``s·B·A``), the captured ``X`` (L,T,n)
and ``S`` (L,T,m), and the method state. Outputs are the new factors and the new state; the caller writes
them back (or not, when they are not finite).
"""

from __future__ import annotations

from torch import Tensor

from .lorsum import (
    data_operand,
    effective_metric,
    ema,
    kfac_statistics,
    low_rank_sum,
    scaled_low_rank_sum,
    shampoo_statistics,
)

__all__ = ["psi_lora_step", "scaled_psi_lora_step"]


def psi_lora_step(
    A: Tensor,
    B: Tensor,
    X: Tensor,
    S: Tensor,
    momentum_factors: tuple[Tensor, Tensor] | None,
    *,
    lr,
    lmbd: float,
    lmbd_momentum: float,
    iters: int,
    momentum: float,
    dampening: float,
    backend: str | None = "auto",
):
    """PSI-LoRA with low-rank heavy-ball momentum kept as factors ``(A_m, B_m)`` (spec §5.1).

    Weight step: ``(A, B) ← LoRSum([(A,B), (X,Sᵀ), (A_m,B_m)], [1, −η(1−d), −ηβ], k, λ = η·λ0)``, so the
    target is ``BA − η((1−d)G + β·B_mA_m)``: PyTorch SGD momentum with the current gradient at full rank.
    Buffer step (after it, with the same G): ``(A_m, B_m) ← LoRSum([(A_m,B_m), (X,Sᵀ)], [β, 1−d], k,
    λ = η·λ_mom)``. With ``momentum_factors=None`` (β = 0) the buffer is neither used nor updated.

    Returns ``(A, B, momentum_factors)``.
    """
    # cast (when the backend needs it) once, not in each LoRSum call
    grad_pair = (data_operand(X, A.dtype, backend), data_operand(S, A.dtype, backend).mT)
    lam = lr * lmbd
    if momentum_factors is None:
        A_new, B_new = low_rank_sum([(A, B), grad_pair], [1.0, -lr * (1 - dampening)], lmbd=lam, iters=iters,
                                    backend=backend)
        return A_new, B_new, None
    A_m, B_m = momentum_factors
    A_new, B_new = low_rank_sum(
        [(A, B), grad_pair, (A_m, B_m)],
        [1.0, -lr * (1 - dampening), -lr * momentum],
        lmbd=lam,
        iters=iters,
        backend=backend,
    )
    buffer = low_rank_sum(
        [(A_m, B_m), grad_pair], [momentum, 1 - dampening], lmbd=lr * lmbd_momentum, iters=iters, backend=backend
    )
    return A_new, B_new, buffer


def scaled_psi_lora_step(
    A: Tensor,
    B: Tensor,
    X: Tensor,
    S: Tensor,
    metric_state: tuple[Tensor, Tensor],
    momentum_factors: tuple[Tensor, Tensor] | None,
    *,
    lr,
    lmbd: float,
    min_lmbd: float,
    iters: int,
    betas: tuple[float, float],
    damping: float,
    metric: str,
    metric_power: float,
    loss_reduction: str,
    backend: str | None = "auto",
):
    """Scaled PSI-LoRA, "normal" mode (spec §6.4), for metrics ``"kfac"`` or ``"shampoo"``.

    1. The metric EMAs ``v_in`` (n) and ``v_out`` (m) take the current batch's statistics (β2, no bias
       correction); the effective metrics are ``(v + δ)^p``.
    2. ``(A, B) ← ScaledLoRSum([(A,B), (X,Sᵀ), (A_m,B_m)], [1, −η(1−β1), −ηβ1], M, k,
       λ = max(η·λ0, min_lmbd))``.
    3. If β1 > 0: ``(A_m, B_m) ← LoRSum([(A_m,B_m), (X,Sᵀ)], [β1, 1−β1], k, λ = η·λ0)``, an
       unpreconditioned EMA of G; the preconditioning is applied when the buffer is used.

    Returns ``(A, B, (v_in, v_out), momentum_factors)``.
    """
    beta1, beta2 = betas
    X, S = data_operand(X, A.dtype, backend), data_operand(S, A.dtype, backend)  # once, not per LoRSum
    stats = kfac_statistics if metric == "kfac" else shampoo_statistics
    stat_in, stat_out = stats(X, S, loss_reduction=loss_reduction, backend=backend)
    v_in, v_out = ema(metric_state[0], stat_in, beta2), ema(metric_state[1], stat_out, beta2)
    metrics = (effective_metric(v_in, damping, metric_power), effective_metric(v_out, damping, metric_power))
    lam = lr * lmbd
    lam = lam.clamp_min(min_lmbd) if isinstance(lam, Tensor) else max(lam, min_lmbd)
    grad_pair = (X, S.mT)
    pairs, coeffs = [(A, B), grad_pair], [1.0, -lr * (1 - beta1)]
    if momentum_factors is not None:
        pairs.append(momentum_factors)
        coeffs.append(-lr * beta1)
    A_new, B_new = scaled_low_rank_sum(pairs, coeffs, metrics, lmbd=lam, iters=iters, backend=backend)
    buffer = None
    if momentum_factors is not None:
        buffer = low_rank_sum(
            [momentum_factors, grad_pair], [beta1, 1 - beta1], lmbd=lr * lmbd, iters=iters, backend=backend
        )
    return A_new, B_new, (v_in, v_out), buffer
