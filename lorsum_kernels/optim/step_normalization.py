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
bound; one whose gradient shrank stays the smaller, lagged step, as a conservative Adam would take it. On
a layer's first step (or while all its steps were zero) there are no statistics: the step is computed at η to measure u_1, then again at
η/u_1 (twice the work, once). ‖ΔW‖ is the bound of ``update_clip.merged_update_bound`` (r×r Grams).

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

    def second_moment(u):  # v̂ with this step's u: (L,)
        return (v * beta + (1 - beta) * u * u) / (1 - beta ** (t + 1))

    fresh = (t == 0) | (v == 0)  # no statistics yet (or only zero steps): measure the step first
    if bool(fresh.any()):
        A_probe, B_probe, _ = step_at(lr)
        lagged = torch.where(fresh, second_moment(size(A_probe, B_probe, lr)),
                             v / (1 - beta ** t).clamp_min(1e-30))
    else:
        lagged = v / (1 - beta ** t)
    layer_lr = lr / lagged.sqrt().clamp_min(1e-30)
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
