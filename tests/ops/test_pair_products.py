"""pair_products (the token products of the half-steps' right sides) on every backend against
reference.pair_products.

Contract: for a pair (f_in (..., q, n), f_out (..., m, q)) (the gradient pair (X, Sᵀ) with q = T tokens, or a
factor pair (A, B) with q = r) and optional factors W (..., m, w), V (..., v, n): P = (Wᵀ·f_out)·f_in
(..., w, n) and Q = f_out·(f_in·Vᵀ) (..., m, v), an absent factor giving an empty result, batch dimensions
broadcast; contiguous, accumulated in fp32 (fp64 if any input is fp64) and returned in that dtype: within
1e-5 (fp64: 1e-12) of the fp64 reference on the same values; no tokens give zeros; a NaN reaches the entries
the reference's products carry it to; run-to-run deterministic. [B̂ | B̂_m] in one pass gives the two
products of PSI-LoRA's weight and momentum steps. Native: both CPU code paths and every dtype; CUDA: the
layer grid, w = 2r; Triton: several tiles and token blocks (16-wide tiles forced), factor pairs, mixed dtypes,
broadcasting, views, an infinite factor against the padding, its input checks and dispatch.
"""

from __future__ import annotations

import functools

import pytest
import torch

from lorsum_kernels import backends, ops, reference

from ..problems import (NATIVE_CPU, NATIVE_CUDA, TRITON, assert_deterministic, cpu64, fp32_tol, gen, over_backends,
                        randn, rel_err, spy_on_launcher)

OP = "pair_products"
DTYPES = [torch.float32, torch.float64]
_randn = functools.partial(randn, dtype=torch.float32, device=NATIVE_CUDA.device)
# (L, T, m, n, r): every value of r ∈ {1, 3, 16}, m, n ∈ {5, 123, 256}, T ∈ {1, 37, 512} and L ∈ {1, 3}.
CUDA_SHAPES = [(1, 37, 5, 123, 3), (3, 37, 123, 5, 1), (1, 512, 123, 256, 16), (3, 1, 256, 123, 3),
               (3, 512, 5, 5, 3), (1, 37, 256, 256, 16), (3, 37, 123, 123, 16)]


def _launcher():
    from lorsum_kernels.triton_kernels import products

    return products


# ---- native CPU --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(1, 37, 5, 123, 3), (3, 512, 256, 123, 19), (2, 1, 123, 256, 1)], ids=str)
@over_backends(OP, NATIVE_CPU)
def test_native_matches_reference(be, shape, dtype, cpu_path):
    L, T, m, n, w = shape
    g = torch.Generator().manual_seed(3)
    X, S = torch.randn(L, T, n, generator=g).to(dtype), torch.randn(L, T, m, generator=g).to(dtype)
    W, V = torch.randn(L, m, w, generator=g), torch.randn(L, w + 2, n, generator=g)
    P, Q = ops.pair_products(X, S.mT, W, V, backend="native")
    eP, eQ = reference.pair_products(X.double(), S.double().mT, W.double(), V.double())
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert P.dtype == Q.dtype == acc and P.shape == (L, w, n) and Q.shape == (L, m, w + 2)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert rel_err(P, eP) < tol and rel_err(Q, eQ) < tol
    # One side only: the other result is empty.
    P1, Q1 = ops.pair_products(X, S.mT, W, None, backend="native")
    assert Q1.shape == (L, m, 0) and torch.equal(P1, P)
    P2, Q2 = ops.pair_products(X, S.mT, None, V, backend="native")
    assert P2.shape == (L, 0, n) and torch.equal(Q2, Q)


@over_backends(OP, NATIVE_CPU)
def test_native_wide_factor_equals_separate(be):
    # [B̂ | B̂_m] in one pass gives the two A-step products of PSI-LoRA's weight and momentum steps.
    g = torch.Generator().manual_seed(4)
    X, S = torch.randn(3, 300, 70, generator=g), torch.randn(3, 300, 90, generator=g)
    B, B_m = torch.randn(3, 90, 8, generator=g), torch.randn(3, 90, 5, generator=g)
    wide, _ = ops.pair_products(X, S.mT, torch.cat([B, B_m], -1), backend="native")
    one, _ = ops.pair_products(X, S.mT, B, backend="native")
    two, _ = ops.pair_products(X, S.mT, B_m, backend="native")
    torch.testing.assert_close(wide, torch.cat([one, two], -2), rtol=0, atol=0)

@over_backends(OP, NATIVE_CPU)
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-one-side"])
def test_native_opcheck(be, bf16):
    g = gen(0)
    X, S = randn(2, 9, 5, g=g, dtype=torch.float32), randn(2, 9, 7, g=g, dtype=torch.float32)
    A, B = randn(2, 3, 5, g=g, dtype=torch.float32), randn(2, 7, 3, g=g, dtype=torch.float32)
    args = (X.bfloat16(), S.mT.bfloat16(), B, None) if bf16 else (X, S.mT, B, A)
    torch.library.opcheck(torch.ops.lorsum.pair_products.default, args)


@over_backends(OP, NATIVE_CUDA)
def test_cuda_opcheck(be):
    # Schema, fake (meta) implementation, autograd registration and AOT dispatch on CUDA tensors.
    g = gen(18)
    X, S = _randn(2, 37, 5, g=g), _randn(2, 37, 7, g=g)
    A0, B0 = _randn(2, 3, 5, g=g), _randn(2, 7, 3, g=g)
    torch.library.opcheck(torch.ops.lorsum.pair_products, (X, S.mT, B0, A0))


# ---- CUDA --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("wide", [False, True], ids=["w=r", "w=2r"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=lambda s: "L{}_T{}_m{}_n{}_r{}".format(*s))
@over_backends(OP, NATIVE_CUDA)
def test_cuda_gradient_pair(be, shape, dtype, wide):
    # P = (S·W)ᵀ·X and Q = Sᵀ·(X·Vᵀ) for the gradient pair (X, Sᵀ); W = [B̂ | B̂_m] when wide. Factors in
    # fp32 (fp64 for fp64), X and S in `dtype`.
    L, T, m, n, r = shape
    w = 2 * r if wide else r
    g = gen(14)
    fdt = torch.float64 if dtype == torch.float64 else torch.float32
    X, S = _randn(L, T, n, g=g, dtype=dtype), _randn(L, T, m, g=g, dtype=dtype, scale=0.1)
    W, V = _randn(L, m, w, g=g, dtype=fdt), _randn(L, w, n, g=g, dtype=fdt)
    P, Q = torch.ops.lorsum.pair_products(X, S.mT, W, V)
    exp_P, exp_Q = reference.pair_products(cpu64(X), cpu64(S).mT, cpu64(W), cpu64(V))
    assert P.shape == (L, w, n) and Q.shape == (L, m, w) and P.dtype == Q.dtype == fdt
    assert rel_err(P, exp_P) < fp32_tol(dtype) and rel_err(Q, exp_Q) < fp32_tol(dtype)
    assert_deterministic(lambda: torch.ops.lorsum.pair_products(X, S.mT, W, V))


@over_backends(OP, NATIVE_CUDA)
def test_cuda_factor_pair_mixed_and_absent(be):
    g = gen(15)
    L, m, n, r, q = 3, 123, 256, 16, 3
    A_m, B_m = _randn(L, q, n, g=g), _randn(L, m, q, g=g)  # a contiguous f_out (m×q): rows copied
    W, V = _randn(L, m, r, g=g), _randn(L, r, n, g=g)
    P, Q = torch.ops.lorsum.pair_products(A_m, B_m, W, V)
    exp_P, exp_Q = reference.pair_products(cpu64(A_m), cpu64(B_m), cpu64(W), cpu64(V))
    assert rel_err(P, exp_P) < 1e-5 and rel_err(Q, exp_Q) < 1e-5
    # bf16 X with fp32 S.
    X, S = _randn(L, 37, n, g=g, dtype=torch.bfloat16), _randn(L, 37, m, g=g)
    P, Q = torch.ops.lorsum.pair_products(X, S.mT, W, V)
    exp_P, exp_Q = reference.pair_products(cpu64(X), cpu64(S).mT, cpu64(W), cpu64(V))
    assert rel_err(P, exp_P) < 1e-5 and rel_err(Q, exp_Q) < 1e-5
    # Absent factors give empty products; no tokens give zeros.
    P, Q = torch.ops.lorsum.pair_products(X, S.mT, None, V)
    assert P.shape == (L, 0, n) and rel_err(Q, exp_Q) < 1e-5
    P, Q = torch.ops.lorsum.pair_products(X, S.mT, W, None)
    assert Q.shape == (L, m, 0) and rel_err(P, exp_P) < 1e-5
    P, Q = torch.ops.lorsum.pair_products(X[:, :0], S[:, :0].mT, W, V)
    assert torch.equal(P, torch.zeros_like(P)) and torch.equal(Q, torch.zeros_like(Q))


@over_backends(OP, NATIVE_CUDA)
def test_cuda_nan(be):
    g = gen(16)
    X, S = _randn(2, 512, 123, g=g), _randn(2, 512, 5, g=g)
    W, V = _randn(2, 5, 3, g=g), _randn(2, 3, 123, g=g)
    X[0, 300, 7] = float("nan")
    P, Q = torch.ops.lorsum.pair_products(X, S.mT, W, V)
    assert P[0, :, 7].isnan().all() and P[0, :, :7].isfinite().all() and P[0, :, 8:].isfinite().all()
    assert Q[0].isnan().all()
    assert P[1].isfinite().all() and Q[1].isfinite().all()


# ---- Triton ------------------------------------------------------------------------------------------------



def _normal(shape, dtype=torch.float32, seed=0):
    return randn(*shape, g=gen(seed), dtype=dtype, device=TRITON.device)


def _gradient_pair(batch, T, n, m, w, v, dtype, seed=0):
    """(f_in, f_out, W, V) = (X, Sᵀ, W, V) for X (T×n), S (T×m)."""
    X = _normal(batch + (T, n), dtype, seed)
    S = _normal(batch + (T, m), dtype, seed + 1)
    return X, S.mT, _normal(batch + (m, w), dtype, seed + 2), _normal(batch + (v, n), dtype, seed + 3)


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
@over_backends(OP, TRITON)
def test_gradient_pair_matches_reference(be, shape, dtype):
    args = _gradient_pair(*shape, dtype)
    out = _launcher().pair_products(*args)
    assert out[0].dtype == dtype
    _check(args, out)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@over_backends(OP, TRITON)
def test_several_tiles_and_token_blocks(be, dtype, monkeypatch):
    # 16-wide tiles: 3 token blocks (partials summed by torch), 3 blocks of m and of n, 2 tiles of W.
    products = _launcher()
    monkeypatch.setattr(products, "_tiles", lambda *a: (16, 16, 16, 16, 4))
    args = _gradient_pair((2,), 37, 33, 33, 20, 17, dtype, seed=4)
    _check(args, products.pair_products(*args))


@over_backends(OP, TRITON)
def test_factor_pair(be):
    # A pair of factors (F_in = A (r×n), F_out = B (m×r)): q = r, far below one token block.
    A, B = _normal((2, 3, 33), seed=5), _normal((2, 5, 3), seed=6)
    args = (A, B, _normal((2, 5, 16), seed=7), _normal((2, 1, 33), seed=8))
    _check(args, _launcher().pair_products(*args))


@pytest.mark.parametrize("which", ["W", "V", "both"])
@over_backends(OP, TRITON)
def test_absent_factor_gives_empty_result(be, which):
    X, S_t, W, V = _gradient_pair((3,), 37, 5, 33, 3, 16, torch.float32)
    args = (X, S_t, None if which in ("W", "both") else W, None if which in ("V", "both") else V)
    out = _launcher().pair_products(*args)
    _check(args, out)
    if which != "V":
        assert out[0].shape == (3, 0, 5)
    if which != "W":
        assert out[1].shape == (3, 33, 0)


@over_backends(OP, TRITON)
def test_mixed_dtypes(be):
    X, S_t, W, V = _gradient_pair((2,), 37, 33, 5, 3, 1, torch.float32, seed=9)
    # bf16 activations and gradients with fp32 factors: fp32 products of the bf16 values.
    args = (X.bfloat16(), S_t.bfloat16(), W, V)
    out = _launcher().pair_products(*args)
    assert [t.dtype for t in out] == [torch.float32] * 2
    _check(args, out)
    # One fp64 operand makes the whole computation fp64.
    args = (X, S_t.half(), W.double(), V)
    out = _launcher().pair_products(*args)
    assert [t.dtype for t in out] == [torch.float64] * 2
    _check(args, out)


@over_backends(OP, TRITON)
def test_batch_dims_broadcast(be):
    # Factors shared by the layers, and f_in / f_out with crossed broadcast dimensions.
    X = _normal((3, 1, 37, 5), seed=10)
    S = _normal((2, 37, 33), seed=11)
    args = (X, S.mT, _normal((33, 3), seed=12), _normal((16, 5), seed=13))
    out = _launcher().pair_products(*args)
    assert out[0].shape == (3, 2, 3, 5) and out[1].shape == (3, 2, 33, 16)
    _check(args, out)


@over_backends(OP, TRITON)
def test_non_contiguous_inputs(be):
    X = _normal((2, 33, 37), seed=14).mT  # (2, 37, 33), tokens contiguous
    S = _normal((3, 40, 10), seed=15)[1:, 1:38, ::2]  # (2, 37, 5), strided
    W = _normal((2, 16, 5), seed=16).mT  # (2, 5, 16)
    V = _normal((2, 33, 6), seed=17).mT[:, ::2]  # (2, 3, 33)
    args = (X, S.mT, W, V)
    products = _launcher()
    out = products.pair_products(*args)
    _check(args, out)
    contiguous = products.pair_products(*[t.contiguous() for t in args])
    for a, b in zip(out, contiguous):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


@pytest.mark.parametrize("shape", [(2, 0, 5, 33), (2, 37, 5, 0)], ids=["T0", "m0"])
@over_backends(OP, TRITON)
def test_empty_sums_give_zeros(be, shape):
    batch, T, n, m = (shape[0],), *shape[1:]
    args = _gradient_pair(batch, T, n, m, 3, 4, torch.float32)
    P, Q = _launcher().pair_products(*args)
    assert P.shape == (2, 3, 5) and not P.any() and Q.shape == (2, m, 4) and not Q.any()


@over_backends(OP, TRITON)
def test_nan_propagates_like_reference(be):
    X, S_t, W, V = _gradient_pair((2,), 37, 33, 5, 3, 16, torch.float32, seed=18)
    S_t[0, 2, 4] = float("nan")  # token 4 of layer 0: all of P[0], row 2 of Q[0]
    X[1, 7, 3] = float("nan")  # token 7 of layer 1: column 3 of P[1], all of Q[1]
    args = (X, S_t, W, V)
    out = _launcher().pair_products(*args)
    for o, e in zip(out, reference.pair_products(*args)):
        assert torch.equal(o.isnan(), e.isnan())
        torch.testing.assert_close(o, e, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert out[0][0].isnan().all() and out[0][1].isnan().sum() == 3
    assert out[1][0].isnan().sum() == 16 and out[1][1].isnan().all()


@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")
@over_backends(OP, TRITON)
def test_inf_factor_does_not_meet_the_padding(be):
    # U = Wᵀ·f_out is +inf on every real token; padded tokens must add nothing (0·inf would be NaN).
    X = torch.rand(37, 5, device=TRITON.device) + 0.5
    S = torch.rand(37, 1, device=TRITON.device) + 0.5
    W = torch.full((1, 2), float("inf"), device=TRITON.device)
    P, _ = _launcher().pair_products(X, S.mT, W)
    assert torch.equal(P, reference.pair_products(X, S.mT, W)[0]) and P.isposinf().all()


@over_backends(OP, TRITON)
def test_rejects_bad_shapes(be):
    products = _launcher()
    X, S_t, W, V = _gradient_pair((2,), 7, 5, 3, 2, 4, torch.float32)
    with pytest.raises(ValueError, match=r"same q"):
        products.pair_products(X, S_t[..., :6])
    with pytest.raises(ValueError, match=r"W must be \(\.\.\., m, w\) with m = 3"):
        products.pair_products(X, S_t, W.mT)
    with pytest.raises(ValueError, match=r"V must be \(\.\.\., v, n\) with n = 5"):
        products.pair_products(X, S_t, None, V.mT)
    with pytest.raises(ValueError, match=r"do not broadcast"):
        products.pair_products(X, S_t, _normal((3, 3, 2)))
    with pytest.raises(TypeError, match=r"W must be one of"):
        products.pair_products(X, S_t, W.int())


@over_backends(OP, TRITON)
def test_registered_and_dispatched(be, monkeypatch):
    assert OP in backends.TRITON_OPS
    args = _gradient_pair((2,), 7, 5, 3, 2, 4, torch.float32)
    real = _launcher().pair_products
    calls = spy_on_launcher(monkeypatch, OP, real)
    out = ops.pair_products(*args, backend="triton")
    assert len(calls) == 1
    for a, b in zip(out, real(*args)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
