"""AdaPreLoRA as pure functions of tensors (spec/adaprelora.md §2–3).

AdaPreLoRA preconditions the full-weight gradient G (m×n) with Adafactor's factored second moment,
``H(Y) = P·Y·Q`` with ``p = sqrt(R/ΣR)``, ``q = sqrt(C)`` (so ``H⁻¹(G) = G/sqrt(V̂)`` is Adafactor's
unclipped direction), and maps that direction to the LoRA factors by the closed-form H-weighted solve:
the H-orthogonal projection onto the tangent space at (B, A), with the overlap split evenly.

Contract:

* Tensors may carry leading batch dimensions (a bucket of same-shape layers): ``A`` (..., r, n),
  ``B`` (..., m, r), ``X`` (..., T, n), ``S`` (..., T, m), statistics (..., m) and (..., n).
* Math runs in fp32, or fp64 when a factor is fp64; nothing reads a value on the host and no Python
  branch depends on tensor values, so a step can be captured in a CUDA graph.
* The statistics come from one of two sources (spec §3.5):

  - ``exact_statistics``: the row and column energies of ``G = SᵀX`` from the captured layer inputs X
    and output-gradients S, produced ``block_size`` columns at a time: no m×n tensor is ever held.
    Exact under gradient accumulation when X and S are accumulated (concatenated over micro-batches:
    ``Σ_k S_kᵀ X_k = [S_1; S_2]ᵀ[X_1; X_2]``).
  - ``surrogate_statistics``: the energies of the rank-2r tangent surrogate ``G̃ = B·g_A + g_B·A`` from
    the factor gradients alone, O((m+n)r²) flops, no capture.

* Statistics enter an EMA (``adafactor_ema``: ``β̂2_t = 1 − t^(−0.8)`` or a fixed β2, plus ε1 per
  entry), then ``adaprelora_direction`` forms p, q and solves. ``adaprelora_step`` is one optimizer step
  for a bucket (statistics, EMA, momentum variant, solve, weight decay); it takes the EMA, the correction
  and p, q from ``ops.adafactor_ema_scales`` (the same functions in turn, or one Triton launch on a GPU).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import ops
from .._numerics import batch_scalar, decayed
from .low_rank_sum import compute_dtype
from .riemannian import adamw_update

__all__ = [
    "adafactor_decay",
    "adafactor_ema",
    "adafactor_debias",
    "adafactor_scales",
    "exact_statistics",
    "surrogate_statistics",
    "adaprelora_direction",
    "adaprelora_step",
]

MOMENTUM_MODES = (None, "input", "adam")

# Lower bound of p and q: sqrt(ε1) with Adafactor's ε1 = 1e-30 (spec §3.5). Keeps P⁻¹, Q⁻¹ finite.
SCALE_FLOOR = 1e-15


def _per_element(value, like: Tensor) -> Tensor | float:
    """A scalar or one value per batch element, shaped to broadcast against ``like``'s vectors (..., k)."""
    if isinstance(value, Tensor) and value.ndim > 0:
        return value.to(like.dtype).unsqueeze(-1)
    if isinstance(value, Tensor):
        return value.to(like.dtype)
    return float(value)


def _is_one(value) -> bool:
    """Whether a scale is the Python number 1 (a config value, never a tensor: no host sync)."""
    return not isinstance(value, Tensor) and float(value) == 1.0


def adafactor_decay(t, *, beta2: float | None = None, decay_rate: float = 0.8):
    """β̂2 of step ``t`` (1-based): ``1 − t^(−decay_rate)`` (Adafactor), or the fixed ``beta2`` if given.

    The schedule gives β̂2_1 = 0: the first step overwrites the (zero) state.
    """
    if beta2 is not None:
        return beta2
    return 1 - t ** (-decay_rate)


def adafactor_ema(
    row_stat: Tensor,
    col_stat: Tensor,
    rows: Tensor,
    cols: Tensor,
    t,
    *,
    beta2: float | None = None,
    decay_rate: float = 0.8,
    eps1: float = 1e-30,
) -> tuple[Tensor, Tensor]:
    """Adafactor's factored second-moment EMA (spec §2): the new ``(R_t, C_t)``.

    ``R_t = β̂2 R_{t−1} + (1 − β̂2)(rows + n·ε1)`` and ``C_t = β̂2 C_{t−1} + (1 − β̂2)(cols + m·ε1)``, i.e.
    the row and column sums of ``G∘G + ε1``. ``t`` is this step's number (1-based; a number, 0-d tensor
    or one value per batch element); ``beta2=None`` selects the schedule ``1 − t^(−decay_rate)``.
    """
    m, n = row_stat.shape[-1], col_stat.shape[-1]
    beta = _per_element(adafactor_decay(t, beta2=beta2, decay_rate=decay_rate), row_stat)
    R = row_stat * beta + (rows.to(row_stat.dtype) + n * eps1) * (1 - beta)
    C = col_stat * beta + (cols.to(col_stat.dtype) + m * eps1) * (1 - beta)
    return R, C


def adafactor_debias(R: Tensor, C: Tensor, t, *, beta2: float | None = None) -> tuple[Tensor, Tensor]:
    """Bias-corrected statistics for a fixed β2 (``R/(1 − β2ᵗ)``, likewise C); the schedule needs none.

    With a fixed β2 and zero initial state the first C would be (1 − β2)× too small and the first step
    1/sqrt(1 − β2)× too large; the 1 − t^(−0.8) schedule starts at β̂2_1 = 0 and is unbiased by design.
    """
    if beta2 is None:
        return R, C
    correction = _per_element(1 - beta2**t, R)
    return R / correction, C / correction


def adafactor_scales(row: Tensor, col: Tensor, *, floor: float = SCALE_FLOOR) -> tuple[Tensor, Tensor]:
    """``p = sqrt(R/ΣR)``, ``q = sqrt(C)``, floored at ``floor``: ``p_i·q_j = sqrt(V̂_ij)`` (spec §2).

    ``V̂ = R·Cᵀ/ΣR`` is Adafactor's rank-1 estimate; HF's row/column means instead of sums give the same
    V̂. Only the products p_i·q_j matter, so the normalisation by ΣR could sit on either side.
    """
    total = row.sum(-1, keepdim=True).clamp_min(torch.finfo(row.dtype).tiny)
    return (row / total).sqrt().clamp_min(floor), col.sqrt().clamp_min(floor)


def exact_statistics(
    X: Tensor, S: Tensor, *, block_size: int = 256, backend: str | None = "auto"
) -> tuple[Tensor, Tensor]:
    """Row and column energies ``(Σ_j G_ij², Σ_i G_ij²)`` of the true gradient ``G = SᵀX`` (spec §3.5 (a)).

    Args:
        X: layer inputs (..., T, n), the rows of all micro-batches concatenated.
        S: gradients of the layer output (..., T, m), in the same row order.
        block_size: columns of G produced at a time.
        backend: for ``ops.row_col_energies``.

    Returns:
        ``(rows (..., m), cols (..., n))`` in fp32 (fp64 for fp64 input).

    Cost: 2·T·m·n flops (the weight-gradient GEMM LoRA normally skips) plus 2·m·n for the squares. Memory:
    G is never held; the transient is at most three m×block_size slabs per batch element (a new product,
    its square, and the previous squared slab until it is replaced), i.e. ``3·L·m·block_size`` numbers
    (3 MiB for L = 1, m = 1024, block 256, fp32; G itself would be 4 MiB at n = 1024), plus fp32
    copies of S (L·T·m) and of one X slab (L·T·block_size) when the capture is in a lower precision.
    Nothing persists.
    """
    if X.shape[:-1] != S.shape[:-1]:
        raise ValueError(f"X (..., T, n) and S (..., T, m) must share their leading shape; got "
                         f"{tuple(X.shape)} and {tuple(S.shape)}")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    return ops.row_col_energies(X, S, block_size=block_size, backend=backend)


def surrogate_statistics(
    A: Tensor, B: Tensor, g_A: Tensor, g_B: Tensor, *, scale=1.0, backend: str | None = "auto"
) -> tuple[Tensor, Tensor]:
    """Row and column energies of the rank-2r tangent surrogate ``G̃ = B·g_A + g_B·A`` (spec §3.5 (b)).

    ``g_A``, ``g_B`` are the autograd gradients of A and B; with the LoRA scale ``scale`` = s they are
    ``s·BᵀG`` and ``s·GAᵀ``, and are divided by s here, so ``G̃ = BBᵀG + GAᵀA``. Computed in factor form
    (``ops.tangent_energies``): O((m+n)r²) flops, O((m+n)r) memory, no capture and no m×n tensor. G̃
    only sees G inside col(B) ∪ row(A); at B = 0 it is ``G·AᵀA``.
    """
    dt = compute_dtype(A, B, g_A, g_B)
    A_, B_, E, F = A.to(dt), B.to(dt), g_A.to(dt), g_B.to(dt)
    if not _is_one(scale):  # the optimizers pass balanced factors (s = 1): no copies then
        inv = 1 / batch_scalar(scale, A_)
        E, F = E * inv, F * inv
    return ops.tangent_energies(B_, E, F, A_, backend=backend)


def _check_direction_inputs(A, B, g_A, g_B, row, col, scale, ridge) -> None:
    if A.ndim < 2 or B.ndim < 2 or A.shape[-2] != B.shape[-1]:
        raise ValueError(
            f"expected A (..., r, n) and B (..., m, r); got {tuple(A.shape)} and {tuple(B.shape)}"
        )
    r, n, m = A.shape[-2], A.shape[-1], B.shape[-2]
    if r > min(m, n):
        raise ValueError(f"rank r={r} is larger than min(m, n) = {min(m, n)}")
    if g_A.shape != A.shape or g_B.shape != B.shape:
        raise ValueError(
            f"gradients must have the shapes of their factors: g_A {tuple(g_A.shape)} vs A {tuple(A.shape)}, "
            f"g_B {tuple(g_B.shape)} vs B {tuple(B.shape)}"
        )
    if row.shape[-1] != m or col.shape[-1] != n:
        raise ValueError(
            f"row must be (..., {m}) and col (..., {n}); got {tuple(row.shape)} and {tuple(col.shape)}"
        )
    if not isinstance(ridge, Tensor) and not float(ridge) >= 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    if not isinstance(scale, Tensor) and not float(scale) > 0:
        raise ValueError(f"scale must be > 0, got {scale}")


def adaprelora_direction(
    A: Tensor,
    B: Tensor,
    g_A: Tensor,
    g_B: Tensor,
    row: Tensor,
    col: Tensor,
    *,
    scale=1.0,
    ridge=1e-6,
    backend: str | None = "auto",
) -> tuple[Tensor, Tensor]:
    """AdaPreLoRA's factor direction (spec §3.3–3.4): step with ``A ← A − η·dA``, ``B ← B − η·dB``.

    Args:
        A: the "in" factor (..., r, n) (PEFT ``lora_A.weight``).
        B: the "out" factor (..., m, r) (PEFT ``lora_B.weight``).
        g_A: autograd gradient of A, ``s·BᵀG`` (or its momentum).
        g_B: autograd gradient of B, ``s·GAᵀ`` (or its momentum).
        row: R_t (..., m), Adafactor's row statistic (positive); only ``R/ΣR`` matters.
        col: C_t (..., n), Adafactor's column statistic (positive).
        scale: the LoRA scale s = α/r (float, 0-d tensor or one value per batch element); the
            direction is defined on the merged weight: ``s·(B·dA + dB·A)`` does not depend on s.
        ridge: relative ridge of the two r×r Grams (times their mean diagonal); 0 solves exactly
            wherever the Grams are positive definite.
        backend: for ``ops.adaprelora_solve``.

    Returns:
        ``(dA, dB)`` in the dtype of ``A``, with ``s·(B·dA + dB·A)`` the H-orthogonal projection of
        Adafactor's direction ``G/sqrt(V̂)`` onto the LoRA tangent space, the overlap split evenly.
        At B = 0 (standard init) ``dA = 0`` and ``dB·A`` is the projection onto row(A); no special case.

    Cost: two r×r Cholesky factorisations and O((m+n)r²) flops; no m×n tensor.
    """
    _check_direction_inputs(A, B, g_A, g_B, row, col, scale, ridge)
    dt = compute_dtype(A, B, g_A, g_B)
    p, q = adafactor_scales(row.to(dt), col.to(dt))
    return _direction_from_scales(A, B, g_A, g_B, p, q, scale, ridge, backend)


def _direction_from_scales(A, B, g_A, g_B, p, q, scale, ridge, backend) -> tuple[Tensor, Tensor]:
    """``adaprelora_direction`` from the scales p, q (in the compute dtype) rather than the statistics."""
    dt = compute_dtype(A, B, g_A, g_B)
    A_, B_ = A.to(dt), B.to(dt)
    dA, dB = ops.adaprelora_solve(A_, B_, g_A.to(dt), g_B.to(dt), p, q, ridge=ridge, backend=backend)
    if not _is_one(scale):
        # ĝ = s·g and the target of s·(B dA + dB A) is T, not s·T: both factors pick up 1/s² (spec §3.3).
        inv_s2 = 1 / batch_scalar(scale, A_) ** 2
        dA, dB = dA * inv_s2, dB * inv_s2
    return dA.to(A.dtype), dB.to(A.dtype)


def adaprelora_step(
    A: Tensor,
    B: Tensor,
    g_A: Tensor,
    g_B: Tensor,
    state: dict[str, Tensor],
    *,
    X: Tensor | None = None,
    S: Tensor | None = None,
    lr,
    betas: tuple[float, float | None] = (0.9, None),
    weight_decay=0.0,
    momentum: str | None = "input",
    decay_rate: float = 0.8,
    eps1: float = 1e-30,
    ridge=1e-6,
    adam_beta2: float = 0.999,
    eps: float = 1e-8,
    block_size: int = 256,
    backend: str | None = "auto",
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """One AdaPreLoRA step for a bucket of layers (spec §3.7), on factors with LoRA scale 1.

    The optimizer passes the balanced factors ``√s·A``, ``√s·B`` and their gradients, whose product is
    the merged weight, so s never appears here.

    Args:
        A, B: factors (..., r, n), (..., m, r) in the math dtype.
        g_A, g_B: their gradients ``BᵀG``, ``GAᵀ``.
        state: ``t`` (steps taken, floating, one per batch element), ``row_stat`` (..., m),
            ``col_stat`` (..., n), and the momentum buffers: ``exp_avg_A``, ``exp_avg_B`` ("input" and
            "adam") and ``exp_avg_sq_A``, ``exp_avg_sq_B`` ("adam").
        X, S: the captured layer data for the exact statistics; None selects the surrogate.
        lr: η.
        betas: (β1, β2): β1 of the momentum ("input": EMA of the gradients, bias-corrected; "adam": Adam's
            first moment); β2 of the statistics' EMA, None for Adafactor's ``1 − t^(−decay_rate)``.
        weight_decay: decoupled: ``A ← A(1 − η·wd)`` before the step, likewise B.
        momentum: None (the SGD variant), "input" (M1: the closed form applied to the momenta of g_A,
            g_B) or "adam" (M2: Adam moments on the direction, as Scaled AdamW does).
        decay_rate, eps1: Adafactor's schedule exponent and per-entry ε1.
        ridge: relative ridge of the r×r solves.
        adam_beta2, eps: Adam's second-moment decay and ε ("adam" only).
        block_size: column block of the exact statistics.
        backend: for the hot paths.

    Returns:
        ``(A, B, new_state)``.
    """
    if momentum not in MOMENTUM_MODES:
        raise ValueError(f"momentum must be one of {MOMENTUM_MODES}, got {momentum!r}")
    beta1, beta2 = betas
    t = state["t"] + 1
    if X is not None:
        rows, cols = exact_statistics(X, S, block_size=block_size, backend=backend)
    else:
        rows, cols = surrogate_statistics(A, B, g_A, g_B, backend=backend)
    momenta = {}

    in_A, in_B = g_A, g_B
    if momentum == "input":
        m_A = torch.lerp(state["exp_avg_A"], g_A.to(state["exp_avg_A"].dtype), 1 - beta1)
        m_B = torch.lerp(state["exp_avg_B"], g_B.to(state["exp_avg_B"].dtype), 1 - beta1)
        momenta.update(exp_avg_A=m_A, exp_avg_B=m_B)
        # The solve is linear in its inputs, so bias-correcting the momenta bias-corrects the step.
        correction = 1 - beta1 ** batch_scalar(t, m_A)
        in_A, in_B = m_A / correction, m_B / correction
    _check_direction_inputs(A, B, in_A, in_B, state["row_stat"], state["col_stat"], 1.0, ridge)
    # adafactor_ema, adafactor_debias and adaprelora_direction's scales in one op (one launch on a GPU)
    R, C, p, q = ops.adafactor_ema_scales(
        state["row_stat"], state["col_stat"], rows, cols, t, beta2, decay_rate, eps1,
        compute_dtype(A, B, in_A, in_B), SCALE_FLOOR,
        backend=ops.fused_or_reference(backend, A.device, "adafactor_ema_scales"))
    new_state = {"t": t, "row_stat": R, "col_stat": C, **momenta}
    dA, dB = _direction_from_scales(A, B, in_A, in_B, p, q, 1.0, ridge, backend)

    lr_ = batch_scalar(lr, A)
    if momentum == "adam":
        kw = dict(lr=lr, beta1=beta1, beta2=adam_beta2, eps=eps, weight_decay=weight_decay)
        A_new, m_A, v_A = adamw_update(A, dA, state["exp_avg_A"], state["exp_avg_sq_A"], t, **kw)
        B_new, m_B, v_B = adamw_update(B, dB, state["exp_avg_B"], state["exp_avg_sq_B"], t, **kw)
        new_state.update(exp_avg_A=m_A, exp_avg_B=m_B, exp_avg_sq_A=v_A, exp_avg_sq_B=v_B)
    else:
        A_new = decayed(A, lr, weight_decay) - lr_ * dA
        B_new = decayed(B, lr, weight_decay) - lr_ * dB
    return A_new, B_new, new_state
