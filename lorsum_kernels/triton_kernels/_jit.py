"""Plumbing shared by the Triton launchers: lazy kernel compilation, device checks, fp64 scalars.

Contract:

* :func:`kernel` wraps a kernel's Python function. ``kernel_obj[grid](...)`` launches it exactly as a
  ``@triton.jit`` function would, but the function is handed to ``triton.jit`` at its first launch, once
  per Triton mode (compiled or interpreted), not when the module is imported. ``triton.jit`` reads
  ``TRITON_INTERPRET`` when it decorates (an env read, in triton 3.6 through 3.9), so a kernel decorated
  at import would keep whatever mode was set then: a process that imported this package before setting
  ``TRITON_INTERPRET=1`` (a test suite, a notebook) would try to compile for a GPU it does not have.
  Kernels written for this wrapper call no other jitted function, whose mode would be fixed at import:
  neither helpers of ours nor triton.language's own (``tl.sum``, ``tl.cdiv``, ``tl.zeros``; see
  ``_lang``). So they run in the mode TRITON_INTERPRET has at launch, whenever triton was imported.
* :func:`check_device` raises a clear error for tensors Triton cannot run on: CPU tensors outside the
  interpreter, devices other than CPU and CUDA, and tensors on different devices.
* :func:`f64_bits` turns a Python float into the int64 bit pattern of its fp64 value. Triton types every
  Python float argument as fp32, which would round the EMA coefficient or the scale of an fp64 metric;
  kernels get the exact value back with ``bits.to(tl.int64).to(tl.float64, bitcast=True)``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import struct
from collections.abc import Callable, Iterable

import torch


def interpret_mode() -> bool:
    """Whether ``triton.jit`` would build an interpreted function now."""
    import triton

    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"  # before triton.knobs existed


class LazyKernel:
    """A kernel function jitted at its first launch in each Triton mode (see the module docstring)."""

    def __init__(self, fn: Callable, do_not_specialize: Iterable[str] = ()):
        self.fn = fn
        self.do_not_specialize = list(do_not_specialize)
        self._jitted: dict[bool, object] = {}
        functools.update_wrapper(self, fn)

    def jitted(self):
        import triton

        mode = interpret_mode()
        if mode not in self._jitted:
            self._jitted[mode] = triton.jit(self.fn, do_not_specialize=self.do_not_specialize)
        return self._jitted[mode]

    def __getitem__(self, grid):
        return self.jitted()[grid]


def kernel(fn: Callable | None = None, *, do_not_specialize: Iterable[str] = ()):
    """Decorator: ``@kernel`` or ``@kernel(do_not_specialize=(...))`` in place of ``@triton.jit``."""
    if fn is None:
        return lambda f: LazyKernel(f, do_not_specialize)
    return LazyKernel(fn, do_not_specialize)


def check_device(op: str, *tensors: torch.Tensor) -> torch.device:
    device = tensors[0].device
    for t in tensors[1:]:
        if t.device != device:
            raise RuntimeError(f"{op}: all tensors must be on one device, got {device} and {t.device}")
    if device.type == "cpu":
        if not interpret_mode():
            raise RuntimeError(
                f"{op}: Triton runs on CPU tensors only in its interpreter; set TRITON_INTERPRET=1"
            )
    elif device.type != "cuda":
        raise RuntimeError(f"{op}: Triton does not run on {device.type} tensors")
    return device


def device_guard(device: torch.device):
    """Triton launches on the current CUDA device, which need not be the tensors' one."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def f64_bits(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def target_programs(device: torch.device) -> int:
    """Programs that keep every SM busy (a few per SM); 1 in the interpreter, where more only cost time."""
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    return 4 * _sm_count(index)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_float(op: str, name: str, t: torch.Tensor, dtypes=FLOAT_DTYPES) -> None:
    if t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{op}: {name} must be one of {names}, got {t.dtype}")
    if t.layout != torch.strided:
        raise TypeError(f"{op}: {name} must be a dense (strided) tensor")
