"""The Hugging Face Trainer with the package's optimizers, also under FSDP (``Trainer.create_optimizer``).

Passing a pre-built optimizer (``Trainer(optimizers=(opt, sched))``) works without sharding
(``examples/trainer_example.py``), but the Trainer refuses it under FSDP (and DeepSpeed): there it builds
the optimizer itself, through ``create_optimizer``. ``LoRAOptimizerMixin`` overrides that method::

    from transformers import Trainer
    from lorsum_kernels.hf import LoRAOptimizerMixin

    class LoRATrainer(LoRAOptimizerMixin, Trainer):
        pass

    trainer = LoRATrainer(model=peft_model, args=args, train_dataset=data,
                          lora_optimizer="scaled_lorsum")

What ``create_optimizer`` adds to ``lora_optimizer_kwargs`` (anything given there wins):

* ``process_group="default"`` when torch.distributed runs several ranks (DDP, or FSDP2: with accelerate's
  FSDP2 the optimizer is built before the model is sharded, ``prepare(model, optimizer)`` shards it and
  swaps the optimizer's parameters, and the optimizer follows them at its first step; it then averages over
  the FSDP mesh, which must hold the same ranks);
* ``accumulation_steps=args.gradient_accumulation_steps`` (the step is then taken from the cached X and S of
  all micro-batches, exactly, instead of streamed).

It refuses, before anything is built: ``TrainingArguments.max_grad_norm > 0`` with a method that steps from
the captured inputs and output gradients (LoRSum, ScaledLoRSum, SVDLoRA, AdaPreLoRA with exact statistics):
the Trainer clips ``.grad``, which their LoRA step does not read; set ``max_grad_norm=0`` there and, to clip,
pass ``max_grad_norm=`` in ``lora_optimizer_kwargs`` (the optimizer clips the norm of what it steps from).
DeepSpeed: ZeRO flattens the parameters into buffers that separate each A from its B
(``docs/distributed.md``). FSDP1 (``fsdp_version=1``) likewise; the optimizer raises for it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .optim import OPTIMIZERS

__all__ = ["LoRAOptimizerMixin", "trainer_optimizer_kwargs"]


def trainer_optimizer_kwargs(trainer, name: str, kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The keyword arguments ``LoRAOptimizerMixin`` builds optimizer ``name`` with for ``trainer`` (module
    docstring). Raises for the configurations it refuses."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown LoRA optimizer {name!r}; choose from {sorted(OPTIMIZERS)}")
    cls = OPTIMIZERS[name]
    kwargs = dict(kwargs or {})
    args = trainer.args
    if getattr(trainer, "is_deepspeed_enabled", False):
        raise NotImplementedError(
            f"{cls.__name__} under DeepSpeed: ZeRO flattens the parameters into buffers sharded without "
            "regard to which A belongs to which B, so no rank holds a layer's pair (docs/distributed.md); use "
            "FSDP2 (fsdp_config={'fsdp_version': 2}) or DDP"
        )
    clip = getattr(args, "max_grad_norm", None)
    if cls.needs_capture and clip and clip > 0 and not _steps_from_grads(cls, kwargs):
        raise ValueError(
            f"TrainingArguments(max_grad_norm={clip}) clips .grad, which {cls.__name__}'s LoRA step does not "
            "read (it steps from each layer's captured inputs and output gradients): set max_grad_norm=0 in "
            "TrainingArguments and, to clip, pass max_grad_norm=... in lora_optimizer_kwargs"
        )
    if "process_group" not in kwargs and dist.is_available() and dist.is_initialized() \
            and dist.get_world_size() > 1:
        kwargs["process_group"] = "default"
    steps = getattr(args, "gradient_accumulation_steps", 1) or 1
    if "accumulation_steps" not in kwargs and steps > 1:
        kwargs["accumulation_steps"] = steps
    return kwargs


def _steps_from_grads(cls, kwargs: dict) -> bool:
    """AdaPreLoRA with the surrogate statistics reads .grad only (the Trainer's clipping reaches it)."""
    return cls.__name__ == "AdaPreLoRA" and kwargs.get("statistics") == "surrogate"


class LoRAOptimizerMixin:
    """A ``transformers.Trainer`` mixin whose ``create_optimizer`` builds a ``lorsum_kernels`` optimizer:
    ``class LoRATrainer(LoRAOptimizerMixin, Trainer)``. Keyword arguments: ``lora_optimizer`` (a name of
    ``lorsum_kernels.optim.OPTIMIZERS``; default ``"lorsum"``) and ``lora_optimizer_kwargs`` (the
    optimizer's; ``lr`` defaults to ``TrainingArguments.learning_rate``). The scheduler is the Trainer's
    (``lr_scheduler_type``). Works with and without FSDP2 and DDP (module docstring)."""

    def __init__(self, *args, lora_optimizer: str = "lorsum", lora_optimizer_kwargs: dict | None = None,
                 **kwargs):
        if lora_optimizer not in OPTIMIZERS:  # before the Trainer does anything
            raise ValueError(f"unknown LoRA optimizer {lora_optimizer!r}; choose from {sorted(OPTIMIZERS)}")
        self.lora_optimizer = lora_optimizer
        self.lora_optimizer_kwargs = dict(lora_optimizer_kwargs or {})
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            kwargs = trainer_optimizer_kwargs(self, self.lora_optimizer, self.lora_optimizer_kwargs)
            kwargs.setdefault("lr", self.args.learning_rate)
            # The PEFT model itself (the optimizer pairs factors by module and hooks the modules); under FSDP1
            # the Trainer passes the wrapped model, which the optimizer refuses with the reason.
            target = self.model if model is None else model
            self.optimizer = OPTIMIZERS[self.lora_optimizer](target, **kwargs)
        return self.optimizer
