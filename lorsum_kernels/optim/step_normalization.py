"""``normalize_step``: each layer's merged-weight step scaled to a size set by the lr alone (issue #17).

A LoRSum step moves the merged weight by ``ΔW ≈ −η·[G]_r``, the rank-r part of the gradient in its
Frobenius geometry: a layer moves in proportion to its gradient's size, and the lr that suits one task's
gradients was 5–12% off AdamW's perplexity on a language model at every lr (docs/defaults_sweep.md). Much
of what Adam brings to transformers is a scale per block of parameters (Adam-mini, Zhang et al. 2024,
keeps a single second moment per block). This gives each layer one such scale, on the step LoRSum already
computes, so the direction (the rank-r projection) is unchanged:

    u_t = ‖ΔW_t‖_F / (ℓ_t·√(m·n))            the step's size per unit lr, per entry (ℓ_t the lr it ran at)
    v_t = β·v_{t−1} + (1−β)·u_t²,  v̂_t = v_t / (1 − β^t)
    the layer's lr is η/√v̂_t, so its merged step has RMS ≈ η·u_t/√v̂_t (η exactly at t = 1).

u_t is known only once the step is computed. So the step runs at the lr of the statistics so far,
``ℓ_t = η/√v̂_{t−1}`` (the layer's step, in backward when streamed, reads it from the state), and
``step()`` then shrinks it (never grows it) to ``η/√v̂_t``: the factors move by α ≤ 1 of their step
(``A + α·δA``, ``B + α·δB``, as ``max_update_norm`` does). A step whose gradient grew is cut to its bound;
one whose gradient shrank stays the smaller, lagged step, as a conservative Adam would take it. On a
layer's first step (or while all its steps were zero) there are no statistics: the step is computed at η
to measure u_1, then at η/u_1, until the lr reproduces itself within 5% (two to four times the work, once;
more than two when the step is large against the weight, where it is not linear in the lr).

At η = 0 (a warm-up from 0, as transformers' schedules start, or a schedule's end) the step is zero and
measures nothing: the factors and statistics stay, and the step is taken, not skipped (the rest of the
state, a momentum buffer or a metric, updates as at any lr, as torch's optimizers update their moments).
A step too small to tell from the factors' rounding, ‖ΔW‖ ≤ ``NOISE_FLOOR``·ε·‖A‖_F·‖B‖_F (ε of the
factors' math dtype; a merged step ~1e-6 of the weight's size, as at an lr below ~1e-6 of the one the
statistics came from: the last steps before a restart of a long-cycle cosine schedule), would measure that
rounding (and ScaledLoRSum's re-solve in its new metric) instead of itself and overstate u, shrinking the
layer's later steps until the EMA forgot (ScaledLoRSum, one step at 1e-7 of the lr: one layer's v 147
times too large, its next step 0.09 of its size; ``python tools/step_noise_ratio.py --effect``): it is
taken, and the statistics stay, as at η = 0. So does a zero step (a zero gradient), which before decayed v.

The proximal weight stays ``η·λ0`` (the method's, at the group's lr) whatever the layer's lr: tied to the
layer's lr it would grow with it and cap the step of a layer with small gradients near ``G/λ0``, and the
step would no longer be invariant to the gradient's scale. ‖ΔW‖ is the bound of
``update_clip.merged_update_bound`` (2r×2r Grams). The statistics live in the layer's state (0-d each:
``step_norm_sq`` = v, ``step_norm_count`` = t, ``step_norm_scale`` = 1/√v̂ for the next step (0: none
yet)) and come from the step's results, identical on every rank under data parallelism; ``step()``
finishes them for all results of one factor shape at once, warm, after backward.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .._numerics import STEP_NOISE_FLOOR
from .update_clip import merged_update_bound, moved_by

__all__ = ["NOISE_FLOOR", "STATE_KEYS", "finish", "initial_state", "layer_lrs", "step_at_layer_lr"]

STATE_KEYS = ("step_norm_sq", "step_norm_count", "step_norm_scale")
# A step whose merged-update bound is at most this many ε·‖A‖_F·‖B‖_F (the old, unbalanced factors) measures
# nothing (module docstring). On a small MLP (tools/step_noise_ratio.py): LoRSum's and ScaledLoRSum's steps at
# lr 1e-3 ~9e4 ε·‖A‖‖B‖, at 1e-6 ~90, their rounding residue below 1 (ScaledLoRSum's at lr → 0: 0.23).
NOISE_FLOOR = STEP_NOISE_FLOOR
MEASURED_LR = "step_norm_lr"  # in a method step's new state only: the lr a measured first step ran at
# The layer's step reads only the scale; step() updates these (LoRAOptimizer._state_for_step).
FINISHED_IN_STEP = ("step_norm_sq", "step_norm_count")
_FIRST_STEP_TRIES = 4


def initial_state(dtype: torch.dtype, device: torch.device) -> dict:
    return {key: torch.zeros((), dtype=dtype, device=device) for key in STATE_KEYS}


def _size(A: Tensor, B: Tensor, A_new: Tensor, B_new: Tensor, lrs: Tensor) -> Tensor:
    """u: the merged step's RMS per entry and unit lr, (L,), for balanced factors."""
    dt = A_new.dtype
    return _per_entry_and_lr(merged_update_bound(A.to(dt), B.to(dt), A_new, B_new), A, B, lrs)


def _per_entry_and_lr(bound: Tensor, A: Tensor, B: Tensor, lrs: Tensor) -> Tensor:
    """The merged-update bound (L,) as a size per entry and unit lr."""
    return bound / (lrs.to(bound.dtype) * (A.shape[-1] * B.shape[-2]) ** 0.5)


def step_at_layer_lr(step_at: Callable[[object], tuple], A: Tensor, B: Tensor, lr, state: dict,
                     known_positive: bool = False) -> tuple:
    """The method's step of a bucket (balanced A (L,r,n), B (L,m,r)) at each layer's lr: ``η·step_norm_scale``
    where the layer has statistics (scale > 0), found by measuring where it has none. ``step_at(lr)`` runs
    the step at a number or an (L,) tensor. Returns ``(A_new, B_new, new_state)``, with ``step_norm_lr``
    (the lr it ran at) where a layer had no statistics; ``finish`` does the rest. ``known_positive``: the
    caller knows every scale is positive, so the step reads none (on a GPU a read waits for the device).
    """
    scale = state["step_norm_scale"].reshape(-1)
    if float(lr) == 0:  # every layer's lr is 0 (finish keeps the statistics): nothing to measure
        return step_at(0.0)
    if known_positive:
        return step_at((float(lr) * scale).to(A.dtype))
    if scale.device.type == "cpu" and scale.numel() == 1:
        # One layer on the CPU (every streamed step): the lr as a number, so the step builds no tensors
        # for it (each op costs ~0.1 ms there, right after the layer's GEMMs; docs/step_cost.md).
        known = float(scale)
        if known > 0:
            return step_at(float(lr) * known)
    elif not bool((scale == 0).any()):
        return step_at((float(lr) * scale).to(A.dtype))
    # At t = 1 the lr is η/u_1, u_1 measured at that lr; the step is linear in the lr only while it is small
    # against the weight, so iterate from η until the lr reproduces itself (finish() cuts an overshoot).
    fresh = scale == 0
    layer_lr = torch.where(fresh, torch.full_like(scale, float(lr)), float(lr) * scale)
    for attempt in range(_FIRST_STEP_TRIES):
        A_new, B_new, new_state = step_at(layer_lr.to(A.dtype))
        target = torch.where(fresh, float(lr) / _size(A, B, A_new, B_new, layer_lr).to(scale.dtype)
                             .clamp_min(1e-30), layer_lr)
        if attempt + 1 == _FIRST_STEP_TRIES or bool(((target / layer_lr - 1).abs() <= 0.05).all()):
            break  # the step computed is the one at layer_lr
        layer_lr = target
    return A_new, B_new, {**new_state, MEASURED_LR: layer_lr.reshape(state["step_norm_scale"].shape)}


def layer_lrs(lr, old_scale: Tensor, new_state: dict) -> Tensor:
    """(L,) the lr each layer's step ran at: measured (``MEASURED_LR``) or ``η·step_norm_scale`` as read (a
    scheduler cannot change η between the two: the optimizers check)."""
    if MEASURED_LR in new_state:
        return new_state[MEASURED_LR].reshape(-1)
    return float(lr) * old_scale.reshape(-1)


def finish(A_old: Tensor, B_old: Tensor, A_new: Tensor, B_new: Tensor, root: Tensor, lr, beta: float,
           old_state: dict, layer_lr: Tensor) -> tuple:
    """The statistics' update and the shrink of L layers' results (unbalanced factors, ``root`` = √s
    (L,1,1); ``old_state`` the layers' stacked ``STATE_KEYS`` before the step, ``layer_lr`` (L,) the lr each
    step ran at). Returns ``(A_new, B_new, statistics)``, the statistics' new values by ``STATE_KEYS``."""
    v, t = old_state["step_norm_sq"].reshape(-1), old_state["step_norm_count"].reshape(-1)
    dt = A_new.dtype
    # The bound is homogeneous of degree 2 in the factors: that of the balanced ones (√s·A, √s·B) is s times
    # that of the unbalanced ones (no scaled copies of all factors, four passes over them).
    A_old, B_old = A_old.to(dt), B_old.to(dt)
    zero_lr = float(lr) == 0
    if zero_lr:
        # η = 0 (a warm-up from 0, a schedule's end): every layer's lr is 0, its step is zero and measures
        # nothing (u = ‖ΔW‖/0, rounding over 0, would put inf in v and stop the layer for good): the factors
        # and statistics stay; the scale below is the stored one, recomputed from the same v and t.
        v_new, t_new = v, t
    else:
        bound = merged_update_bound(A_old, B_old, A_new, B_new)
        norms = A_old.flatten(1).norm(dim=1) * B_old.flatten(1).norm(dim=1)
        floor = NOISE_FLOOR * torch.finfo(dt).eps * norms
        measured = ~(bound <= floor)  # NaN counts as measured: it reaches v, as any non-finite step does
        u = (_per_entry_and_lr(bound, A_old, B_old, layer_lr) * root.reshape(-1).square()).to(v.dtype)
        v_new = torch.where(measured, v * beta + (1 - beta) * u * u, v)
        t_new = torch.where(measured, t + 1, t)
    # 1/√v̂_t; 0 while every step was zero (v = 0): the next one is measured again
    scale = torch.where(v_new > 0, (v_new / (1 - beta ** t_new)).sqrt().clamp_min(1e-30).reciprocal(), 0)
    stats = {"step_norm_sq": v_new, "step_norm_count": t_new, "step_norm_scale": scale}
    if zero_lr:
        return A_old, B_old, stats
    alpha = (float(lr) * scale / layer_lr).clamp(max=1.0).to(dt).view(-1, 1, 1)
    A_new, B_new = moved_by(A_old, A_new, alpha), moved_by(B_old, B_new, alpha)
    return A_new, B_new, stats
