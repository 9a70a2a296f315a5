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
* ``get()`` hands the pairs over; ``clear()`` (called by the optimizer's ``step`` and ``zero_grad``)
  holds nothing afterwards. X is kept without copying (a detached view of the input autograd already
  keeps alive); an in-place change of it between its forward and the moment it is read (at backward, and
  again in ``get()``) is detected through its version counter and raises, never giving a wrong G.
* Records left over from a step that never ran (an AMP step skipped for inf, then ``model.zero_grad()``)
  are dropped when a new output gradient arrives after a finished backward while the layer's factors
  have no gradient (``None``), i.e. at the first backward after the gradients were reset.
* ``received_grad(module)`` tells whether backward reached the module's LoRA factors since the last
  ``clear()`` (a post-accumulate-grad hook), so "gradients but no captured data" is detected exactly,
  also after ``zero_grad(set_to_none=False)``.
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
        # module id -> [(X, S, X's version when recorded)]
        self._records: dict[int, list[tuple[Tensor, Tensor, int]]] = {}
        self._factors: dict[int, list[Tensor]] = {}
        self._received_grad: set[int] = set()
        self._handles = []
        for layer in layers:
            key = id(layer.module)
            for p in (layer.A, layer.B):
                self._handles.append(p.register_post_accumulate_grad_hook(
                    lambda _p, key=key: self._received_grad.add(key)))
            if key in self._records:  # several adapters of one module share its X and S
                self._factors[key] += [layer.A, layer.B]
                continue
            self._records[key] = []
            self._factors[key] = [layer.A, layer.B]
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
        key = id(module)
        records, factors = self._records[key], self._factors[key]

        def on_output_grad(grad: Tensor) -> None:
            _check_version(x, version, module)
            if key in self._received_grad and all(p.grad is None for p in factors):
                # Left over from a finished backward whose step never ran; gradients were reset since.
                records.clear()
                self._received_grad.discard(key)
            records.append((x.reshape(-1, x.shape[-1]), grad.detach().reshape(-1, grad.shape[-1]), version))

        output.register_hook(on_output_grad)

    def rows(self, module: nn.Module) -> int:
        """Token rows recorded so far for ``module``."""
        return sum(x.shape[0] for x, _, _ in self._records.get(id(module), ()))

    def has_data(self, module: nn.Module) -> bool:
        return bool(self._records.get(id(module)))

    def received_grad(self, module: nn.Module) -> bool:
        """Whether backward accumulated a gradient into the module's LoRA factors since ``clear()``."""
        return id(module) in self._received_grad

    def get(self, module: nn.Module) -> tuple[Tensor, Tensor] | None:
        """The concatenated (X (T×n), S (T×m)) of ``module`` so far, or None; keeps the records.

        Raises if an input was modified in place since it was recorded (e.g. a reused input buffer).
        """
        pairs = self._records.get(id(module))
        if not pairs:
            return None
        for x, _, version in pairs:
            _check_version(x, version, module)
        if len(pairs) == 1:
            return pairs[0][0], pairs[0][1]
        return torch.cat([x for x, _, _ in pairs]), torch.cat([s for _, s, _ in pairs])

    def clear(self) -> None:
        for pairs in self._records.values():
            pairs.clear()
        self._received_grad.clear()

    def remove(self) -> None:
        """Detach the hooks from the model and drop everything recorded."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()


def _check_version(x: Tensor, version: int, module: nn.Module) -> None:
    if x._version != version:
        raise RuntimeError(
            f"the input of {type(module).__name__} was modified in place after its forward; the LoRA "
            "optimizer reads it at backward and at step(), so it must stay unchanged until then (clone "
            "a reused input buffer before the forward)"
        )
