"""Triton col_sq_sums (lorsum_kernels.triton_kernels.sq_sums) against reference.col_sq_sums, the
subpackage's import contract, and dispatch to it.

Without CUDA the kernels run in Triton's interpreter on the CPU. TRITON_INTERPRET=1 is set per test (the
autouse fixture), not when this file is imported: set then, it would stay set for the whole session,
where tests/test_native_ops.py expects Triton to be unavailable on the CPU; and it could not come before
the first import of triton anyway (tests/conftest.py imports lorsum_kernels, whose torch._dynamo imports
triton). Neither matters to our kernels: triton 3.9 reads TRITON_INTERPRET when ``triton.jit`` decorates
a function, ours are decorated at launch (triton_kernels._jit), and they use no function that
triton.language jitted at its own import (triton_kernels._lang).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from lorsum_kernels import backends, ops, reference

from .conftest import rel_err

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not backends.triton_available(), reason="triton is not importable"),
]

DTYPES = [torch.float32, torch.float64, torch.bfloat16]


@pytest.fixture(autouse=True)
def _triton_mode(monkeypatch):
    if DEVICE.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("LORSUM_BACKEND", raising=False)


def _launcher():
    from lorsum_kernels.triton_kernels import sq_sums

    return sq_sums


def _check(x: torch.Tensor, out: torch.Tensor) -> None:
    expected = reference.col_sq_sums(x)
    assert out.shape == expected.shape and out.dtype == expected.dtype and out.device == x.device
    assert out.is_contiguous()
    # Both accumulate in fp32 (fp64 for fp64): only the order of the additions differs.
    rtol = 1e-12 if x.dtype == torch.float64 else 2e-6
    torch.testing.assert_close(out, expected, rtol=rtol, atol=1e-30)
    if x.numel():  # and the fp32 result is within the 1e-5 target of the exact sums
        assert rel_err(out, reference.col_sq_sums(x.double())) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape", [(1, 5), (37, 33), (3, 37, 5), (2, 3, 17, 9), (1, 33), (0, 7), (4, 0, 3), (0, 37, 5)], ids=str
)
def test_matches_reference(shape, dtype):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64).to(dtype).to(DEVICE)
    _check(x, _launcher().col_sq_sums(x))


def test_empty_token_dim_is_zero():
    out = _launcher().col_sq_sums(torch.empty(2, 0, 5, device=DEVICE))
    assert torch.equal(out, torch.zeros(2, 5, device=DEVICE))


@pytest.mark.parametrize("splits", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_token_splits_match_reference(splits, dtype):
    # The second reduction pass (per-split partial sums), which the GPU uses for few, tall inputs.
    torch.manual_seed(1)
    x = torch.randn(2, 300, 33, dtype=dtype, device=DEVICE)
    _check(x, _launcher()._col_sq_sums(x, t_splits=splits))


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
def test_non_contiguous(make_view):
    torch.manual_seed(2)
    x = make_view(torch.randn(6, 45, 31, device=DEVICE))
    launcher = _launcher()
    out = launcher.col_sq_sums(x)
    _check(x, out)
    torch.testing.assert_close(out, launcher.col_sq_sums(x.contiguous()), rtol=0, atol=0)


def test_nan_and_inf_propagate_like_reference():
    x = torch.randn(2, 37, 5, device=DEVICE)
    x[0, 3, 1] = float("nan")
    x[1, 0, 4] = float("inf")
    out = _launcher().col_sq_sums(x)
    expected = reference.col_sq_sums(x)
    assert torch.equal(out.isnan(), expected.isnan()) and out.isnan().sum() == 1
    assert torch.equal(out.isinf(), expected.isinf()) and out.isinf().sum() == 1
    finite = expected.isfinite()
    torch.testing.assert_close(out[finite], expected[finite], rtol=2e-6, atol=0)


def test_rejects_bad_input():
    launcher = _launcher()
    with pytest.raises(ValueError, match=r"col_sq_sums: x must have at least 2 dimensions"):
        launcher.col_sq_sums(torch.randn(7, device=DEVICE))
    with pytest.raises(TypeError, match=r"col_sq_sums: x must be one of float32"):
        launcher.col_sq_sums(torch.ones(3, 4, dtype=torch.int64, device=DEVICE))


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the interpreter requirement concerns CPU tensors")
def test_cpu_tensor_outside_interpreter_raises(monkeypatch):
    launcher = _launcher()  # imported (and its kernel wrapped) while the interpreter was on
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match=r"only in its interpreter; set TRITON_INTERPRET=1"):
        launcher.col_sq_sums(torch.randn(3, 4))


def test_dispatch_reaches_the_triton_launcher(monkeypatch):
    from lorsum_kernels import triton_kernels

    x = torch.randn(3, 37, 5, device=DEVICE)
    calls = []
    real = _launcher().col_sq_sums

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(triton_kernels, "col_sq_sums", spy)
    out = ops.col_sq_sums(x, backend="triton")
    assert len(calls) == 1
    torch.testing.assert_close(out, real(x), rtol=0, atol=0)
    monkeypatch.setenv("LORSUM_BACKEND", "triton")
    ops.col_sq_sums(x)
    assert len(calls) == 2


def test_triton_ops_registry_matches_launchers():
    from lorsum_kernels import triton_kernels

    assert backends.TRITON_OPS == set(triton_kernels.LAUNCHERS)
    for name in triton_kernels.LAUNCHERS:
        assert callable(getattr(triton_kernels, name))


def test_package_imports_without_triton():
    # triton blocked in a fresh interpreter: the package, the subpackage and the torch/native paths still
    # work, and forcing the Triton backend names the cause.
    code = """
import sys
sys.modules["triton"] = None
import torch
import lorsum_kernels, lorsum_kernels.triton_kernels
from lorsum_kernels import ops
x = torch.randn(4, 3)
torch.testing.assert_close(ops.col_sq_sums(x, backend="torch"), (x * x).sum(0))
try:
    ops.col_sq_sums(x, backend="triton")
except RuntimeError as e:
    assert "triton is not importable" in str(e), e
else:
    raise AssertionError("forced triton without triton did not raise")
assert "triton" not in [m for m in sys.modules if sys.modules[m] is not None and m.split(".")[0] == "triton"]
"""
    env = {k: v for k, v in os.environ.items() if k != "LORSUM_BACKEND"}
    env["TRITON_INTERPRET"] = "1"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env=env, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
