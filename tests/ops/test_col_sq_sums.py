"""col_sq_sums on every backend against reference.col_sq_sums.

Contract: x (..., T, n) in fp32 / fp64 / bf16 / fp16 gives Σ_t x[..., t, :]² of shape (..., n), contiguous, on
x's device, accumulated and returned in fp32 (fp64 for fp64 x): within 2e-6 of the reference on the same
input elementwise and 1e-6 of the exact sums; an empty sum is zero; NaN and inf stay in their column; the
summation order depends on the shape alone (a non-contiguous view gives the contiguous copy's result bit for
bit), so results are run-to-run deterministic. Native: both CPU code paths, thread-count independence,
opcheck, gradcheck, FakeTensor and compile, and the input checks; Triton: the token-split second pass, its
input checks and dispatch (ops.col_sq_sums reaches the launcher).
"""

from __future__ import annotations

import pytest
import torch

from lorsum_kernels import ops, reference

from ..problems import (NATIVE_CPU, NATIVE_CUDA, TOKEN_VIEWS, TRITON, assert_deterministic,
                        assert_independent_of_thread_count, assert_layout_independent, cpu64, gen,
                        over_backends, per_backend, randn, rel_err, spy_on_launcher)

OP = "col_sq_sums"
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

# Each backend's grid: odd sizes, empty sums and batches, 2- to 4-D; the interpreter's stay small.
GRIDS = {
    NATIVE_CPU: [(s, d) for s in [(5, 123), (1, 1), (37, 256), (3, 37, 5), (2, 3, 17, 9), (0, 7), (4, 0, 3),
                                  (2, 300, 33)] for d in DTYPES],
    NATIVE_CUDA: [(s, d) for s in [(1, 5), (37, 123), (512, 256), (512, 5), (1, 256), (37, 5), (3, 1, 123),
                                   (3, 37, 256), (1, 512, 123), (2, 3, 37, 5)] for d in DTYPES],
    TRITON: [(s, d) for s in [(1, 5), (37, 33), (3, 37, 5), (2, 3, 17, 9), (1, 33), (0, 7), (4, 0, 3), (0, 37, 5)]
             for d in DTYPES[:3]],
}


def _check(x: torch.Tensor, out: torch.Tensor) -> None:
    """out is col_sq_sums(x): the reference's shape, dtype and device, contiguous, within 2e-6 of the
    reference on the same input (both accumulate in fp32, fp64 for fp64: only the order of the additions
    differs) and within 1e-6 of the exact sums."""
    expected = reference.col_sq_sums(x)
    assert out.shape == expected.shape == x.shape[:-2] + x.shape[-1:]
    assert out.dtype == expected.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
    assert out.device == x.device and out.is_contiguous()
    rtol = 1e-12 if x.dtype == torch.float64 else 2e-6
    torch.testing.assert_close(out, expected, rtol=rtol, atol=1e-30)
    assert rel_err(out, reference.col_sq_sums(cpu64(x))) < (1e-12 if x.dtype == torch.float64 else 1e-6)


# ---- accuracy, layouts, edge cases: every backend ----------------------------------------------------------


@per_backend(OP, "shape,dtype", GRIDS, ids=lambda v: f"{v[0]}-{v[1]}")
def test_matches_reference(be, shape, dtype):
    x = randn(*shape, g=gen(0), dtype=dtype, device=be.device)
    _check(x, be.run(OP, x))
    assert_deterministic(lambda: be.run(OP, x))


@over_backends(OP, NATIVE_CPU, NATIVE_CUDA)
def test_long_token_dim(be):
    # Many T chunks: the fp32 accumulation stays within 1e-6 of the exact sum (DESIGN.md asks for 1e-5).
    x = randn(3, 20000, 40, g=gen(1), device=be.device)
    assert rel_err(be.run(OP, x.float()), reference.col_sq_sums(cpu64(x))) < 1e-6


@over_backends(OP)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("make_view", TOKEN_VIEWS)
def test_non_contiguous(be, make_view, dtype):
    x = make_view(randn(6, 45, 31, g=gen(2), dtype=dtype, device=be.device))
    out = be.run(OP, x)
    _check(x, out)
    # The summation order depends on the shape alone, not on the strides (Triton: within rounding).
    assert_layout_independent(be, out, be.run(OP, x.contiguous()))


@over_backends(OP)
def test_empty_sum_is_zero(be):
    out = be.run(OP, torch.empty(2, 0, 5, device=be.device))
    assert out.shape == (2, 5) and torch.equal(out, torch.zeros(2, 5, device=be.device))
    assert be.run(OP, torch.empty(0, 7, 5, device=be.device)).shape == (0, 5)


@over_backends(OP)
def test_nan_and_inf_propagate_like_reference(be):
    x = randn(2, 300, 70, g=gen(3), dtype=torch.float32, device=be.device)
    x[1, 200, 65] = float("nan")
    out = be.run(OP, x)
    assert out[1, 65].isnan()
    out[1, 65] = 0
    assert out.isfinite().all()
    x = torch.randn(2, 37, 5, generator=gen(4)).to(be.device)
    x[0, 3, 1] = float("nan")
    x[1, 0, 4] = float("inf")
    out = be.run(OP, x)
    expected = reference.col_sq_sums(x)
    assert torch.equal(out.isnan(), expected.isnan()) and out.isnan().sum() == 1
    assert torch.equal(out.isinf(), expected.isinf()) and out.isinf().sum() == 1
    finite = expected.isfinite()
    torch.testing.assert_close(out[finite], expected[finite], rtol=2e-6, atol=0)


# ---- CUDA: opcheck -----------------------------------------------------------------------------------------


@over_backends(OP, NATIVE_CUDA)
def test_cuda_opcheck(be):
    # Schema, fake (meta) implementation, autograd registration and AOT dispatch on CUDA tensors.
    x = randn(2, 37, 5, g=gen(18), dtype=torch.float32, device=be.device)
    torch.library.opcheck(torch.ops.lorsum.col_sq_sums, (x,))


# ---- native CPU: code paths, threads, the op's registration, input checks ----------------------------------


@over_backends(OP, NATIVE_CPU)
def test_large_parallel_matches_serial(be):
    # Enough work that at::parallel_for splits it across threads (when more than one is available).
    x = randn(4, 700, 1000, g=gen(3), dtype=torch.float32)
    assert_independent_of_thread_count(lambda: be.run(OP, x))
    _check(x, be.run(OP, x))


@over_backends(OP, NATIVE_CPU)
@pytest.mark.parametrize(
    "x",
    [
        pytest.param(torch.randn(5, 123), id="2d"),
        pytest.param(torch.randn(3, 37, 5, dtype=torch.float64), id="3d-fp64"),
        pytest.param(torch.randn(2, 3, 17, 9).to(torch.bfloat16), id="4d-bf16"),
        pytest.param(torch.randn(9, 17).mT, id="transposed"),
        pytest.param(torch.randn(2, 0, 4), id="empty-T"),
    ],
)
def test_opcheck(be, x):
    torch.library.opcheck(torch.ops.lorsum.col_sq_sums.default, (x,))


@over_backends(OP, NATIVE_CPU)
def test_gradcheck(be):
    x = torch.randn(2, 7, 5, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.lorsum.col_sq_sums.default, (x,))
    assert torch.autograd.gradcheck(torch.ops.lorsum.col_sq_sums, (x,))


@over_backends(OP, NATIVE_CPU)
def test_fake_tensor_and_compile(be):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        out = torch.ops.lorsum.col_sq_sums(torch.empty(4, 10, 3, dtype=torch.bfloat16))
    assert out.shape == (4, 3) and out.dtype == torch.float32

    x = torch.randn(3, 11, 6)
    compiled = torch.compile(lambda t: torch.ops.lorsum.col_sq_sums(t) * 2, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), 2 * reference.col_sq_sums(x))


@over_backends(OP, NATIVE_CPU)
def test_native_rejects_1d(be):
    with pytest.raises(RuntimeError, match=r"col_sq_sums: x must have at least 2 dimensions"):
        be.run(OP, torch.randn(7))


@over_backends(OP, NATIVE_CPU)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64], ids=str)
def test_native_rejects_non_float(be, dtype):
    with pytest.raises(RuntimeError, match=r"col_sq_sums: x must be float32, float64, bfloat16 or float16"):
        be.run(OP, torch.ones(3, 4, dtype=dtype))


# ---- Triton: the token-split pass, input checks, dispatch --------------------------------------------------


def _launcher():
    from lorsum_kernels.triton_kernels import sq_sums

    return sq_sums


@over_backends(OP, TRITON)
@pytest.mark.parametrize("splits", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_token_splits_match_reference(be, splits, dtype):
    # The second reduction pass (per-split partial sums), which the GPU uses for few, tall inputs.
    torch.manual_seed(1)
    x = torch.randn(2, 300, 33, dtype=dtype, device=be.device)
    _check(x, _launcher()._col_sq_sums(x, t_splits=splits))


@over_backends(OP, TRITON)
def test_triton_rejects_bad_input(be):
    with pytest.raises(ValueError, match=r"col_sq_sums: x must have at least 2 dimensions"):
        _launcher().col_sq_sums(torch.randn(7, device=be.device))
    with pytest.raises(TypeError, match=r"col_sq_sums: x must be one of float32"):
        _launcher().col_sq_sums(torch.ones(3, 4, dtype=torch.int64, device=be.device))


@over_backends(OP, TRITON)
def test_dispatch_reaches_the_triton_launcher(be, monkeypatch):
    x = torch.randn(3, 37, 5, device=be.device)
    real = _launcher().col_sq_sums
    calls = spy_on_launcher(monkeypatch, OP, real)
    out = ops.col_sq_sums(x, backend="triton")
    assert len(calls) == 1
    torch.testing.assert_close(out, real(x), rtol=0, atol=0)
    monkeypatch.setenv("LORSUM_BACKEND", "triton")
    ops.col_sq_sums(x)
    assert len(calls) == 2
