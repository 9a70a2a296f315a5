"""What every op test shares (tests/ops/): the backends present, the problem builders, and the checks.

Backends. Each op test runs on every backend that implements the op, as a pytest parameter ``be`` (a
:class:`Backend`): ``native-cpu`` (the C++ kernels of csrc/cpu), ``native-cuda`` (csrc/cuda, skipped without
a GPU or without a CUDA kernel in the build) and ``triton`` (lorsum_kernels.triton_kernels: compiled on a
GPU, or on CPU tensors in Triton's interpreter). Triton decides at import whether it interprets, so the
interpreter runs in a pytest process of its own with ``TRITON_INTERPRET=1`` set before anything imports
triton (``make test`` runs it after the main process); that process runs only the ``triton`` parameters
(tests/ops/conftest.py deselects the others) and the main process skips them, with the reason, unless it has
a GPU. The torch reference (lorsum_kernels.reference) is the oracle everywhere.

Problems. Random inputs are drawn in fp64 on the CPU from a seeded generator (the same numbers on every
device and every run), then cast to the dtype under test and moved to the backend's device; odd shapes
(5 × 123, r = 3) are always in the grids.

Tolerances (DESIGN.md "Numerical policy"): results of fp32 arithmetic within 1e-5 relative Frobenius error of
an fp64 reference computed on the same input values; bf16 results within twice the error plain PyTorch makes
in bf16; NaN never passes (:func:`rel_err` is inf for any non-finite value).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

from lorsum_kernels import _native, backends, ops

# ---- the backends ------------------------------------------------------------------------------------

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# The interpreter runs on CPU tensors, even where a GPU is present (compiled runs test that one).
# The GPU with its index, as tensors report their device (torch.device("cuda") != torch.device("cuda:0")).
CUDA_DEVICE = (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
               else torch.device("cuda"))
TRITON_DEVICE = CUDA_DEVICE if torch.cuda.is_available() and not INTERPRET else torch.device("cpu")
INTERPRETER_COMMAND = "TRITON_INTERPRET=1 pytest tests/ops"


@dataclass(frozen=True)
class Backend:
    """One implementation of the ops: its test id, the ``backend=`` name ops.* takes, and its device."""

    id: str
    name: str
    device: torch.device

    def __repr__(self) -> str:
        return self.id

    def run(self, op: str, *args, **kwargs):
        """ops.<op> forced to this backend."""
        return getattr(ops, op)(*args, backend=self.name, **kwargs)

    def to(self, t):
        return None if t is None else t.to(self.device)

    @property
    def interpreted(self) -> bool:
        return self.name == "triton" and self.device.type == "cpu"


NATIVE_CPU = Backend("native-cpu", "native", torch.device("cpu"))
NATIVE_CUDA = Backend("native-cuda", "native", CUDA_DEVICE)
TRITON = Backend("triton", "triton", TRITON_DEVICE)
BACKENDS = (NATIVE_CPU, NATIVE_CUDA, TRITON)


def skip_reason(be: Backend, op: str) -> str | None:
    """Why ``op`` cannot run on ``be`` in this process, or None."""
    if be is NATIVE_CPU:
        return None if _native.has_native_op(op, "cpu") else f"native {op} not built: {_native.native_error}"
    if be is NATIVE_CUDA:
        if not torch.cuda.is_available():
            return "needs a CUDA GPU"
        if not _native.has_native_op(op, "cuda"):
            return f"lorsum::{op} has no CUDA kernel in this build ({_native.native_error or 'built without CUDA'})"
        return None
    if op not in backends.TRITON_OPS:
        return f"{op} has no Triton implementation"
    if not backends.triton_available():
        return "triton is not importable"
    if be.device.type == "cpu" and not INTERPRET:
        return f"no GPU: Triton runs on the CPU only in its interpreter ({INTERPRETER_COMMAND})"
    return None


def _marks(be: Backend, op: str) -> list:
    marks = [pytest.mark.triton] if be.name == "triton" else []
    if be is NATIVE_CUDA:
        marks.append(pytest.mark.cuda)
    reason = skip_reason(be, op)
    if reason is not None:
        marks.append(pytest.mark.skip(reason=reason))
    return marks


def over_backends(op: str, *which: Backend):
    """Parametrizes ``be`` over ``which`` (default: every backend) for ``op``; each one a skip where it cannot
    run here, marked ``triton`` or ``cuda`` where it is one of those."""
    return pytest.mark.parametrize(
        "be", [pytest.param(be, id=be.id, marks=_marks(be, op)) for be in (which or BACKENDS)])


def per_backend(op: str, argnames: str, grids: dict, ids=None):
    """Parametrizes ``be`` and ``argnames`` with a grid of its own per backend (``{Backend: [values]}``): the
    interpreter runs small shapes, the compiled kernels the full grid."""
    params = []
    for be, values in grids.items():
        for v in values:
            v = v if isinstance(v, tuple) and "," in argnames else (v,)
            label = ids(v if len(v) > 1 else v[0]) if callable(ids) else "-".join(map(str, v))
            params.append(pytest.param(be, *v, id=f"{be.id}-{label}", marks=_marks(be, op)))
    return pytest.mark.parametrize(f"be,{argnames}", params)


CPU_PATHS = ("avx512", "generic")


def use_cpu_path(monkeypatch, path: str) -> None:
    """Selects a code path of the native CPU kernels: the AVX-512 micro-kernels (where the CPU has them) or
    the portable ones ("generic"); "-" (another backend) changes nothing."""
    if path == "generic":
        monkeypatch.setenv("LORSUM_CPU_KERNELS", "generic")
    elif path == "avx512":
        monkeypatch.delenv("LORSUM_CPU_KERNELS", raising=False)


def with_cpu_paths(be: Backend, values: list) -> list:
    """A grid's values (each a tuple of the test's arguments), each with the CPU code path to run it on as its
    last argument: both paths on native-cpu, "-" elsewhere."""
    paths = CPU_PATHS if be is NATIVE_CPU else ("-",)
    return [(*v, path) for v in values for path in paths]


@pytest.fixture(params=CPU_PATHS)
def cpu_path(request, monkeypatch):
    """Both CPU code paths of the native kernels; a test over several backends runs the other backends once
    (the second path is skipped for them)."""
    callspec = getattr(request.node, "callspec", None)
    be = callspec.params.get("be") if callspec is not None else None
    if be is not None and be is not NATIVE_CPU:
        if request.param != CPU_PATHS[0]:
            pytest.skip("the CPU code paths are native-cpu's")
        return "-"
    use_cpu_path(monkeypatch, request.param)
    return request.param


# ---- errors and tolerances ---------------------------------------------------------------------------


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative Frobenius error, computed in fp64; NaN anywhere gives inf (NaN never passes)."""
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - e).norm() / e.norm().clamp_min(1e-300)).item()


def max_rel_err(outs, expected) -> float:
    """The largest rel_err of several results."""
    return max(rel_err(a, e) for a, e in zip(outs, expected))


def fp32_tol(dtype: torch.dtype) -> float:
    """1e-12 for fp64 arithmetic, else the fp32 target 1e-5."""
    return 1e-12 if dtype == torch.float64 else 1e-5


def cpu64(t):
    return None if t is None else t.detach().cpu().double()


def on(device, dtype=torch.float64):
    """A cast of tensors (None passes) to ``dtype`` on ``device``."""
    return lambda t: None if t is None else t.detach().to(device=device, dtype=dtype)


# ---- checks ------------------------------------------------------------------------------------------


def assert_deterministic(fn):
    """Two runs of fn() give bitwise identical tensors (data-parallel ranks must stay identical)."""
    first, second = fn(), fn()
    if isinstance(first, torch.Tensor):
        first, second = (first,), (second,)
    for a, b in zip(first, second):
        assert torch.equal(a, b) or (a.isnan().equal(b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()))


def assert_independent_of_thread_count(fn):
    """fn() with one intra-op thread and with several gives bitwise identical tensors."""
    threads = torch.get_num_threads()
    outs = []
    for n in sorted({1, max(threads, 2)}):
        torch.set_num_threads(n)
        try:
            out = fn()
        finally:
            torch.set_num_threads(threads)
        outs.append((out,) if isinstance(out, torch.Tensor) else tuple(out))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def assert_layout_independent(be: Backend, a: torch.Tensor, b: torch.Tensor) -> None:
    """a (from views) is b (from contiguous copies): bit for bit on the native kernels, whose summation order
    depends on the shapes alone; within 1e-6 on Triton, whose loads may round differently per layout."""
    if be.name == "native":
        assert torch.equal(a, b)
    else:
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


def assert_same_training(run_a, run_b, tol: float = 1e-5):
    """Two trainings (params, state) from conftest.train_tiny agree: floating tensors within ``tol``,
    the others (step counters, skipped steps) exactly."""
    (p_a, s_a), (p_b, s_b) = run_a, run_b
    assert p_a.keys() == p_b.keys() and s_a.keys() == s_b.keys()
    for key in p_b:
        assert rel_err(p_a[key], p_b[key]) < tol, key
    for key in s_b:
        if s_b[key].is_floating_point():
            assert rel_err(s_a[key], s_b[key]) < tol, key
        else:
            assert torch.equal(s_a[key], s_b[key]), key


def spy_on_launcher(monkeypatch, op: str, real):
    """Replaces triton_kernels.<op> (what ops.<op> dispatches to) by a spy around ``real``; returns the list
    of the calls' (args, kwargs)."""
    from lorsum_kernels import triton_kernels

    calls = []

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(triton_kernels, op, spy)
    return calls


# ---- problem builders --------------------------------------------------------------------------------


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, g, dtype=torch.float64, scale=1.0, device="cpu") -> torch.Tensor:
    """Normal numbers drawn in fp64 on the CPU (the same on every device), scaled, cast and moved."""
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)


def rand(*shape, g, dtype=torch.float64, low=0.5, width=1.0, device="cpu") -> torch.Tensor:
    """Uniform numbers in [low, low + width), drawn like :func:`randn`: metrics, statistics, states."""
    return (torch.rand(*shape, generator=g, dtype=torch.float64) * width + low).to(dtype).to(device)


def as_batch(batch) -> tuple:
    """A batch shape from an int layer count (0: unbatched) or a tuple."""
    if isinstance(batch, int):
        return (batch,) if batch else ()
    return tuple(batch)


def activations(batch, T, n, m, *, dtype=torch.float64, s_dtype=None, s_scale=1.0, seed=0, device="cpu"):
    """X (..., T, n) and S (..., T, m): a layer's inputs and output gradients (G = SᵀX is m×n)."""
    g = gen(seed)
    batch = as_batch(batch)
    X = randn(*batch, T, n, g=g, dtype=dtype, device=device)
    S = randn(*batch, T, m, g=g, dtype=s_dtype or dtype, scale=s_scale, device=device)
    return X, S


def lorsum_problem(L, T, m, n, r, *, dtype=torch.float64, big_dtype=None, metrics=False, per_layer=False,
                   hats=False, seed=0, device="cpu"):
    """A LoRSum half-step as PSI-LoRA poses it: anchor (A0, B0), pairs [(X, Sᵀ), (A_m, B_m)], coefficients
    [1, -0.5, -0.05] (the middle one per layer with ``per_layer``), λ = 1e-2, and with ``metrics`` the
    diagonal metrics (m_in (n,), m_out (m,)) in [0.5, 1.5). X and S in ``big_dtype`` (default ``dtype``).
    With ``hats``, current iterates A_hat, B_hat off the anchor (so every term of the right side is non-zero).
    L = 0 is one unbatched layer."""
    g = gen(seed)
    batch = as_batch(L)
    big_dtype = big_dtype or dtype

    def draw(*shape, scale=1.0, dt=dtype):
        return randn(*batch, *shape, g=g, dtype=dt, scale=scale, device=device)

    p = {"A0": draw(r, n, scale=n**-0.5), "B0": draw(m, r, scale=3 * m**-0.5)}
    if hats:
        p["A_hat"] = (p["A0"].double() * 0.9 + draw(r, n, scale=0.1 * n**-0.5, dt=torch.float64)).to(dtype)
        p["B_hat"] = (p["B0"].double() * 1.1 + draw(m, r, scale=0.3 * m**-0.5, dt=torch.float64)).to(dtype)
    X, S = draw(T, n, dt=big_dtype), draw(T, m, scale=0.1, dt=big_dtype)
    A_m, B_m = draw(r, n, scale=0.3), draw(m, r, scale=0.3)
    coeffs = [1.0, -0.5, -0.05]
    if per_layer:
        coeffs = [1.0, torch.linspace(-0.6, -0.4, L, dtype=torch.float64).to(dtype), -0.05]
    p.update(pairs=[(X, S.mT), (A_m, B_m)], coeffs=coeffs, lmbd=1e-2, metrics=None)
    if metrics:
        p["metrics"] = (rand(*batch, n, g=g, dtype=dtype, device=device),
                        rand(*batch, m, g=g, dtype=dtype, device=device))
    return p


def cast_problem(p: dict, dtype, *, big_dtype=None, device=None) -> dict:
    """A half-step problem with its factors, coefficients and metrics in ``dtype`` and the gradient pair (the
    first pair) in ``big_dtype`` (default ``dtype``), on ``device`` (default: where they are)."""
    big_dtype = big_dtype or dtype

    def c(t, dt=dtype):
        return t.detach().to(device=device or t.device, dtype=dt) if isinstance(t, torch.Tensor) else t

    out = dict(p)
    for k in ("A0", "B0", "A_hat", "B_hat"):
        if k in p:
            out[k] = c(p[k])
    out["pairs"] = [tuple(c(t, big_dtype if j == 0 else dtype) for t in pair) for j, pair in enumerate(p["pairs"])]
    out["coeffs"] = [c(v) for v in p["coeffs"]]
    out["lmbd"] = c(p["lmbd"])
    out["metrics"] = None if p["metrics"] is None else tuple(c(t) for t in p["metrics"])
    return out


def half_step(side: str, p: dict, backend: str, hat=None):
    """ops.lorsum_update_in/out on a problem of :func:`lorsum_problem`; the iterate is ``hat``, else the
    problem's A_hat / B_hat, else the anchor's factor."""
    fn = ops.lorsum_update_in if side == "in" else ops.lorsum_update_out
    if hat is None:
        key = "B" if side == "in" else "A"
        hat = p.get(f"{key}_hat", p[f"{key}0"])
    return fn(hat, (p["A0"], p["B0"]), p["pairs"], p["coeffs"], p["lmbd"], p["metrics"], backend=backend)


def adaprelora_problem(batch, m, n, r, *, dtype=torch.float64, momentum=False, seed=0, device="cpu"):
    """[A, B, g_A, g_B, p, q] as AdaPreLoRA poses them: g_A = BᵀG and g_B = GAᵀ for one G, or (momentum)
    gradients that come from no single G; p (m,) and q (n,) in [0.5, 2)."""
    g = gen(seed)
    batch = as_batch(batch)

    def draw(*shape, scale=1.0):
        return torch.randn(*batch, *shape, generator=g, dtype=torch.float64) * scale

    A, B = draw(r, n, scale=n**-0.5), draw(m, r, scale=m**-0.5 * 3)
    if momentum:
        g_A, g_B = draw(r, n), draw(m, r)
    else:
        G = draw(m, n)
        g_A, g_B = B.mT @ G, G @ A.mT
    p = rand(*batch, m, g=g, width=1.5)
    q = rand(*batch, n, g=g, width=1.5)
    return [t.to(dtype).to(device) for t in (A, B, g_A, g_B, p, q)]


def tangent_problem(batch, m, n, r_B, r_F=None, *, dtype=torch.float64, surrogate=True, seed=0, device="cpu"):
    """[B, E, F, A] of tangent_energies: AdaPreLoRA's surrogate (E = BᵀG, F = GAᵀ for one G) when
    ``surrogate`` and the ranks agree, else independent factors; r_F defaults to r_B."""
    g = gen(seed)
    batch = as_batch(batch)
    r_F = r_B if r_F is None else r_F

    def draw(*shape, scale=1.0):
        return torch.randn(*batch, *shape, generator=g, dtype=torch.float64) * scale

    B, A = draw(m, r_B, scale=max(m, 1) ** -0.5 * 3), draw(r_F, n, scale=max(n, 1) ** -0.5)
    if surrogate and r_B == r_F:
        G = draw(m, n)
        E, F = B.mT @ G, G @ A.mT
    else:
        E, F = draw(r_B, n), draw(m, r_F)
    return [t.to(dtype).to(device) for t in (B, E, F, A)]


def spd_matrices(batch, r, *, width=None, floor=0.0, dtype=torch.float64, g=None, seed=0, device="cpu"):
    """Symmetric positive definite r×r matrices F·Fᵀ/w + floor·I for F (r × w) normal (w = 3r by default):
    well conditioned for w ≥ 2r, more so with a floor."""
    g = g if g is not None else gen(seed)
    width = width or 3 * r
    F = torch.randn(*as_batch(batch), r, width, generator=g, dtype=torch.float64)
    gram = F @ F.mT / width + floor * torch.eye(r, dtype=torch.float64)
    return gram.to(dtype).to(device)


# Non-contiguous views of a (6, 45, 31) tensor that the reductions over the token dimension must read as the
# contiguous copy: transposed, sliced, strided, permuted batch, and stride-0 batch and rows.
TOKEN_VIEWS = [
    pytest.param(lambda b: b.mT, id="transposed"),
    pytest.param(lambda b: b[:, 1:40:3, 2:19], id="sliced-rows-and-cols"),
    pytest.param(lambda b: b[:, :, ::2], id="strided-cols"),
    pytest.param(lambda b: b.permute(2, 0, 1)[:, :5], id="permuted-batch"),
    pytest.param(lambda b: b[:1].expand(4, -1, -1), id="expanded-batch"),
    pytest.param(lambda b: b[0, 0].expand(50, -1), id="expanded-rows"),
]
