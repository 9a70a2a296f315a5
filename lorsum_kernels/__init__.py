"""lorsum-kernels: fast, correct LoRA optimizers (LoRSum / PSI-LoRA, Scaled LoRSum, and baselines).

Public API: the optimizers (``LoRSum``, ``ScaledLoRSum``, ``SVDLoRA``, ``create_optimizer``), the
functional methods (``low_rank_sum``, ``scaled_low_rank_sum``, metric statistics, ``svdlora_step``,
``gradient_norm``), LoRA discovery (``LoRALinear``, ``find_lora_layers``) and the gradient-based
initialisations (``lora_one_init``, ``lora_ga_init``).
"""

from .functional import (
    effective_metric,
    ema,
    gradient_norm,
    kfac_statistics,
    low_rank_sum,
    scaled_low_rank_sum,
    shampoo_statistics,
    svdlora_step,
)
from .init import lora_ga_init, lora_one_init
from .lora import LoRALayer, LoRALinear, find_lora_layers
from .optim import LoRAOptimizer, LoRSum, ScaledLoRSum, SVDLoRA, create_optimizer

__version__ = "0.1.0"

__all__ = [
    "LoRALayer",
    "LoRALinear",
    "LoRAOptimizer",
    "LoRSum",
    "SVDLoRA",
    "ScaledLoRSum",
    "create_optimizer",
    "effective_metric",
    "ema",
    "find_lora_layers",
    "gradient_norm",
    "kfac_statistics",
    "low_rank_sum",
    "scaled_low_rank_sum",
    "shampoo_statistics",
    "svdlora_step",
    "lora_one_init",
    "lora_ga_init",
]

from .functional import (  # noqa: E402
    adaprelora_direction,
    exact_statistics,
    scaled_gd_direction,
    surrogate_statistics,
)
from .optim import AdaPreLoRA, ScaledAdamW, ScaledGD  # noqa: E402

__all__ += [
    "AdaPreLoRA",
    "ScaledAdamW",
    "ScaledGD",
    "adaprelora_direction",
    "exact_statistics",
    "scaled_gd_direction",
    "surrogate_statistics",
]
