"""Backend selection (lorsum_kernels.backends.resolve_backend): names, the LORSUM_BACKEND environment variable,
forced backends that lack an op or a device, "auto" per device and its one-time warning when the native
extension did not load. The ops themselves, on every backend: tests/ops/."""

from __future__ import annotations

import pytest
import torch

from lorsum_kernels import _native, backends

requires_native = pytest.mark.skipif(
    not _native.NATIVE_AVAILABLE, reason=f"native extension not loaded: {_native.native_error}"
)


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
