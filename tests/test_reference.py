"""The reference ops (lorsum_kernels.reference) and the functional statistics built on them.

Each expected value is formed explicitly in fp64 (the m×n gradient G, dense solves, a numpy SVD), which
the ops themselves never do. See DESIGN.md "Numerical policy": solves are Cholesky with a ridge relative
to the Gram's mean diagonal (so a well-conditioned system is exact to ~1e-7·cond at any scale), a failed
factorisation falls back to a larger ridge chosen per batch element on the device, statistics
accumulate in fp32 (fp64 for fp64 input).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorsum_kernels import ops, reference
from lorsum_kernels.functional import align_factors, shampoo_statistics, svdlora_step

from .conftest import rel_err

F64 = torch.float64
BF16 = torch.bfloat16


def gauss(shape, seed, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


def spd(batch, r, seed, lo=1.0, hi=4.0):
    """Random SPD r×r matrices with eigenvalues in [lo, hi] (cond ≤ hi/lo), fp64."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(*batch, r, r, generator=g, dtype=F64)).Q
    lam = lo + (hi - lo) * torch.rand(*batch, r, generator=g, dtype=F64)
    return (Q * lam.unsqueeze(-2)) @ Q.mT


def solve_exact(gram, rhs, left):
    return torch.linalg.solve(gram, rhs) if left else torch.linalg.solve(gram.mT, rhs.mT).mT


def rhs_for(gram, left, seed, width=9):
    r = gram.shape[-1]
    shape = (*gram.shape[:-2], r, width) if left else (*gram.shape[:-2], width, r)
    return gauss(shape, seed)


# ----------------------------------------------------------------------------------------------------
# spd_solve
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1e-8, 1.0, 1e8], ids=["tiny", "unit", "huge"])
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=str)
@pytest.mark.parametrize("batch", [(), (3,), (2, 3)], ids=str)
@pytest.mark.parametrize("r", [1, 3, 8])
@pytest.mark.parametrize("left", [True, False], ids=["left", "right"])
def test_spd_solve_well_conditioned_is_exact(left, r, batch, dtype, scale):
    """cond ≤ 4: exact within 1e-6 at every scale (an absolute ridge would fail the tiny scale)."""
    gram = spd(batch, r, seed=r) * scale
    rhs = rhs_for(gram, left, seed=10 + r) * scale
    out = reference.spd_solve(gram.to(dtype), rhs.to(dtype), left=left)
    assert out.dtype == dtype and out.shape == rhs.shape
    assert rel_err(out, solve_exact(gram, rhs, left)) <= 1e-6
    # The op entry point (dispatching) computes the same thing.
    out_ops = ops.spd_solve(gram.to(dtype), rhs.to(dtype), left=left, backend="torch")
    assert rel_err(out_ops, solve_exact(gram, rhs, left)) <= 1e-6


@pytest.mark.parametrize("left", [True, False], ids=["left", "right"])
def test_spd_solve_ridge_is_relative_per_batch_element(left):
    """One batch holding Grams 12 orders of magnitude apart: each element is solved exactly."""
    gram = spd((3,), 4, seed=1) * torch.tensor([1e-6, 1.0, 1e6], dtype=F64)[:, None, None]
    rhs = rhs_for(gram, left, seed=2)
    out = reference.spd_solve(gram, rhs, left=left)
    for i in range(3):
        assert rel_err(out[i], solve_exact(gram[i], rhs[i], left)) <= 1e-6


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=str)
@pytest.mark.parametrize("rank", [0, 1, 3])
@pytest.mark.parametrize("left", [True, False], ids=["left", "right"])
def test_spd_solve_singular_psd_gives_finite_output(left, rank, dtype):
    """A rank-deficient PSD Gram (r = 4, rank 0, 1, 3) still gives a finite answer.

    For a right side in the Gram's range the answer solves the system (residual ≤ 1e-5 relative). For a
    general right side only finiteness is asked: the system has no solution.
    """
    r = 4
    V = gauss((r, rank), 3)
    gram = V @ V.mT  # exactly PSD in fp64, rank `rank`; rank 0 is the exact zero matrix
    consistent = gram @ gauss((r, 6), 4) if left else gauss((6, r), 4) @ gram
    out = reference.spd_solve(gram.to(dtype), consistent.to(dtype), left=left)
    assert torch.isfinite(out).all()
    if rank == 0:
        assert torch.equal(out, torch.zeros_like(out))  # B = 0, λ = 0: zero Gram and zero right side
    else:
        back = gram @ out.double() if left else out.double() @ gram
        assert rel_err(back, consistent) <= 1e-5
        generic = rhs_for(gram, left, seed=5)
        assert torch.isfinite(reference.spd_solve(gram.to(dtype), generic.to(dtype), left=left)).all()


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=str)
def test_spd_solve_failed_factorisation_does_not_spill_into_the_batch(dtype):
    """A batch of [well-conditioned, indefinite-by-rounding]: the first stays exact, both are finite.

    The second Gram has an eigenvalue of −1e-5 relative, beyond the 1e-7 ridge, so its factorisation
    fails and the fallback ridge is used for that element only.
    """
    r = 4
    good = spd((), r, seed=6)
    Q = torch.linalg.qr(gauss((r, r), 7)).Q
    bad = (Q * torch.tensor([1.0, 1.0, 1.0, -1e-5], dtype=F64)) @ Q.mT
    assert not bool(torch.linalg.cholesky_ex(bad.to(dtype) + 1e-7 * torch.eye(r, dtype=dtype)).info == 0)
    gram = torch.stack([good, bad])
    rhs = torch.stack([gauss((r, 5), 8), bad @ gauss((r, 5), 9)])
    out = reference.spd_solve(gram.to(dtype), rhs.to(dtype), left=True)
    assert torch.isfinite(out).all()
    assert rel_err(out[0], torch.linalg.solve(good, rhs[0])) <= 1e-6


@pytest.mark.parametrize("where", ["gram", "rhs"])
@pytest.mark.parametrize("left", [True, False], ids=["left", "right"])
def test_spd_solve_nan_propagates(left, where):
    gram = spd((2,), 3, seed=10)
    rhs = rhs_for(gram, left, seed=11)
    (gram if where == "gram" else rhs)[1].view(-1)[0] = float("nan")
    out = reference.spd_solve(gram, rhs, left=left)
    assert torch.isnan(out[1]).any()
    if where == "gram":
        assert torch.isnan(out[1]).all()
    assert rel_err(out[0], solve_exact(gram[0], rhs[0], left)) <= 1e-6  # the other layer is untouched


# ----------------------------------------------------------------------------------------------------
# The LoRSum half-steps: the exact block minimisers (spec §3.3, §6.2)
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "scaled"])
@pytest.mark.parametrize("batch", [(), (3,)], ids=["single", "L3"])
@pytest.mark.parametrize("shape", [(50, 40, 4, 25), (5, 123, 3, 7)], ids=["m50-n40-r4", "m5-n123-r3"])
def test_lorsum_half_steps_are_block_minimisers(shape, batch, scaled):
    """A-step: (B̂ᵀM_outB̂ + λI)Â = B̂ᵀM_out Y_M + λA0; B-step: B̂(ÂM_inÂᵀ + λI) = Y_M M_inÂᵀ + λB0.

    Y_M = c0·B0A0 + Σ_j c_j M_out⁻¹ F_out_j F_in_j M_in⁻¹ is formed densely (M = I for the plain step),
    with c0 ≠ 1 (the momentum buffer's β) and two extra pairs.
    """
    m, n, r, T = shape
    A0, B0 = gauss((*batch, r, n), 20) / n**0.25, gauss((*batch, m, r), 21) / m**0.25
    X, S = gauss((*batch, T, n), 22), gauss((*batch, T, m), 23) / T
    A_m, B_m = gauss((*batch, 2, n), 24), gauss((*batch, m, 2), 25)
    B_hat, A_hat = gauss((*batch, m, r), 26), gauss((*batch, r, n), 27)
    g = torch.Generator().manual_seed(28)
    m_in = 0.5 + torch.rand(*batch, n, generator=g, dtype=F64) if scaled else torch.ones(*batch, n, dtype=F64)
    m_out = (
        0.5 + torch.rand(*batch, m, generator=g, dtype=F64) if scaled else torch.ones(*batch, m, dtype=F64)
    )
    coeffs, lam = [0.9, -0.05, -0.3], 0.02
    metrics = (m_in, m_out) if scaled else None
    Mi, Mo = torch.diag_embed(m_in), torch.diag_embed(m_out)
    data = coeffs[1] * S.mT @ X + coeffs[2] * B_m @ A_m
    Y_M = coeffs[0] * B0 @ A0 + torch.linalg.inv(Mo) @ data @ torch.linalg.inv(Mi)
    I = torch.eye(r, dtype=F64)
    A_exp = torch.linalg.solve(B_hat.mT @ Mo @ B_hat + lam * I, B_hat.mT @ Mo @ Y_M + lam * A0)
    B_exp = torch.linalg.solve((A_hat @ Mi @ A_hat.mT + lam * I).mT, (Y_M @ Mi @ A_hat.mT + lam * B0).mT).mT
    pairs = [(X, S.mT), (A_m, B_m)]
    A_out = reference.lorsum_update_in(B_hat, (A0, B0), pairs, coeffs, lam, metrics)
    B_out = reference.lorsum_update_out(A_hat, (A0, B0), pairs, coeffs, lam, metrics)
    assert A_out.shape == A0.shape and B_out.shape == B0.shape
    assert rel_err(A_out, A_exp) <= 1e-6 and rel_err(B_out, B_exp) <= 1e-6


# ----------------------------------------------------------------------------------------------------
# Statistics: col_sq_sums, row_col_energies, shampoo_statistics
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F64, torch.float32, BF16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(4096, 37), (3, 5, 123), (2, 3, 17, 9), (1, 1)], ids=str)
def test_col_sq_sums(shape, dtype):
    """(x²).sum(-2), accumulated in fp32 (fp64 for fp64): for bf16 input, bf16 accumulation is far off."""
    x = gauss(shape, 30).to(dtype)
    exact = x.double().square().sum(-2)  # of the values the op sees
    out = reference.col_sq_sums(x)
    assert out.dtype == (F64 if dtype == F64 else torch.float32)
    assert out.shape == shape[:-2] + shape[-1:]
    assert rel_err(out, exact) <= (1e-13 if dtype == F64 else 1e-6)
    if dtype == BF16 and shape[-2] >= 1024:
        # The test can tell: accumulating in bf16 misses by far more than the tolerance.
        assert rel_err(x.square().sum(-2), exact) > 1e-3


def explicit_energies(X, S):
    G = S.double().mT @ X.double()
    return G.square().sum(-1), G.square().sum(-2)  # rows: diag(GGᵀ) (m), cols: diag(GᵀG) (n)


ENERGY_CASES = [
    # (batch, T, m, n, block_size)
    ((), 20, 30, 48, 16),  # divides n
    ((), 20, 30, 48, 7),  # does not divide n
    ((), 20, 30, 48, 48),
    ((), 20, 30, 48, 256),  # one slab wider than n
    ((), 20, 30, 48, 1),
    ((), 7, 5, 123, 10),  # the odd shape
    ((), 7, 5, 123, 256),
    ((3,), 11, 13, 50, 32),
    ((2, 3), 9, 6, 20, 6),
]


@pytest.mark.parametrize(
    "dtypes", [(F64, F64), (torch.float32,) * 2, (BF16, BF16), (BF16, torch.float32)], ids=str
)
@pytest.mark.parametrize(
    "case", ENERGY_CASES, ids=[f"{c[0]}-T{c[1]}-m{c[2]}-n{c[3]}-b{c[4]}" for c in ENERGY_CASES]
)
def test_row_col_energies_against_explicit_G(case, dtypes):
    batch, T, m, n, block = case
    X, S = gauss((*batch, T, n), 40).to(dtypes[0]), gauss((*batch, T, m), 41).to(dtypes[1])
    rows_exp, cols_exp = explicit_energies(X, S)
    rows, cols = reference.row_col_energies(X, S, block_size=block)
    acc = F64 if F64 in dtypes else torch.float32
    assert rows.dtype == cols.dtype == acc
    assert rows.shape == (*batch, m) and cols.shape == (*batch, n)
    tol = 1e-13 if acc == F64 else 1e-6
    assert rel_err(rows, rows_exp) <= tol and rel_err(cols, cols_exp) <= tol
    # The dispatching entry point agrees.
    rows_o, cols_o = ops.row_col_energies(X, S, block_size=block, backend="torch")
    assert rel_err(rows_o, rows_exp) <= tol and rel_err(cols_o, cols_exp) <= tol


@pytest.mark.parametrize("loss_reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [F64, torch.float32, BF16], ids=str)
@pytest.mark.parametrize("shape", [((), 25, 40, 50), ((), 7, 5, 123), ((3,), 30, 60, 300)], ids=str)
def test_shampoo_statistics(shape, dtype, loss_reduction):
    """(c·diag(GᵀG) (n,), c·diag(GGᵀ) (m,)), c = T for a mean loss and 1/T for a sum (spec §6.1)."""
    batch, T, m, n = shape
    X, S = gauss((*batch, T, n), 50).to(dtype), gauss((*batch, T, m), 51).to(dtype)
    G = S.double().mT @ X.double()
    c = T if loss_reduction == "mean" else 1.0 / T
    exp_in = c * torch.diagonal(G.mT @ G, dim1=-2, dim2=-1)
    exp_out = c * torch.diagonal(G @ G.mT, dim1=-2, dim2=-1)
    v_in, v_out = shampoo_statistics(X, S, loss_reduction=loss_reduction)
    assert v_in.shape == (*batch, n) and v_out.shape == (*batch, m)
    tol = 1e-12 if dtype == F64 else 1e-6
    assert rel_err(v_in, exp_in) <= tol and rel_err(v_out, exp_out) <= tol


def test_shampoo_statistics_bad_reduction():
    with pytest.raises(ValueError, match="loss_reduction"):
        shampoo_statistics(gauss((5, 4), 52), gauss((5, 3), 53), loss_reduction="none")


# ----------------------------------------------------------------------------------------------------
# svdlora_step: Π_r(B·A − lr·grad), balanced factors
# ----------------------------------------------------------------------------------------------------


def numpy_truncation(W, r):
    U, s, Vh = np.linalg.svd(W.detach().double().numpy(), full_matrices=False)
    return torch.from_numpy((U[:, :r] * s[:r]) @ Vh[:r]), torch.from_numpy(s[:r].copy())


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(50, 40, 4), (40, 60, 3), (5, 123, 3)], ids=str)
def test_svdlora_step_is_rank_r_truncation(shape, dtype):
    m, n, r = shape
    A, B = gauss((r, n), 60).to(dtype), gauss((m, r), 61).to(dtype)
    grad = gauss((m, n), 62).to(dtype)
    lr = 0.3
    W = B.double() @ A.double() - lr * grad.double()
    W_r, sigma = numpy_truncation(W, r)
    A_new, B_new = svdlora_step(A, B, grad, lr)
    assert A_new.dtype == B_new.dtype == dtype
    assert A_new.shape == (r, n) and B_new.shape == (m, r)
    tol = 1e-12 if dtype == F64 else 1e-5
    assert rel_err(B_new @ A_new, W_r) <= tol
    # Balanced: A = Σ^½Vᵀ and B = UΣ^½, so A Aᵀ = BᵀB = diag(σ_1..σ_r) (row norms² of A = column norms²
    # of B = the singular values).
    assert rel_err(A_new.double() @ A_new.double().mT, torch.diag(sigma)) <= tol
    assert rel_err(B_new.double().mT @ B_new.double(), torch.diag(sigma)) <= tol
    assert rel_err(A_new.double().square().sum(-1), B_new.double().square().sum(-2)) <= tol


def test_align_factors_is_the_nearest_rotation_and_ignores_the_svds_gauge():
    L, m, n, r = 2, 23, 17, 4
    A, B = gauss((L, r, n), 66), gauss((L, m, r), 67)
    A_new, B_new = svdlora_step(A, B, gauss((L, m, n), 68), 0.2)
    A_al, B_al = align_factors(A, B, A_new, B_new)
    assert rel_err(B_al @ A_al, B_new @ A_new) <= 1e-12  # the same product, balanced still
    assert rel_err(A_al @ A_al.mT, B_al.mT @ B_al) <= 1e-12

    def distance(A2, B2):
        return (A2 - A).square().sum((-2, -1)) + (B2 - B).square().sum((-2, -1))

    # Nearest over rotations: no random orthogonal Q (nor the SVD's own basis) brings the factors closer.
    for seed in range(20):
        Q, _ = torch.linalg.qr(gauss((L, r, r), 70 + seed))
        assert (distance(A_al, B_al) <= distance(Q @ A_new, B_new @ Q.mT) + 1e-12).all()
    assert (distance(A_al, B_al) < distance(A_new, B_new)).all()
    # The SVD's arbitrary signs (and any rotation of its basis) give the same aligned factors.
    Q, _ = torch.linalg.qr(gauss((L, r, r), 69))
    flips = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=F64)
    for R in (torch.diag(flips), Q):
        A2, B2 = align_factors(A, B, R @ A_new, B_new @ R.mT)
        assert rel_err(A2, A_al) <= 1e-10 and rel_err(B2, B_al) <= 1e-10
    # Non-finite new factors stay non-finite (and raise nothing); the other layer is aligned as before.
    A_bad = A_new.clone()
    A_bad[0, 0, 0] = float("nan")
    A2, B2 = align_factors(A, B, A_bad, B_new)
    assert not A2[0].isfinite().all() and torch.equal(A2[1], A_al[1]) and torch.equal(B2[1], B_al[1])


def test_svdlora_step_batched_with_per_layer_lr():
    L, m, n, r = 3, 20, 30, 4
    A, B, grad = gauss((L, r, n), 63), gauss((L, m, r), 64), gauss((L, m, n), 65)
    lr = torch.tensor([0.1, 0.5, 2.0], dtype=F64)
    A_new, B_new = svdlora_step(A, B, grad, lr)
    for i in range(L):
        W_r, _ = numpy_truncation(B[i] @ A[i] - lr[i] * grad[i], r)
        assert rel_err(B_new[i] @ A_new[i], W_r) <= 1e-12
