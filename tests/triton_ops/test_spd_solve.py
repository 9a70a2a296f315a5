"""Triton spd_solve (lorsum_kernels.triton_kernels.spd) against reference.spd_solve and its ridge rules.

Compiled on a GPU, or in Triton's interpreter (conftest.py). The interpreter runs the r-step
factorisation op by op, about 1 s for r = 16, so the larger r appear only in a few cases.
"""

from __future__ import annotations

import pytest
import torch

from lorsum_kernels import ops, reference

from ..conftest import rel_err
from .conftest import DEVICE

pytestmark = pytest.mark.triton
DTYPES = [torch.float32, torch.float64]
# A failed factorisation takes the square root of a non-positive pivot on purpose (numpy warns about it
# in the interpreter).
SQRT_WARNING = pytest.mark.filterwarnings("ignore:invalid value encountered in sqrt:RuntimeWarning")


def _spd():
    from lorsum_kernels.triton_kernels import spd

    return spd


def _gram(batch, r, dtype, seed=0):
    """Well-conditioned (κ ≲ 1e2) SPD matrices, so that fp32 solves meet the 1e-5 target."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(batch + (r, 2 * r + 3), generator=g, dtype=torch.float64)
    return (a @ a.mT / (2 * r + 3) + 0.1 * torch.eye(r, dtype=torch.float64)).to(dtype).to(DEVICE)


def _rhs(shape, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)


def _check(gram, rhs, left, out):
    expected = reference.spd_solve(gram.to(out.dtype), rhs.to(out.dtype), left=left)
    assert out.shape == expected.shape and out.device == expected.device and out.is_contiguous()
    exact = reference.spd_solve(gram.double(), rhs.double(), left=left)
    assert rel_err(out, exact) < (1e-12 if out.dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("left", [True, False], ids=["left", "right"])
@pytest.mark.parametrize("batch,r,N", [((), 1, 5), ((2,), 3, 33), ((3,), 3, 1), ((), 16, 37)], ids=str)
def test_matches_reference(batch, r, N, left, dtype):
    gram = _gram(batch, r, dtype)
    rhs = _rhs(batch + ((r, N) if left else (N, r)), dtype)
    out = _spd().spd_solve(gram, rhs, left=left)
    assert out.dtype == dtype
    _check(gram, rhs, left, out)


def test_r_64_and_several_column_blocks():
    gram = _gram((), 64, torch.float64, seed=2)
    rhs = _rhs((64, 130), torch.float64)
    _check(gram, rhs, True, _spd().spd_solve(gram, rhs))


@pytest.mark.parametrize(
    "g_batch,r_batch",
    [((), (2,)), ((2,), ()), ((3, 1), (2,)), ((1, 2), (3, 1))],
    ids=["gram-shared", "rhs-shared", "both", "crossed"],
)
def test_batch_dims_broadcast(g_batch, r_batch):
    gram = _gram(g_batch, 3, torch.float32, seed=3)
    rhs = _rhs(r_batch + (5, 3), torch.float32)
    out = _spd().spd_solve(gram, rhs, left=False)
    assert out.shape == torch.broadcast_shapes(g_batch, r_batch) + (5, 3)
    _check(gram, rhs, False, out)


def test_reads_only_the_lower_triangle():
    gram = _gram((2,), 3, torch.float64, seed=4)
    garbage = torch.triu(torch.full_like(gram, 7.0), diagonal=1)
    garbage[1, 0, 2] = float("nan")
    rhs = _rhs((2, 3, 4), torch.float64)
    out = _spd().spd_solve(torch.tril(gram) + garbage, rhs)
    torch.testing.assert_close(out, reference.spd_solve(gram, rhs), rtol=1e-12, atol=0)


def test_non_contiguous_inputs():
    gram = _gram((2,), 3, torch.float32, seed=5).mT  # symmetric: a transposed view reads the same
    rhs = _rhs((2, 5, 6), torch.float32).mT[:, ::2]  # (2, 3, 5): every other row of a transposed view
    spd = _spd()
    out = spd.spd_solve(gram, rhs)
    _check(gram, rhs, True, out)
    torch.testing.assert_close(out, spd.spd_solve(gram.contiguous(), rhs.contiguous()), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_gram_uses_the_floored_ridge(dtype):
    # B = 0 at the standard LoRA init: a zero Gram, factorisable through the floor of its mean diagonal.
    gram = torch.zeros(2, 3, 3, dtype=dtype, device=DEVICE)
    rhs = _rhs((2, 3, 4), dtype)
    rhs[1] = 0
    out = _spd().spd_solve(gram, rhs)
    assert torch.isfinite(out).all() and not out[1].any()
    torch.testing.assert_close(out, reference.spd_solve(gram, rhs), rtol=1e-6, atol=0)


@SQRT_WARNING
@pytest.mark.parametrize("dtype,pivot", [(torch.float32, -1e-6), (torch.float64, -1e-11)],
                         ids=["fp32", "fp64"])
def test_fallback_ridge_where_the_first_factorisation_fails(dtype, pivot):
    # A pivot below -RELATIVE_RIDGE·s but above -(RELATIVE_RIDGE + FALLBACK_RIDGE)·s: the first attempt
    # fails, the fallback succeeds, per matrix (the second matrix of the batch takes the first attempt).
    gram = torch.stack([torch.diag(torch.tensor([1.0, pivot, 1.0], dtype=dtype)), torch.eye(3, dtype=dtype)])
    gram = gram.to(DEVICE)
    rhs = _rhs((2, 3, 4), dtype)
    out = _spd().spd_solve(gram, rhs)
    expected = reference.spd_solve(gram, rhs)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=0)


@SQRT_WARNING
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_indefinite_gram_gives_nan(dtype):
    # Both attempts fail: NaN, as the native kernels (the reference returns LAPACK's partial factor's
    # solution there, which depends on the LAPACK build). The other matrix of the batch is unaffected.
    gram = torch.stack([torch.diag(torch.tensor([1.0, -1.0, 1.0], dtype=dtype)), torch.eye(3, dtype=dtype)])
    gram = gram.to(DEVICE)
    rhs = _rhs((2, 3, 4), dtype)
    out = _spd().spd_solve(gram, rhs)
    assert out[0].isnan().all()
    torch.testing.assert_close(out[1], rhs[1], rtol=1e-6, atol=0)


@SQRT_WARNING
@pytest.mark.parametrize("where", [(2, 0), (1, 1), (0, 0)], ids=str)
def test_nan_in_gram_propagates_like_reference(where):
    gram = _gram((2,), 3, torch.float32, seed=6)
    gram[0, where[0], where[1]] = float("nan")
    rhs = _rhs((2, 3, 4), torch.float32)
    out, expected = _spd().spd_solve(gram, rhs), reference.spd_solve(gram, rhs)
    assert torch.equal(out.isnan(), expected.isnan()) and out[0].isnan().all() and not out[1].isnan().any()


@pytest.mark.parametrize("left", [True, False], ids=["left", "right"])
def test_nan_in_rhs_propagates_like_reference(left):
    gram = _gram((2,), 3, torch.float32, seed=7)
    rhs = _rhs((2, 3, 4) if left else (2, 4, 3), torch.float32)
    rhs[1, 2, 1] = float("nan")
    out, expected = _spd().spd_solve(gram, rhs, left=left), reference.spd_solve(gram, rhs, left=left)
    assert torch.equal(out.isnan(), expected.isnan()) and out.isnan().sum() == 3
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=0, equal_nan=True)


def test_half_inputs_solve_in_fp32():
    gram = _gram((2,), 3, torch.float32, seed=8)
    rhs = _rhs((2, 3, 4), torch.float32)
    out = _spd().spd_solve(gram.bfloat16(), rhs.bfloat16())
    assert out.dtype == torch.bfloat16
    expected = reference.spd_solve(gram.bfloat16().float(), rhs.bfloat16().float())
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2)
    # fp32 gram with bf16 rhs promotes to fp32
    assert _spd().spd_solve(gram, rhs.bfloat16()).dtype == torch.float32


def test_wider_than_the_register_tile_uses_the_reference():
    spd = _spd()
    gram = _gram((), spd.MAX_R + 1, torch.float64, seed=9)
    rhs = _rhs((spd.MAX_R + 1, 3), torch.float64)
    torch.testing.assert_close(spd.spd_solve(gram, rhs), reference.spd_solve(gram, rhs), rtol=0, atol=0)


@pytest.mark.parametrize("g_shape,r_shape", [((0, 3, 3), (0, 3, 4)), ((3, 3), (3, 0)), ((0, 0), (0, 5))],
                         ids=str)
def test_empty(g_shape, r_shape):
    out = _spd().spd_solve(torch.ones(g_shape, device=DEVICE), torch.ones(r_shape, device=DEVICE))
    assert out.shape == torch.broadcast_shapes(g_shape[:-2], r_shape[:-2]) + r_shape[-2:]


def test_rejects_bad_shapes():
    spd = _spd()
    with pytest.raises(ValueError, match=r"gram must be square"):
        spd.spd_solve(torch.ones(3, 4, device=DEVICE), torch.ones(3, 2, device=DEVICE))
    with pytest.raises(ValueError, match=r"rhs must be \(\.\.\., N, r\) for left=False"):
        spd.spd_solve(torch.eye(3, device=DEVICE), torch.ones(3, 2, device=DEVICE), left=False)
    with pytest.raises(ValueError, match=r"do not broadcast"):
        spd.spd_solve(torch.ones(2, 3, 3, device=DEVICE), torch.ones(3, 3, 2, device=DEVICE))


def test_dispatch_reaches_the_triton_launcher(monkeypatch):
    from lorsum_kernels import triton_kernels

    gram, rhs = _gram((2,), 3, torch.float32), _rhs((2, 4, 3), torch.float32)
    calls = []
    real = _spd().spd_solve

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(triton_kernels, "spd_solve", spy)
    out = ops.spd_solve(gram, rhs, left=False, backend="triton")
    assert calls == [{"left": False}]
    torch.testing.assert_close(out, real(gram, rhs, left=False), rtol=0, atol=0)
