"""Which implementation of a hot-path op runs: ``native``, ``triton`` or ``torch`` (DESIGN.md "Dispatch").

Contract of :func:`resolve_backend` ``(backend, device, op) -> name``:

* ``backend`` is one of :data:`BACKENDS`, or ``None`` / ``"auto"``, which reads the environment variable
  ``LORSUM_BACKEND`` (unset or empty means ``"auto"``). Any other name raises ``ValueError``.
* ``"auto"`` chooses per device. CUDA: the native op if the extension has a CUDA kernel for it, else
  Triton if triton imports and the op has a Triton implementation (:data:`TRITON_OPS`), else torch.
  CPU: the native op if the extension loaded, else torch. Other devices: torch. When auto falls back
  because the extension failed to load, one warning is issued per process.
* A forced backend (``"native"``, ``"triton"``) that is missing for that op and device raises
  ``RuntimeError`` naming the op, the device and why (the extension's load error, if any). ``"torch"``
  (the reference implementation) is always available. Triton on a CPU device means the Triton
  interpreter, so forcing it there also needs ``TRITON_INTERPRET=1``.

A caller that runs many ops on one device (an optimizer step) resolves once: :func:`resolve` gives a
:class:`Backend`, the choice for that device, which every ``ops`` function accepts in place of a name and
answers from its own table (each op resolved on first use, by the rules above). :func:`check_name` checks
a name alone (constructors); :func:`check_backend` checks a forced backend for ops on a model's devices.
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass, field

import torch

from lorsum_kernels import _native
from lorsum_kernels.triton_kernels import LAUNCHERS as TRITON_LAUNCHERS

BACKENDS = ("native", "triton", "torch")

# Ops with a Triton implementation, by op name (the same names as torch.ops.lorsum.*): the launchers'
# registry, a plain dict, so that choosing a backend never imports triton.
TRITON_OPS: frozenset[str] = frozenset(TRITON_LAUNCHERS)

_warned_native_fallback = False


@functools.cache
def triton_available() -> bool:
    """Whether ``import triton`` succeeds (checked once)."""
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install failing at import time
        return False
    return True


def _triton_missing_reason(device: torch.device, op: str) -> str | None:
    if op not in TRITON_OPS:
        return f"op {op!r} has no Triton implementation"
    if not triton_available():
        return "triton is not importable"
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return "Triton runs on a CPU device only in the interpreter (TRITON_INTERPRET=1)"
    if device.type not in ("cpu", "cuda"):
        return f"Triton does not run on {device.type} devices"
    return None


def _native_missing_reason(device: torch.device, op: str) -> str | None:
    if _native.has_native_op(op, device.type):
        return None
    if not _native.NATIVE_AVAILABLE:
        return f"the native extension did not load ({_native.native_error})"
    return f"the native extension has no {device.type} kernel for it"


def _warn_native_fallback_once() -> None:
    global _warned_native_fallback
    # A deliberate LORSUM_SKIP_LOADING_SO=1 is not a failure worth a warning.
    if _warned_native_fallback or os.environ.get("LORSUM_SKIP_LOADING_SO", "0").strip() == "1":
        return
    _warned_native_fallback = True
    warnings.warn(
        f"lorsum_kernels: native extension unavailable ({_native.native_error}); "
        "falling back to the Triton/torch backends",
        RuntimeWarning,
        stacklevel=3,
    )


def requested_name(backend: str | None) -> str:
    """The backend name asked for: ``backend``, or for None and ``"auto"`` the ``LORSUM_BACKEND`` environment
    variable (``"auto"`` where unset or empty). Not checked."""
    name = backend if backend is not None else "auto"
    if name == "auto":
        name = os.environ.get("LORSUM_BACKEND", "").strip().lower() or "auto"
    return name


def resolve_backend(backend: str | None, device: torch.device | str, op: str) -> str:
    """The backend that runs ``op`` on ``device``; see the module docstring for the rules."""
    name = requested_name(backend)
    if name != "auto" and name not in BACKENDS:
        source = "backend" if backend not in (None, "auto") else "LORSUM_BACKEND"
        raise ValueError(f"unknown {source} {name!r}; valid names: {', '.join(BACKENDS)} or 'auto'")
    device = torch.device(device)

    if name == "auto":
        if device.type in ("cpu", "cuda"):
            if _native.has_native_op(op, device.type):
                return "native"
            if not _native.NATIVE_AVAILABLE:
                _warn_native_fallback_once()
        if device.type == "cuda" and _triton_missing_reason(device, op) is None:
            return "triton"
        return "torch"

    reason = None
    if name == "native":
        reason = _native_missing_reason(device, op)
    elif name == "triton":
        reason = _triton_missing_reason(device, op)
    if reason is not None:
        raise RuntimeError(f"backend {name!r} is not available for op {op!r} on device {device}: {reason}")
    return name


def check_backend(backend: str | None, model, ops: tuple[str, ...]) -> None:
    """What ``resolve_backend`` would raise at the first step, raised now (optimizer constructors, before
    the model is hooked): an unknown name, or a forced backend lacking one of ``ops`` on a device of the
    model's parameters (the CPU for a model without parameters). Checked on the model's own devices: a
    forced ``"triton"`` is valid for a CUDA model whatever it would mean on the CPU."""
    devices = {p.device for p in model.parameters()} if isinstance(model, torch.nn.Module) else set()
    for device in sorted(devices, key=str) or [torch.device("cpu")]:
        for op in ops:
            resolve_backend(backend, device, op)


def check_name(backend) -> None:
    """Raises ``ValueError`` for anything but a backend name, ``"auto"`` or None (``LORSUM_BACKEND`` is read
    when an op runs, so a bad value there is reported then)."""
    if backend is not None and backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid names: {', '.join(BACKENDS)} or 'auto'")


@dataclass(eq=False)
class Backend:
    """A backend choice resolved for one device: which implementation runs each op there.

    ``requested`` is the name given (None or "auto" included), ``device`` the device it was resolved for.
    ``of(op)`` resolves the op on first use (``resolve_backend``'s rules, its errors included) and then
    answers from the table: one resolution per op for as long as the value is kept (an optimizer keeps it
    for one step, so a change of ``LORSUM_BACKEND`` takes effect at the next). Used on another device, it
    resolves there (never a stale answer)."""

    requested: str | None
    device: torch.device
    _table: dict = field(default_factory=dict, repr=False)

    def of(self, op: str, device: torch.device | None = None) -> str:
        if device is not None and device != self.device:
            return resolve_backend(self.requested, device, op)
        name = self._table.get(op)
        if name is None:
            name = self._table[op] = resolve_backend(self.requested, self.device, op)
        return name

    def reads_low_precision(self, op: str, device: torch.device | None = None) -> bool:
        """Whether ``op`` takes bf16/fp16 token data as it is (the native kernels convert in registers)
        rather than in the math dtype (the reference and Triton half-steps need a converted copy)."""
        return self.of(op, device) == "native"


def resolve(backend: "str | None | Backend", device: torch.device | str) -> Backend:
    """The :class:`Backend` value of ``backend`` on ``device`` (a value for that device is returned as is)."""
    device = torch.device(device)
    if isinstance(backend, Backend):
        return backend if backend.device == device else Backend(backend.requested, device)
    check_name(backend)
    return Backend(backend, device)
