"""``max_grad_norm``: the global 2-norm of everything a step consumes, for clipping inside the step.

``.grad`` clipping (``clip_grad_norm_``, the Trainer's ``max_grad_norm``) cannot reach the methods that step
from the captured X and S, so the norm is taken over what the step reads: each captured layer's weight
gradient ``G = Sᵀ·X`` (``functional.gradient_norm``, never forming G; under data parallelism the norm of
the rank-averaged G, which has cross-rank terms), the factor gradients of the layers stepped from ``.grad``,
and the other groups' ``.grad`` (under FSDP2 each shard's part, summed over the mesh once). Everything stays
on the device: the clip coefficient is a tensor, and a non-finite norm makes it non-finite, which skips the
step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..fsdp import is_sharded, local_tensor
from ..functional.low_rank_sum import gradient_norm

__all__ = ["clip_coefficient", "global_grad_norm", "grad_squares"]


def global_grad_norm(plan, param_groups, reduce, sharded, backend_of, device) -> Tensor:
    """The 2-norm of what the step of ``plan`` (``LoRAOptimizer._plan``) and the other groups consume;
    ``backend_of(group, device)`` is the group's resolved backend."""
    squares = []
    for group, buckets in plan:
        for layers, data in buckets:
            for layer, d in zip(layers, data):
                if d is not None and reduce is not None:
                    # The global G = mean over ranks of S_rᵀX_r: its norm has cross-rank terms.
                    squares.append((reduce.gradient_norm(d[0], d[1]).float().square(), False))
                elif d is not None:
                    # The captured data define the method's gradient (weight gradient, or the statistics
                    # and factor gradients derived from it): G's norm is the one to clip.
                    norm = gradient_norm(d[0], d[1], backend=backend_of(group, d[0].device))
                    squares.append((norm.float().square(), False))
                else:
                    squares += grad_squares((layer.A, layer.B))
    for group in param_groups:
        if group["kind"] == "other":
            squares += grad_squares(group["params"])
    # Under FSDP2 a sharded gradient's local sum of squares is its part: summed over the mesh, once.
    on_shards = [sq for sq, on_shard in squares if on_shard]
    squares = [sq for sq, on_shard in squares if not on_shard]
    if on_shards:
        squares.append(sharded.sum(torch.stack(on_shards).sum()))
    return torch.stack(squares).sum().sqrt() if squares else torch.zeros((), device=device)


def clip_coefficient(max_grad_norm: float, norm: Tensor) -> Tensor:
    """``min(1, max_grad_norm / (norm + 1e-6))``, as torch's ``clip_grad_norm_`` scales."""
    return (max_grad_norm / (norm + 1e-6)).clamp(max=1.0)


def grad_squares(params) -> list[tuple[Tensor, bool]]:
    """(sum of squares of the local ``.grad``, whether it is a shard of a sharded gradient) per parameter."""
    return [(local_tensor(p.grad).float().square().sum(), is_sharded(p.grad))
            for p in params if p.grad is not None]
