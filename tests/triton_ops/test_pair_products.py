"""Triton pair_products (lorsum_kernels.triton_kernels.products) against reference.pair_products.

Compiled on a GPU, or in Triton's interpreter (conftest.py). The interpreter's tiles cover these small
shapes in one block each way, so one test forces 16-wide tiles to run the loops over m and n, several W
tiles and the partial buffer of several token blocks.
"""

from __future__ import annotations

import pytest
import torch

from lorsum_kernels import backends, ops, reference

from ..conftest import rel_err
from .conftest import DEVICE

pytestmark = pytest.mark.triton
DTYPES = [torch.float32, torch.float64]


def _products():
    from lorsum_kernels.triton_kernels import products

    return products


def _randn(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)


def _gradient_pair(batch, T, n, m, w, v, dtype, seed=0):
    """(f_in, f_out, W, V) = (X, Sᵀ, W, V) for X (T×n), S (T×m)."""
    X = _randn(batch + (T, n), dtype, seed)
    S = _randn(batch + (T, m), dtype, seed + 1)
    return X, S.mT, _randn(batch + (m, w), dtype, seed + 2), _randn(batch + (v, n), dtype, seed + 3)


def _check(args, out):
    expected = reference.pair_products(*args)
    for o, e in zip(out, expected):
        assert o.shape == e.shape and o.dtype == e.dtype and o.device == e.device and o.is_contiguous()
    exact = reference.pair_products(*[None if t is None else t.double() for t in args])
    tol = 1e-12 if out[0].dtype == torch.float64 else 1e-5
    for o, e in zip(out, exact):
        assert o.numel() == 0 or rel_err(o, e) < tol


# (batch, T, n, m, w, v): every T ∈ {1, 37}, m, n ∈ {5, 33}, w, v ∈ {1, 3, 16}, batch ∈ {(), (3,), (2, 2)}.
SHAPES = [((), 37, 5, 33, 3, 16), ((3,), 1, 33, 5, 16, 1), ((2, 2), 37, 33, 33, 1, 3), ((3,), 37, 5, 5, 16, 3)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gradient_pair_matches_reference(shape, dtype):
    args = _gradient_pair(*shape, dtype)
    out = _products().pair_products(*args)
    assert out[0].dtype == dtype
    _check(args, out)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_several_tiles_and_token_blocks(dtype, monkeypatch):
    # 16-wide tiles: 3 token blocks (partials summed by torch), 3 blocks of m and of n, 2 tiles of W.
    products = _products()
    monkeypatch.setattr(products, "_tiles", lambda *a: (16, 16, 16, 16, 4))
    args = _gradient_pair((2,), 37, 33, 33, 20, 17, dtype, seed=4)
    _check(args, products.pair_products(*args))


def test_factor_pair():
    # A pair of factors (F_in = A (r×n), F_out = B (m×r)): q = r, far below one token block.
    A, B = _randn((2, 3, 33), seed=5), _randn((2, 5, 3), seed=6)
    args = (A, B, _randn((2, 5, 16), seed=7), _randn((2, 1, 33), seed=8))
    _check(args, _products().pair_products(*args))


@pytest.mark.parametrize("which", ["W", "V", "both"])
def test_absent_factor_gives_empty_result(which):
    X, S_t, W, V = _gradient_pair((3,), 37, 5, 33, 3, 16, torch.float32)
    args = (X, S_t, None if which in ("W", "both") else W, None if which in ("V", "both") else V)
    out = _products().pair_products(*args)
    _check(args, out)
    if which != "V":
        assert out[0].shape == (3, 0, 5)
    if which != "W":
        assert out[1].shape == (3, 33, 0)


def test_mixed_dtypes():
    X, S_t, W, V = _gradient_pair((2,), 37, 33, 5, 3, 1, torch.float32, seed=9)
    # bf16 activations and gradients with fp32 factors: fp32 products of the bf16 values.
    args = (X.bfloat16(), S_t.bfloat16(), W, V)
    out = _products().pair_products(*args)
    assert [t.dtype for t in out] == [torch.float32] * 2
    _check(args, out)
    # One fp64 operand makes the whole computation fp64.
    args = (X, S_t.half(), W.double(), V)
    out = _products().pair_products(*args)
    assert [t.dtype for t in out] == [torch.float64] * 2
    _check(args, out)


def test_batch_dims_broadcast():
    # Factors shared by the layers, and f_in / f_out with crossed broadcast dimensions.
    X = _randn((3, 1, 37, 5), seed=10)
    S = _randn((2, 37, 33), seed=11)
    args = (X, S.mT, _randn((33, 3), seed=12), _randn((16, 5), seed=13))
    out = _products().pair_products(*args)
    assert out[0].shape == (3, 2, 3, 5) and out[1].shape == (3, 2, 33, 16)
    _check(args, out)


def test_non_contiguous_inputs():
    X = _randn((2, 33, 37), seed=14).mT  # (2, 37, 33), tokens contiguous
    S = _randn((3, 40, 10), seed=15)[1:, 1:38, ::2]  # (2, 37, 5), strided
    W = _randn((2, 16, 5), seed=16).mT  # (2, 5, 16)
    V = _randn((2, 33, 6), seed=17).mT[:, ::2]  # (2, 3, 33)
    args = (X, S.mT, W, V)
    products = _products()
    out = products.pair_products(*args)
    _check(args, out)
    contiguous = products.pair_products(*[t.contiguous() for t in args])
    for a, b in zip(out, contiguous):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


@pytest.mark.parametrize("shape", [(2, 0, 5, 33), (2, 37, 5, 0)], ids=["T0", "m0"])
def test_empty_sums_give_zeros(shape):
    batch, T, n, m = (shape[0],), *shape[1:]
    args = _gradient_pair(batch, T, n, m, 3, 4, torch.float32)
    P, Q = _products().pair_products(*args)
    assert P.shape == (2, 3, 5) and not P.any() and Q.shape == (2, m, 4) and not Q.any()


def test_nan_propagates_like_reference():
    X, S_t, W, V = _gradient_pair((2,), 37, 33, 5, 3, 16, torch.float32, seed=18)
    S_t[0, 2, 4] = float("nan")  # token 4 of layer 0: all of P[0], row 2 of Q[0]
    X[1, 7, 3] = float("nan")  # token 7 of layer 1: column 3 of P[1], all of Q[1]
    args = (X, S_t, W, V)
    out = _products().pair_products(*args)
    for o, e in zip(out, reference.pair_products(*args)):
        assert torch.equal(o.isnan(), e.isnan())
        torch.testing.assert_close(o, e, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert out[0][0].isnan().all() and out[0][1].isnan().sum() == 3
    assert out[1][0].isnan().sum() == 16 and out[1][1].isnan().all()


@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")
def test_inf_factor_does_not_meet_the_padding():
    # U = Wᵀ·f_out is +inf on every real token; padded tokens must add nothing (0·inf would be NaN).
    X = torch.rand(37, 5, device=DEVICE) + 0.5
    S = torch.rand(37, 1, device=DEVICE) + 0.5
    W = torch.full((1, 2), float("inf"), device=DEVICE)
    P, _ = _products().pair_products(X, S.mT, W)
    assert torch.equal(P, reference.pair_products(X, S.mT, W)[0]) and P.isposinf().all()


def test_rejects_bad_shapes():
    products = _products()
    X, S_t, W, V = _gradient_pair((2,), 7, 5, 3, 2, 4, torch.float32)
    with pytest.raises(ValueError, match=r"same q"):
        products.pair_products(X, S_t[..., :6])
    with pytest.raises(ValueError, match=r"W must be \(\.\.\., m, w\) with m = 3"):
        products.pair_products(X, S_t, W.mT)
    with pytest.raises(ValueError, match=r"V must be \(\.\.\., v, n\) with n = 5"):
        products.pair_products(X, S_t, None, V.mT)
    with pytest.raises(ValueError, match=r"do not broadcast"):
        products.pair_products(X, S_t, _randn((3, 3, 2)))
    with pytest.raises(TypeError, match=r"W must be one of"):
        products.pair_products(X, S_t, W.int())


def test_registered_and_dispatched(monkeypatch):
    from lorsum_kernels import triton_kernels

    assert "pair_products" in backends.TRITON_OPS
    args = _gradient_pair((2,), 7, 5, 3, 2, 4, torch.float32)
    calls = []
    real = _products().pair_products

    def spy(*a, **kw):
        calls.append(a)
        return real(*a, **kw)

    monkeypatch.setattr(triton_kernels, "pair_products", spy)
    out = ops.pair_products(*args, backend="triton")
    assert len(calls) == 1
    for a, b in zip(out, real(*args)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
