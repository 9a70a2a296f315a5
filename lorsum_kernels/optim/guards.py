"""Device-side flags of the step's guards: which layers may step (everything they read and would write is
finite) and how skip flags combine. Nothing here reads a value on the host, except on the CPU, where the
tensor is the host's (``finite_data``)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["either", "finite_data", "finite_each", "finite_once", "finite_rows", "finite_rows_of",
           "host_waits_for"]


def host_waits_for(device: torch.device) -> bool:
    """Whether reading a tensor's value on the host waits for ``device``: every device but the CPU (the
    optimizers read values on the host only where this is False; tests/test_accelerator_sync_free.py)."""
    return device.type != "cpu"


def finite_rows(t: Tensor, rows: int) -> Tensor:
    """(rows,) bool: whether each of the ``rows`` leading slices of ``t`` is entirely finite.

    ``amax`` and ``amin`` propagate NaN and keep ±inf, so both are finite exactly when every element is:
    two fast contiguous reductions instead of the three passes and the mask of ``isfinite().all()``
    (about 10x faster on a 1024x384 fp32 tensor on the CPU; ``aminmax(dim=...)`` is the slowest of all).
    Empty slices are finite.
    """
    return _finite_extremes([t], rows)


def _finite_extremes(tensors: list[Tensor], rows: int) -> Tensor:
    """``finite_rows`` of every tensor, and-ed. On the CPU in 2·len(tensors) + 4 ops: each tensor's slice
    maxima and minima, stacked into one tensor, whose entries are finite exactly where ``x − x == 0`` (±inf −
    ±inf and NaN − NaN are NaN); ``isfinite`` would take four passes and a mask. On an accelerator, where each
    op is a kernel launch the host pays for (in the streamed step, once per layer in backward), in 5 ops
    whatever the number of tensors: ``_largest_magnitudes`` of every slice."""
    slices = [flat for t in tensors for flat in t.reshape(rows, -1).unbind(0)] if rows else []
    if not any(flat.numel() for flat in slices):  # an empty slice is finite
        device = tensors[0].device if tensors else None
        return torch.ones(rows, dtype=torch.bool, device=device)
    if _one_reduction_for_all(slices[0].device):
        return _is_finite(_largest_magnitudes(slices)).view(-1, rows).all(0)
    extremes = []
    for t in tensors:
        flat = t.reshape(rows, -1)
        if flat.shape[1] > 0:
            extremes += [flat.amax(1), flat.amin(1)]
    return _finite(extremes).all(0)


def _one_reduction_for_all(device: torch.device) -> bool:
    """Whether the finite checks on ``device`` take one multi-tensor reduction for all tensors
    (``_largest_magnitudes``: accelerators, where each op is a launch) or two reductions a tensor (the CPU,
    where a foreach op is a loop over the tensors and slicing them costs more)."""
    return device.type != "cpu"


def _largest_magnitudes(tensors: list[Tensor]) -> Tensor:
    """(len(tensors),) max |x| of each tensor (0 for an empty or an integer one), NaN where it holds a NaN
    and inf where an inf: finite exactly where the tensor is. One multi-tensor reduction for all
    (``torch._foreach_norm`` at ord = inf, which propagates NaN; a launch or two on CUDA, with the stack one
    more), each element read once where ``amax`` and ``amin`` read it twice in two launches a tensor."""
    present = [t for t in tensors if t.numel() and t.is_floating_point()]
    norms = iter(torch._foreach_norm(present, float("inf")) if present else ())
    zero = None
    values = []
    for t in tensors:
        if t.numel() and t.is_floating_point():
            values.append(next(norms))
        else:
            zero = torch.zeros((), dtype=t.dtype, device=t.device) if zero is None else zero
            values.append(zero)
    return torch.stack(values)


def _finite(extremes: list[Tensor]) -> Tensor:
    """The extremes stacked (dtypes promote: ±inf and NaN stay what they are), and where each is finite:
    ``x − x == 0`` (±inf − ±inf and NaN − NaN are NaN), two ops for all."""
    return _is_finite(torch.stack(extremes))


def _is_finite(x: Tensor) -> Tensor:
    """``x − x == 0``: two ops where ``isfinite`` is four kernels on CUDA."""
    return x.sub(x).eq(0)


def finite_rows_of(tensors: list[Tensor], rows: int) -> Tensor:
    """(rows,) bool: whether each of the ``rows`` leading slices is entirely finite in every tensor (each
    tensor's leading dimension is ``rows``).

    On the CPU, where a host check costs nothing, one sum per tensor settles the common case: a finite
    total is finite only if every element is (±inf and NaN propagate, and inf − inf is NaN); a non-finite
    total may also be an overflow of finite elements, which the exact ``finite_rows`` check then settles,
    as it does every check on an accelerator (no host synchronisation in the step). One reduction per
    tensor instead of two plus the flags' arithmetic.
    """
    if tensors and all(t.device.type == "cpu" for t in tensors):
        total = sum(t.sum() for t in tensors)
        if bool(total.isfinite()):
            return torch.ones(rows, dtype=torch.bool)
    return _finite_extremes(tensors, rows)


def finite_data(t: Tensor) -> Tensor:
    """0-d bool: whether every element of a captured X or S is finite, as ``finite_rows(t, 1)[0]``.

    On the CPU in one pass instead of two (these are the step's largest tensors, read once per layer in
    the streamed step), by ``finite_rows_of``'s sum (fp16's range is reached by a sum of moderate values:
    the exact check then settles it).
    """
    return finite_rows_of([t], 1)[0]


def finite_once(tensors: list[Tensor], cache: dict) -> Tensor:
    """(len(tensors),) bool: ``finite_data`` of each captured X or S, computed once per step for the
    tensors that several layers captured (``cache``, keyed by storage and layout, lives for a step).

    On an accelerator the tensors not yet in the cache are checked together: their maxima and minima in
    one stack, then the ``x − x == 0`` test of ``finite_rows``: 2 reductions each and 4 more ops for all
    (a layer's X and S in 9 ops with the result's stack, 15 one tensor at a time)."""
    keys = [(t.data_ptr(), t.shape, t.stride(), t.dtype, t.device) for t in tensors]
    new = {}
    for key, t in zip(keys, tensors):
        if key not in cache:
            new.setdefault(key, t)
    if new and all(t.device.type == "cpu" for t in new.values()):
        for key, t in new.items():  # one sum each (finite_data), settled on the host
            cache[key] = finite_data(t)
    elif new:
        flags = finite_each(list(new.values()))
        for i, key in enumerate(new):
            cache[key] = flags[i]
        if len(new) == len(keys):  # every tensor new and distinct, in order: the flags themselves
            return flags
    return torch.stack([cache[key] for key in keys])


def finite_each(tensors: list[Tensor]) -> Tensor:
    """(len(tensors),) bool: whether each tensor is entirely finite (an empty one is): on the CPU by the
    extremes, 2·len(tensors) reductions and 4 ops for all (``finite_rows`` one tensor at a time: 6 each); on
    an accelerator by ``_largest_magnitudes``, 5 ops for all."""
    if tensors and _one_reduction_for_all(tensors[0].device):
        return _is_finite(_largest_magnitudes(tensors))
    extremes = []
    for t in tensors:
        flat = t.reshape(-1)
        extremes += ([flat.amax(), flat.amin()] if flat.numel() else
                     [torch.zeros((), dtype=t.dtype, device=t.device)] * 2)
    return _finite(extremes).view(-1, 2).all(1)


def either(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None or b is None:
        return b if a is None else a
    return a | b.to(a.device)
