"""The step inside backward: each layer's data-dependent work runs while its X and S are alive.

Contract (the optimizers' ``capture=`` and ``accumulation_steps=`` arguments):

* ``capture="stream"``: the capture hands each layer's (X, S) to ``StreamedStep.take`` during backward,
  which runs the method's whole step for that layer right there (its k ALS rounds, momentum, statistics,
  the non-finite check; under data parallelism the collectives too, in backward order, the same on every
  rank) and keeps only the result: the new factors and state, O((m+n)·r) per layer. Nothing per token
  outlives the layer's backward (on the CPU: the backward; below). ``step()`` then writes every result;
  the factors autograd still needs are never changed during backward. Needs the step's gradient scaling
  up front, so it refuses ``max_grad_norm`` (the global norm is known only after the last layer's
  backward) and a GradScaler (its scale reaches ``step()`` only).
* Two kinds of layer step (``LoRAOptimizer._steps_from_token_sums``, per parameter group):

  - **token sums** (LoRSum and ScaledLoRSum with ``iters=0``, the latter with ``metric="kfac"``): the step
    reads X and S only through sums over tokens of products with operands fixed during backward (the
    factors, the momentum factors; the K-FAC column sums of squares and token counts). Those sums add over
    backwards exactly, so every backward of the step (gradient-accumulation micro-batches, a module called
    several times) adds its sums to the layer's running sums (O((m+n)·r) numbers, all that is kept), and
    ``step()`` computes the step from them, batched by bucket: the step of all of the backwards. Under data
    parallelism the running sums are averaged over ranks there (one collective per bucket and token sum,
    none in backward), so ranks may run different numbers of backwards (a layer unused on a rank adds zero).
  - **whole step** (every other configuration: ALS rounds k ≥ 1 multiply by the previous round's result,
    the Shampoo diagonal and AdaPreLoRA's exact energies are quadratic in the step's G, SVDLoRA forms G):
    exact only when the layer sees one backward per step, the hook then holding all of the step's tokens.

* ``capture="cache"``: X and S are kept until ``step()`` (everything works; the memory is the cache's).
* ``capture="auto"`` (default): the first step caches; from the next step on token-sum layers stream, and
  whole-step layers stream when that step had exactly one backward per layer on every rank. No
  ``max_grad_norm``, no GradScaler (``max_update_norm`` clips the streamed step: it scales results, which
  all exist before ``step()`` writes). ``accumulation_steps=N > 1`` says up front that whole-step layers
  never stream: they are cached, the token-sum layers streamed.
* On the CPU, in one process, the layer steps run in short batches: each layer's (X, S) waits in a queue
  until the next would take it past ``stream_batch_bytes`` (default 64 MiB; a layer larger than that runs
  at once) or backward ends (an autograd final callback), and the queued steps then run in a row, the
  last queued first (its data are the likeliest still in cache). Right
  after a layer's GEMMs its step runs cold (the GEMMs evicted the code and data its dispatched calls
  touch, each costing tens to hundreds of µs there against a few warm: docs/step_cost.md); in a row, all
  but the first run warm. So at most that many bytes of X and S outlive their layers' backward, and
  nothing outlives the backward. Accelerators (asynchronous launches, nothing cold) and data parallelism
  (each layer's collectives stay in its backward) run every layer's step in its own backward;
  ``stream_batch_bytes=0`` does so on the CPU too.
* Never a silently wrong step: a second backward reaching a streamed whole-step layer before ``step()``
  raises in that backward, drops the step's streamed results, and ``step()`` then refuses; ``auto`` caches
  whole-step layers from then on. Hyperparameters are read at backward: a group option changed between
  the last backward and ``step()`` (a scheduler stepped first) raises in ``step()``. A backward discarded
  by zeroing the gradients drops its results and running sums, as the capture drops its records.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from ..lora import LoRALayer
from .guards import finite_rows_of

if TYPE_CHECKING:
    from .base import LoRAOptimizer

__all__ = ["CAPTURE_MODES", "LayerResults", "StreamedStep", "check_capture_options", "check_stream_groups"]

CAPTURE_MODES = ("auto", "cache", "stream")
# How many bytes of X and S the CPU's streamed layer steps may wait with, by default (module docstring).
DEFAULT_CPU_BATCH_BYTES = 64 << 20


def check_capture_options(capture, accumulation_steps, max_grad_norm, stream_batch_bytes=None) -> None:
    if stream_batch_bytes is not None and (
        isinstance(stream_batch_bytes, bool) or not isinstance(stream_batch_bytes, int) or stream_batch_bytes < 0
    ):
        raise ValueError(f"stream_batch_bytes must be an integer >= 0 or None, got {stream_batch_bytes!r}")
    if capture not in CAPTURE_MODES:
        raise ValueError(f"capture must be one of {CAPTURE_MODES}, got {capture!r}")
    if accumulation_steps is not None and (
        isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int) or accumulation_steps < 1
    ):
        raise ValueError(f"accumulation_steps must be a positive integer or None, got {accumulation_steps!r}")
    if capture == "stream" and max_grad_norm is not None:
        raise ValueError(
            "capture='stream' cannot clip: the global gradient norm is known only after the last layer's "
            "backward, when the streamed steps have run; use capture='cache' with max_grad_norm"
        )


def check_stream_groups(optimizer: "LoRAOptimizer", capture: str, accumulation_steps) -> None:
    """``capture="stream"`` with accumulation needs every group's step to come from token sums."""
    if capture != "stream" or (accumulation_steps or 1) == 1:
        return
    if not all(optimizer._steps_from_token_sums(g) for g in optimizer._lora_groups()):
        raise ValueError(
            f"capture='stream' with accumulation_steps={accumulation_steps}: {type(optimizer).__name__} at these "
            "options needs all of a step's tokens at once in each layer's backward (only iters=0 steps, with "
            "metric='kfac' for ScaledLoRSum, add over micro-batches); use capture='auto' (which caches those "
            "layers) or capture='cache'"
        )


def _options(group: dict) -> dict:
    """The group's hyperparameters as read at backward (plain values only; tensors by identity)."""
    return {k: v for k, v in group.items() if k != "params"}


class _RunningSums:
    """The ``reduce`` of one layer-step computation in backward: each token sum the step passes through it
    is added to the running sum of the step's earlier backwards, and the running sum is used in its place."""

    def __init__(self, sums: list[list[Tensor]]):
        self.sums = sums  # one list of tensors per reduce call of the step, in call order
        self.calls = 0

    def __call__(self, tensors) -> list[Tensor]:
        tensors = list(tensors)
        if self.calls == len(self.sums):
            self.sums.append(tensors)
        else:
            self.sums[self.calls] = [total + t for total, t in zip(self.sums[self.calls], tensors)]
        self.calls += 1
        return self.sums[self.calls - 1]


class _StepSums:
    """The ``reduce`` of the step computed in ``step()`` from zero-token stand-ins of the data: the bucket's
    running sums (stacked over its layers) in place of the local ones, averaged over ranks when
    ``rank_average`` is given."""

    def __init__(self, per_layer: list[list[list[Tensor]]], rank_average):
        self.per_layer = per_layer
        self.rank_average = rank_average
        self.calls = 0

    def __call__(self, tensors) -> list[Tensor]:
        call = self.calls
        self.calls += 1
        sums = [torch.cat(parts) for parts in zip(*(layer_sums[call] for layer_sums in self.per_layer))]
        return sums if self.rank_average is None else self.rank_average(sums)


class _LayerSums:
    """A token-sum layer's running sums over this step's backwards, whether all it read was finite, and the
    group options they were taken under."""

    def __init__(self, layer: LoRALayer, group: dict):
        self.layer, self.group, self.options = layer, group, _options(group)
        self.sums: list[list[Tensor]] = []
        self.finite: Tensor | None = None
        # Zero-token stand-ins of the layer's data for the step computed in step(), in the factors' dtype
        # whatever the data's (the sums are in the math dtype either way): buckets then match over ranks.
        self.empty = _zero_tokens(layer)


def _held_bytes(X: Tensor, S: Tensor, pending: list[tuple]) -> int:
    """The bytes that queueing (X, S) behind ``pending`` keeps alive: those of X and S, less a tensor that
    the queue holds already (q, k and v share their X, gate and up theirs)."""
    held = {(t.data_ptr(), t.shape) for *_, X_p, S_p in pending for t in (X_p, S_p)}
    return sum(t.numel() * t.element_size() for t in (X, S) if (t.data_ptr(), t.shape) not in held)


def _joined(tensors: list[Tensor]) -> Tensor:
    """The layers' results (each with its leading layer dimension) as one bucket."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _zero_tokens(layer: LoRALayer) -> tuple[Tensor, Tensor]:
    """(X, S) of no tokens for ``layer``, in its factors' dtype and device."""
    return layer.A.new_empty((0, layer.in_features)), layer.A.new_empty((0, layer.out_features))


class LayerResults(NamedTuple):
    """A bucket's results kept layer by layer (``StreamedStep.collect``, for the normalised step's in-place
    finish, ``LoRAOptimizer._write_normalized``): per layer the new factors A (1, r, n) and B (1, m, r),
    times √s when ``balanced``, and each new state value (leading dimension 1); ``finite`` the (L,) flag of
    what was checked already (None: nothing), ``skip`` the group's device skip flag."""

    group: dict
    layers: list
    A: list
    B: list
    state: dict
    finite: Tensor | None
    skip: Tensor | None
    balanced: bool


class StreamedStep:
    """Per-layer results of the step computed in backward, until ``step()`` writes them."""

    def __init__(self, optimizer: "LoRAOptimizer", mode: str, accumulation_steps: int | None,
                 batch_bytes: int | None = None):
        self.optimizer = optimizer
        self.mode = mode
        # The CPU's queue of layers whose step has not run yet: (layer, group, X, S), in backward order.
        self.batch_bytes = DEFAULT_CPU_BATCH_BYTES if batch_bytes is None else batch_bytes
        self.pending: list[tuple] = []
        self.pending_bytes = 0
        self.prepared: dict = {}  # id(layer) -> (its prepared step, group options), in a flush
        self.flush_task = None  # the backward (graph task id) whose end flushes the queue
        # id(layer) -> (layer, group, options, A, B, state, finite, results_unchecked): whole-step results
        self.results: dict[int, tuple] = {}
        self.sums: dict[int, _LayerSums] = {}  # id(layer) -> running token sums (token-sum layers)
        self.refusal: str | None = None  # why the step's streamed results were dropped
        # Whether whole-step layers stream (they need one backward per step); token-sum layers always do.
        self.whole_steps = (accumulation_steps or 1) == 1
        self.auto_off = mode == "cache" or (mode == "auto" and optimizer.max_grad_norm is not None)
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

    def _token_sum_groups(self) -> bool:
        opt = self.optimizer
        return any(opt._steps_from_token_sums(g) for g in opt._lora_groups())

    # backward --------------------------------------------------------------------------------------

    def take(self, layer: LoRALayer, X: Tensor, S: Tensor) -> bool:
        """The capture's sink: True when this object takes the pair (its step runs now or from the queue),
        False when the capture is to cache it."""
        opt = self.optimizer
        group = opt._group_of(layer)
        opt._check_options_fit_layer(group, layer)  # a scheduler may have changed them since step()
        if not opt._steps_from_token_sums(group):
            if not self.whole_steps:
                return False  # cached: this layer's step needs all of the step's tokens at once
            if id(layer) in self.results or any(entry[0] is layer for entry in self.pending):
                self._refuse_second_backward(layer)
        if self._queues(X):
            held = _held_bytes(X, S, self.pending)
            if self.pending and self.pending_bytes + held > self.batch_bytes:
                self.flush()  # the queue never holds more than batch_bytes
                held = _held_bytes(X, S, self.pending)
            if held <= self.batch_bytes and self._flush_at_end_of_backward():
                self.pending.append((layer, group, X, S))
                self.pending_bytes += held
                return True
        self.run(layer, group, X, S)  # a layer larger than the budget runs at once
        return True

    def run(self, layer: LoRALayer, group: dict, X: Tensor, S: Tensor) -> None:
        """The layer's step from this backward's (X, S): added to its running token sums, or its whole
        step computed and kept for ``step()``. (The benchmarks time the streamed work here.)"""
        prepared = self.prepared.pop(id(layer), None)
        if prepared is not None:  # the queue's one-layer path (prepare): the native work and the result
            run, options = prepared
            with torch.no_grad():
                result = run()
            if result is not None:
                A, B, state, finite, balanced = result
                self.results[id(layer)] = (layer, group, options, A, B, state, finite, True, balanced)
                return
        if self.optimizer._steps_from_token_sums(group):
            self._add_token_sums(layer, group, X, S)
        else:
            self._whole_step(layer, group, X, S)

    def flush(self) -> None:
        """Runs the queued layer steps, the one queued last first. Its X and S went through the cache last
        (its layer's backward had just read them), so where the queue outgrows the cache the last layers'
        data are still in it; each step run after them then evicts the data of a step already run (the
        least recently used), where in backward order it would evict those of the steps to come."""
        while self.pending:
            queue, self.pending, self.pending_bytes = self.pending[::-1], [], 0
            try:
                self.prepare(queue)
                for entry in queue:
                    self.run(*entry)
            finally:
                self.prepared.clear()

    def prepare(self, queue: list[tuple]) -> None:
        """Builds the arguments of the queued layer steps that have a one-layer path
        (``LoRAOptimizer._prepare_one_layer_step``), all before any runs: each step streams megabytes of X
        and S through the cache, evicting the Python's own data, so the Python of a step run between two
        others ran cold, several times its warm time (docs/step_cost.md). ``run`` then runs the native
        work, and keeps its result with the group's options read here, once per group (their copy per layer,
        made between two runs, was cold too). (The benchmarks time the streamed work here and in ``run``.)"""
        opt = self.optimizer
        if opt._reduce is not None or opt._uses_grads():
            return  # the one-layer paths apply in one process, to methods that read no .grad
        options: dict = {}  # id(group) -> the group's options, or None where its steps come from token sums
        with torch.no_grad():
            for layer, group, X, S in queue:
                key = id(group)
                if key not in options:
                    options[key] = None if opt._steps_from_token_sums(group) else _options(group)
                if options[key] is not None:
                    prepared = opt._prepare_one_layer_step(group, layer, X, S)
                    if prepared is not None:
                        self.prepared[id(layer)] = (prepared, options[key])

    def _queues(self, X: Tensor) -> bool:
        return (self.batch_bytes > 0 and X.device.type == "cpu" and self.optimizer._reduce is None
                and not torch.compiler.is_compiling())

    def _flush_at_end_of_backward(self) -> bool:
        """Makes sure the queue is flushed when the running backward ends; False outside a backward (the
        step then runs at once)."""
        current = getattr(torch._C, "_current_graph_task_id", None)  # private: absent, nothing queues
        task = -1 if current is None else current()
        if task == -1:
            return False
        if task != self.flush_task:  # once per backward (a backward that raised never ran its callback)
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
            self.flush_task = task
        return True

    def _end_of_backward(self) -> None:
        self.flush_task = None
        self.flush()

    def _refuse_second_backward(self, layer: LoRALayer) -> None:
        self.results.clear()
        self.sums.clear()
        self.pending, self.pending_bytes = [], 0
        self.refusal = (
            f"{layer.name} received a second backward before step() while its step was streamed in the "
            "first (gradient accumulation, or a module called twice per step): the streamed step saw "
            "only part of the batch, so this step's streamed results were dropped. Pass "
            "accumulation_steps=N (or capture='cache') to the optimizer"
        )
        if self.mode == "auto":  # whole-step layers are cached from now on
            self.whole_steps = False
            if not self._token_sum_groups():
                self.stop()
                self.auto_off = True
        raise RuntimeError(self.refusal)

    def _whole_step(self, layer: LoRALayer, group: dict, X: Tensor, S: Tensor) -> None:
        opt = self.optimizer
        # In one process the results' finiteness is checked in step() (collect), warm, rather than here
        # right after the layer's GEMMs; under data parallelism the ranks agree on it here, in backward
        # order. Methods that compute factor gradients from the data check those here (they are not kept).
        results_unchecked = opt._reduce is None and not opt._uses_grads()
        with torch.no_grad():
            prepared = opt._prepare_one_layer_step(group, layer, X, S) if results_unchecked else None
            result = None if prepared is None else prepared()
            if result is None:
                result = (*opt._compute_bucket(group, [layer], [(X, S)], grads_from_data=True,
                                               check_results=not results_unchecked), False)
        A, B, state, finite, balanced = result
        self.results[id(layer)] = (layer, group, _options(group), A, B, state, finite, results_unchecked,
                                   balanced)

    def _add_token_sums(self, layer: LoRALayer, group: dict, X: Tensor, S: Tensor) -> None:
        """Adds this backward's token sums to the layer's running sums. They are what the method's step passes
        to ``reduce``, so the step runs here with ``_RunningSums`` as its reduce; only the sums and the
        finiteness of what it read are kept (``write`` computes the step from the sums, batched)."""
        layer_sums = self.sums.get(id(layer))
        if layer_sums is None:
            layer_sums = self.sums[id(layer)] = _LayerSums(layer, group)
        layer_sums.options = _options(group)
        with torch.no_grad():
            *_, finite = self.optimizer._compute_bucket(
                group, [layer], [(X, S)], grads_from_data=True, reduce=_RunningSums(layer_sums.sums))
        layer_sums.finite = finite if layer_sums.finite is None else layer_sums.finite & finite

    def discard(self, layer: LoRALayer) -> None:
        """The layer's gradients were reset after a backward whose step never ran: its result goes."""
        self.results.pop(id(layer), None)
        self.sums.pop(id(layer), None)
        kept = [entry for entry in self.pending if entry[0] is not layer]
        if len(kept) != len(self.pending):
            self.pending, self.pending_bytes = [], 0
            for entry in kept:
                self.pending_bytes += _held_bytes(entry[2], entry[3], self.pending)
                self.pending.append(entry)

    def has_result(self, layer: LoRALayer) -> bool:
        return id(layer) in self.results or id(layer) in self.sums or any(e[0] is layer for e in self.pending)

    # step ------------------------------------------------------------------------------------------

    def check(self, loss_scaled: bool) -> None:
        """Raises, before anything changes, when this step's streamed results cannot be written."""
        opt = self.optimizer
        self.flush()  # a backward that raised ended without its final callback
        if opt._reduce is not None and self.active and self._token_sum_groups():
            # collect() recomputes the token-sum layers' steps with collectives per bucket: every rank must
            # have the same layers. One with a backward on some rank but not here takes part with zero
            # sums (zero tokens), as the cached step's layers do (one collective; same condition on all).
            has = torch.tensor([id(layer) in self.sums for layer in opt._layers], dtype=torch.int32,
                               device=opt._layers[0].A.device)
            _, anywhere = opt._reduce.min_max(has)
            for layer, elsewhere in zip(opt._layers, anywhere.tolist()):
                if elsewhere and id(layer) not in self.sums:
                    self._add_token_sums(layer, opt._group_of(layer), *_zero_tokens(layer))
        if self.refusal is not None:
            refusal, self.refusal = self.refusal, None
            raise RuntimeError(refusal)
        if not self.results and not self.sums:
            return
        if loss_scaled:
            raise RuntimeError(
                "the step was streamed in backward from loss-scaled output gradients, and a GradScaler's scale "
                "reaches step() only: use capture='cache' (or 'auto', which does) with GradScaler"
            )
        taken = [(layer, group, options) for layer, group, options, *_ in self.results.values()]
        taken += [(e.layer, e.group, e.options) for e in self.sums.values()]
        for layer, group, options in taken:
            if _options(group) != options:
                changed = sorted(k for k in options if options[k] != group.get(k))
                raise RuntimeError(
                    f"the options {changed} of {layer.name}'s group changed between backward, where its step "
                    "was streamed, and step(): step the LR scheduler after optimizer.step(), as torch expects"
                )

    def collect(self, skip_of) -> list[tuple]:
        """Every streamed layer's result, for the optimizer to write: ``(group, layers, A_new, B_new,
        new_state, finite, skip)`` per bucket, ``skip_of(group)`` being the group's device skip flag. The
        token-sum layers' steps are computed here, from their running sums; the whole-step layers' results
        (one per layer) are stacked into buckets of one group and shape, in the optimizer's layer order, so
        that their checks, normalisation and writes run once per bucket; a bucket that the normalised step
        finishes in place (``LoRAOptimizer._finishes_in_place``) as ``LayerResults``, unjoined. The results
        are dropped."""
        opt = self.optimizer
        out = self._from_sums(skip_of) if self.sums else []
        buckets: dict[tuple, list[tuple]] = {}
        for layer in opt._layers:
            entry = self.results.pop(id(layer), None)
            if entry is not None:
                _, group, _, A, B, state, finite, unchecked, balanced = entry
                key = (id(group), tuple(A.shape), tuple(B.shape), A.dtype, A.device, tuple(state),
                       finite is None, unchecked, balanced)
                buckets.setdefault(key, []).append(entry)
        for entries in buckets.values():
            layers, group, unchecked = [e[0] for e in entries], entries[0][1], entries[0][7]
            finite = None if entries[0][6] is None else _joined([e[6] for e in entries])
            if opt._finishes_in_place(group, layers, entries[0][3]):
                # The layers' results as they are, for the normalised step's in-place finish, which checks
                # them itself (no join, no division by √s, no separate pass for the check).
                state = {key: [e[5][key] for e in entries] for key in entries[0][5]}
                A, B = [e[3] for e in entries], [e[4] for e in entries]
                out.append(LayerResults(group, layers, A, B, state, finite, skip_of(group), entries[0][8]))
                continue
            A, B = (_joined([e[k] for e in entries]) for k in (3, 4))
            if entries[0][8]:  # balanced factors (√s·A, √s·B) from a one-layer path: back to A and B here
                root = opt._scale_root([layer.scale for layer in layers], A.dtype, A.device)
                if len(entries) > 1:  # in the bucket just joined (no fresh pages for a copy of it)
                    A, B = A.div_(root), B.div_(root)
                else:
                    A, B = A / root, B / root
            state = {key: _joined([e[5][key] for e in entries]) for key in entries[0][5]}
            if unchecked:  # the results' check that the layer steps left for here
                results_ok = finite_rows_of([A, B, *state.values()], len(layers))
                finite = results_ok if finite is None else finite & results_ok
            if opt._uses_grads():  # a non-finite .grad skips the layer, as in the cached step
                finite = finite & opt._factor_grads_finite(layers).to(finite.device)
            out.append((group, layers, A, B, state, finite, skip_of(group)))
        self.results.clear()
        self.sums.clear()
        return out

    def _from_sums(self, skip_of) -> list[tuple]:
        """The token-sum layers' steps from their running sums (rank-averaged under data parallelism),
        batched by bucket in the optimizer's layer order (the same on every rank)."""
        opt = self.optimizer
        buckets: dict[tuple, list[_LayerSums]] = {}
        for layer in opt._layers:
            entry = self.sums.pop(id(layer), None)
            if entry is not None:
                key = (id(entry.group), tuple(layer.A.shape), tuple(layer.B.shape), layer.A.dtype)
                buckets.setdefault(key, []).append(entry)
        out = []
        for entries in buckets.values():
            layers, group = [e.layer for e in entries], entries[0].group
            with torch.no_grad():
                A, B, state, finite = opt._compute_bucket(
                    group, layers, [e.empty for e in entries],
                    reduce=_StepSums([e.sums for e in entries], opt._reduce))
            finite = finite & torch.cat([e.finite for e in entries])
            if opt._reduce is not None:
                finite = opt._reduce.all_ranks(finite)
            out.append((group, layers, A, B, state, finite, skip_of(group)))
        return out

    def after_cached_step(self, pairs_per_layer: list[int], loss_scaled: bool) -> None:
        """``auto``: after a cached step, token-sum layers stream from the next step on; whole-step layers
        too when this step had one backward per layer on every rank (their collectives run in each layer's
        backward, so every rank must reach the same layers); a step with accumulation, a module called
        twice or uneven ranks means never for them. Nothing starts under a GradScaler."""
        if self.auto_off or self.active or self.mode != "auto" or loss_scaled:
            return
        opt = self.optimizer
        low = high = pairs_per_layer
        if opt._reduce is not None:
            counts = torch.tensor(pairs_per_layer, device=opt._layers[0].A.device)
            low, high = (t.tolist() for t in opt._reduce.min_max(counts))
        token_sums = [opt._steps_from_token_sums(opt._group_of(layer)) for layer in opt._layers]
        whole = [(lo, hi) for lo, hi, sums in zip(low, high, token_sums) if not sums]
        if any(hi > 1 or lo != hi for lo, hi in whole):
            self.whole_steps = False
        if any(hi >= 1 for hi, sums in zip(high, token_sums) if sums) or (
                self.whole_steps and any(hi == 1 for _, hi in whole)):
            self.start()
        elif not self.whole_steps and not any(token_sums):
            self.auto_off = True

    def saved_mode(self):
        """What a checkpoint records: False (caching), True (streaming) or "token_sums" (streaming the
        token-sum layers only)."""
        if not self.active:
            return False
        return True if self.whole_steps else "token_sums"

    def resume(self, saved) -> None:
        """A checkpoint saved while ``auto`` streamed: stream from the next backward on, as it did."""
        if self.mode == "auto" and not self.auto_off and not self.optimizer._capture.removed:
            self.whole_steps = saved is True
            self.start()

    def clear(self) -> None:
        """The gradients were discarded (``optimizer.zero_grad``): so are the results and any refusal."""
        self.results.clear()
        self.sums.clear()
        self.pending, self.pending_bytes = [], 0
        self.refusal = None
