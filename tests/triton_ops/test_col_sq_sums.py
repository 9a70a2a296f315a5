"""Triton col_sq_sums (lorsum_kernels.triton_kernels.sq_sums) against reference.col_sq_sums, and dispatch
to it.

Compiled on a GPU, or in Triton's interpreter (conftest.py). The subpackage's import contract and its
refusal of CPU tensors outside the interpreter: tests/test_triton_kernels.py.
"""

from __future__ import annotations

import pytest
import torch

from lorsum_kernels import ops, reference

from ..conftest import rel_err
from .conftest import DEVICE

pytestmark = pytest.mark.triton

DTYPES = [torch.float32, torch.float64, torch.bfloat16]


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
