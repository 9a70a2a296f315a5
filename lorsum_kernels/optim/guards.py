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
    """``finite_rows`` of every tensor, and-ed, in 2·len(tensors) + 4 ops (kernel launches on a GPU, each
    paid for by the host in the streamed step, once per layer in backward): each tensor's slice maxima and
    minima, stacked into one tensor, whose entries are finite exactly where ``x − x == 0`` (±inf − ±inf and
    NaN − NaN are NaN). ``isfinite`` is four kernels on CUDA (abs, ≠ inf, x == x, and), and was taken per
    tensor twice: 11 per tensor."""
    extremes = []
    for t in tensors:
        flat = t.reshape(rows, -1)
        if flat.shape[1] > 0:  # an empty slice is finite
            extremes += [flat.amax(1), flat.amin(1)]
    if not extremes:
        device = tensors[0].device if tensors else None
        return torch.ones(rows, dtype=torch.bool, device=device)
    return _finite(extremes).all(0)


def _finite(extremes: list[Tensor]) -> Tensor:
    """The extremes stacked (dtypes promote: ±inf and NaN stay what they are), and where each is finite:
    ``x − x == 0`` (±inf − ±inf and NaN − NaN are NaN), two ops for all."""
    both = torch.stack(extremes)
    return both.sub(both).eq(0)


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
    """(len(tensors),) bool: whether each tensor is entirely finite (an empty one is), by the extremes:
    2·len(tensors) reductions and 4 ops for all (``finite_rows`` one tensor at a time: 6 each)."""
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
