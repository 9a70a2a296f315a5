"""The step inside backward: each layer's data-dependent work runs while its X and S are alive.

Contract (the optimizers' ``capture=`` and ``accumulation_steps=`` arguments):

* ``capture="stream"``: the capture hands each layer's (X, S) to ``StreamedStep.take`` during backward,
  which runs the method's whole step for that layer right there (its k ALS rounds, momentum, statistics,
  the non-finite check; under data parallelism the collectives too, in backward order, the same on every
  rank) and keeps only the result: the new factors and state, O((m+n)·r) per layer. Nothing per token
  outlives the layer's backward. ``step()`` then writes every result; the factors autograd still needs
  are never changed during backward. Exact whenever each layer sees one backward per step: the hook then
  holds all of the step's tokens. Needs the step's gradient scaling up front, so it refuses
  ``max_grad_norm`` (the global norm is known only after the last layer's backward) and a GradScaler
  (its scale reaches ``step()`` only).
* ``capture="cache"``: X and S are kept until ``step()`` (gradient accumulation, modules called several
  times per step, clipping, GradScaler: everything works; the memory is the cache's).
* ``capture="auto"`` (default): the first step caches; it streams from the next step on when that step
  had exactly one backward per layer, no clipping and no GradScaler. ``accumulation_steps=N > 1`` says up
  front that it never will.
* Never a silently wrong step: a second backward reaching a streamed layer before ``step()`` (gradient
  accumulation, a module called twice) raises in that backward, drops the step's streamed results, and
  ``step()`` then refuses; ``auto`` caches from then on. Hyperparameters are read at backward: a group
  option changed between backward and ``step()`` (a scheduler stepped first) raises in ``step()``. A
  backward discarded by zeroing the gradients drops its results, as the capture drops its records.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..lora import LoRALayer

if TYPE_CHECKING:
    from .base import LoRAOptimizer

__all__ = ["CAPTURE_MODES", "StreamedStep", "check_capture_options"]

CAPTURE_MODES = ("auto", "cache", "stream")


def check_capture_options(capture, accumulation_steps, max_grad_norm) -> None:
    if capture not in CAPTURE_MODES:
        raise ValueError(f"capture must be one of {CAPTURE_MODES}, got {capture!r}")
    if accumulation_steps is not None and (
        isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int) or accumulation_steps < 1
    ):
        raise ValueError(f"accumulation_steps must be a positive integer or None, got {accumulation_steps!r}")
    if capture == "stream" and (accumulation_steps or 1) > 1:
        raise ValueError(
            "capture='stream' runs each layer's step in its backward, so it needs one backward per step; "
            "with gradient accumulation use capture='cache' (or 'auto')"
        )
    if capture == "stream" and max_grad_norm is not None:
        raise ValueError(
            "capture='stream' cannot clip: the global gradient norm is known only after the last layer's "
            "backward, when the streamed steps have run; use capture='cache' with max_grad_norm"
        )


def _options(group: dict) -> dict:
    """The group's hyperparameters as read at backward (plain values only; tensors by identity)."""
    return {k: v for k, v in group.items() if k != "params"}


class StreamedStep:
    """Per-layer results of the step computed in backward, until ``step()`` writes them."""

    def __init__(self, optimizer: "LoRAOptimizer", mode: str, accumulation_steps: int | None):
        self.optimizer = optimizer
        self.mode = mode
        self.accumulation_steps = accumulation_steps
        self.results: dict[int, tuple] = {}  # id(layer) -> (layer, group, options, A, B, state, finite)
        self.refusal: str | None = None  # why the step's streamed results were dropped
        self.auto_off = mode == "cache" or (mode == "auto" and (
            (accumulation_steps or 1) > 1 or optimizer.max_grad_norm is not None))
        self.attach(optimizer._capture)
        if mode == "stream":
            self.start()

    @property
    def active(self) -> bool:
        return self.optimizer._capture is not None and self.optimizer._capture.sink is not None

    def attach(self, capture) -> None:
        """Hooks ``capture`` up to this object (at construction, and when add_param_group rebuilds it)."""
        capture.on_discard = self.discard

    def start(self) -> None:
        self.attach(self.optimizer._capture)
        self.optimizer._capture.sink = self.take

    def stop(self) -> None:
        self.optimizer._capture.sink = None

    # backward --------------------------------------------------------------------------------------

    def take(self, layer: LoRALayer, X: Tensor, S: Tensor) -> bool:
        opt = self.optimizer
        if id(layer) in self.results:
            self.results.clear()
            self.refusal = (
                f"{layer.name} received a second backward before step() while its step was streamed in the "
                "first (gradient accumulation, or a module called twice per step): the streamed step saw "
                "only part of the batch, so this step's streamed results were dropped. Pass "
                "accumulation_steps=N (or capture='cache') to the optimizer"
            )
            if self.mode == "auto":
                self.stop()
                self.auto_off = True
            raise RuntimeError(self.refusal)
        group = opt._group_of(layer)
        with torch.no_grad():
            A, B, state, finite = opt._compute_bucket(group, [layer], [(X, S)], grads_from_data=True)
        self.results[id(layer)] = (layer, group, _options(group), A, B, state, finite)
        return True

    def discard(self, layer: LoRALayer) -> None:
        """The layer's gradients were reset after a backward whose step never ran: its result goes."""
        self.results.pop(id(layer), None)

    def has_result(self, layer: LoRALayer) -> bool:
        return id(layer) in self.results

    # step ------------------------------------------------------------------------------------------

    def check(self, loss_scaled: bool) -> None:
        """Raises, before anything changes, when this step's streamed results cannot be written."""
        if self.refusal is not None:
            refusal, self.refusal = self.refusal, None
            raise RuntimeError(refusal)
        if not self.results:
            return
        if loss_scaled:
            raise RuntimeError(
                "the step was streamed in backward from loss-scaled output gradients, and a GradScaler's scale "
                "reaches step() only: use capture='cache' (or 'auto', which does) with GradScaler"
            )
        for layer, group, options, *_ in self.results.values():
            if _options(group) != options:
                changed = sorted(k for k in options if options[k] != group.get(k))
                raise RuntimeError(
                    f"the options {changed} of {layer.name}'s group changed between backward, where its step "
                    "was streamed, and step(): step the LR scheduler after optimizer.step(), as torch expects"
                )

    def write(self, skip_of) -> list[Tensor]:
        """Writes every result; ``skip_of(group)`` is the group's device skip flag. Returns skip flags."""
        flags = []
        opt = self.optimizer
        for layer, group, _, A, B, state, finite in self.results.values():
            if opt._uses_grads():  # a non-finite .grad skips the layer, as in the cached step
                finite = finite & opt._factor_grads_finite([layer]).to(finite.device)
            flags.append(self.optimizer._write_bucket([layer], A, B, state, finite, skip_of(group)))
        self.results.clear()
        return flags

    def after_cached_step(self, pairs_per_layer: list[int], loss_scaled: bool) -> None:
        """``auto``: stream from the next step when this one had one backward per layer (on every rank:
        the streamed collectives run in each layer's backward, so every rank must reach the same layers)
        and no scaler; a step with accumulation, a module called twice or uneven ranks means never."""
        if self.auto_off or self.active or self.mode != "auto":
            return
        opt = self.optimizer
        low = high = pairs_per_layer
        if opt._reduce is not None:
            counts = torch.tensor(pairs_per_layer, device=opt._layers[0].A.device)
            low, high = (t.tolist() for t in opt._reduce.min_max(counts))
        if any(hi > 1 or lo != hi for lo, hi in zip(low, high)):
            self.auto_off = True
        elif not loss_scaled and any(hi == 1 for hi in high):
            self.start()

    def resume(self) -> None:
        """A checkpoint saved while ``auto`` streamed: stream from the next backward on."""
        if self.mode == "auto" and not self.auto_off and not self.optimizer._capture.removed:
            self.start()

    def clear(self) -> None:
        """The gradients were discarded (``optimizer.zero_grad``): so are the results and any refusal."""
        self.results.clear()
        self.refusal = None
