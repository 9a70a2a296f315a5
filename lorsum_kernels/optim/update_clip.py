"""``max_update_norm``: global clipping of the step itself, the safeguard that works with the streamed step.

``max_grad_norm`` clips the gradient before the step, so it needs every layer's gradient norm before any
layer steps, which the step inside backward (optim/streaming.py) does not have. Every layer's *result*,
however, exists before ``step()`` writes anything, in every capture mode. So this clips what the step does
to the merged weights W = W0 + s·B·A, measured in gradient units: with ΔW_l the change of layer l's
merged weight and η_l its group's lr,

    N = sqrt(Σ_l ‖ΔW_l‖_F² / η_l²),      every layer moves by α = min(1, max_update_norm / N) of its step.

For a LoRSum step ΔW ≈ −η·[G]_r, the rank-r part of the gradient, so N is (at most) the global norm of the
gradient that ``max_grad_norm`` would clip, and the official recipe's ``max_grad_norm=1.0`` has this as
its analogue: ``max_update_norm=1.0`` bounds the step by η (Frobenius, over all layers).

The factors move by α of their step (``A + α·δA``, ``B + α·δB``), which moves W by
``α·(δB·A + B·δA) + α²·δB·δA``; ``‖ΔW_l‖`` is taken as the bound ``‖δB·A + B·δA‖ + ‖δB·δA‖``
(computed from two 2r×2r Grams, no m×n product), so the clipped step moves the weights by at most ``α·N``
in these units.
With α = 1 nothing changes, bit for bit. Method state (momentum, metrics) is not scaled. Layers that are
skipped (non-finite) do not count. ``optimizer.update_norm`` keeps the last step's N (a device tensor).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["merged_update_bound", "moved_by"]


def merged_update_bound(A: Tensor, B: Tensor, A_new: Tensor, B_new: Tensor,
                        steps: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """(L,) bound on ``‖B_new·A_new − B·A‖_F`` of a bucket of balanced factors (A (L,r,n), B (L,m,r)):
    ``‖δB·A + B·δA‖_F + ‖δB·δA‖_F``, from 2r×2r Grams. ``steps``: ``(A_new − A, B_new − B)`` if the caller
    has them (a pass over the factors fewer)."""
    dA, dB = steps if steps is not None else (A_new - A, B_new - B)
    r = A.shape[-2]
    # With P = [δB, B] (m×2r) and Q = [A; δA] (2r×n), P·Q = δB·A + B·δA, so ‖δB·A + B·δA‖² = ⟨PᵀP, QQᵀ⟩:
    # two 2r×2r Grams hold every product of the expansion (⟨δBᵀδB, AAᵀ⟩ + ⟨BᵀB, δAδAᵀ⟩ + 2⟨δBᵀB, A·δAᵀ⟩),
    # and their corner blocks ‖δB·δA‖² = ⟨δBᵀδB, δAδAᵀ⟩: 15 ops where six Grams took 24 (each a kernel
    # launch on a GPU, in step(), per bucket).
    P, Q = torch.cat([dB, B], -1), torch.cat([A, dA], -2)
    gram_P, gram_Q = P.mT @ P, Q @ Q.mT
    dims = (-2, -1)
    first = (gram_P * gram_Q).sum(dims)
    second = (gram_P[..., :r, :r] * gram_Q[..., r:, r:]).sum(dims)
    return first.clamp_min(0).sqrt() + second.clamp_min(0).sqrt()


def moved_by(old: Tensor, new: Tensor, alpha: Tensor) -> Tensor:
    """``old + α·(new − old)`` where α < 1, else ``new`` exactly (α a 0-d tensor, or one per layer that
    broadcasts against the factors: normalize_step's shrink). On the CPU, where reading α costs no device
    wait, ``new`` itself when no α is below 1 (the common step: no pass over the factors). Otherwise one
    ``torch.lerp`` at weight α where α < 1 and 1 elsewhere, which returns ``new`` exactly there: one pass over
    the factors (the formula as written, a multiply, an add and a select over the result, took three)."""
    cut = alpha < 1
    if cut.device.type == "cpu" and not bool(cut.any()):
        return new
    return torch.lerp(old, new, torch.where(cut, alpha, 1).to(old.dtype))
