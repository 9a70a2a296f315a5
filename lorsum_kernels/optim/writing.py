"""The second half of ``step()``: every bucket's results finished, clipped and written (a mixin of
``LoRAOptimizer``).

``step()`` first computes every layer's new factors and state without changing anything (its buckets, and
the steps streamed in backward); ``_write_results`` then, in this order:

* finishes the normalised step (``normalize_step``: the statistics of the step's size and the shrink,
  ``step_normalization``) in place, layer by layer, where the native CPU op can
  (``_finishes_in_place`` / ``_write_normalized``), else batched over the results of one shape
  (``_finish_normalized``, ``ops.finish_normalized_stacked``);
* scales every result by ``max_update_norm``'s one factor (``_update_clip``, ``update_clip``), which needs
  every layer's bound before any write;
* writes each bucket (``_write_bucket``): the layers whose inputs and results are finite (and not skipped
  as a whole: GradScaler's inf flag, a device lr that is not finite or negative) take their new factors,
  in the parameters' dtype, and state; the others keep theirs and count a skipped step. The choice is a
  device select, never a host read of a flag, except on the CPU where the read is free.

Each returns a device flag per bucket (whether it skipped a layer), which ``step()`` counts. The mixin reads
the optimizer's state, options and helpers (``_backend``, ``_scale_root``, ``_host_values``,
``_factor_values``, ``_sharded``), which ``LoRAOptimizer`` defines.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import ops
from .._numerics import as_dtype
from ..fsdp import is_sharded
from ..lora import LoRALayer
from . import step_normalization
from .streaming import LayerResults
from .update_clip import merged_update_bound, moved_by

__all__ = ["WritingMixin", "stacked"]


class WritingMixin:
    def _write_results(self, results: list) -> list[Tensor]:
        """Finishes, clips and writes ``results`` (``(group, layers, A_new, B_new, new_state, finite, skip)``
        per bucket, or the streamed step's ``LayerResults``); returns each write's skip flag."""
        skipped = []
        # The normalised step finished and written in place where it can be (_finishes_in_place), one pass
        # over each layer's factors; the rest below, batched over the results of one shape.
        remaining = []
        for result in results:
            if isinstance(result, LayerResults) or self._finishes_in_place(result[0], result[1], result[2]):
                skipped.append(self._write_normalized(result))
            else:
                remaining.append(result)
        results = remaining
        if any(group.get("normalize_step") for group in self.param_groups):
            results = self._finish_normalized(results)
        alpha, olds = None, [None] * len(results)
        if self.max_update_norm is not None:
            alpha, old_factors = self._update_clip(results)
            if alpha.device.type == "cpu" and bool(alpha >= 1):
                alpha = None  # the clip moves nothing (moved_by would return every result as it is)
            else:
                olds = [(as_dtype(stacked(A_old), r[2].dtype), as_dtype(stacked(B_old), r[2].dtype))
                        for (A_old, B_old), r in zip(old_factors, results)]
        for (group, layers, A_new, B_new, new_state, finite, skip), old in zip(results, olds):
            skipped.append(self._write_bucket(layers, A_new, B_new, new_state, finite, skip, alpha, old))
        return skipped

    def _finishes_in_place(self, group: dict, layers: list[LoRALayer], A_new: Tensor) -> bool:
        """Whether the normalised step of ``group``'s results for ``layers`` (new factors like ``A_new``) is
        finished and written in place, layer by layer (``_write_normalized``): fp32 factors on the CPU, in
        one process, no ``max_update_norm`` (whose clip needs every layer's bound before any write), a
        method that reads no ``.grad`` (whose finiteness would count), and the group's backend runs
        ``finish_normalized_step`` natively. Otherwise ``_finish_normalized`` and ``_write_bucket`` do it,
        batched."""
        if (not group.get("normalize_step") or self.max_update_norm is not None or self._sharded is not None
                or self._reduce is not None or self._uses_grads() or A_new.device.type != "cpu"
                or A_new.dtype != torch.float32):
            return False
        params = [p for layer in layers for p in (layer.A, layer.B)]
        if not all(p.dtype == torch.float32 and p.is_contiguous() for p in params):
            return False
        try:
            return self._backend(group, A_new.device).of("finish_normalized_step") == "native"
        except RuntimeError:  # a forced backend that lacks it (Triton on the CPU): the composite
            return False

    def _write_normalized(self, result) -> Tensor:
        """The normalised step's finish and write of one bucket's results (``LayerResults``, or a joined
        bucket's tuple), in place: ``ops.finish_normalized_step`` moves the factors of every layer whose
        results are finite and not skipped and updates its statistics; the rest of the new state and the
        counters are written here. Returns ``_write_bucket``'s flag (whether a layer was skipped)."""
        if isinstance(result, LayerResults):
            group, layers, A_new, B_new, new_state, finite, skip, balanced = result
        else:
            group, layers, A, B, state, finite, skip = result
            A_new, B_new, balanced = list(A.unbind(0)), list(B.unbind(0)), False
            new_state = {key: list(value.unbind(0)) for key, value in state.items()}
        count = len(layers)
        states = [self.state[layer.A] for layer in layers]
        allowed = torch.ones(count, dtype=torch.bool) if finite is None else finite.to("cpu", copy=True)
        if skip is not None and bool(skip):
            allowed.zero_()
        new_state = dict(new_state)
        measured = new_state.pop(step_normalization.MEASURED_LR, None)
        if isinstance(measured, list):
            measured = torch.stack(measured)
        layer_lr = step_normalization.layer_lrs(
            group["lr"], torch.stack([st["step_norm_scale"] for st in states]),
            {} if measured is None else {step_normalization.MEASURED_LR: measured})
        root = self._scale_root([layer.scale for layer in layers], torch.float32, A_new[0].device).reshape(-1)
        checked = [values[i] for i in range(count) for values in new_state.values()]
        written = ops.finish_normalized_step(
            [layer.A for layer in layers], [layer.B for layer in layers], A_new, B_new, checked,
            *([st[key] for st in states] for key in step_normalization.STATE_KEYS), root,
            layer_lr.to(torch.float32), allowed, balanced, group["lr"], group["normalize_beta"],
            backend=self._backend(group, A_new[0].device))
        if bool(written.all()):
            targets, values = [], []
            for key, per_layer in new_state.items():
                targets += [st[key] for st in states]
                values += [value.reshape(st[key].shape) for value, st in zip(per_layer, states)]
            if targets:
                torch._foreach_copy_(targets, values)
            torch._foreach_add_([st["step"] for st in states], 1)
            return torch.zeros((), dtype=torch.bool)
        for i, st in enumerate(states):
            if written[i]:
                for key, per_layer in new_state.items():
                    st[key].copy_(per_layer[i].reshape(st[key].shape))
                st["step"] += 1
            else:
                st["skipped_steps"] += 1
        return torch.ones((), dtype=torch.bool)

    def _finish_normalized(self, results: list) -> list:
        """``normalize_step``'s statistics and shrink (optim/step_normalization.py) for this step's results,
        in ``step()`` where the code runs warm, once per group and factor shape over all its results (the
        streamed step hands over one result per layer); the layers' state before the step is still in
        ``self.state``. Returns the results with the shrunk factors and the statistics in their state."""
        batches: dict = {}
        for i, (group, _, A_new, B_new, *_) in enumerate(results):
            if group.get("normalize_step"):
                key = (id(group), tuple(A_new.shape[1:]), tuple(B_new.shape[1:]), A_new.dtype, A_new.device)
                batches.setdefault(key, []).append(i)
        results = list(results)
        for members in batches.values():
            group = results[members[0]][0]
            layers = [layer for i in members for layer in results[i][1]]
            A_new, B_new = (results[members[0]][k] if len(members) == 1
                            else torch.cat([results[i][k] for i in members]) for k in (2, 3))
            dt = A_new.dtype
            A_old, B_old, _ = self._factor_values(layers)
            old = {k: torch.stack([self.state[layer.A][k] for layer in layers])
                   for k in step_normalization.STATE_KEYS}
            sizes = [len(results[i][1]) for i in members]
            scales = old["step_norm_scale"].split(sizes)
            layer_lr = torch.cat([step_normalization.layer_lrs(group["lr"], scale, results[i][4])
                                  .to(scale.dtype) for i, scale in zip(members, scales)])
            root = self._scale_root([layer.scale for layer in layers], dt, A_new.device)
            A_new, B_new, *values = ops.finish_normalized_stacked(
                as_dtype(stacked(A_old), dt), as_dtype(stacked(B_old), dt), A_new, B_new, root, layer_lr,
                old["step_norm_sq"], old["step_norm_count"], group["lr"], group["normalize_beta"],
                backend=ops.fused_or_reference(self._backend(group, A_new.device), A_new.device,
                                               "finish_normalized_stacked"))
            stats = dict(zip(step_normalization.STATE_KEYS, values))
            parts = zip(members, A_new.split(sizes), B_new.split(sizes),
                        zip(*(value.reshape(old[k].shape).split(sizes) for k, value in stats.items())))
            for i, A_i, B_i, values in parts:
                g, ls, _, _, state_i, finite, skip = results[i]
                state_i = {k: v for k, v in state_i.items() if k != step_normalization.MEASURED_LR}
                state_i.update(zip(stats, values))
                results[i] = (g, ls, A_i, B_i, state_i, finite, skip)
        return results

    def _update_clip(self, results) -> tuple[Tensor, list]:
        """``max_update_norm``'s factor α (a 0-d device tensor) for this step's results
        (optim/update_clip.py), and each result's old factors as lists of full tensors (the write moves from
        them where α < 1: gathered once under FSDP2); the step's update norm N goes to ``self.update_norm``.
        The bounds are computed once per factor shape, over all the results of that shape (the streamed step
        hands over one result per layer: ~15 small ops each would be the step's largest cost), the old
        factors stacked once per shape."""
        olds, batches = [], {}
        for group, layers, A_new, B_new, _, finite, skip in results:
            A_old, B_old, _ = self._factor_values(layers)
            olds.append((A_old, B_old))
            dt = A_new.dtype
            counted = finite if skip is None else finite & ~skip.to(finite.device)
            lr = group["lr"]
            lr = lr.to(dt).expand(len(layers)) if isinstance(lr, Tensor) else [float(lr)] * len(layers)
            key = (tuple(A_new.shape[1:]), tuple(B_new.shape[1:]), dt, A_new.device)
            batch = batches.setdefault(key, ([], [], [], [], [], [], []))
            for part, value in zip(batch, (A_old, B_old, A_new, B_new, [layer.scale for layer in layers],
                                           lr, counted)):
                part.append(value)
        squares = []
        for (_, _, dt, device), (A_old, B_old, A_new, B_new, scales, lrs, counted) in batches.items():
            # Device tensors of host numbers, built once and reused (_host_values): no host-to-device copy
            # per step, which capturing the step in a CUDA graph refuses.
            root = self._scale_root([s for part in scales for s in part], dt, device)
            A_old, B_old = (as_dtype(torch.stack([p for part in t for p in part]), dt) * root
                            for t in (A_old, B_old))
            A_new, B_new = (torch.cat(t) * root for t in (A_new, B_new))
            bound = merged_update_bound(A_old, B_old, A_new, B_new)
            if any(isinstance(v, Tensor) for v in lrs):
                lr = torch.cat([v.to(device) if isinstance(v, Tensor)
                                else torch.tensor(v, dtype=dt, device=device) for v in lrs])
            else:  # plain numbers (the usual case): one tensor for the whole batch
                lr = self._host_values([x for v in lrs for x in v], dt, device)
            counted = torch.cat([c if c.device == device else c.to(device) for c in counted])
            per_lr = torch.where(counted & (lr > 0), bound / torch.where(lr > 0, lr, 1), 0)
            squares.append(per_lr.square().sum())
        device = self._layers[0].A.device
        norm = (torch.stack([s.to(device) for s in squares]).sum().sqrt() if squares
                else torch.zeros((), device=device))
        self.update_norm = norm
        return (self.max_update_norm / norm).clamp(max=1.0), olds  # N = 0: inf, clamped to 1

    def _write_param(self, p: Tensor, value: Tensor, ok: Tensor) -> None:
        """``p ← value`` (full, in p's dtype) where the 0-d ``ok`` holds; a sharded p takes its rows."""
        if self._sharded is not None and is_sharded(p):
            self._sharded.write(p, value, ok)
        else:
            p.copy_(torch.where(ok, value, p))

    def _write_bucket(self, layers: list[LoRALayer], A_new: Tensor, B_new: Tensor, new_state: dict,
                      finite: Tensor, skip_all: Tensor | None = None, alpha: Tensor | None = None,
                      old: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Writes the layers whose ``finite`` flag is set (and not ``skip_all``), parameters in their dtype;
        returns a device flag, true when any layer was skipped. ``alpha`` (``max_update_norm``): the
        factors move by that fraction of their step (``update_clip.moved_by``) from ``old`` (the stacked
        factors ``_update_clip`` read).

        On an accelerator bucket-wide, as torch.optim's foreach paths: one ``torch.where`` per dtype keeps
        a skipped layer's old values of every factor and state key (``_kept_where_skipped``) and one
        ``torch._foreach_copy_`` writes every layer's slice (a where and a copy per tensor and layer would
        be ~8 small launches per layer). On the CPU,
        where a foreach op is a loop and the stacking costs more than it saves (measured: 60 against 40 µs
        for one 576×576 r=16 layer, 180 against 160 µs for four), layer by layer, as torch.optim defaults
        to foreach only for CUDA tensors."""
        pdt = layers[0].A.dtype
        if skip_all is not None:
            finite = finite & ~skip_all.to(finite.device)
        if alpha is not None:
            A_old, B_old = old
            alpha = alpha.to(A_new.device)
            A_new, B_new = moved_by(A_old, A_new, alpha), moved_by(B_old, B_new, alpha)
        states = [self.state[layer.A] for layer in layers]
        sharded = self._sharded is not None and any(is_sharded(layer.A) or is_sharded(layer.B)
                                                    for layer in layers)
        if not sharded and finite.device.type == "cpu" and bool(finite.all()):
            # Every layer steps, which on the CPU the host reads for free: plain copies (the selects below
            # would pick the new values anyway; ~7 ops a layer fewer, the step's largest cost for methods
            # whose work is all in step()), in one foreach call (a loop in C++ rather than in Python).
            targets = [layer.A for layer in layers] + [layer.B for layer in layers]
            values = [*A_new.unbind(0), *B_new.unbind(0)]
            for key, value in new_state.items():
                targets += [st[key] for st in states]
                values += value.unbind(0)
            torch._foreach_copy_(targets, values)
            torch._foreach_add_([st["step"] for st in states], 1)
            return torch.zeros((), dtype=torch.bool)
        if sharded or not _foreach_write(A_new.device):
            for i, layer in enumerate(layers):  # under FSDP2 each rank writes its shard of the full new value
                ok = finite[i]
                self._write_param(layer.A, A_new[i].to(pdt), ok)
                self._write_param(layer.B, B_new[i].to(pdt), ok)
                st = states[i]
                for key, value in new_state.items():
                    st[key].copy_(torch.where(ok, value[i], st[key]))
                st["step"] += ok
                st["skipped_steps"] += ~ok
            return ~finite.all()
        entries = [([layer.A for layer in layers], A_new), ([layer.B for layer in layers], B_new)]
        entries += [([st[key] for st in states], new) for key, new in new_state.items()]
        torch._foreach_copy_(*_kept_where_skipped(entries, finite))
        steps = finite.to(torch.int64)
        torch._foreach_add_([st["step"] for st in states], steps.unbind(0))
        torch._foreach_add_([st["skipped_steps"] for st in states], (1 - steps).unbind(0))
        return ~finite.all()


def stacked(tensors: list[Tensor]) -> Tensor:
    """The tensors stacked along a new leading dimension; one tensor as a view of itself."""
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


def _kept_where_skipped(entries: list[tuple[list[Tensor], Tensor]], ok: Tensor) -> tuple[list, list]:
    """The targets and values of a bucket's write: each entry is the L layers' tensors of one kind (a factor,
    a state key) and their new values stacked (L, ...); a target takes its new value where its layer's ``ok``
    flag (L,) holds and keeps its own elsewhere. The entries of one dtype are selected together, side by side
    in one (L, total) buffer per side (new values cast to the targets' dtype, as a copy would round them):
    two concatenations and one ``torch.where`` a dtype, where a stack and a where per entry took twice the
    entries' number of launches (10 a bucket for LoRSum's factors and statistics, 18 for AdaPreLoRA's)."""
    L = ok.numel()
    groups: dict[torch.dtype, list] = {}
    for targets, new in entries:
        groups.setdefault(targets[0].dtype, []).append((targets, new.to(targets[0].dtype)))
    all_targets, values = [], []
    for group in groups.values():
        rows = [new.reshape(L, -1) for _, new in group]
        new_rows = rows[0] if len(rows) == 1 else torch.cat(rows, 1)
        old_rows = torch.cat([targets[l].reshape(-1) for l in range(L) for targets, _ in group])
        kept = torch.where(ok.view(L, 1), new_rows, old_rows.view(L, -1))
        for (targets, new), part in zip(group, kept.split([row.shape[1] for row in rows], 1)):
            all_targets += targets
            values += [row.view(new.shape[1:]) for row in part.unbind(0)]  # a row's slice is contiguous
    return all_targets, values


def _foreach_write(device: torch.device) -> bool:
    """Whether ``_write_bucket`` writes bucket-wide with foreach ops (accelerators) or layer by layer
    (CPU)."""
    return device.type != "cpu"
