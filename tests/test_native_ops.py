"""The native ops (lorsum_kernels._C) against lorsum_kernels.reference, and backend selection."""

from __future__ import annotations

import pytest
import torch

from lorsum_kernels import _native, backends, reference

requires_native = pytest.mark.skipif(
    not _native.NATIVE_AVAILABLE, reason=f"native extension not loaded: {_native.native_error}"
)

SHAPES = [(5, 123), (1, 1), (37, 256), (3, 37, 5), (2, 3, 17, 9), (0, 7), (4, 0, 3), (2, 300, 33)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _col_sq_sums(x: torch.Tensor) -> torch.Tensor:
    return torch.ops.lorsum.col_sq_sums(x)


def _assert_matches_reference(x: torch.Tensor) -> None:
    out = _col_sq_sums(x)
    # The reference applied to the same input (bf16/fp16 included): both accumulate in fp32 (fp64 for
    # fp64), so only the order of the additions differs.
    expected = reference.col_sq_sums(x)
    assert out.shape == expected.shape == x.shape[:-2] + x.shape[-1:]
    assert out.dtype == expected.dtype
    assert out.device == x.device
    if x.dtype == torch.float64:
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=0)
    else:
        torch.testing.assert_close(out, expected, rtol=2e-6, atol=1e-30)


@requires_native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_col_sq_sums_matches_reference(shape, dtype):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64).to(dtype)
    _assert_matches_reference(x)


@requires_native
def test_col_sq_sums_empty_sum_is_zero():
    out = _col_sq_sums(torch.empty(2, 0, 5))
    assert out.shape == (2, 5)
    assert torch.equal(out, torch.zeros(2, 5))


@requires_native
def test_col_sq_sums_fp32_close_to_fp64_long_token_dim():
    # A long token dimension: the fp32 accumulation stays within 1e-6 of the exact sum (DESIGN.md asks
    # for 1e-5 relative error of fp32 results against an fp64 reference).
    torch.manual_seed(1)
    x = torch.randn(3, 20000, 40, dtype=torch.float64)
    exact = reference.col_sq_sums(x)
    out = _col_sq_sums(x.float()).double()
    assert ((out - exact).norm() / exact.norm()).item() < 1e-6


@requires_native
@pytest.mark.parametrize(
    "make_view",
    [
        pytest.param(lambda b: b.mT, id="transposed"),
        pytest.param(lambda b: b[:, 1:40:3, 2:19], id="sliced-rows-and-cols"),
        pytest.param(lambda b: b[:, :, ::2], id="strided-cols"),
        pytest.param(lambda b: b.permute(2, 0, 1)[:, :5], id="permuted-batch"),
        pytest.param(lambda b: b[:1].expand(4, -1, -1), id="expanded-batch"),
        pytest.param(lambda b: b[0, 0].expand(50, -1), id="expanded-rows"),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_col_sq_sums_non_contiguous(make_view, dtype):
    torch.manual_seed(2)
    x = make_view(torch.randn(6, 45, 31).to(dtype))
    _assert_matches_reference(x)
    torch.testing.assert_close(_col_sq_sums(x), _col_sq_sums(x.contiguous()), rtol=0, atol=0)


@requires_native
def test_col_sq_sums_large_parallel_matches_serial():
    # Enough work that at::parallel_for splits it across threads (when more than one is available).
    torch.manual_seed(3)
    x = torch.randn(4, 700, 1000)
    out = _col_sq_sums(x)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = _col_sq_sums(x)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(out, serial, rtol=0, atol=0)
    _assert_matches_reference(x)


@requires_native
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
def test_col_sq_sums_opcheck(x):
    torch.library.opcheck(torch.ops.lorsum.col_sq_sums.default, (x,))


@requires_native
def test_col_sq_sums_gradcheck():
    x = torch.randn(2, 7, 5, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.lorsum.col_sq_sums.default, (x,))
    assert torch.autograd.gradcheck(torch.ops.lorsum.col_sq_sums, (x,))


@requires_native
def test_col_sq_sums_fake_tensor_and_compile():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        out = _col_sq_sums(torch.empty(4, 10, 3, dtype=torch.bfloat16))
    assert out.shape == (4, 3) and out.dtype == torch.float32

    x = torch.randn(3, 11, 6)
    compiled = torch.compile(lambda t: _col_sq_sums(t) * 2, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), 2 * reference.col_sq_sums(x))


@requires_native
def test_col_sq_sums_rejects_1d():
    with pytest.raises(RuntimeError, match=r"col_sq_sums: x must have at least 2 dimensions"):
        _col_sq_sums(torch.randn(7))


@requires_native
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64], ids=str)
def test_col_sq_sums_rejects_non_float(dtype):
    x = torch.ones(3, 4, dtype=dtype)
    with pytest.raises(RuntimeError, match=r"col_sq_sums: x must be float32, float64, bfloat16 or float16"):
        _col_sq_sums(x)


# ---- backend selection -----------------------------------------------------------------------------


@pytest.fixture
def no_backend_env(monkeypatch):
    monkeypatch.delenv("LORSUM_BACKEND", raising=False)
    return monkeypatch


def test_resolve_backend_unknown_name(no_backend_env):
    with pytest.raises(ValueError, match=r"unknown backend 'cudnn'.*native, triton, torch"):
        backends.resolve_backend("cudnn", torch.device("cpu"), "col_sq_sums")


def test_resolve_backend_unknown_env_name(no_backend_env):
    no_backend_env.setenv("LORSUM_BACKEND", "fast")
    with pytest.raises(ValueError, match=r"unknown LORSUM_BACKEND 'fast'"):
        backends.resolve_backend(None, torch.device("cpu"), "col_sq_sums")


def test_resolve_backend_forced_triton_unavailable_raises(no_backend_env):
    # No op has a Triton implementation registered for the CPU here (and no TRITON_INTERPRET).
    no_backend_env.delenv("TRITON_INTERPRET", raising=False)
    match = r"backend 'triton' is not available for op 'col_sq_sums' on device cpu"
    with pytest.raises(RuntimeError, match=match):
        backends.resolve_backend("triton", torch.device("cpu"), "col_sq_sums")


def test_resolve_backend_forced_native_missing_op_raises(no_backend_env):
    with pytest.raises(RuntimeError, match=r"backend 'native' is not available for op 'no_such_op'"):
        backends.resolve_backend("native", "cpu", "no_such_op")


def test_resolve_backend_forced_native_cuda_without_cuda_kernel_raises(no_backend_env):
    if _native.has_native_op("col_sq_sums", "cuda"):
        pytest.skip("this build has CUDA kernels")
    with pytest.raises(RuntimeError, match=r"'col_sq_sums' on device cuda"):
        backends.resolve_backend("native", torch.device("cuda"), "col_sq_sums")


def test_resolve_backend_torch_always_available(no_backend_env):
    assert backends.resolve_backend("torch", torch.device("cpu"), "no_such_op") == "torch"
    assert backends.resolve_backend("torch", torch.device("meta"), "col_sq_sums") == "torch"


def test_resolve_backend_honours_env(no_backend_env):
    no_backend_env.setenv("LORSUM_BACKEND", "torch")
    assert backends.resolve_backend(None, torch.device("cpu"), "col_sq_sums") == "torch"
    assert backends.resolve_backend("auto", torch.device("cpu"), "col_sq_sums") == "torch"
    # An explicit backend argument wins over the environment.
    if _native.NATIVE_AVAILABLE:
        assert backends.resolve_backend("native", torch.device("cpu"), "col_sq_sums") == "native"
    no_backend_env.setenv("LORSUM_BACKEND", "triton")
    with pytest.raises(RuntimeError, match=r"backend 'triton'"):
        backends.resolve_backend(None, torch.device("cpu"), "col_sq_sums")


@requires_native
def test_resolve_backend_auto_cpu_is_native(no_backend_env):
    assert backends.resolve_backend(None, torch.device("cpu"), "col_sq_sums") == "native"
    assert backends.resolve_backend("auto", "cpu", "col_sq_sums") == "native"
    # An op without a native kernel falls back to torch silently.
    assert backends.resolve_backend("auto", "cpu", "no_such_op") == "torch"


def test_resolve_backend_auto_cuda_without_kernels_is_torch(no_backend_env):
    # Without a CUDA kernel or a Triton implementation of the op, auto on CUDA is torch.
    if _native.has_native_op("col_sq_sums", "cuda"):
        pytest.skip("this build has CUDA kernels")
    assert backends.resolve_backend(None, torch.device("cuda"), "no_such_op") == "torch"


def test_resolve_backend_auto_fallback_warns_once(no_backend_env):
    no_backend_env.setattr(_native, "NATIVE_AVAILABLE", False)
    no_backend_env.setattr(_native, "native_error", "ImportError: simulated")
    no_backend_env.setattr(backends, "_warned_native_fallback", False)
    no_backend_env.delenv("LORSUM_SKIP_LOADING_SO", raising=False)
    with pytest.warns(RuntimeWarning, match="simulated"):
        assert backends.resolve_backend(None, torch.device("cpu"), "col_sq_sums") == "torch"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.resolve_backend(None, torch.device("cpu"), "col_sq_sums") == "torch"
    with pytest.raises(RuntimeError, match=r"did not load \(ImportError: simulated\)"):
        backends.resolve_backend("native", torch.device("cpu"), "col_sq_sums")
