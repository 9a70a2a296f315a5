"""lorsum-kernels: fast, correct LoRA optimizers for PyTorch.

Public API:

* optimizers (``torch.optim.Optimizer``, built from the model): ``LoRSum``, ``ScaledLoRSum``,
  ``AdaPreLoRA``, ``ScaledGD``, ``ScaledAdamW``, ``SVDLoRA``, and ``create_optimizer(model, name)``;
* functional methods: ``low_rank_sum``, ``scaled_low_rank_sum``, the metric statistics
  (``kfac_statistics``, ``shampoo_statistics``, ``ema``, ``effective_metric``), ``gradient_norm``,
  ``svdlora_step``, ``adaprelora_direction``, ``exact_statistics``, ``surrogate_statistics``,
  ``scaled_gd_direction``;
* data-parallel training: the optimizers' ``process_group=`` argument (``distributed`` documents what each
  method averages over ranks) and ``RankAverage``, the ``reduce`` of the functional methods;
* LoRA discovery: ``LoRALinear``, ``find_lora_layers``; initialisation: ``lora_one_init``,
  ``lora_ga_init``.
"""

from .functional import (
    adaprelora_direction,
    effective_metric,
    ema,
    exact_statistics,
    gradient_norm,
    kfac_statistics,
    low_rank_sum,
    scaled_gd_direction,
    scaled_low_rank_sum,
    shampoo_statistics,
    surrogate_statistics,
    svdlora_step,
)
from .distributed import RankAverage
from .init import lora_ga_init, lora_one_init
from .lora import LoRALayer, LoRALinear, find_lora_layers
from .optim import (
    AdaPreLoRA,
    LoRAOptimizer,
    LoRSum,
    ScaledAdamW,
    ScaledGD,
    ScaledLoRSum,
    SVDLoRA,
    create_optimizer,
)

__version__ = "0.1.0"

__all__ = [
    "AdaPreLoRA",
    "LoRALayer",
    "LoRALinear",
    "LoRAOptimizer",
    "LoRSum",
    "RankAverage",
    "SVDLoRA",
    "ScaledAdamW",
    "ScaledGD",
    "ScaledLoRSum",
    "adaprelora_direction",
    "create_optimizer",
    "effective_metric",
    "ema",
    "exact_statistics",
    "find_lora_layers",
    "gradient_norm",
    "kfac_statistics",
    "lora_ga_init",
    "lora_one_init",
    "low_rank_sum",
    "scaled_gd_direction",
    "scaled_low_rank_sum",
    "shampoo_statistics",
    "surrogate_statistics",
    "svdlora_step",
]
