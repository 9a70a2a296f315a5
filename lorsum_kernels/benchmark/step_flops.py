"""The flop count of each optimizer's data-dependent step work, and this machine's GEMM rate: the flop bound
a measured step is compared with (docs/step_cost.md has the formulas and where the time goes).

Counted per LoRA layer (m×n weight, rank r, T tokens of the step), for the work that reads the tokens; the
r×r solves, O((m+n)·r²), and the elementwise work, O(m+n), are left out (negligible next to it at T ≫ r):

* LoRSum: each of max(k, 1) rounds an A-step product ``(S·B)ᵀ·X`` and a B-step product ``Sᵀ·(X·Aᵀ)``,
  2·T·q·(m+n) flops each, q = r plus the momentum rank when momentum is on (the weight and buffer LoRSums
  run in lock step, their wide factors side by side).
* ScaledLoRSum: the same with β1 > 0 as the momentum, plus the K-FAC statistics (a sum of squares per
  column of X and of S, 2·T·(m+n)) or the Shampoo diagonal (the energies of G, 2·T·m·n).
* AdaPreLoRA with exact statistics: the row and column energies of G = SᵀX (2·T·m·n) and the factor
  gradients from X and S (4·T·r·(m+n)); with the surrogate: none.
* SVDLoRA: G (2·T·m·n) and its SVD (counted as 4·m·n·min(m, n)).
* Every other optimizer (LoRA + AdamW, ScaledGD, ScaledAdamW): none; their step reads only r-wide factors.
"""

from __future__ import annotations

import torch
from torch.utils import benchmark as torch_benchmark

__all__ = ["layer_step_flops", "step_flops", "gemm_flops_per_second"]


def layer_step_flops(optimizer, group: dict, m: int, n: int, r: int, T: int) -> int:
    """Token-work flops of one layer's step under ``optimizer`` with ``group``'s options."""
    from .. import optim

    if isinstance(optimizer, optim.ScaledLoRSum):
        q = r + ((group["momentum_rank"] or r) if group["betas"][0] > 0 else 0)
        stats = 2 * T * (m + n) if group["metric"] == "kfac" else 2 * T * m * n
        return stats + max(group["iters"], 1) * 4 * T * q * (m + n)
    if isinstance(optimizer, optim.LoRSum):
        q = r + ((group["momentum_rank"] or r) if group["momentum"] > 0 else 0)
        return max(group["iters"], 1) * 4 * T * q * (m + n)
    if isinstance(optimizer, optim.AdaPreLoRA):
        return 2 * T * m * n + 4 * T * r * (m + n) if optimizer.statistics == "exact" else 0
    if isinstance(optimizer, optim.SVDLoRA):
        return 2 * T * m * n + 4 * m * n * min(m, n)
    return 0


def step_flops(optimizer, tokens: int) -> int:
    """Token-work flops of one step over all of ``optimizer``'s LoRA layers (0 for torch optimizers)."""
    groups = getattr(optimizer, "_group_of", None)
    if groups is None:
        return 0
    return sum(layer_step_flops(optimizer, optimizer._group_of(layer), layer.out_features, layer.in_features,
                                layer.rank, tokens) for layer in optimizer._layers)


def gemm_flops_per_second(m: int, n: int, k: int, *, device: torch.device, dtype=torch.float32,
                          min_run_time: float = 1.0) -> float:
    """This machine's rate on an (m×k)·(k×n) product, timed with ``torch.utils.benchmark`` for at least
    ``min_run_time`` seconds (median of its blocks)."""
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    timer = torch_benchmark.Timer("a @ b", globals={"a": a, "b": b}, num_threads=torch.get_num_threads())
    return 2 * m * n * k / timer.blocked_autorange(min_run_time=min_run_time).median
