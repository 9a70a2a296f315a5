"""spd_solve (the batched r×r solve of the half-steps) on every backend against reference.spd_solve and its
ridge rules.

Contract: gram (..., r, r) symmetric positive (semi)definite, read from its lower triangle, and rhs
(..., r, N) (left) or (..., N, r) (right), batch dimensions broadcast: the solution of (gram + ρ·s·I)·x = rhs
(or x·(gram + ρ·s·I) = rhs) with s the mean diagonal floored above zero and ρ the dtype's relative ridge,
or, where that factorisation fails, the fallback ridge, per matrix; contiguous, in the promoted dtype
(bf16/fp16 solved in fp32), within 1e-5 (fp64: 1e-12) of the fp64 reference for well-conditioned grams; a
zero Gram with a zero right side gives zero; an indefinite Gram (both attempts fail) or a NaN gives NaN in
its own solutions only; run-to-run deterministic. Native: both CPU code paths and the input checks; CUDA:
r > 64 (the ATen path), bf16, the on-device fallback ridge; Triton: r = 64 with several column blocks, the
lower triangle only, the reference above its register tile, its input checks and dispatch. The interpreter
runs the r-step factorisation op by op (about 1 s for r = 16), so its larger r appear only in a few cases.
"""

from __future__ import annotations

import functools

import pytest
import torch

from lorsum_kernels import ops, reference

from ..problems import (NATIVE_CPU, NATIVE_CUDA, TRITON, assert_deterministic, cpu64, fp32_tol, gen, over_backends,
                        randn, rel_err, spd_matrices, spy_on_launcher)

OP = "spd_solve"
DTYPES = [torch.float32, torch.float64]
_randn = functools.partial(randn, dtype=torch.float32, device=NATIVE_CUDA.device)


def _native_spd(batch, r, *, dtype=torch.float64, seed=5):
    return spd_matrices(batch, r, dtype=dtype, seed=seed)


def _cuda_spd(L, r, g, dtype, *, cond_floor=0.5):
    """Well-conditioned symmetric positive definite r×r matrices (condition number below about 10)."""
    return spd_matrices(L, r, width=2 * r, floor=cond_floor, g=g, dtype=dtype, device=NATIVE_CUDA.device)


def _gram(batch, r, dtype, seed=0):
    """Well-conditioned (κ ≲ 1e2) SPD matrices, so that fp32 solves meet the 1e-5 target."""
    return spd_matrices(batch, r, width=2 * r + 3, floor=0.1, seed=seed, dtype=dtype, device=TRITON.device)


def _launcher():
    from lorsum_kernels.triton_kernels import spd

    return spd


# ---- native CPU: the batched solve -------------------------------------------------------------------------


@pytest.mark.parametrize("left", [True, False], ids=["left", "right"])
@pytest.mark.parametrize("r, N, batch", [(1, 5, (3,)), (3, 123, (1,)), (16, 256, (2, 3)), (3, 1, ()), (24, 37, (2,))],
                         ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@over_backends(OP, NATIVE_CPU)
def test_native_matches_reference(be, r, N, batch, left, dtype, cpu_path):
    gram = _native_spd(batch, r, dtype=dtype)
    g = torch.Generator().manual_seed(6)
    rhs = torch.randn(*batch, *((r, N) if left else (N, r)), generator=g).to(dtype)
    out = ops.spd_solve(gram, rhs, left=left, backend="native")
    exact = reference.spd_solve(gram.double(), rhs.double(), left=left)
    assert out.dtype == dtype and out.shape == rhs.shape
    assert rel_err(out, exact) < (1e-5 if dtype == torch.float32 else 1e-12)


@over_backends(OP, NATIVE_CPU)
def test_native_broadcast_and_non_contiguous(be):
    gram = _native_spd((1, 3), 4)  # broadcast over the first batch dimension of rhs
    rhs = torch.randn(2, 3, 9, 4, dtype=torch.float64).mT  # (2, 3, 4, 9), transposed view
    out = ops.spd_solve(gram, rhs, backend="native")
    assert out.shape == (2, 3, 4, 9)
    assert rel_err(out, reference.spd_solve(gram, rhs)) < 1e-12
    out = ops.spd_solve(gram.mT, rhs.mT, left=False, backend="native")
    assert rel_err(out, reference.spd_solve(gram.mT, rhs.mT, left=False)) < 1e-12


@over_backends(OP, NATIVE_CPU)
def test_native_zero_gram_and_fallback_ridge(be):
    rhs = torch.randn(3, 2, 7)
    # A zero Gram with a zero right side: the floored ridge makes it factorisable, the solution is 0.
    out = ops.spd_solve(torch.zeros(3, 2, 2), torch.zeros(3, 2, 7), backend="native")
    assert torch.equal(out, torch.zeros(3, 2, 7))
    # Indefinite by 1e-6 (rounding-level): the 1e-7 relative ridge fails and the fallback ridge (1e-7 + 1e-4)
    # is used, per matrix, as in the reference (the system is then solved with condition number ~2e4).
    bad = torch.tensor([[1.0, 1.0], [1.0, 1.0 - 1e-6]], dtype=torch.float64)
    gram = torch.stack([bad, torch.eye(2, dtype=torch.float64), bad]).float()
    out = ops.spd_solve(gram, rhs, backend="native")
    ridge = reference.RELATIVE_RIDGE[torch.float32] + reference.FALLBACK_RIDGE[torch.float32]
    ridged = gram.double() + ridge * torch.eye(2, dtype=torch.float64)
    for i in (0, 2):
        assert rel_err(out[i], torch.linalg.solve(ridged[i], rhs[i].double())) < 1e-2
        assert rel_err(out[i], reference.spd_solve(gram[i], rhs[i])) < 1e-2
    torch.testing.assert_close(out[1], rhs[1], rtol=1e-6, atol=0)  # the identity, ridged by 1e-7


@over_backends(OP, NATIVE_CPU)
def test_native_nan(be):
    gram = _native_spd((3,), 4, dtype=torch.float32)
    gram[1, 2, 1] = float("nan")
    rhs = torch.randn(3, 4, 6)
    out = ops.spd_solve(gram, rhs, backend="native")
    assert torch.isnan(out[1]).all()
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[2]).all()
    rhs[2, 0, 0] = float("nan")
    assert not torch.isfinite(ops.spd_solve(gram, rhs, backend="native")[2]).all()


@over_backends(OP, NATIVE_CPU)
def test_native_rejects_bad_input(be):
    with pytest.raises(RuntimeError, match=r"spd_solve: gram must be square"):
        torch.ops.lorsum.spd_solve(torch.ones(3, 2), torch.ones(3, 4))
    with pytest.raises(RuntimeError, match=r"spd_solve: rhs must be \(\.\.\., r, N\) for left=True"):
        torch.ops.lorsum.spd_solve(torch.eye(3), torch.ones(4, 5))
    with pytest.raises(RuntimeError, match=r"spd_solve: the batch dimensions .* do not broadcast"):
        torch.ops.lorsum.spd_solve(torch.eye(3).expand(2, 3, 3), torch.ones(4, 3, 5))

@over_backends(OP, NATIVE_CUDA)
@pytest.mark.parametrize("left", [True, False], ids=["left", "right"])
def test_cuda_opcheck(be, left):
    # Schema, fake (meta) implementation, autograd registration and AOT dispatch on CUDA tensors.
    g = gen(18)
    gram = _cuda_spd(2, 3, g, torch.float32)
    torch.library.opcheck(torch.ops.lorsum.spd_solve, (gram, _randn(2, *((3, 5) if left else (5, 3)), g=g), left))


@over_backends(OP, NATIVE_CPU)
@pytest.mark.parametrize("left", [True, False], ids=["left", "right"])
def test_native_opcheck(be, left):
    if left:
        args = (_native_spd((2,), 3, dtype=torch.float32), torch.randn(2, 3, 6), True)
    else:
        args = (_native_spd((2,), 3), torch.randn(1, 6, 3, dtype=torch.float64), False)
    torch.library.opcheck(torch.ops.lorsum.spd_solve.default, args)


# ---- CUDA: the batched solve -------------------------------------------------------------------------------


def _solve_ref(gram, rhs, left):
    return reference.spd_solve(cpu64(gram), cpu64(rhs), left=left)


@pytest.mark.parametrize("left", [True, False], ids=["left", "right"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("r,N,L", [(1, 5, 1), (3, 123, 3), (16, 256, 1), (16, 1, 3), (64, 300, 2), (80, 37, 2)],
                         ids=lambda v: str(v))
@over_backends(OP, NATIVE_CUDA)
def test_cuda_matches_reference(be, r, N, L, dtype, left):
    # r = 80 exercises the ATen path for r > 64.
    g = gen(7)
    gram = _cuda_spd(L, r, g, dtype)
    rhs = _randn(L, r, N, g=g, dtype=dtype) if left else _randn(L, N, r, g=g, dtype=dtype)
    out = torch.ops.lorsum.spd_solve(gram, rhs, left)
    assert out.dtype == dtype and out.shape == rhs.shape
    assert rel_err(out, _solve_ref(gram, rhs, left)) < fp32_tol(dtype) * (10 if dtype == torch.float64 else 1)
    assert_deterministic(lambda: torch.ops.lorsum.spd_solve(gram, rhs, left))


@pytest.mark.parametrize("left", [True, False], ids=["left", "right"])
@over_backends(OP, NATIVE_CUDA)
def test_cuda_bf16(be, left):
    g = gen(8)
    gram = _cuda_spd(3, 16, g, torch.bfloat16)
    rhs = _randn(3, 16, 123, g=g, dtype=torch.bfloat16)
    rhs = rhs if left else rhs.mT.contiguous()
    out = torch.ops.lorsum.spd_solve(gram, rhs, left)
    assert out.dtype == torch.bfloat16
    exact = _solve_ref(gram, rhs, left)
    # Within twice the error of the exact solution rounded to bf16 (torch has no bf16 Cholesky to compare).
    assert rel_err(out, exact) <= 2 * rel_err(exact.to(torch.bfloat16), exact)
    # fp32 gram with bf16 right sides: fp32 result at fp32 accuracy.
    out32 = torch.ops.lorsum.spd_solve(gram.float(), rhs, left)
    assert out32.dtype == torch.float32 and rel_err(out32, exact) < 1e-5


@over_backends(OP, NATIVE_CUDA)
def test_cuda_broadcast_and_non_contiguous(be):
    g = gen(9)
    gram = _cuda_spd(1, 5, g, torch.float32)[0]
    rhs = _randn(3, 5, 37, g=g)
    out = torch.ops.lorsum.spd_solve(gram, rhs, True)  # one matrix for every right side
    assert out.shape == (3, 5, 37) and rel_err(out, _solve_ref(gram.expand(3, 5, 5), rhs, True)) < 1e-5
    grams = _cuda_spd(3, 5, g, torch.float32).unsqueeze(1)  # (3, 1, 5, 5) with (2, 5, 37): batch (3, 2)
    rhs2 = _randn(2, 5, 37, g=g)
    out = torch.ops.lorsum.spd_solve(grams, rhs2, True)
    assert out.shape == (3, 2, 5, 37)
    assert rel_err(out, _solve_ref(grams.expand(3, 2, 5, 5), rhs2.expand(3, 2, 5, 37), True)) < 1e-5
    # Column-major right sides and a transposed (symmetric) Gram, both solve sides.
    rhs_cm = rhs.mT.contiguous().mT
    grams3 = _cuda_spd(3, 5, g, torch.float32)
    for left, b in [(True, rhs_cm), (False, rhs_cm.mT)]:
        out = torch.ops.lorsum.spd_solve(grams3.mT, b, left)
        assert rel_err(out, _solve_ref(grams3, b, left)) < 1e-5
        assert torch.equal(out, torch.ops.lorsum.spd_solve(grams3.contiguous(), b.contiguous(), left))


@pytest.mark.parametrize("dtype,neg", [(torch.float32, 1e-5), (torch.float64, 1e-10)], ids=["fp32", "fp64"])
@over_backends(OP, NATIVE_CUDA)
def test_cuda_fallback_ridge(be, dtype, neg):
    # diag(1, -neg, 1): the relative ridge (1e-7 / 1e-14 of the mean diagonal) leaves the second pivot
    # negative, the fallback ridge (+1e-4 / +1e-8) makes it positive. Without the on-device fallback the
    # result is NaN; with it, it is rhs / (diag + fallback·s), exactly what reference.ridged_cholesky defines.
    ridge, fallback = (1e-7, 1e-4) if dtype == torch.float32 else (1e-14, 1e-8)
    diag = torch.tensor([1.0, -neg, 1.0], dtype=torch.float64)
    gram = torch.stack([torch.diag(diag), torch.eye(3, dtype=torch.float64)]).to(dtype).to(NATIVE_CUDA.device)
    rhs = _randn(2, 3, 7, g=gen(10), dtype=dtype)
    out = torch.ops.lorsum.spd_solve(gram, rhs, True)
    s = diag.mean()
    expected = torch.stack([cpu64(rhs[0]) / (diag + (ridge + fallback) * s)[:, None],
                            cpu64(rhs[1]) / (1 + ridge)])
    assert rel_err(out, expected) < fp32_tol(dtype)
    # A rank-one PSD Gram: factorable (with the ridge or the fallback), finite, a small residual.
    v = torch.randn(3, 1, generator=gen(11), dtype=torch.float64)
    rank1 = (v @ v.mT).to(dtype).to(NATIVE_CUDA.device)
    b = rank1 @ _randn(3, 4, g=gen(12), dtype=dtype)
    z = torch.ops.lorsum.spd_solve(rank1, b, True)
    assert z.isfinite().all() and rel_err(rank1 @ z, b) < 1e-3


@over_backends(OP, NATIVE_CUDA)
def test_cuda_zero_gram_and_non_finite(be):
    # An all-zero Gram (B = 0 at the standard LoRA init, λ = 0) with zero right sides: zero, not NaN.
    out = torch.ops.lorsum.spd_solve(torch.zeros(2, 3, 3, device=NATIVE_CUDA.device), torch.zeros(2, 3, 5, device=NATIVE_CUDA.device), True)
    assert torch.equal(out, torch.zeros_like(out))
    out = torch.ops.lorsum.spd_solve(torch.zeros(3, 3, device=NATIVE_CUDA.device, dtype=torch.float64),
                           torch.zeros(4, 3, device=NATIVE_CUDA.device, dtype=torch.float64), False)
    assert torch.equal(out, torch.zeros_like(out))
    # A NaN or infinite Gram poisons its own solutions only; a NaN right side poisons its own column only.
    g = gen(13)
    gram = _cuda_spd(3, 4, g, torch.float32)
    rhs = _randn(3, 4, 9, g=g)
    gram[1, 2, 1] = gram[1, 1, 2] = float("nan")
    gram[2, 0, 0] = float("inf")
    rhs[0, 3, 4] = float("nan")
    out = torch.ops.lorsum.spd_solve(gram, rhs, True)
    assert out[1].isnan().all() and not out[2].isfinite().any()
    assert out[0, :, 4].isnan().all()
    assert out[0, :, :4].isfinite().all() and out[0, :, 5:].isfinite().all()


# ---- Triton ------------------------------------------------------------------------------------------------

# A failed factorisation takes the square root of a non-positive pivot on purpose (numpy warns about it
# in the interpreter).
SQRT_WARNING = pytest.mark.filterwarnings("ignore:invalid value encountered in sqrt:RuntimeWarning")


def _rhs(shape, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(TRITON.device)


def _check(gram, rhs, left, out):
    expected = reference.spd_solve(gram.to(out.dtype), rhs.to(out.dtype), left=left)
    assert out.shape == expected.shape and out.device == expected.device and out.is_contiguous()
    exact = reference.spd_solve(gram.double(), rhs.double(), left=left)
    assert rel_err(out, exact) < (1e-12 if out.dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("left", [True, False], ids=["left", "right"])
@pytest.mark.parametrize("batch,r,N", [((), 1, 5), ((2,), 3, 33), ((3,), 3, 1), ((), 16, 37)], ids=str)
@over_backends(OP, TRITON)
def test_matches_reference(be, batch, r, N, left, dtype):
    gram = _gram(batch, r, dtype)
    rhs = _rhs(batch + ((r, N) if left else (N, r)), dtype)
    out = _launcher().spd_solve(gram, rhs, left=left)
    assert out.dtype == dtype
    _check(gram, rhs, left, out)


@over_backends(OP, TRITON)
def test_r_64_and_several_column_blocks(be):
    gram = _gram((), 64, torch.float64, seed=2)
    rhs = _rhs((64, 130), torch.float64)
    _check(gram, rhs, True, _launcher().spd_solve(gram, rhs))


@pytest.mark.parametrize(
    "g_batch,r_batch",
    [((), (2,)), ((2,), ()), ((3, 1), (2,)), ((1, 2), (3, 1))],
    ids=["gram-shared", "rhs-shared", "both", "crossed"],
)
@over_backends(OP, TRITON)
def test_batch_dims_broadcast(be, g_batch, r_batch):
    gram = _gram(g_batch, 3, torch.float32, seed=3)
    rhs = _rhs(r_batch + (5, 3), torch.float32)
    out = _launcher().spd_solve(gram, rhs, left=False)
    assert out.shape == torch.broadcast_shapes(g_batch, r_batch) + (5, 3)
    _check(gram, rhs, False, out)


@over_backends(OP, TRITON)
def test_reads_only_the_lower_triangle(be):
    gram = _gram((2,), 3, torch.float64, seed=4)
    garbage = torch.triu(torch.full_like(gram, 7.0), diagonal=1)
    garbage[1, 0, 2] = float("nan")
    rhs = _rhs((2, 3, 4), torch.float64)
    out = _launcher().spd_solve(torch.tril(gram) + garbage, rhs)
    torch.testing.assert_close(out, reference.spd_solve(gram, rhs), rtol=1e-12, atol=0)


@over_backends(OP, TRITON)
def test_non_contiguous_inputs(be):
    gram = _gram((2,), 3, torch.float32, seed=5).mT  # symmetric: a transposed view reads the same
    rhs = _rhs((2, 5, 6), torch.float32).mT[:, ::2]  # (2, 3, 5): every other row of a transposed view
    spd = _launcher()
    out = spd.spd_solve(gram, rhs)
    _check(gram, rhs, True, out)
    torch.testing.assert_close(out, spd.spd_solve(gram.contiguous(), rhs.contiguous()), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@over_backends(OP, TRITON)
def test_zero_gram_uses_the_floored_ridge(be, dtype):
    # B = 0 at the standard LoRA init: a zero Gram, factorisable through the floor of its mean diagonal.
    gram = torch.zeros(2, 3, 3, dtype=dtype, device=TRITON.device)
    rhs = _rhs((2, 3, 4), dtype)
    rhs[1] = 0
    out = _launcher().spd_solve(gram, rhs)
    assert torch.isfinite(out).all() and not out[1].any()
    torch.testing.assert_close(out, reference.spd_solve(gram, rhs), rtol=1e-6, atol=0)


@SQRT_WARNING
@pytest.mark.parametrize("dtype,pivot", [(torch.float32, -1e-6), (torch.float64, -1e-11)],
                         ids=["fp32", "fp64"])
@over_backends(OP, TRITON)
def test_fallback_ridge_where_the_first_factorisation_fails(be, dtype, pivot):
    # A pivot below -RELATIVE_RIDGE·s but above -(RELATIVE_RIDGE + FALLBACK_RIDGE)·s: the first attempt
    # fails, the fallback succeeds, per matrix (the second matrix of the batch takes the first attempt).
    gram = torch.stack([torch.diag(torch.tensor([1.0, pivot, 1.0], dtype=dtype)), torch.eye(3, dtype=dtype)])
    gram = gram.to(TRITON.device)
    rhs = _rhs((2, 3, 4), dtype)
    out = _launcher().spd_solve(gram, rhs)
    expected = reference.spd_solve(gram, rhs)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=0)


@SQRT_WARNING
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@over_backends(OP, TRITON)
def test_indefinite_gram_gives_nan(be, dtype):
    # Both attempts fail: NaN, as the native kernels (the reference returns LAPACK's partial factor's
    # solution there, which depends on the LAPACK build). The other matrix of the batch is unaffected.
    gram = torch.stack([torch.diag(torch.tensor([1.0, -1.0, 1.0], dtype=dtype)), torch.eye(3, dtype=dtype)])
    gram = gram.to(TRITON.device)
    rhs = _rhs((2, 3, 4), dtype)
    out = _launcher().spd_solve(gram, rhs)
    assert out[0].isnan().all()
    torch.testing.assert_close(out[1], rhs[1], rtol=1e-6, atol=0)


@SQRT_WARNING
@pytest.mark.parametrize("where", [(2, 0), (1, 1), (0, 0)], ids=str)
@over_backends(OP, TRITON)
def test_nan_in_gram_propagates_like_reference(be, where):
    gram = _gram((2,), 3, torch.float32, seed=6)
    gram[0, where[0], where[1]] = float("nan")
    rhs = _rhs((2, 3, 4), torch.float32)
    out, expected = _launcher().spd_solve(gram, rhs), reference.spd_solve(gram, rhs)
    assert torch.equal(out.isnan(), expected.isnan()) and out[0].isnan().all() and not out[1].isnan().any()


@pytest.mark.parametrize("left", [True, False], ids=["left", "right"])
@over_backends(OP, TRITON)
def test_nan_in_rhs_propagates_like_reference(be, left):
    gram = _gram((2,), 3, torch.float32, seed=7)
    rhs = _rhs((2, 3, 4) if left else (2, 4, 3), torch.float32)
    rhs[1, 2, 1] = float("nan")
    out, expected = _launcher().spd_solve(gram, rhs, left=left), reference.spd_solve(gram, rhs, left=left)
    assert torch.equal(out.isnan(), expected.isnan()) and out.isnan().sum() == 3
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=0, equal_nan=True)


@over_backends(OP, TRITON)
def test_half_inputs_solve_in_fp32(be):
    gram = _gram((2,), 3, torch.float32, seed=8)
    rhs = _rhs((2, 3, 4), torch.float32)
    out = _launcher().spd_solve(gram.bfloat16(), rhs.bfloat16())
    assert out.dtype == torch.bfloat16
    expected = reference.spd_solve(gram.bfloat16().float(), rhs.bfloat16().float())
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2)
    # fp32 gram with bf16 rhs promotes to fp32
    assert _launcher().spd_solve(gram, rhs.bfloat16()).dtype == torch.float32


@over_backends(OP, TRITON)
def test_wider_than_the_register_tile_uses_the_reference(be):
    spd = _launcher()
    gram = _gram((), spd.MAX_R + 1, torch.float64, seed=9)
    rhs = _rhs((spd.MAX_R + 1, 3), torch.float64)
    torch.testing.assert_close(spd.spd_solve(gram, rhs), reference.spd_solve(gram, rhs), rtol=0, atol=0)


@pytest.mark.parametrize("g_shape,r_shape", [((0, 3, 3), (0, 3, 4)), ((3, 3), (3, 0)), ((0, 0), (0, 5))],
                         ids=str)
@over_backends(OP, TRITON)
def test_empty(be, g_shape, r_shape):
    out = _launcher().spd_solve(torch.ones(g_shape, device=TRITON.device), torch.ones(r_shape, device=TRITON.device))
    assert out.shape == torch.broadcast_shapes(g_shape[:-2], r_shape[:-2]) + r_shape[-2:]


@over_backends(OP, TRITON)
def test_rejects_bad_shapes(be):
    spd = _launcher()
    with pytest.raises(ValueError, match=r"gram must be square"):
        spd.spd_solve(torch.ones(3, 4, device=TRITON.device), torch.ones(3, 2, device=TRITON.device))
    with pytest.raises(ValueError, match=r"rhs must be \(\.\.\., N, r\) for left=False"):
        spd.spd_solve(torch.eye(3, device=TRITON.device), torch.ones(3, 2, device=TRITON.device), left=False)
    with pytest.raises(ValueError, match=r"do not broadcast"):
        spd.spd_solve(torch.ones(2, 3, 3, device=TRITON.device), torch.ones(3, 3, 2, device=TRITON.device))


@over_backends(OP, TRITON)
def test_dispatch_reaches_the_triton_launcher(be, monkeypatch):
    gram, rhs = _gram((2,), 3, torch.float32), _rhs((2, 4, 3), torch.float32)
    real = _launcher().spd_solve
    calls = spy_on_launcher(monkeypatch, OP, real)
    out = ops.spd_solve(gram, rhs, left=False, backend="triton")
    assert [kw for _, kw in calls] == [{"left": False}]
    torch.testing.assert_close(out, real(gram, rhs, left=False), rtol=0, atol=0)
