"""Each method as pure functions of tensors: one step for a group of same-shape layers.

``low_rank_sum`` (the LoRSum primitive: the rank-r projection of an implicit sum, its scaled and
data-parallel forms, the metric statistics, the clip norm, the SVDLoRA step), ``lorsum_step`` (the
LoRSum / ScaledLoRSum optimizer step built on it: PSI-LoRA with momentum), ``adaprelora`` (Adafactor statistics and the H-weighted factor solve), ``riemannian`` (ScaledGD,
Scaled AdamW), ``lora_one`` (randomized SVD pieces of LoRA-One / LoRA-GA). Imports only go down:
``optim`` → ``functional`` → ``ops`` → backends and ``reference``; the classes are in ``optim``.
"""

from .adaprelora import (
    adafactor_debias,
    adafactor_decay,
    adafactor_ema,
    adafactor_scales,
    adaprelora_direction,
    adaprelora_step,
    exact_statistics,
    surrogate_statistics,
)
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
from .low_rank_sum import (
    align_factors,
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
from .lorsum_step import psi_lora_step, scaled_psi_lora_step
from .riemannian import adamw_update, scaled_adamw_step, scaled_gd_direction, scaled_gd_step

__all__ = [
    "adafactor_debias",
    "adafactor_decay",
    "adafactor_ema",
    "adafactor_scales",
    "adamw_update",
    "adaprelora_direction",
    "adaprelora_step",
    "align_factors",
    "compute_dtype",
    "effective_metric",
    "ema",
    "exact_statistics",
    "gaussian_test_matrix",
    "gradient_norm",
    "kfac_statistics",
    "lora_ga_factors",
    "lora_one_factors",
    "low_rank_sum",
    "orthonormalize",
    "psi_lora_step",
    "randomized_svd",
    "rayleigh_ritz_svd",
    "scaled_adamw_step",
    "scaled_gd_direction",
    "scaled_gd_step",
    "scaled_low_rank_sum",
    "shampoo_statistics",
    "subspace_iteration",
    "surrogate_statistics",
    "svdlora_step",
    "truncated_svd",
]
