"""Triton row_col_energies (lorsum_kernels.triton_kernels.energies) against reference.row_col_energies.

Compiled on a GPU, or in Triton's interpreter (conftest.py).
"""

from __future__ import annotations

import pytest
import torch

from lorsum_kernels import ops, reference

from ..conftest import rel_err
from .conftest import DEVICE

pytestmark = pytest.mark.triton

# (X dtype, S dtype). bf16 pairs run upcast in the interpreter (its tl.dot mishandles bf16) and on the
# tensor cores on a GPU; both must match the reference's fp32 products of the same bf16 numbers.
DTYPES = [(torch.float32, torch.float32), (torch.float64, torch.float64), (torch.float32, torch.float64),
          (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.bfloat16, torch.float32)]


def _energies():
    from lorsum_kernels.triton_kernels import energies

    return energies


def _problem(batch, T, n, m, x_dtype, s_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(batch + (T, n), generator=g, dtype=torch.float64).to(x_dtype).to(DEVICE)
    S = torch.randn(batch + (T, m), generator=g, dtype=torch.float64).to(s_dtype).to(DEVICE)
    return X, S


def _check(X, S, out):
    rows, cols = out
    exp_rows, exp_cols = reference.row_col_energies(X, S)
    for o, e in ((rows, exp_rows), (cols, exp_cols)):
        assert o.shape == e.shape and o.dtype == e.dtype and o.device == e.device and o.is_contiguous()
    # Against the exact energies of the same (possibly bf16) numbers: fp32 within the 1e-5 target, fp64
    # at fp64 rounding.
    exact = reference.row_col_energies(X.double(), S.double())
    tol = 1e-12 if rows.dtype == torch.float64 else 1e-5
    assert rel_err(rows, exact[0]) < tol and rel_err(cols, exact[1]) < tol


@pytest.mark.parametrize("x_dtype,s_dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("batch,T,n,m", [((), 37, 5, 33), ((2,), 1, 33, 5), ((2, 1), 37, 33, 33)],
                         ids=["T37", "T1", "batch2d"])
def test_matches_reference(batch, T, n, m, x_dtype, s_dtype):
    X, S = _problem(batch, T, n, m, x_dtype, s_dtype)
    _check(X, S, _energies().row_col_energies(X, S))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_several_tiles_and_token_blocks(dtype):
    # More than one tile each way and several token blocks: the second reduction over tiles.
    X, S = _problem((2,), 70, 90, 75, dtype, dtype, seed=1)
    _check(X, S, _energies().row_col_energies(X, S))


@pytest.mark.parametrize("batch,T,n,m", [((2,), 0, 5, 3), ((0,), 7, 5, 3), ((2,), 7, 0, 3)], ids=str)
def test_empty(batch, T, n, m):
    X, S = _problem(batch, T, n, m, torch.float32, torch.float32)
    rows, cols = _energies().row_col_energies(X, S)
    assert rows.shape == batch + (m,) and cols.shape == batch + (n,)
    assert not rows.any() and not cols.any()


def test_non_contiguous():
    g = torch.Generator().manual_seed(2)
    X = torch.randn(2, 33, 37, generator=g).to(DEVICE).mT  # (2, 37, 33), tokens contiguous
    S = torch.randn(3, 40, 12, generator=g).to(DEVICE)[1:, 1:38, ::2]  # (2, 37, 6), strided
    energies = _energies()
    out = energies.row_col_energies(X, S)
    _check(X, S, out)
    contiguous = energies.row_col_energies(X.contiguous(), S.contiguous())
    for a, b in zip(out, contiguous):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


def test_nan_propagates_like_reference():
    X, S = _problem((2,), 37, 5, 33, torch.float32, torch.float32, seed=3)
    S[0, 4, 7] = float("nan")  # G[0] row 7 is NaN: rows[0, 7] and every cols[0] entry
    X[1, 2, 3] = float("nan")  # G[1] column 3 is NaN: cols[1, 3] and every rows[1] entry
    out = _energies().row_col_energies(X, S)
    ref = reference.row_col_energies(X, S)
    for o, e in zip(out, ref):
        assert torch.equal(o.isnan(), e.isnan())
        torch.testing.assert_close(o, e, rtol=1e-5, atol=0, equal_nan=True)
    assert out[0].isnan().sum() == 1 + 33 and out[1].isnan().sum() == 5 + 1


def test_rejects_mismatched_shapes():
    X, S = _problem((2,), 7, 5, 3, torch.float32, torch.float32)
    with pytest.raises(ValueError, match=r"same batch shape and T"):
        _energies().row_col_energies(X, S[:, :4])
    with pytest.raises(ValueError, match=r"same batch shape and T"):
        _energies().row_col_energies(X, S[:1])


def test_dispatch_reaches_the_triton_launcher(monkeypatch):
    from lorsum_kernels import triton_kernels

    X, S = _problem((2,), 7, 5, 3, torch.float32, torch.float32)
    calls = []
    real = _energies().row_col_energies

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(triton_kernels, "row_col_energies", spy)
    out = ops.row_col_energies(X, S, backend="triton")
    assert len(calls) == 1
    for a, b in zip(out, real(X, S)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
