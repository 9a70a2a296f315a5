"""Hooks that give each LoRA layer the inputs X and output-gradients S of the current step.

Contract:

* A forward hook on the layer's module sees its input X and output Y, and registers a gradient hook on
  Y. Only when that gradient arrives is the pair (X, S = ∂L/∂Y) recorded, so X and S always have the same
  rows. Forwards in eval mode, under ``no_grad``, or whose output needs no gradient record nothing; a
  train-mode forward without backward records nothing either.
* ``torch.utils.checkpoint``: the reentrant variant runs the first forward under ``no_grad`` (nothing
  recorded) and the recomputation builds the graph the gradient flows through (recorded once); the
  non-reentrant variant's recomputed output receives no gradient, so only the original pair is recorded.
  Either way each token row appears once.
* Gradient accumulation and modules called several times per step append pairs; the optimizer
  concatenates them, which gives exactly ``Σ_k S_kᵀ X_k`` with the loss's own scaling and nothing else.
* ``take()`` hands the pairs over and holds nothing afterwards. X is kept without copying (a detached
  view of the input autograd already keeps alive); an in-place change of it before backward is detected
  through its version counter and raises.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn

from .lora import LoRALayer

__all__ = ["ActivationCapture"]


class ActivationCapture:
    """Records (X, S) for the modules of the given LoRA layers until ``take()`` or ``clear()``."""

    def __init__(self, layers: Iterable[LoRALayer]):
        self._records: dict[int, list[tuple[Tensor, Tensor]]] = {}
        self._handles = []
        for layer in layers:
            key = id(layer.module)
            if key in self._records:
                continue  # several adapters of one module share its X and S
            self._records[key] = []
            self._handles.append(layer.module.register_forward_hook(self._on_forward, with_kwargs=True))

    def _on_forward(self, module: nn.Module, args, kwargs, output) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        if not isinstance(output, Tensor) or not output.requires_grad:
            return
        x = args[0] if args else next(iter(kwargs.values()), None)
        if not isinstance(x, Tensor):
            return
        x = x.detach()
        version = x._version
        records = self._records[id(module)]

        def on_output_grad(grad: Tensor) -> None:
            if x._version != version:
                raise RuntimeError(
                    f"the input of {type(module).__name__} was modified in place after its forward; "
                    "the LoRA optimizer needs it unchanged until backward"
                )
            records.append((x.reshape(-1, x.shape[-1]), grad.detach().reshape(-1, grad.shape[-1])))

        output.register_hook(on_output_grad)

    def rows(self, module: nn.Module) -> int:
        """Token rows recorded so far for ``module``."""
        return sum(x.shape[0] for x, _ in self._records.get(id(module), ()))

    def has_data(self, module: nn.Module) -> bool:
        return bool(self._records.get(id(module)))

    def get(self, module: nn.Module) -> tuple[Tensor, Tensor] | None:
        """The concatenated (X (T×n), S (T×m)) of ``module`` so far, or None; keeps the records."""
        pairs = self._records.get(id(module))
        if not pairs:
            return None
        if len(pairs) == 1:
            return pairs[0]
        return torch.cat([x for x, _ in pairs]), torch.cat([s for _, s in pairs])

    def clear(self) -> None:
        for pairs in self._records.values():
            pairs.clear()

    def remove(self) -> None:
        """Detach the hooks from the model and drop everything recorded."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()
