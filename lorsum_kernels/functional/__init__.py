"""Each method as pure functions of tensors: one step for a group of same-shape layers.

Imports only go down: ``optim`` → ``functional`` → ``ops`` → backends and ``reference``.
"""

from .lorsum import (
    compute_dtype,
    effective_metric,
    ema,
    gradient_norm,
    kfac_statistics,
    low_rank_sum,
    scaled_low_rank_sum,
    shampoo_statistics,
    svdlora_step,
)

__all__ = [
    "compute_dtype",
    "effective_metric",
    "ema",
    "gradient_norm",
    "kfac_statistics",
    "low_rank_sum",
    "scaled_low_rank_sum",
    "shampoo_statistics",
    "svdlora_step",
]
