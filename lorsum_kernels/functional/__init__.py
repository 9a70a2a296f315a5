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

from .lora_one import (
    gaussian_test_matrix,
    lora_ga_factors,
    lora_one_factors,
    orthonormalize,
    randomized_svd,
    rayleigh_ritz_svd,
    subspace_iteration,
    truncated_svd,
)

__all__ += [
    "gaussian_test_matrix",
    "lora_ga_factors",
    "lora_one_factors",
    "orthonormalize",
    "randomized_svd",
    "rayleigh_ritz_svd",
    "subspace_iteration",
    "truncated_svd",
]

from .adaprelora import (  # noqa: E402
    adafactor_debias,
    adafactor_decay,
    adafactor_ema,
    adafactor_scales,
    adaprelora_direction,
    adaprelora_step,
    exact_statistics,
    surrogate_statistics,
)
from .riemannian import adamw_update, scaled_adamw_step, scaled_gd_direction, scaled_gd_step  # noqa: E402

__all__ += [
    "adafactor_debias",
    "adafactor_decay",
    "adafactor_ema",
    "adafactor_scales",
    "adaprelora_direction",
    "adaprelora_step",
    "exact_statistics",
    "surrogate_statistics",
    "adamw_update",
    "scaled_adamw_step",
    "scaled_gd_direction",
    "scaled_gd_step",
]
