"""What every Triton launcher shares: the launch plan, the device it plans for, input checks, fp64 scalars.

Contract:

* A launcher splits into a *plan*, a pure function of shapes, dtypes and a :class:`Target` that decides
  everything fixed before a launch (grid, constexprs such as block sizes and the accumulator dtype,
  ``num_warps``, ``num_stages``) and returns a :class:`LaunchPlan`, and the launch itself,
  ``plan.launch(*args)`` with the runtime arguments (pointers, sizes, strides) in the kernel's order.
  Plans need no device, so ``tests/test_triton_compile.py`` compiles, for real GPU targets, exactly
  the kernels a launcher would run there.
* :class:`Target` is what a plan needs to know of the device: its SM count, or that the kernels run in
  Triton's interpreter. :func:`target_of` reads it for a launch.
* :func:`check_device` raises a clear error for tensors a kernel cannot run on: CPU tensors unless the
  kernel is interpreted (Triton reads ``TRITON_INTERPRET`` when ``triton.jit`` decorates, i.e. when
  the kernel's module is imported), devices other than CPU and CUDA, tensors on different devices.
* :func:`f64_bits` turns a Python float into the int64 bit pattern of its fp64 value: Triton types every
  Python float argument as fp32, compiled and interpreted, which would round an fp64 EMA coefficient or
  ridge. Kernels declare such an argument ``tl.int64`` and ``do_not_specialize`` (one compiled kernel for
  every value) and get the exact value back with :func:`f64_from_bits`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import struct
from collections.abc import Mapping
from typing import Any

import torch
import triton
import triton.language as tl


@dataclasses.dataclass(frozen=True)
class Target:
    """The device a plan is made for: ``sm_count`` streaming multiprocessors, or the interpreter."""

    sm_count: int
    interpret: bool = False

    @property
    def programs(self) -> int:
        """Programs that keep every SM busy (a few per SM); 1 in the interpreter, where more only cost
        time."""
        return 1 if self.interpret else 4 * self.sm_count


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """One launch of ``kernel`` with everything but its runtime arguments decided."""

    kernel: Any  # a @triton.jit function
    grid: tuple[int, ...]
    constexprs: Mapping[str, Any]
    num_warps: int
    num_stages: int

    @property
    def options(self) -> dict[str, Any]:
        """The compiler options of the launch."""
        # FMA contraction pinned: Triton's default until 3.9, which warns that 3.10 turns it off; the
        # results then do not change with the Triton release.
        return {"num_warps": self.num_warps, "num_stages": self.num_stages, "enable_fp_fusion": True}

    def launch(self, *args) -> None:
        self.kernel[self.grid](*args, **self.constexprs, **self.options)


def acc_type(dtype: torch.dtype) -> tl.dtype:
    """The Triton accumulator type for a torch working dtype (fp32 or fp64)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def interpreted(kernel) -> bool:
    """Whether ``kernel`` runs in Triton's interpreter (decorated while ``TRITON_INTERPRET=1``)."""
    return not isinstance(kernel, triton.runtime.JITFunction)


def check_device(op: str, kernel, *tensors: torch.Tensor) -> torch.device:
    device = tensors[0].device
    for t in tensors[1:]:
        if t.device != device:
            raise RuntimeError(f"{op}: all tensors must be on one device, got {device} and {t.device}")
    if device.type == "cpu":
        if not interpreted(kernel):
            raise RuntimeError(
                f"{op}: Triton runs on CPU tensors only in its interpreter; set TRITON_INTERPRET=1 "
                "before triton is imported"
            )
    elif device.type != "cuda":
        raise RuntimeError(f"{op}: Triton does not run on {device.type} tensors")
    return device


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def target_of(device: torch.device, kernel) -> Target:
    if interpreted(kernel):
        return Target(sm_count=1, interpret=True)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return Target(sm_count=_sm_count(index))


def device_guard(device: torch.device):
    """Triton launches on the current CUDA device, which need not be the tensors' one."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def f64_bits(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


@triton.jit
def f64_from_bits(bits):
    """The fp64 value whose bit pattern :func:`f64_bits` passed as an integer argument."""
    # The interpreter ignores the tl.int64 annotation and passes small values as int32.
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


# torch's clamps propagate NaN; tl.maximum and tl.minimum return the other operand unless told otherwise.
PROPAGATE_NAN = tl.constexpr(tl.PropagateNan.ALL)


@triton.jit
def sqrt_ieee(x):
    """The correctly rounded square root, as torch's: sqrt_rn in fp32 (tl.sqrt is an approximation there),
    tl.sqrt in fp64 (already IEEE)."""
    if x.dtype == tl.float32:
        return tl.sqrt_rn(x)
    return tl.sqrt(x)


@triton.jit
def div_ieee(a, b):
    """The correctly rounded quotient, as torch's: div_rn in fp32 (``/`` is an approximation there), ``/`` in
    fp64 (already IEEE)."""
    if a.dtype == tl.float32:
        return tl.div_rn(a, b)
    return a / b


FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_float(op: str, name: str, t: torch.Tensor, dtypes=FLOAT_DTYPES) -> None:
    if t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{op}: {name} must be one of {names}, got {t.dtype}")
    if t.layout != torch.strided:
        raise TypeError(f"{op}: {name} must be a dense (strided) tensor")
