"""One PSI-LoRA / Scaled PSI-LoRA optimizer step as a pure function (spec/lorsum.md §5.1, §6.4).

Inputs are a bucket of L same-shape layers: balanced factors ``A`` (L,r,n) and ``B`` (L,m,r) in the math
dtype (``√s·A``, ``√s·B``, so that ``B·A`` is the merged LoRA weight ``s·B·A``), the captured ``X`` (L,T,n)
and ``S`` (L,T,m), and the method state. Outputs are the new factors and the new state; the caller writes
them back (or not, when they are not finite).

``reduce`` (default None: single process) turns on data-parallel mode (``lorsum_kernels.distributed``):
X and S are then this rank's tokens, and every token sum (the LoRSum products, the K-FAC column sums of
squares and token counts) is averaged over ranks by ``reduce`` before it is used; the weight and momentum LoRSums run in lock step so
that each half-step needs one collective (``low_rank_sums_over_ranks``).
"""

from __future__ import annotations

from torch import Tensor

from .. import ops
from .low_rank_sum import (
    LoRSumProblem,
    Reduce,
    data_operand,
    effective_metric,
    ema,
    kfac_from_token_sums,
    kfac_scaled_low_rank_sum,
    kfac_statistics,
    low_rank_sum,
    low_rank_sums_over_ranks,
    scaled_low_rank_sum,
    shampoo_statistics,
)

__all__ = ["kfac_scale_out", "psi_lora_step", "scaled_psi_lora_step"]


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
    reduce: Reduce | None = None,
    proximal: tuple[float, float] | None = None,
):
    """PSI-LoRA with low-rank heavy-ball momentum kept as factors ``(A_m, B_m)`` (spec §5.1).

    Weight step: ``(A, B) ← LoRSum([(A,B), (X,Sᵀ), (A_m,B_m)], [1, −η(1−d), −ηβ], k, λ = η·λ0)``, so the
    target is ``BA − η((1−d)G + β·B_mA_m)``: PyTorch SGD momentum with the current gradient at full rank.
    Buffer step (after it, with the same G): ``(A_m, B_m) ← LoRSum([(A_m,B_m), (X,Sᵀ)], [β, 1−d], k,
    λ = η·λ_mom)``. With ``momentum_factors=None`` (β = 0) the buffer is neither used nor updated.
    ``proximal``: the two λ themselves, in place of ``lr·lmbd`` and ``lr·lmbd_momentum`` (an optimizer whose
    layers step at their own lr keeps λ at its group's η·λ0: numbers, where a per-layer lr tensor would
    make each a kernel launch on a GPU).

    Returns ``(A, B, momentum_factors)``.
    """
    # cast (when the backend needs it) once, not in each LoRSum call
    grad_pair = (data_operand(X, A.dtype, backend), data_operand(S, A.dtype, backend).mT)
    lam, lam_momentum = (lr * lmbd, None) if proximal is None else proximal
    # The coefficients as lr · −c: the same numbers as −lr · c (negation is exact), one op instead of two
    # where lr is a tensor (each layer's normalised lr, on a GPU in backward: a kernel launch each).
    if reduce is not None or momentum_factors is not None:
        # With momentum the weight and buffer LoRSums run in lock step, their wide factors side by side, so
        # each half-step reads X and S once for both (in one process the "average over ranks" is the
        # identity): half the passes over the tokens of two separate LoRSums.
        return _weight_and_buffer_over_ranks(
            (A, B), grad_pair, momentum_factors, [1.0, lr * -(1 - dampening), lr * -momentum],
            [momentum, 1 - dampening], None, lam, lr * lmbd_momentum if lam_momentum is None else lam_momentum,
            iters, reduce or _one_process, backend)
    A_new, B_new = low_rank_sum([(A, B), grad_pair], [1.0, lr * -(1 - dampening)], lmbd=lam, iters=iters,
                                backend=backend)
    return A_new, B_new, None


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
    reduce: Reduce | None = None,
    proximal: float | None = None,
):
    """Scaled PSI-LoRA, "normal" mode (spec §6.4), for metrics ``"kfac"`` or ``"shampoo"``.

    1. The metric EMAs ``v_in`` (n) and ``v_out`` (m) take the current batch's statistics (β2, no bias
       correction); the effective metrics are ``(v + δ)^p``. β2 is a float or a tensor that broadcasts
       against the metrics (one per layer of a batch: shape (L, 1), as the β2 warm-up passes it).
    2. ``(A, B) ← ScaledLoRSum([(A,B), (X,Sᵀ), (A_m,B_m)], [1, −η(1−β1), −ηβ1], M, k,
       λ = max(η·λ0, min_lmbd))``.
    3. If β1 > 0: ``(A_m, B_m) ← LoRSum([(A_m,B_m), (X,Sᵀ)], [β1, 1−β1], k, λ = η·λ0)``, an
       unpreconditioned EMA of G; the preconditioning is applied when the buffer is used.

    ``proximal``: η·λ0 itself, in place of ``lr·lmbd`` (as for ``psi_lora_step``).

    Returns ``(A, B, (v_in, v_out), momentum_factors)``.
    """
    if reduce is not None and metric != "kfac":
        raise ValueError(
            f"metric={metric!r} has no data-parallel mode: diag(GᵀG) of the global G is not a sum over "
            "tokens (it has cross-rank terms); use metric='kfac'"
        )
    beta1, beta2 = betas
    X, S = data_operand(X, A.dtype, backend), data_operand(S, A.dtype, backend)  # once, not per LoRSum
    fused_beta2 = _one_host_value(beta2)
    unfloored = lr * lmbd if proximal is None else proximal
    lam = unfloored.clamp_min(min_lmbd) if isinstance(unfloored, Tensor) else max(unfloored, min_lmbd)
    if metric == "kfac" and reduce is None and fused_beta2 is not None:
        T = X.shape[-2]
        kfac = (fused_beta2, damping, metric_power, 1.0 / max(T, 1), kfac_scale_out(loss_reduction, T))
        if momentum_factors is None:
            # The metric step folded into the first A-step: its statistics summed in that half-step's own
            # passes over X and S (ops.kfac_lorsum_update_in), not in a pass of their own.
            (A_new, B_new), state = kfac_scaled_low_rank_sum(
                [(A, B), (X, S.mT)], [1.0, lr * -(1 - beta1)], metric_state, kfac, lmbd=lam, iters=iters,
                backend=backend)
            return A_new, B_new, state, None
        # The design's fused diagonal-metric op: statistics, EMA, damping and power in one pass over X
        # and S (one kernel per side instead of five launches and four n- or m-vectors per layer).
        v_in, v_out, *metrics = ops.kfac_metric_update(X, S, *metric_state, *kfac, backend=backend)
        metrics = tuple(metrics)
    else:
        metrics = None
        if reduce is not None:  # metric == "kfac": token sums and counts are reduced, then normalised
            sums = [ops.col_sq_sums(X, backend=backend), ops.col_sq_sums(S, backend=backend)]
            tokens = sums[0].new_full(X.shape[:-2], X.shape[-2])  # in the sums' dtype: one collective
            sum_in, sum_out, tokens = reduce([*sums, tokens])
            stat_in, stat_out = kfac_from_token_sums(sum_in, sum_out, tokens, loss_reduction=loss_reduction)
        elif metric == "kfac" and ops.kfac_metric_on_triton(backend, X.device):
            # β2 per layer on a GPU (its warm-up): the fused metric step reads it from device memory, one
            # launch per side where the composite below takes ten.
            T = X.shape[-2]
            v_in, v_out, *metrics = ops.kfac_metric_update(
                X, S, *metric_state, beta2, damping, metric_power, 1.0 / max(T, 1),
                kfac_scale_out(loss_reduction, T), backend=backend)
            metrics = tuple(metrics)
        else:
            stats = kfac_statistics if metric == "kfac" else shampoo_statistics
            stat_in, stat_out = stats(X, S, loss_reduction=loss_reduction, backend=backend)
        if metrics is None:
            v_in, v_out = ema(metric_state[0], stat_in, beta2), ema(metric_state[1], stat_out, beta2)
            metrics = (effective_metric(v_in, damping, metric_power),
                       effective_metric(v_out, damping, metric_power))
    grad_pair = (X, S.mT)
    if reduce is not None or momentum_factors is not None:  # lock step: one read of X and S per half-step
        A_new, B_new, buffer = _weight_and_buffer_over_ranks(
            (A, B), grad_pair, momentum_factors, [1.0, lr * -(1 - beta1), lr * -beta1], [beta1, 1 - beta1],
            metrics, lam, unfloored, iters, reduce or _one_process, backend)
        return A_new, B_new, (v_in, v_out), buffer
    A_new, B_new = scaled_low_rank_sum([(A, B), grad_pair], [1.0, lr * -(1 - beta1)], metrics, lmbd=lam,
                                       iters=iters, backend=backend)
    return A_new, B_new, (v_in, v_out), None


def kfac_scale_out(loss_reduction: str, T: int) -> float:
    """The scale of Σ_t s_t² in the K-FAC output statistic (``kfac_statistics``): T for a mean-reduced loss,
    1/T for a sum."""
    if loss_reduction not in ("mean", "sum"):
        raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
    return T if loss_reduction == "mean" else 1.0 / max(T, 1)


def _one_host_value(beta):
    """β2 as the number the fused metric op takes: a number as it is; a per-layer tensor (the β2 warm-up)
    on the CPU whose layers all share one value (they do unless some skipped a step) as that value. None
    otherwise: per-layer values, or an accelerator tensor, whose value the host would have to wait for."""
    if not isinstance(beta, Tensor):
        return beta
    if beta.device.type != "cpu" or beta.numel() == 0:
        return None
    if beta.numel() == 1:  # one layer (every streamed step): one read, no comparison ops
        return float(beta)
    flat = beta.reshape(-1)
    return float(flat[0]) if bool((flat == flat[0]).all()) else None


def _one_process(tensors):
    """The rank average of a single process: the tensors themselves."""
    return list(tensors)


def _weight_and_buffer_over_ranks(
    factors, grad_pair, momentum_factors, weight_coeffs, buffer_coeffs, metrics, lmbd, lmbd_buffer, iters,
    reduce, backend,
):
    """The weight LoRSum ``[(A,B), (X,Sᵀ), (A_m,B_m)]`` (metric-scaled when ``metrics`` is given) and, with
    momentum, the buffer's ``[(A_m,B_m), (X,Sᵀ)]`` in lock step over ranks. ``weight_coeffs`` has the
    momentum pair's coefficient last, unused without momentum. Returns ``(A, B, momentum_factors)``."""
    weight = LoRSumProblem(factors, [], weight_coeffs[:2], metrics, lmbd)
    problems = [weight]
    if momentum_factors is not None:
        weight.replicated.append(momentum_factors)
        weight.coeffs.append(weight_coeffs[2])
        problems.append(LoRSumProblem(momentum_factors, [], list(buffer_coeffs), None, lmbd_buffer))
    (A_new, B_new), *buffer = low_rank_sums_over_ranks(problems, grad_pair, iters=iters, reduce=reduce,
                                                      backend=backend)
    return A_new, B_new, (buffer[0] if buffer else None)
