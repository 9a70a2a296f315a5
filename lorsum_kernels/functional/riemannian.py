"""Riemannian-preconditioned LoRA (ScaledGD, Scaled AdamW) as pure functions of tensors.

Zhang & Pilanci (ICML 2024), spec/lora_one.md §3 and spec/lorsum.md §4(b). For a factor pair ``A``
(..., r, n), ``B`` (..., m, r) with gradients ``g_A``, ``g_B``:

    dA = (BᵀB + reg·I_r)⁻¹ g_A          dB = g_B (AAᵀ + reg·I_r)⁻¹

Contract:

* Every tensor may carry leading batch dimensions (a bucket of same-shape layers); scalars (``lr``,
  ``reg``) are Python numbers, 0-d tensors or one value per batch element.
* The formulas are applied to the factors exactly as given. The optimizers pass the balanced factors
  ``√s·A``, ``√s·B`` and their gradients, so that the step on the merged weight ``s·B·A`` is
  ``−lr·(P_B G + G P_A)`` to first order whatever α/r; with raw PEFT factors (and s = 1) this is the
  official and PEFT definition (docs/riemannian_vs_peft.md).
* Math runs in fp32, or fp64 when a factor is fp64. Directions come back in the dtype of ``A``; the step
  functions return factors in their input dtype and state in the state's dtype.
* ``reg`` is the method's absolute damping δ; the r×r solves (``ops.spd_solve``) add their own tiny
  relative ridge and fall back to a larger one on the device, so B = 0 (standard init) is safe:
  ``g_A = BᵀG = 0`` there and ``dA = 0``. Nothing reads a value on the host.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import ops
from .._numerics import batch_scalar, decayed
from .low_rank_sum import compute_dtype

__all__ = ["adamw_update", "scaled_gd_direction", "scaled_gd_step", "scaled_adamw_step"]

UPDATE_ORDERS = ("jacobi", "gauss_seidel")


def _damped_gram(F: Tensor, reg, *, left: bool) -> Tensor:
    """``FᵀF + reg·I`` (left, F = B) or ``FFᵀ + reg·I`` (right, F = A)."""
    gram = F.mT @ F if left else F @ F.mT
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return gram + batch_scalar(reg, gram) * eye


def _precondition_A(B: Tensor, g_A: Tensor, reg, backend) -> Tensor:
    return ops.spd_solve(_damped_gram(B, reg, left=True), g_A, left=True, backend=backend)


def _precondition_B(A: Tensor, g_B: Tensor, reg, backend) -> Tensor:
    return ops.spd_solve(_damped_gram(A, reg, left=False), g_B, left=False, backend=backend)


def _check_pair(A: Tensor, B: Tensor, g_A: Tensor, g_B: Tensor) -> None:
    if A.ndim < 2 or B.ndim < 2 or A.shape[-2] != B.shape[-1]:
        raise ValueError(
            f"expected A (..., r, n) and B (..., m, r); got {tuple(A.shape)} and {tuple(B.shape)}"
        )
    if g_A.shape != A.shape or g_B.shape != B.shape:
        raise ValueError(
            f"gradients must have the shapes of their factors: g_A {tuple(g_A.shape)} vs A {tuple(A.shape)}, "
            f"g_B {tuple(g_B.shape)} vs B {tuple(B.shape)}"
        )


def _check_order(update_order: str) -> None:
    if update_order not in UPDATE_ORDERS:
        raise ValueError(f"update_order must be one of {UPDATE_ORDERS}, got {update_order!r}")


def scaled_gd_direction(
    A: Tensor, B: Tensor, g_A: Tensor, g_B: Tensor, *, reg=1e-6, backend: str | None = "auto"
) -> tuple[Tensor, Tensor]:
    """The Riemannian-preconditioned gradients ``((BᵀB + δI)⁻¹ g_A, g_B (AAᵀ + δI)⁻¹)``.

    Args:
        A: the "in" factor (..., r, n).
        B: the "out" factor (..., m, r).
        g_A: gradient of the loss with respect to ``A``.
        g_B: gradient of the loss with respect to ``B``.
        reg: δ, the absolute damping added to both r×r Grams.
        backend: "auto", "native", "triton" or "torch" for the r×r solves.

    Returns:
        ``(dA, dB)`` in the dtype of ``A``; both preconditioners use the factors as given (Jacobi).
    """
    _check_pair(A, B, g_A, g_B)
    dt = compute_dtype(A, B, g_A, g_B)
    A_, B_ = A.to(dt), B.to(dt)
    dA = _precondition_A(B_, g_A.to(dt), reg, backend)
    dB = _precondition_B(A_, g_B.to(dt), reg, backend)
    return dA.to(A.dtype), dB.to(A.dtype)


def scaled_gd_step(
    A: Tensor,
    B: Tensor,
    g_A: Tensor,
    g_B: Tensor,
    *,
    lr,
    reg=1e-6,
    weight_decay=0.0,
    update_order: str = "jacobi",
    backend: str | None = "auto",
) -> tuple[Tensor, Tensor]:
    """One ScaledGD step (spec/lora_one.md §3.1) with decoupled weight decay.

    ``A ← A(1 − lr·wd) − lr·(BᵀB + δI)⁻¹ g_A`` and ``B ← B(1 − lr·wd) − lr·g_B(AAᵀ + δI)⁻¹``. With
    ``update_order="jacobi"`` (the official ``SGDr``) both preconditioners use the pre-step factors; with
    ``"gauss_seidel"`` B's uses the new A. Returns the new ``(A, B)`` in their input dtypes.
    """
    _check_pair(A, B, g_A, g_B)
    _check_order(update_order)
    dt = compute_dtype(A, B, g_A, g_B)
    A_, B_ = A.to(dt), B.to(dt)
    lr_ = batch_scalar(lr, A_)
    A_new = decayed(A_, lr, weight_decay) - lr_ * _precondition_A(B_, g_A.to(dt), reg, backend)
    B_ref = A_ if update_order == "jacobi" else A_new
    B_new = decayed(B_, lr, weight_decay) - lr_ * _precondition_B(B_ref, g_B.to(dt), reg, backend)
    return A_new.to(A.dtype), B_new.to(B.dtype)


def adamw_update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor,
    *,
    lr,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay=0.0,
    correct_bias: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """torch AdamW's update as a pure function, for a batch of matrices (out of place).

    ``step`` is the step number of this update (already incremented), one value per batch element, in a
    floating dtype. Follows ``torch.optim.AdamW`` (decoupled decay first, then
    ``param − lr/(1−β1ᵗ) · m / (√v/√(1−β2ᵗ) + eps)``); ``correct_bias=False`` drops both corrections, as
    the official Riemannian code does by default. Returns ``(param, exp_avg, exp_avg_sq)``.
    """
    exp_avg = torch.lerp(exp_avg, grad.to(exp_avg.dtype), 1 - beta1)
    exp_avg_sq = exp_avg_sq * beta2 + grad.to(exp_avg_sq.dtype).square() * (1 - beta2)
    lr_ = batch_scalar(lr, param)
    param = decayed(param, lr, weight_decay)
    if correct_bias:
        t = batch_scalar(step, param)
        step_size = lr_ / (1 - beta1**t)
        denom = exp_avg_sq.sqrt() / (1 - beta2**t).sqrt() + eps
    else:
        step_size = lr_
        denom = exp_avg_sq.sqrt() + eps
    return param - step_size * exp_avg / denom, exp_avg, exp_avg_sq


def scaled_adamw_step(
    A: Tensor,
    B: Tensor,
    g_A: Tensor,
    g_B: Tensor,
    state: dict[str, Tensor],
    *,
    lr,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay=0.0,
    reg=1e-6,
    correct_bias: bool = True,
    update_order: str = "gauss_seidel",
    backend: str | None = "auto",
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """One Scaled AdamW step (spec/lora_one.md §3.2): precondition the raw gradients, then AdamW.

    ``g̃_A = (BᵀB + δI)⁻¹ g_A`` feeds A's Adam moments and A is updated; then ``g̃_B = g_B (AAᵀ + δI)⁻¹``
    feeds B's, where A is the updated A under ``update_order="gauss_seidel"`` (the official ``AdamWr``,
    whose in-place A update changes B's preconditioner) and the pre-step A under ``"jacobi"`` (PEFT's
    ``create_riemannian_optimizer``).

    Args:
        A, B: the factors (..., r, n) and (..., m, r).
        g_A, g_B: their gradients.
        state: ``t`` (one value per batch element in a floating dtype, the count of steps taken so far),
            ``exp_avg_A``,
            ``exp_avg_sq_A``, ``exp_avg_B``, ``exp_avg_sq_B``.
        lr: learning rate (float, 0-d tensor or one value per batch element).
        betas: Adam's (β1, β2).
        eps: Adam's ε.
        weight_decay: decoupled weight decay (``p ← p(1 − lr·wd)`` before the Adam step, as torch AdamW).
        reg: δ, the absolute damping of the r×r Grams.
        correct_bias: Adam bias correction (torch's behaviour); the official code's default is False.
        update_order: "gauss_seidel" or "jacobi".
        backend: for the r×r solves.

    Returns:
        ``(A, B, new_state)``.
    """
    _check_pair(A, B, g_A, g_B)
    _check_order(update_order)
    dt = compute_dtype(A, B, g_A, g_B)
    A_, B_ = A.to(dt), B.to(dt)
    step = state["t"] + 1
    kw = dict(lr=lr, beta1=betas[0], beta2=betas[1], eps=eps, weight_decay=weight_decay,
              correct_bias=correct_bias)
    gt_A = _precondition_A(B_, g_A.to(dt), reg, backend)
    A_new, m_A, v_A = adamw_update(A_, gt_A, state["exp_avg_A"], state["exp_avg_sq_A"], step, **kw)
    gt_B = _precondition_B(A_ if update_order == "jacobi" else A_new, g_B.to(dt), reg, backend)
    B_new, m_B, v_B = adamw_update(B_, gt_B, state["exp_avg_B"], state["exp_avg_sq_B"], step, **kw)
    new_state = {"t": step, "exp_avg_A": m_A, "exp_avg_sq_A": v_A, "exp_avg_B": m_B, "exp_avg_sq_B": v_B}
    return A_new.to(A.dtype), B_new.to(B.dtype), new_state
