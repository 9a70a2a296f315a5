"""SVDLoRA, the step LoRSum approximates, as a baseline optimizer (spec/lorsum.md §2).

Each step is ``s·B·A ← Π_r(s·B·A − η·G)`` by a full SVD of the m×n matrix, with ``G = SᵀX`` formed from
the captured layer data: plain gradient descent on the merged weight, projected back to rank r (the new
factors: the SVD's balanced ones, rotated to the basis nearest the old factors, ``align_factors``). It
costs what LoRSum avoids (an m×n gradient and an SVD per layer) and exists for comparisons and tests.
"""

from __future__ import annotations

from ..functional import align_factors, svdlora_step
from .base import LoRAOptimizer

__all__ = ["SVDLoRA"]


class SVDLoRA(LoRAOptimizer):
    """Projected gradient descent on the merged LoRA weight. Args: ``model``, ``lr`` (default 1.0, LoRSum's:
    the same merged-weight step to first order; not swept) and the
    ``param_groups`` / ``other_*`` / ``max_grad_norm`` / ``max_update_norm`` (default 1.0, a gradient step
    like LoRSum's) / ``process_group`` / ``capture`` / ``accumulation_steps`` / ``stream_batch_bytes`` options
    of ``LoRSum``
    (streamed, the m×n G and its SVD run in each layer's backward and only the new factors are kept)."""

    def __init__(self, model, lr: float = 1.0, *, max_update_norm: float | None = 1.0, **kwargs):
        super().__init__(model, dict(lr=lr), max_update_norm=max_update_norm, **kwargs)

    def _method_step(self, group, A, B, X, S, state, grads, reduce, backend):
        G = S.to(A.dtype).mT @ X.to(A.dtype)
        if reduce is not None:  # data-parallel: the mean of the ranks' G (m×n numbers per layer)
            (G,) = reduce([G])
        # The SVD's factors, rotated to the old ones' basis: the clip (max_update_norm) moves the factors by α
        # of their step, which only means "α of the weights' step" when the step is not also a change of
        # gauge (the SVD's arbitrary signs).
        A_new, B_new = svdlora_step(A, B, G, group["lr"])
        A, B = align_factors(A, B, A_new, B_new)
        return A, B, {}
