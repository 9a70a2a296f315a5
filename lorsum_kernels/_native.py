"""Loads the native extension ``lorsum_kernels._C`` and registers what torch needs to know about its ops.

Importing ``lorsum_kernels._C`` runs the extension's ``TORCH_LIBRARY`` / ``TORCH_LIBRARY_IMPL`` blocks,
which register the ops as ``torch.ops.lorsum.*`` with their CPU (and, in a CUDA build, CUDA) kernels.
The op schemas live in ``csrc/lorsum.cpp``.

The package must import and work without the extension (on the torch backend), so, as torchao does:

* ``LORSUM_SKIP_LOADING_SO=1`` skips loading it;
* an ``ImportError`` / ``OSError`` while loading (no .so built, or one built against another torch)
  logs one warning and leaves ``NATIVE_AVAILABLE = False`` with the reason in ``native_error``.

When the library loads, fake (meta) implementations are registered for every native op, so the ops
work under FakeTensor and ``torch.compile``, and autograd formulas where an op has one.
"""

from __future__ import annotations

import importlib
import logging
import os

import torch

logger = logging.getLogger(__name__)

NATIVE_AVAILABLE: bool = False
native_error: str | None = None

if os.environ.get("LORSUM_SKIP_LOADING_SO", "0").strip() == "1":
    native_error = "not loaded: LORSUM_SKIP_LOADING_SO=1"
else:
    try:
        # Loading the .so registers torch.ops.lorsum.*. import_module, not `from lorsum_kernels import _C`:
        # with no .so built, its message is "No module named 'lorsum_kernels._C'", not a circular import.
        importlib.import_module("lorsum_kernels._C")

        NATIVE_AVAILABLE = True
    except (ImportError, OSError) as exc:  # no .so, or one built against a different torch
        native_error = f"{type(exc).__name__}: {exc}"
        logger.warning(
            "lorsum_kernels: native extension lorsum_kernels._C not loaded (%s); using the torch backend. "
            "Build it with `pip install --no-build-isolation --no-deps -e .` (or `make venv`).",
            native_error,
        )

# torch.device.type -> dispatch key name, for the devices that can have native kernels.
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def has_native_op(name: str, device_type: str | torch.device) -> bool:
    """Whether ``torch.ops.lorsum.<name>`` has a native kernel for that device type ("cpu", "cuda").

    False when the library did not load, for devices with no native kernels, and for a CUDA device when
    the extension was built without CUDA.
    """
    if not NATIVE_AVAILABLE:
        return False
    device_type = device_type.type if isinstance(device_type, torch.device) else str(device_type)
    key = _DISPATCH_KEYS.get(device_type)
    if key is None:
        return False
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"lorsum::{name}", key))
    except Exception:  # an op name that was never registered, or a private API that changed
        return False


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


if NATIVE_AVAILABLE:
    # Fake implementations: shapes and dtypes only, with the same input checks as the C++ kernels so a
    # bad input fails identically under FakeTensor / torch.compile.

    @torch.library.register_fake("lorsum::col_sq_sums")
    def _col_sq_sums_fake(x: torch.Tensor) -> torch.Tensor:
        torch._check(
            x.dim() >= 2,
            lambda: f"col_sq_sums: x must have at least 2 dimensions (..., T, n), got a {x.dim()}-D tensor",
        )
        torch._check(
            x.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16),
            lambda: f"col_sq_sums: x must be float32, float64, bfloat16 or float16, got {x.dtype}",
        )
        return x.new_empty(x.shape[:-2] + x.shape[-1:], dtype=_acc_dtype(x.dtype))

    # d/dx Σ_t x_t² = 2x, in the accumulation dtype, returned in x's dtype.
    def _col_sq_sums_backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        return (2 * x.to(grad.dtype) * grad.unsqueeze(-2)).to(x.dtype)

    def _col_sq_sums_setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    torch.library.register_autograd(
        "lorsum::col_sq_sums", _col_sq_sums_backward, setup_context=_col_sq_sums_setup_context
    )
