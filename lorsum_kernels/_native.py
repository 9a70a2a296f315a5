"""Loads the native extension ``lorsum_kernels._C`` and registers what torch needs to know about its ops.

Importing ``lorsum_kernels._C`` runs the extension's ``TORCH_LIBRARY`` / ``TORCH_LIBRARY_IMPL`` blocks,
which register the ops as ``torch.ops.lorsum.*`` with their CPU (and, in a CUDA build, CUDA) kernels.
The op schemas live in ``csrc/lorsum.cpp``.

The package must import and work without the extension (on the torch backend), so, as torchao does:

* ``LORSUM_SKIP_LOADING_SO=1`` skips loading it;
* a library built against another torch release (``_C.torch_version``, written by setup.py beside it,
  says which) is not loaded: torch has no stable C++ ABI, and such a library can load and then crash or
  compute wrong results; one warning, ``NATIVE_AVAILABLE = False``, the reason in ``native_error``;
* an ``ImportError`` / ``OSError`` while loading (no .so built) does the same.

When the library loads, fake (meta) implementations are registered for every native op, so the ops
work under FakeTensor and ``torch.compile``, and autograd formulas where an op has one.
"""

from __future__ import annotations

import importlib
import logging
import os

import torch

from ._numerics import math_dtype

logger = logging.getLogger(__name__)

NATIVE_AVAILABLE: bool = False
native_error: str | None = None

# Written by setup.py beside the library: the torch version it was compiled against.
_BUILT_TORCH_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_C.torch_version")


def torch_mismatch(built: str | None, running: str) -> str | None:
    """Why a library built against torch ``built`` must not be loaded under torch ``running`` (None: it may).

    torch has no stable C++ ABI between releases, so the release numbers must be equal; the local part
    (``+cpu``, ``+cu130``) may differ, since the CPU kernels do not depend on it. An unknown build version
    (a library built before the version was recorded) is allowed."""
    if built is None:
        return None
    release = lambda version: version.strip().split("+")[0]  # noqa: E731
    if release(built) != release(running):
        return (f"it was built against torch {built.strip()} and this is torch {running}; rebuild it with "
                "`pip install --no-build-isolation --no-deps -e .` (or `pip install --no-build-isolation .`)")
    return None


def _built_torch_version() -> str | None:
    try:
        with open(_BUILT_TORCH_FILE) as f:
            return f.read().strip() or None
    except OSError:
        return None


_mismatch = torch_mismatch(_built_torch_version(), torch.__version__)
if os.environ.get("LORSUM_SKIP_LOADING_SO", "0").strip() == "1":
    native_error = "not loaded: LORSUM_SKIP_LOADING_SO=1"
elif _mismatch is not None:
    native_error = f"not loaded: {_mismatch}"
    logger.warning("lorsum_kernels: native extension lorsum_kernels._C %s; using the torch backend.", native_error)
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


def _registered_kernels() -> frozenset[tuple[str, str]]:
    """(op name, device type) for every lorsum op with a kernel, read once from the dispatcher at load."""
    if not NATIVE_AVAILABLE:
        return frozenset()
    found = set()
    for device_type, key in _DISPATCH_KEYS.items():
        try:
            names = torch._C._dispatch_get_registrations_for_dispatch_key(key)
        except Exception:  # a private API that changed: report no kernels rather than fail the import
            continue
        found |= {(n.split("::", 1)[1].split(".", 1)[0], device_type) for n in names if n.startswith("lorsum::")}
    return frozenset(found)


# A constant of the process (the library registers its kernels once, when it loads). Looking a name up in
# a frozen set, rather than querying the dispatcher per call, lets torch.compile fold the backend choice
# instead of breaking the graph in front of every op.
_NATIVE_KERNELS = _registered_kernels()

# The fused CPU steps with no CUDA kernel: on a GPU their parts run as separate ops (tools/gpu_check.sh checks
# that every other op with a CPU kernel has a CUDA one).
CPU_ONLY_OPS = frozenset({"finish_normalized_step", "kfac_lorsum_update_in"})


def has_native_op(name: str, device_type: str | torch.device) -> bool:
    """Whether ``torch.ops.lorsum.<name>`` has a native kernel for that device type ("cpu", "cuda").

    False when the library did not load, for devices with no native kernels, and for a CUDA device when
    the extension was built without CUDA.
    """
    if not NATIVE_AVAILABLE:
        return False
    device_type = device_type.type if isinstance(device_type, torch.device) else str(device_type)
    return (name, device_type) in _NATIVE_KERNELS


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
        return x.new_empty(x.shape[:-2] + x.shape[-1:], dtype=math_dtype(x.dtype))

    # d/dx Σ_t x_t² = 2x, in the accumulation dtype, returned in x's dtype.
    def _col_sq_sums_backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        return (2 * x.to(grad.dtype) * grad.unsqueeze(-2)).to(x.dtype)

    def _col_sq_sums_setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    torch.library.register_autograd(
        "lorsum::col_sq_sums", _col_sq_sums_backward, setup_context=_col_sq_sums_setup_context
    )


def _op_defined(name: str) -> bool:
    """Whether the loaded library declares ``lorsum::<name>`` (an older build may lack newer ops)."""
    try:
        getattr(torch.ops.lorsum, name)
    except (AttributeError, RuntimeError):
        return False
    return True


if NATIVE_AVAILABLE and _op_defined("lorsum_update_in"):
    # Fakes of the block power iteration, the batched solve, the energies and the fused K-FAC metric
    # step: shapes and dtypes as the CPU kernels in csrc/cpu/ produce them (contiguous outputs).

    def _check_half_step(op, in_side, hat, A0, B0, f_in, f_out, m_in, m_out):
        hat_name = "B_hat" if in_side else "A_hat"
        torch._check(
            A0.dim() >= 2 and B0.dim() >= 2 and hat.dim() >= 2,
            lambda: f"{op}: A0, B0 and {hat_name} must have at least 2 dimensions",
        )
        r, n, m = A0.shape[-2], A0.shape[-1], B0.shape[-2]
        batch = A0.shape[:-2]
        torch._check(B0.shape[-1] == r, lambda: f"{op}: A0 {tuple(A0.shape)} and B0 {tuple(B0.shape)}: ranks differ")
        want = (m, r) if in_side else (r, n)
        torch._check(
            hat.shape[:-2] == batch and tuple(hat.shape[-2:]) == want,
            lambda: f"{op}: {hat_name} must be {tuple(batch) + want}, got {tuple(hat.shape)}",
        )
        torch._check(len(f_in) == len(f_out), lambda: f"{op}: got {len(f_in)} f_in factors but {len(f_out)} f_out")
        for j, (fi, fo) in enumerate(zip(f_in, f_out)):
            torch._check(
                fi.shape[:-2] == batch and fo.shape[:-2] == batch and fi.shape[-1] == n and fo.shape[-2] == m
                and fi.shape[-2] == fo.shape[-1],
                lambda j=j, fi=fi, fo=fo: f"{op}: pair {j} (f_in {tuple(fi.shape)}, f_out {tuple(fo.shape)}) does "
                f"not stand for an {m}x{n} matrix f_out @ f_in",
            )
        torch._check((m_in is None) == (m_out is None), lambda: f"{op}: give both metrics (m_in and m_out) or neither")

    @torch.library.register_fake("lorsum::lorsum_update_in")
    def _lorsum_update_in_fake(B_hat, A0, B0, f_in, f_out, coeffs, lmbd, m_in=None, m_out=None):
        _check_half_step("lorsum_update_in", True, B_hat, A0, B0, f_in, f_out, m_in, m_out)
        return A0.new_empty(A0.shape)

    @torch.library.register_fake("lorsum::lorsum_update_out")
    def _lorsum_update_out_fake(A_hat, A0, B0, f_in, f_out, coeffs, lmbd, m_in=None, m_out=None):
        _check_half_step("lorsum_update_out", False, A_hat, A0, B0, f_in, f_out, m_in, m_out)
        return A0.new_empty(B0.shape)

    if _op_defined("kfac_lorsum_update_in"):

        @torch.library.register_fake("lorsum::kfac_lorsum_update_in")
        def _kfac_lorsum_update_in_fake(B_hat, A0, B0, f_in, f_out, coeffs, lmbd, v_in, v_out, beta, damping, power,
                                        scale_in, scale_out):
            op = "kfac_lorsum_update_in"
            _check_half_step(op, True, B_hat, A0, B0, f_in, f_out, None, None)
            torch._check(len(f_in) >= 1, lambda: f"{op}: needs the gradient pair (X, S^T) as f_in[0], f_out[0]")
            batch, n, m = A0.shape[:-2], A0.shape[-1], B0.shape[-2]
            torch._check(v_in.shape == batch + (n,) and v_out.shape == batch + (m,),
                         lambda: f"{op}: v_in and v_out must be {tuple(batch) + (n,)} and {tuple(batch) + (m,)}")
            return (A0.new_empty(A0.shape), v_in.new_empty(v_in.shape), v_out.new_empty(v_out.shape),
                    v_in.new_empty(v_in.shape), v_out.new_empty(v_out.shape))

    @torch.library.register_fake("lorsum::pair_products")
    def _pair_products_fake(f_in, f_out, W=None, V=None):
        torch._check(f_in.dim() >= 2 and f_out.dim() >= 2, lambda: "pair_products: f_in and f_out must be matrices")
        batch, n, m = f_in.shape[:-2], f_in.shape[-1], f_out.shape[-2]
        acc = math_dtype(f_in, f_out, W, V)
        w = 0 if W is None else W.shape[-1]
        v = 0 if V is None else V.shape[-2]
        return f_in.new_empty(batch + (w, n), dtype=acc), f_in.new_empty(batch + (m, v), dtype=acc)

    @torch.library.register_fake("lorsum::spd_solve")
    def _spd_solve_fake(gram, rhs, left=True):
        torch._check(gram.dim() >= 2 and gram.shape[-1] == gram.shape[-2], lambda: "spd_solve: gram must be square")
        batch = torch.broadcast_shapes(gram.shape[:-2], rhs.shape[:-2])
        return rhs.new_empty(batch + rhs.shape[-2:], dtype=torch.promote_types(gram.dtype, rhs.dtype))

    @torch.library.register_fake("lorsum::row_col_energies")
    def _row_col_energies_fake(X, S):
        torch._check(X.dim() >= 2 and S.dim() >= 2, lambda: "row_col_energies: X and S must be matrices")
        acc = math_dtype(X, S)
        batch = X.shape[:-2]
        return X.new_empty(batch + S.shape[-1:], dtype=acc), X.new_empty(batch + X.shape[-1:], dtype=acc)

    @torch.library.register_fake("lorsum::kfac_metric_update")
    def _kfac_metric_update_fake(X, S, v_in, v_out, beta, damping, power, scale_in, scale_out):
        return v_in.new_empty(v_in.shape), v_out.new_empty(v_out.shape), v_in.new_empty(v_in.shape), \
            v_out.new_empty(v_out.shape)


if NATIVE_AVAILABLE and _op_defined("adaprelora_solve"):

    @torch.library.register_fake("lorsum::adaprelora_solve")
    def _adaprelora_solve_fake(A, B, g_A, g_B, p, q, ridge):
        op = "adaprelora_solve"
        torch._check(
            A.dim() >= 2 and B.dim() >= 2 and p.dim() >= 1 and q.dim() >= 1,
            lambda: f"{op}: A and B must be matrices (..., r, n) and (..., m, r), p and q vectors",
        )
        r, n, m = A.shape[-2], A.shape[-1], B.shape[-2]
        batch = A.shape[:-2]
        torch._check(
            B.shape[-1] == r and B.shape[:-2] == batch,
            lambda: f"{op}: A {tuple(A.shape)} is (..., r, n) and B {tuple(B.shape)} must be (..., m, r) with the "
            "same r and batch shape",
        )
        torch._check(
            g_A.shape == A.shape and g_B.shape == B.shape,
            lambda: f"{op}: g_A {tuple(g_A.shape)} and g_B {tuple(g_B.shape)} must have the shapes of A and B",
        )
        torch._check(
            p.shape == batch + (m,) and q.shape == batch + (n,),
            lambda: f"{op}: p must be {tuple(batch) + (m,)} and q {tuple(batch) + (n,)}, got {tuple(p.shape)} and "
            f"{tuple(q.shape)}",
        )
        dtype = A.dtype
        for t in (B, g_A, g_B, p, q):
            dtype = torch.promote_types(dtype, t.dtype)
        return A.new_empty(A.shape, dtype=dtype), A.new_empty(B.shape, dtype=dtype)

    from torch.utils.flop_counter import register_flop_formula

    # FlopCounterMode sees a custom op as one call: count its r-wide products (per side of each layer the
    # Gram, the substitutions, the cross product and the output, each r²·N multiply-adds), so that cost
    # accounting gives the same O((m+n)r²) law on every backend.
    @register_flop_formula(torch.ops.lorsum.adaprelora_solve)
    def _adaprelora_solve_flops(A_shape, B_shape, *args, out_shape=None, **kwargs) -> int:
        r, n, m = A_shape[-2], A_shape[-1], B_shape[-2]
        layers = 1
        for size in A_shape[:-2]:
            layers *= size
        return layers * 4 * 2 * r * r * (m + n)


if NATIVE_AVAILABLE and _op_defined("tangent_energies"):

    @torch.library.register_fake("lorsum::tangent_energies")
    def _tangent_energies_fake(B, E, F, A):
        op = "tangent_energies"
        torch._check(
            B.dim() >= 2 and E.dim() >= 2 and F.dim() >= 2 and A.dim() >= 2,
            lambda: f"{op}: B, E, F and A must be matrices (..., m, r_B), (..., r_B, n), (..., m, r_F), (..., r_F, n)",
        )
        m, n, batch = B.shape[-2], E.shape[-1], B.shape[:-2]
        torch._check(
            E.shape[-2] == B.shape[-1] and F.shape[-2] == m and A.shape[-2:] == (F.shape[-1], n),
            lambda: f"{op}: B {tuple(B.shape)}, E {tuple(E.shape)}, F {tuple(F.shape)} and A {tuple(A.shape)} do not "
            "stand for an m x n matrix B @ E + F @ A",
        )
        torch._check(
            E.shape[:-2] == batch and F.shape[:-2] == batch and A.shape[:-2] == batch,
            lambda: f"{op}: all inputs share the leading batch dimensions; got B {tuple(B.shape)}, E {tuple(E.shape)}, "
            f"F {tuple(F.shape)}, A {tuple(A.shape)}",
        )
        dtype = B.dtype
        for t in (E, F, A):
            dtype = torch.promote_types(dtype, t.dtype)
        return B.new_empty(batch + (m,), dtype=dtype), B.new_empty(batch + (n,), dtype=dtype)

    from torch.utils.flop_counter import register_flop_formula

    # FlopCounterMode sees the op as one call: count the kernel's multiply-adds (per column of either side,
    # R(R+1)/2 for its share of the Gram's triangle and R(R+1)/2 for its quadratic form in the other side's
    # triangular form, R = r_B + r_F), so that cost accounting gives the O((m+n)r²) law on every backend.
    @register_flop_formula(torch.ops.lorsum.tangent_energies)
    def _tangent_energies_flops(B_shape, E_shape, F_shape, A_shape, *args, out_shape=None, **kwargs) -> int:
        m, n, R = B_shape[-2], E_shape[-1], B_shape[-1] + F_shape[-1]
        layers = 1
        for size in B_shape[:-2]:
            layers *= size
        return layers * 2 * R * (R + 1) * (m + n)


if NATIVE_AVAILABLE and _op_defined("finish_normalized_step"):

    @torch.library.register_fake("lorsum::finish_normalized_step")
    def _finish_normalized_step_fake(A, B, A_new, B_new, checked, v, t, scale, root, layer_lr, allowed,
                                     balanced, lr, beta):
        op = "finish_normalized_step"
        torch._check(len(B) == len(A_new) == len(B_new) == len(v) == len(t) == len(scale) == len(A),
                     lambda: f"{op}: one tensor per layer in every list")
        torch._check(allowed.shape == (len(A),), lambda: f"{op}: allowed must be ({len(A)},)")
        return allowed.new_empty(allowed.shape)  # the layers written (the parameters and statistics in place)
