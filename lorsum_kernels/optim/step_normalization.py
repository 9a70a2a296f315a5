"""``normalize_step``: each layer's merged-weight step scaled to a size set by the lr alone (issue #17).

A LoRSum step moves the merged weight by ``ΔW ≈ −η·[G]_r``, the rank-r part of the gradient in its
Frobenius geometry: a layer moves in proportion to its gradient's size, and the lr that suits one task's
gradients is 5–12% off AdamW's perplexity on a language model at every lr (docs/defaults_sweep.md). Much
of what Adam brings to transformers is a scale per block of parameters (Adam-mini, Zhang et al. 2024,
keeps a single second moment per block). This gives each layer one such scale, on the step LoRSum already
computes, so the direction (the rank-r projection) is unchanged:

    u_t = ‖ΔW_t‖_F / (η_t·√(m·n))            the step's size per unit lr, per entry (η_t the lr it ran at)
    v_t = β·v_{t−1} + (1−β)·u_t²,  v̂_t = v_t / (1 − β^t)
    the layer steps at the lr η/√v̂_t, so its merged step has RMS ≈ η·u_t/√v̂_t (η exactly at t = 1).

u_t is known only once the step is computed. So the step runs at the lr of the statistics so far,
``η/√v̂_{t−1}``, and is then shrunk (never grown) to ``η/√v̂_t``: the factors move by α ≤ 1 of their step
(``A + α·δA``, ``B + α·δB``, as ``max_update_norm`` does). A step whose gradient grew is cut to its
bound; one whose gradient shrank stays the smaller, lagged step, as a conservative Adam would take it. The
proximal weight stays ``η·λ0`` (the method's, at the group's lr η) whatever the layer's lr: tied to the layer
lr it would grow with it and cap the step of a layer with small gradients near ``G/λ0``, so the step would
no longer be invariant to the gradient's scale. On
a layer's first step (or while all its steps were zero) there are no statistics: the step is computed at η
to measure u_1, then at η/u_1, until the lr reproduces itself within 5% (twice the work, three times when
the gradient is large against the weight; once). ‖ΔW‖ is the bound of ``update_clip.merged_update_bound`` (r×r Grams).

The statistics live in the layer's state (``step_norm_sq`` = v, ``step_norm_count`` = t, 0-d) and are
computed from the step's results, which are identical on every rank under data parallelism.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .update_clip import merged_update_bound

__all__ = ["STATE_KEYS", "initial_state", "layer_normalized_step"]

STATE_KEYS = ("step_norm_sq", "step_norm_count")
_FIRST_STEP_TRIES = 4


def initial_state(dtype: torch.dtype, device: torch.device) -> dict:
    return {key: torch.zeros((), dtype=dtype, device=device) for key in STATE_KEYS}


def layer_normalized_step(
    step_at: Callable[[object], tuple], A: Tensor, B: Tensor, lr: float, state: dict, beta: float,
) -> tuple:
    """The normalised step of a bucket of L layers (balanced factors A (L,r,n), B (L,m,r)).

    ``step_at(lr)`` runs the method's step at ``lr`` (a number, or an (L,) tensor: one lr per layer) and
    returns ``(A_new, B_new, new_state)``; ``state`` holds the stacked ``STATE_KEYS`` (L,). Returns the
    same triple, with the statistics' new values in the state."""
    v, t = state["step_norm_sq"].reshape(-1), state["step_norm_count"].reshape(-1)
    entries = A.shape[-1] * B.shape[-2]

    def size(A_new, B_new, lrs):  # u: the step's RMS per entry and unit lr, (L,)
        dt = A_new.dtype
        return (merged_update_bound(A.to(dt), B.to(dt), A_new, B_new) / (lrs * entries ** 0.5)).to(v.dtype)

    lagged_lr = lr / (v / (1 - beta ** t).clamp_min(1e-30)).sqrt().clamp_min(1e-30)
    fresh = (t == 0) | (v == 0)  # no statistics yet (or only zero steps): find the lr by measuring
    if bool(fresh.any()):
        # At t = 1 the layer's lr is η/u_1, u_1 measured at that lr; the step is linear in the lr only while
        # it is small against the weight, so iterate from η until the lr reproduces itself (2–3 steps).
        layer_lr = torch.where(fresh, torch.full_like(v, float(lr)), lagged_lr)
        for attempt in range(_FIRST_STEP_TRIES):
            A_new, B_new, new_state = step_at(layer_lr.to(A.dtype))
            u = size(A_new, B_new, layer_lr.to(A_new.dtype))
            target = torch.where(fresh, lr / u.clamp_min(1e-30), layer_lr)
            if attempt + 1 == _FIRST_STEP_TRIES or bool(((target / layer_lr - 1).abs() <= 0.05).all()):
                break  # (the step computed is the one at layer_lr; the shrink below bounds it)
            layer_lr = target
    else:
        layer_lr = lagged_lr
        A_new, B_new, new_state = step_at(layer_lr.to(A.dtype))
        u = size(A_new, B_new, layer_lr.to(A_new.dtype))
    v_new = v * beta + (1 - beta) * u * u
    wanted = lr / (v_new / (1 - beta ** (t + 1))).sqrt().clamp_min(1e-30)
    alpha = (wanted / layer_lr).clamp(max=1.0).to(A_new.dtype).view(-1, 1, 1)
    A0, B0 = A.to(A_new.dtype), B.to(B_new.dtype)
    A_new, B_new = A0 + alpha * (A_new - A0), B0 + alpha * (B_new - B0)
    new_state = {**new_state, "step_norm_sq": v_new.reshape(state["step_norm_sq"].shape),
                 "step_norm_count": (t + 1).reshape(state["step_norm_count"].shape)}
    return A_new, B_new, new_state
