"""Backend selection (lorsum_kernels.backends.resolve_backend): names, the LORSUM_BACKEND environment variable,
forced backends that lack an op or a device, "auto" per device and its one-time warning when the native
extension did not load. The backend value (``backends.Backend``, ``ops.resolve``): a choice resolved once
for a device, which an optimizer step makes once and passes down, each op looked up once per value; the
layers above ``ops`` never import ``backends`` or ``_native``. The ops themselves, on every backend:
tests/ops/."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import lorsum_kernels as lk
from lorsum_kernels import _native, backends, ops

from .conftest import TinyLoRAMLP

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


# ---- the backend value ---------------------------------------------------------------------------

PACKAGE = Path(lk.__file__).parent


def test_check_name():
    for name in (None, "auto", *backends.BACKENDS):
        backends.check_name(name)
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        backends.check_name("cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        ops.resolve("fast", "cpu")


def test_value_resolves_each_op_once(monkeypatch):
    calls = []
    real = backends.resolve_backend
    monkeypatch.setattr(backends, "resolve_backend", lambda *a: calls.append(a[2]) or real(*a))
    value = ops.resolve("torch", torch.device("cpu"))
    x = torch.randn(7, 5)
    for _ in range(3):
        torch.testing.assert_close(ops.col_sq_sums(x, backend=value), x.square().sum(0))
    assert calls == ["col_sq_sums"]
    assert value.of("col_sq_sums") == "torch" and not value.reads_low_precision("lorsum_update_in")
    assert ops.resolve(value, "cpu") is value


def test_value_forced_backend_errors_are_resolve_backends(monkeypatch):
    monkeypatch.setattr(backends, "_triton_missing_reason", lambda device, op: "not here")
    value = ops.resolve("triton", torch.device("cpu"))  # the name is valid: nothing resolved yet
    with pytest.raises(RuntimeError, match="backend 'triton' is not available for op 'col_sq_sums'"):
        ops.col_sq_sums(torch.ones(3, 2), backend=value)


def test_value_on_another_device_resolves_there(monkeypatch):
    value = ops.resolve(None, torch.device("meta"))
    assert value.of("col_sq_sums") == "torch"  # auto on a device without kernels
    assert value.of("col_sq_sums", torch.device("cpu")) == backends.resolve_backend(None, "cpu", "col_sq_sums")


def test_optimizer_step_resolves_once_per_op_and_step(monkeypatch):
    torch.manual_seed(0)
    model = TinyLoRAMLP()
    opt = lk.ScaledLoRSum(model, lr=0.1, normalize_step=False, backend="torch")
    calls = []
    real = backends.resolve_backend
    monkeypatch.setattr(backends, "resolve_backend", lambda *a: calls.append(a[2]) or real(*a))
    for _ in range(2):
        model(torch.randn(9, 12)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    # Two buckets per step (two layer shapes), many op calls per bucket: each op resolved once per step.
    per_step = len(calls) // 2
    assert len(calls) == 2 * per_step and len(set(calls)) == per_step, calls


def test_environment_change_takes_effect_at_the_next_step(monkeypatch):
    torch.manual_seed(0)
    model = TinyLoRAMLP()
    opt = lk.LoRSum(model, lr=0.1)
    seen = []
    real = ops.implementation
    monkeypatch.setattr(ops, "implementation", lambda b, d, op: seen.append(real(b, d, op)) or seen[-1])
    monkeypatch.setenv("LORSUM_BACKEND", "torch")
    model(torch.randn(9, 12)).square().mean().backward()
    opt.step()
    opt.zero_grad()
    assert seen and set(seen) == {"torch"}
    monkeypatch.setenv("LORSUM_BACKEND", "bogus")
    with pytest.raises(ValueError, match="LORSUM_BACKEND"):  # in backward (streamed step) or in step()
        model(torch.randn(9, 12)).square().mean().backward()
        opt.step()


def test_upper_layers_reach_backends_only_through_ops():
    for folder in ("optim", "functional"):
        for path in sorted((PACKAGE / folder).glob("*.py")):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom):
                    names = [node.module or ""] + [a.name for a in node.names]
                    assert not any(n.split(".")[-1] in ("backends", "_native") for n in names), (path, names)
                elif isinstance(node, ast.Import):
                    assert not any(a.name.split(".")[-1] in ("backends", "_native") for a in node.names), path
