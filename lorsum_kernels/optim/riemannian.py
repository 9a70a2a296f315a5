"""Riemannian-preconditioned LoRA (Zhang & Pilanci, ICML 2024) as torch.optim optimizers.

``ScaledGD`` and ``ScaledAdamW`` (spec/lora_one.md §3, spec/lorsum.md §4(b)) precondition each LoRA
pair's gradients with the r×r Grams of the other factor and need no captured activations. Pairs are
found by module (``lora.find_lora_layers``), never by parameter order.

The step is defined on the merged weight: the base class hands over the balanced factors ``√s·A``,
``√s·B`` (whose product is the merged ``s·B·A``) and their gradients, so two models with different α/r
but the same merged factors follow the same trajectory. With s = 1 (α = r) and ``update_order="jacobi"``
this is PEFT's ``create_riemannian_optimizer`` (docs/riemannian_vs_peft.md lists every difference).
"""

from __future__ import annotations

import torch

from .. import ops
from ..functional.riemannian import UPDATE_ORDERS, scaled_adamw_step, scaled_gd_step
from .base import LoRAOptimizer
from .checks import check_positive

__all__ = ["ScaledGD", "ScaledAdamW"]


def _check_betas(betas) -> None:
    if len(betas) != 2:
        raise ValueError(f"betas must be a pair, got {betas!r}")
    for i, b in enumerate(betas):
        if not 0.0 <= float(b) < 1.0:
            raise ValueError(f"invalid betas[{i}]: {b} (must be in [0, 1))")


def _check_order(update_order: str) -> None:
    if update_order not in UPDATE_ORDERS:
        raise ValueError(f"update_order must be one of {UPDATE_ORDERS}, got {update_order!r}")


class ScaledGD(LoRAOptimizer):
    """ScaledGD: ``A ← A − η(BᵀB + δI)⁻¹∇_A``, ``B ← B − η∇_B(AAᵀ + δI)⁻¹`` on the balanced factors.

    To first order the merged weight moves by ``−η(P_B G + G P_A)`` (P_B, P_A the orthogonal projectors
    onto col(B) and row(A)), whatever α/r and whatever the balance of the factors.

    Args:
        model (nn.Module): the model holding the LoRA layers (PEFT, ``LoRALinear`` or any module with
            ``lora_A``/``lora_B`` Linear children).
        lr (float): η, read from the param group at every step. Not swept: to first order the merged
            weight moves as LoRSum's does, so LoRSum's default (docs/defaults_sweep.md). (Default: 1.0)
        reg (float): δ, the absolute damping added to both r×r Grams of the balanced factors. (Default: 1e-6)
        weight_decay (float): decoupled: ``p ← p(1 − η·wd)``. (Default: 0)
        update_order (str): "jacobi" (both preconditioners from the pre-step factors, the official
            ``SGDr``) or "gauss_seidel" (B's from the new A). (Default: "jacobi")
        backend (str): "auto", "native", "triton" or "torch" for the r×r solves. (Default: "auto")
        param_groups, other_lr, other_betas, other_eps, other_weight_decay, max_grad_norm, seed: as in
            ``LoRSum``.
        max_update_norm (float, optional): as in ``LoRSum`` (a gradient step: N is at most the norm of
            the projected gradient it follows). (Default: 1.0)
    """

    needs_capture = False

    def __init__(
        self,
        model,
        lr: float = 1.0,
        *,
        reg: float = 1e-6,
        weight_decay: float = 0.0,
        update_order: str = "jacobi",
        backend: str = "auto",
        max_update_norm: float | None = 1.0,
        **kwargs,
    ):
        check_positive("reg", reg, allow_zero=True)
        check_positive("weight_decay", weight_decay, allow_zero=True)
        _check_order(update_order)
        ops.check(backend, model, ("spd_solve",))  # unknown names, and a forced backend lacking it, raise now
        defaults = dict(lr=lr, reg=reg, weight_decay=weight_decay, update_order=update_order, backend=backend)
        super().__init__(model, defaults, max_update_norm=max_update_norm, **kwargs)

    def _method_step(self, group, A, B, X, S, state, grads, reduce, backend):
        g_A, g_B = grads
        A_new, B_new = scaled_gd_step(
            A, B, g_A, g_B, lr=group["lr"], reg=group["reg"], weight_decay=group["weight_decay"],
            update_order=group["update_order"], backend=backend,
        )
        return A_new, B_new, {}


class ScaledAdamW(LoRAOptimizer):
    """Scaled AdamW: AdamW on the Riemannian-preconditioned gradients of the balanced factors.

    ``g̃_A = (BᵀB + δI)⁻¹∇_A`` feeds A's Adam moments and A steps; then ``g̃_B = ∇_B(AAᵀ + δI)⁻¹`` feeds
    B's, with A the updated A (``"gauss_seidel"``, the official ``AdamWr``) or the pre-step A
    (``"jacobi"``, PEFT). State per pair: two Adam moments per factor, 2(m+n)r numbers, in fp32.

    Args:
        model (nn.Module): the model holding the LoRA layers.
        lr (float): η; the defaults sweep's choice (docs/defaults_sweep.md). (Default: 3e-3)
        betas (tuple[float, float]): Adam's (β1, β2). (Default: (0.9, 0.999))
        eps (float): Adam's ε. (Default: 1e-8)
        weight_decay (float): decoupled, applied before the Adam step as torch AdamW does. (Default: 0)
        reg (float): δ, the absolute damping of the balanced factors' r×r Grams. (Default: 1e-6)
        correct_bias (bool): Adam bias correction, as torch AdamW; the official code's default is
            False. (Default: True)
        update_order (str): "gauss_seidel" or "jacobi". (Default: "gauss_seidel")
        backend (str): for the r×r solves. (Default: "auto")
        param_groups, other_lr, other_betas, other_eps, other_weight_decay, max_grad_norm, seed: as in
            ``LoRSum``.
    """

    needs_capture = False

    def __init__(
        self,
        model,
        lr: float = 3e-3,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        reg: float = 1e-6,
        correct_bias: bool = True,
        update_order: str = "gauss_seidel",
        backend: str = "auto",
        **kwargs,
    ):
        _check_betas(betas)
        check_positive("eps", eps, allow_zero=True)
        check_positive("weight_decay", weight_decay, allow_zero=True)
        check_positive("reg", reg, allow_zero=True)
        _check_order(update_order)
        ops.check(backend, model, ("spd_solve",))
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, reg=reg,
            correct_bias=bool(correct_bias), update_order=update_order, backend=backend,
        )
        super().__init__(model, defaults, **kwargs)

    def _init_layer_state(self, layer, group, generator):
        kw = dict(dtype=self._state_dtype(layer), device=layer.A.device)
        r, n, m = layer.rank, layer.in_features, layer.out_features
        return {
            "t": torch.zeros((), **kw),  # Adam's step count for the bias corrections
            "exp_avg_A": torch.zeros(r, n, **kw),
            "exp_avg_sq_A": torch.zeros(r, n, **kw),
            "exp_avg_B": torch.zeros(m, r, **kw),
            "exp_avg_sq_B": torch.zeros(m, r, **kw),
        }

    def _method_step(self, group, A, B, X, S, state, grads, reduce, backend):
        g_A, g_B = grads
        A_new, B_new, new_state = scaled_adamw_step(
            A, B, g_A, g_B, state, lr=group["lr"], betas=group["betas"], eps=group["eps"],
            weight_decay=group["weight_decay"], reg=group["reg"], correct_bias=group["correct_bias"],
            update_order=group["update_order"], backend=backend,
        )
        return A_new, B_new, new_state
