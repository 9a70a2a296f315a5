"""LoRSum / Scaled LoRSum as functions of tensors (lorsum_kernels.functional) against fp64 closed forms.

Every expected value here is written from spec/lorsum.md (§3 sub-problem and half-steps, §4 special
cases, §6 scaled variant, §13 test properties T1–T15) with dense fp64 linear algebra on small problems;
no expected value is produced by the code under test. Tolerances follow DESIGN.md ("Numerical policy"):
the package's Cholesky ridge is relative (1e-7 of the Gram's mean diagonal), so results that depend on
an r×r solve agree with the exact formula to ~1e-7·cond, and the tests allow 1e-6 where the spec says
so; fp32 against fp64 is 1e-5; bf16 within twice the error of plain PyTorch in bf16. Whether fp64 inputs
get fp64-accurate math is its own test (``test_T15_fp64_math_is_fp64_accurate``, 1e-11).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from lorsum_kernels import ops
from lorsum_kernels.functional import (
    effective_metric,
    ema,
    gradient_norm,
    kfac_statistics,
    low_rank_sum,
    scaled_low_rank_sum,
)

from .conftest import rel_err

F64 = torch.float64


# (m, n, r, T): the spec's sizes (m, n ~ 40–60, r 3–4, T 25–30) and the odd shape 5×123, r=3.
SHAPES = [(50, 40, 4, 25), (40, 60, 3, 30), (5, 123, 3, 7)]
SHAPE_IDS = [f"m{m}-n{n}-r{r}-T{T}" for m, n, r, T in SHAPES]


# ----------------------------------------------------------------------------------------------------
# Problems and independent fp64 formulas
# ----------------------------------------------------------------------------------------------------


def make_problem(m, n, r, T, seed=0, dtype=F64):
    """Balanced random factors (‖B0ᵀB0‖ ≈ ‖A0A0ᵀ‖), activations X and mean-loss output gradients S."""
    g = torch.Generator().manual_seed(seed)
    A0 = torch.randn(r, n, generator=g, dtype=F64) / n**0.25
    B0 = torch.randn(m, r, generator=g, dtype=F64) / m**0.25
    X = torch.randn(T, n, generator=g, dtype=F64)
    S = torch.randn(T, m, generator=g, dtype=F64) / T
    return tuple(t.to(dtype) for t in (A0, B0, X, S))


def make_metrics(m, n, seed=1, dtype=F64):
    """Diagonal metrics with entries in [0.5, 1.5] (spec T6)."""
    g = torch.Generator().manual_seed(seed)
    m_in = 0.5 + torch.rand(n, generator=g, dtype=F64)
    m_out = 0.5 + torch.rand(m, generator=g, dtype=F64)
    return m_in.to(dtype), m_out.to(dtype)


def eye(r):
    return torch.eye(r, dtype=F64)


def solve_left(M, R):
    """M⁻¹ R."""
    return torch.linalg.solve(M, R)


def solve_right(R, M):
    """R M⁻¹."""
    return torch.linalg.solve(M.mT, R.mT).mT


def d64(*ts):
    return tuple(t.double() for t in ts)


def als_dense(Y, A0, B0, lam, iters, m_in=None, m_out=None):
    """Exact block minimisers of the (scaled) proximal sub-problem with the m×n target formed densely.

    Φ_M(A, B) = ½‖M_out^½ (BA − Y) M_in^½‖² + (λ/2)(‖M_out^½ (B − B0)‖² + ‖(A − A0) M_in^½‖²)
    (spec §3.2, §6.2; M = I for plain LoRSum). Setting the block gradients to zero:
        A-step: (Bᵀ M_out B + λI) A = Bᵀ M_out Y + λ A0
        B-step: B (A M_in Aᵀ + λI) = Y M_in Aᵀ + λ B0
    ``iters = 0`` is one Jacobi round (both half-steps from the anchor, spec §3.4), else k Gauss–Seidel
    rounds, A-step first. ``Y`` is the (preconditioned) target Y_M.
    """
    r = A0.shape[-2]
    mo = torch.ones(B0.shape[-2], dtype=F64) if m_out is None else m_out.double()
    mi = torch.ones(A0.shape[-1], dtype=F64) if m_in is None else m_in.double()

    def a_step(B):
        return solve_left(B.mT @ (mo[:, None] * B) + lam * eye(r), B.mT @ (mo[:, None] * Y) + lam * A0)

    def b_step(A):
        return solve_right((Y * mi) @ A.mT + lam * B0, (A * mi) @ A.mT + lam * eye(r))

    if iters == 0:
        return a_step(B0), b_step(A0)
    B = B0
    for _ in range(iters):
        A = a_step(B)
        B = b_step(A)
    return A, B


def rplora_jacobi(A0, B0, D, eta, lam):
    """Spec §4(b): the Jacobi round = Riemannian-preconditioned LoRA on the direction D (W-space)."""
    r = A0.shape[-2]
    A = A0 - eta * solve_left(B0.mT @ B0 + lam * eye(r), B0.mT @ D)
    B = B0 - eta * solve_right(D @ A0.mT, A0 @ A0.mT + lam * eye(r))
    return A, B


def phi(A, B, Y, A0, B0, lam):
    """Spec §3.2: ½‖BA − Y‖² + (λ/2)(‖A − A0‖² + ‖B − B0‖²), in fp64."""
    A, B = A.double(), B.double()
    return 0.5 * (B @ A - Y).square().sum() + 0.5 * lam * ((A - A0).square().sum() + (B - B0).square().sum())


def truncated_svd(Y, r):
    U, s, Vh = torch.linalg.svd(Y, full_matrices=False)
    return (U[:, :r] * s[:r]) @ Vh[:r], s


def orth(M):
    return torch.linalg.qr(M).Q


def projector(M):
    Q = orth(M)
    return Q @ Q.mT


def spec_norm(M):
    return torch.linalg.matrix_norm(M, ord=2).item()


def gauss(shape, seed, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


def problem_with_target(Y, r, eta, seed):
    """A warm start (A0, B0) and a gradient pair (X, S) with B0A0 − η·SᵀX = Y exactly (T = n).

    X is a random orthogonal n×n matrix, so S = X Gᵀ gives SᵀX = G for any G = (B0A0 − Y)/η.
    """
    m, n = Y.shape
    A0, B0 = gauss((r, n), seed), gauss((m, r), seed + 1)
    G = (B0 @ A0 - Y) / eta
    X = orth(gauss((n, n), seed + 2))
    S = X @ G.mT
    return A0, B0, X, S


# ----------------------------------------------------------------------------------------------------
# T1–T4: the block power method
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES[:2], ids=SHAPE_IDS[:2])
def test_T1_svd_limit(shape):
    """λ → 0, k → ∞: B_kA_k → Π_r(B0A0 − ηG) (spec §4(a), T1), errors decreasing in k."""
    m, n, r, T = shape
    A0, B0, X, S = make_problem(m, n, r, T, seed=3)
    eta = 0.3
    Y = B0 @ A0 - eta * (S.mT @ X)
    target, s = truncated_svd(Y, r)
    gap = (s[r] / s[r - 1]).item()
    assert gap < 0.3  # the regime of the spec's T1 (σ_{r+1}/σ_r ≈ 0.14)
    args = [(A0.float(), B0.float()), (X.float(), S.mT.float())]
    errs = []
    for k in range(1, 9):
        A, B = low_rank_sum(args, [1.0, -eta], lmbd=1e-10, iters=k)
        assert A.dtype == B.dtype == torch.float32
        errs.append(rel_err(B.double() @ A.double(), target))
    # Strictly decreasing until the fp32 floor, at the subspace-iteration rate (σ_{r+1}/σ_r)² or better.
    for k in range(1, 8):
        if errs[k - 1] > 1e-5:
            assert errs[k] < errs[k - 1], errs
            assert errs[k] <= 1.5 * gap**2 * errs[k - 1] + 1e-6, errs
    assert errs[0] > 1e-4  # k = 1 is not already exact: the test has something to show
    assert errs[7] <= 1e-6, errs  # spec: ~5e-7 at k = 8


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_T2_power_method_identity(shape):
    """λ ≈ 0: span(B_k) = span((YYᵀ)^k B0) and B_kA_k = Y·P_range((YᵀY)^{k−1} Yᵀ B0) (spec §3.5, T2)."""
    m, n, r, T = shape
    A0, B0, X, S = make_problem(m, n, r, T, seed=4)
    eta = 0.5
    Y = B0 @ A0 - eta * (S.mT @ X)
    Q_col = B0  # span((YYᵀ)^k B0), re-orthonormalised every multiplication
    Q_row = None  # range((YᵀY)^{k−1} Yᵀ B0)
    for k in range(1, 4):
        Q_col = orth(Y @ (Y.mT @ orth(Q_col)))
        Q_row = orth(Y.mT @ B0) if k == 1 else orth(Y.mT @ (Y @ Q_row))
        A, B = low_rank_sum([(A0, B0), (X, S.mT)], [1.0, -eta], lmbd=1e-12, iters=k)
        assert spec_norm(projector(B) - Q_col @ Q_col.mT) <= 1e-6
        assert rel_err(B @ A, Y @ (Q_row @ Q_row.mT)) <= 1e-6


@pytest.mark.parametrize("next_sigma", [0.4, 0.6])
def test_T3_convergence_rate(next_sigma):
    """Subspace error dist(span B_k, U_r) shrinks by (σ_{r+1}/σ_r)² per round (spec §3.5, T3)."""
    m, n, r = 50, 40, 4
    U, V = orth(gauss((m, n), 10)), orth(gauss((n, n), 11))
    tail = 0.05 * torch.rand(n - r - 1, generator=torch.Generator().manual_seed(12), dtype=F64)
    sigma = torch.cat([torch.tensor([4.0, 3.0, 2.0, 1.0, next_sigma], dtype=F64), tail])
    Y = (U * sigma) @ V.mT
    A0, B0, X, S = problem_with_target(Y, r, eta=0.5, seed=13)
    U_r = U[:, :r]
    dist = []
    for k in range(1, 8):
        _, B = low_rank_sum([(A0, B0), (X, S.mT)], [1.0, -0.5], lmbd=1e-12, iters=k)
        Q = orth(B)
        dist.append(spec_norm(Q - U_r @ (U_r.mT @ Q)))
    predicted = (next_sigma / 1.0) ** 2
    ratios = [dist[k + 1] / dist[k] for k in range(len(dist) - 1)]
    for ratio in ratios[2:]:
        assert ratio == pytest.approx(predicted, rel=0.05), (ratios, predicted)


@pytest.mark.parametrize("lam", [1e-3, 0.1, 1.0])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_T4_monotone_objective(shape, lam):
    """Φ is non-increasing over rounds k and over half-steps, for any λ > 0 (spec §3.5, T4)."""
    m, n, r, T = shape
    A0, B0, X, S = make_problem(m, n, r, T, seed=5)
    eta = 1.0  # a large step, so the iterates move far from the anchor
    Y = B0 @ A0 - eta * (S.mT @ X)
    pairs, coeffs = [(A0, B0), (X, S.mT)], [1.0, -eta]
    slack = 1e-12

    values = [phi(A0, B0, Y, A0, B0, lam)]
    for k in range(1, 7):
        A, B = low_rank_sum(pairs, coeffs, lmbd=lam, iters=k)
        values.append(phi(A, B, Y, A0, B0, lam))
    for before, after in itertools.pairwise(values):
        assert after <= before * (1 + slack), values
    assert values[-1] < values[0] * (1 - 1e-3)

    # Half-steps through the ops, then the same factors as low_rank_sum(iters=6).
    half = [phi(A0, B0, Y, A0, B0, lam)]
    B_hat = B0
    for _ in range(6):
        A_hat = ops.lorsum_update_in(B_hat, (A0, B0), pairs[1:], coeffs, lam)
        half.append(phi(A_hat, B_hat, Y, A0, B0, lam))
        B_hat = ops.lorsum_update_out(A_hat, (A0, B0), pairs[1:], coeffs, lam)
        half.append(phi(A_hat, B_hat, Y, A0, B0, lam))
    for before, after in itertools.pairwise(half):
        assert after <= before * (1 + slack), half
    assert rel_err(A_hat, A) <= 1e-12 and rel_err(B_hat, B) <= 1e-12


# ----------------------------------------------------------------------------------------------------
# T5–T7: Jacobi (RPLoRA), Gauss–Seidel, scaled Jacobi, whitening
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lam", [1e-3, 0.1])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_T5_jacobi_is_rplora(shape, lam):
    """k = 0 is one Jacobi round: A⁺ = A0 − η(B0ᵀB0+λI)⁻¹B0ᵀG, B⁺ = B0 − ηGA0ᵀ(A0A0ᵀ+λI)⁻¹ (§4(b))."""
    m, n, r, T = shape
    A0, B0, X, S = make_problem(m, n, r, T, seed=6)
    eta = 0.2
    A_exp, B_exp = rplora_jacobi(A0, B0, S.mT @ X, eta, lam)
    A, B = low_rank_sum([(A0, B0), (X, S.mT)], [1.0, -eta], lmbd=lam, iters=0)
    assert rel_err(A, A_exp) <= 1e-6 and rel_err(B, B_exp) <= 1e-6
    # The same through Scaled LoRSum with unit metrics (the official scaled code's k = 0 path).
    ones = (torch.ones(n, dtype=F64), torch.ones(m, dtype=F64))
    A_s, B_s = scaled_low_rank_sum([(A0, B0), (X, S.mT)], [1.0, -eta], ones, lmbd=lam, iters=0)
    assert rel_err(A_s, A_exp) <= 1e-6 and rel_err(B_s, B_exp) <= 1e-6


@pytest.mark.parametrize("dampening", [0.0, 0.1])
def test_T5_jacobi_with_momentum_pair_is_rplora_on_combined_direction(dampening):
    """With a momentum pair, k = 0 is RPLoRA applied to D = (1−d)G + β·B_mA_m (spec §4(b), §5.1)."""
    m, n, r, T = 50, 40, 4, 25
    A0, B0, X, S = make_problem(m, n, r, T, seed=7)
    A_m, B_m = gauss((6, n), 70), gauss((m, 6), 71)  # r_m = 6 ≠ r
    eta, beta, lam = 0.1, 0.9, 0.05
    D = (1 - dampening) * (S.mT @ X) + beta * (B_m @ A_m)
    A_exp, B_exp = rplora_jacobi(A0, B0, D, eta, lam)
    A, B = low_rank_sum(
        [(A0, B0), (X, S.mT), (A_m, B_m)], [1.0, -eta * (1 - dampening), -eta * beta], lmbd=lam, iters=0
    )
    assert rel_err(A, A_exp) <= 1e-6 and rel_err(B, B_exp) <= 1e-6


@pytest.mark.parametrize("lam", [1e-3, 0.1])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_T5_k1_gauss_seidel(shape, lam):
    """k = 1: A⁺ is the RPLoRA A-update; B⁺ = B0 − [(B0A⁺ − Y)A⁺ᵀ](A⁺A⁺ᵀ + λI)⁻¹ (spec §4(c))."""
    m, n, r, T = shape
    A0, B0, X, S = make_problem(m, n, r, T, seed=8)
    eta = 0.2
    G = S.mT @ X
    Y = B0 @ A0 - eta * G
    A_exp = A0 - eta * solve_left(B0.mT @ B0 + lam * eye(r), B0.mT @ G)
    B_exp = B0 - solve_right((B0 @ A_exp - Y) @ A_exp.mT, A_exp @ A_exp.mT + lam * eye(r))
    A, B = low_rank_sum([(A0, B0), (X, S.mT)], [1.0, -eta], lmbd=lam, iters=1)
    assert rel_err(A, A_exp) <= 1e-6 and rel_err(B, B_exp) <= 1e-6


@pytest.mark.parametrize("lam", [1e-3, 0.1])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_T6_scaled_jacobi(shape, lam):
    """Spec §4(e): A⁺ = A0 − η(B0ᵀM_outB0 + λI)⁻¹B0ᵀGM_in⁻¹, B⁺ = B0 − ηM_out⁻¹GA0ᵀ(A0M_inA0ᵀ + λI)⁻¹."""
    m, n, r, T = shape
    A0, B0, X, S = make_problem(m, n, r, T, seed=9)
    m_in, m_out = make_metrics(m, n)
    Mi, Mo = torch.diag(m_in), torch.diag(m_out)
    eta = 0.2
    G = S.mT @ X
    A_exp = A0 - eta * solve_left(B0.mT @ Mo @ B0 + lam * eye(r), B0.mT @ G @ torch.linalg.inv(Mi))
    B_exp = B0 - eta * solve_right(torch.linalg.inv(Mo) @ G @ A0.mT, A0 @ Mi @ A0.mT + lam * eye(r))
    A, B = scaled_low_rank_sum([(A0, B0), (X, S.mT)], [1.0, -eta], (m_in, m_out), lmbd=lam, iters=0)
    assert rel_err(A, A_exp) <= 1e-6 and rel_err(B, B_exp) <= 1e-6


@pytest.mark.parametrize("iters", [0, 1, 3])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_T6_scaled_matches_dense_scaled_als(shape, iters):
    """Scaled LoRSum = exact block minimisation of the metric-weighted sub-problem (spec §6.2), 3 pairs."""
    m, n, r, T = shape
    A0, B0, X, S = make_problem(m, n, r, T, seed=10)
    A_m, B_m = gauss((r, n), 100), gauss((m, r), 101)
    m_in, m_out = make_metrics(m, n)
    coeffs = [1.0, -0.05, -0.2]
    lam = 0.02
    Y_M = coeffs[0] * B0 @ A0 + (coeffs[1] * S.mT @ X + coeffs[2] * B_m @ A_m) / m_out[:, None] / m_in
    A_exp, B_exp = als_dense(Y_M, A0, B0, lam, iters, m_in, m_out)
    A, B = scaled_low_rank_sum(
        [(A0, B0), (X, S.mT), (A_m, B_m)], coeffs, (m_in, m_out), lmbd=lam, iters=iters
    )
    assert rel_err(A, A_exp) <= 1e-6 and rel_err(B, B_exp) <= 1e-6


@pytest.mark.parametrize("iters", [0, 1, 3])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_T7_whitening_equivalence(shape, iters):
    """Spec §6.3: Scaled LoRSum = plain LoRSum in whitened coordinates, mapped back.

    Ã0 = A0 M_in^½, B̃0 = M_out^½ B0, X̃ = X M_in^{−½}, S̃ = S M_out^{−½}; the result is
    (Ã⁺ M_in^{−½}, M_out^{−½} B̃⁺). Both sides solve the same r×r Grams, so in fp64 they agree to rounding.
    """
    m, n, r, T = shape
    A0, B0, X, S = make_problem(m, n, r, T, seed=11)
    m_in, m_out = make_metrics(m, n, seed=2)
    ri, ro = m_in.sqrt(), m_out.sqrt()
    coeffs, lam = [1.0, -0.3], 0.01
    A_s, B_s = scaled_low_rank_sum([(A0, B0), (X, S.mT)], coeffs, (m_in, m_out), lmbd=lam, iters=iters)
    A_w, B_w = low_rank_sum(
        [(A0 * ri, ro[:, None] * B0), (X / ri, (S / ro).mT)], coeffs, lmbd=lam, iters=iters
    )
    assert rel_err(A_s, A_w / ri) <= 1e-10
    assert rel_err(B_s, B_w / ro[:, None]) <= 1e-10
    # And in fp32, against the fp64 whitened result (DESIGN.md: fp32 within 1e-5 of fp64).
    f = [t.float() for t in (A0, B0, X, S, m_in, m_out)]
    A32, B32 = scaled_low_rank_sum(
        [(f[0], f[1]), (f[2], f[3].mT)], coeffs, (f[4], f[5]), lmbd=lam, iters=iters
    )
    assert rel_err(A32, A_w / ri) <= 1e-5 and rel_err(B32, B_w / ro[:, None]) <= 1e-5


@pytest.mark.parametrize("iters", [0, 1, 3])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_T7_unit_metrics_equal_plain_bitwise(shape, iters):
    """With M ≡ 1, Scaled LoRSum is plain LoRSum bit for bit (spec T7)."""
    m, n, r, T = shape
    A0, B0, X, S = make_problem(m, n, r, T, seed=12, dtype=torch.float32)
    pairs, coeffs = [(A0, B0), (X, S.mT)], [1.0, -0.3]
    ones = (torch.ones(n), torch.ones(m))
    A_p, B_p = low_rank_sum(pairs, coeffs, lmbd=0.01, iters=iters)
    A_s, B_s = scaled_low_rank_sum(pairs, coeffs, ones, lmbd=0.01, iters=iters)
    assert torch.equal(A_p, A_s) and torch.equal(B_p, B_s)


# ----------------------------------------------------------------------------------------------------
# T8–T12: invariances, limits and exact cases
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lam", [1e-2, 1.0])
@pytest.mark.parametrize("iters", [0, 1, 3])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_T8_orthogonal_gauge(shape, iters, lam):
    """λ > 0, Q orthogonal: LoRSum(QA0, B0Qᵀ) = (QA⁺, B⁺Qᵀ) (spec T8)."""
    m, n, r, T = shape
    A0, B0, X, S = make_problem(m, n, r, T, seed=13)
    Q = orth(gauss((r, r), 130))
    pairs, coeffs = [(X, S.mT)], [1.0, -0.3]
    A, B = low_rank_sum([(A0, B0)] + pairs, coeffs, lmbd=lam, iters=iters)
    A_q, B_q = low_rank_sum([(Q @ A0, B0 @ Q.mT)] + pairs, coeffs, lmbd=lam, iters=iters)
    assert rel_err(A_q, Q @ A) <= 1e-10 and rel_err(B_q, B @ Q.mT) <= 1e-10


@pytest.mark.parametrize("iters", [0, 1, 3])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_T8_invertible_gauge_of_product(shape, iters):
    """λ → 0, R invertible: B⁺A⁺ is invariant under (RA0, B0R⁻¹) (spec T8: 2e-6)."""
    m, n, r, T = shape
    A0, B0, X, S = make_problem(m, n, r, T, seed=14)
    R = eye(r) + 0.3 * gauss((r, r), 140)
    assert torch.linalg.cond(R) < 10
    pairs, coeffs = [(X, S.mT)], [1.0, -0.3]
    A, B = low_rank_sum([(A0, B0)] + pairs, coeffs, lmbd=1e-12, iters=iters)
    A_r, B_r = low_rank_sum([(R @ A0, B0 @ torch.linalg.inv(R))] + pairs, coeffs, lmbd=1e-12, iters=iters)
    assert rel_err(B_r @ A_r, B @ A) <= 2e-6


@pytest.mark.parametrize("iters", [0, 1])
@pytest.mark.parametrize("lam", [1e3, 1e5])
def test_T9_large_lambda_is_plain_lora_gd(lam, iters):
    """λ → ∞ with α = η/λ fixed: A⁺ ≈ A0 − αB0ᵀG, B⁺ ≈ B0 − αGA0ᵀ (Jacobi), error O(1/λ) (spec §4(d), T9)."""
    m, n, r, T = 50, 40, 4, 25
    A0, B0, X, S = make_problem(m, n, r, T, seed=15)
    alpha = 0.01
    eta = lam * alpha
    G = S.mT @ X
    A, B = low_rank_sum([(A0, B0), (X, S.mT)], [1.0, -eta], lmbd=lam, iters=iters)
    # First order in 1/λ: (I + M/λ)⁻¹ − I ≈ −M/λ, so the update's relative error is at most ‖M‖₂/λ.
    bound_A = 1.1 * spec_norm(B0.mT @ B0) / lam + 1e-6
    err_A = rel_err(A - A0, -alpha * B0.mT @ G)
    assert err_A <= bound_A
    assert err_A <= (5e-4 if lam == 1e5 else 5e-2)
    if iters == 0:  # the B comparison uses Jacobi (spec T9)
        bound_B = 1.1 * spec_norm(A0 @ A0.mT) / lam + 1e-6
        assert rel_err(B - B0, -alpha * G @ A0.mT) <= bound_B


@pytest.mark.parametrize("iters", [1, 2, 3])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_T10_column_space_exactness(shape, iters):
    """G = B0C: k ≥ 1 and λ ≈ 0 give B⁺A⁺ = B0A0 − ηG exactly (spec T10)."""
    m, n, r, T = shape
    A0, B0, X, _ = make_problem(m, n, r, T, seed=16)
    C_s = gauss((r, T), 160) / T
    S = (B0 @ C_s).mT  # Sᵀ = B0·C_s, so G = SᵀX = B0·(C_s X)
    eta = 0.5
    A, B = low_rank_sum([(A0, B0), (X, S.mT)], [1.0, -eta], lmbd=1e-12, iters=iters)
    assert rel_err(B @ A, B0 @ A0 - eta * (S.mT @ X)) <= 1e-6


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=str)
@pytest.mark.parametrize("iters", [0, 1])
@pytest.mark.parametrize("lam", [1e-3, 1e-1])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_T11_zero_B_start(shape, lam, iters, dtype):
    """B0 = 0: A⁺ = A0 and B⁺ = −ηGA0ᵀ(A0A0ᵀ + λI)⁻¹ (spec §4(f), T11).

    Our ridge is relative, so A⁺ = A0 to 1e-6; the official absolute 1e-6 jitter gives A0·λ/(λ+1e-6),
    0.1% off at λ = 1e-3.
    """
    m, n, r, T = shape
    A0, _, X, S = make_problem(m, n, r, T, seed=17)
    B0 = torch.zeros(m, r, dtype=F64)
    eta = 0.3
    B_exp = -eta * solve_right(S.mT @ X @ A0.mT, A0 @ A0.mT + lam * eye(r))
    tol = 1e-6 if dtype == F64 else 1e-5
    c = lambda t: t.to(dtype)
    A, B = low_rank_sum([(c(A0), c(B0)), (c(X), c(S).mT)], [1.0, -eta], lmbd=lam, iters=iters)
    assert A.dtype == B.dtype == dtype
    assert rel_err(A, A0) <= tol
    assert rel_err(B, B_exp) <= tol


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=str)
@pytest.mark.parametrize("iters", [0, 1])
def test_T11_zero_B_start_without_prox_is_finite(iters, dtype):
    """B0 = 0 and λ = 0 (standard LoRA init with lmbd = 0, low_rank_sum's default): the A-step's Gram
    B0ᵀB0 + λI is exactly zero and so is its right side. The output must be finite, and for k = 0 the
    B-step (Gram A0A0ᵀ, invertible) is B⁺ = −ηGA0ᵀ(A0A0ᵀ)⁻¹.
    """
    m, n, r, T = SHAPES[0]
    A0, _, X, S = make_problem(m, n, r, T, seed=19)
    B0 = torch.zeros(m, r, dtype=F64)
    c = lambda t: t.to(dtype)
    A, B = low_rank_sum([(c(A0), c(B0)), (c(X), c(S).mT)], [1.0, -0.3], lmbd=0.0, iters=iters)
    assert torch.isfinite(A).all() and torch.isfinite(B).all()
    if iters == 0:
        assert rel_err(B, -0.3 * solve_right(S.mT @ X @ A0.mT, A0 @ A0.mT)) <= 1e-5


@pytest.mark.parametrize("zero_start", [False, True])
@pytest.mark.parametrize("dampening", [0.0, 0.1])
@pytest.mark.parametrize("mn", [(40, 50), (50, 40), (5, 123)], ids=str)
def test_T12_momentum_exactness(mn, dampening, zero_start):
    """r_m = min(m, n), λ ≈ 0, k = 5: the buffer LoRSum is exact, B_mA_m ← βB_mA_m + (1−d)G (spec T12)."""
    m, n = mn
    T = 25
    r_m = min(m, n)
    _, _, X, S = make_problem(m, n, 3, T, seed=18)
    A_m = gauss((r_m, n), 180)
    B_m = torch.zeros(m, r_m, dtype=F64) if zero_start else gauss((m, r_m), 181) / m**0.5
    beta = 0.9
    A, B = low_rank_sum([(A_m, B_m), (X, S.mT)], [beta, 1 - dampening], lmbd=1e-12, iters=5)
    assert A.shape == A_m.shape and B.shape == B_m.shape
    assert rel_err(B @ A, beta * B_m @ A_m + (1 - dampening) * (S.mT @ X)) <= 1.5e-5


# ----------------------------------------------------------------------------------------------------
# T13–T14: the gradient norm and the metric statistics
# ----------------------------------------------------------------------------------------------------


def _count_row_col_energies(monkeypatch):
    calls = []
    original = ops.row_col_energies

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(ops, "row_col_energies", counting)
    return calls


# (batch, T, m, n, which path): "gram" when T·(m+n) < m·n, else "rows".
NORM_CASES = [
    ((), 25, 60, 50, "gram"),
    ((3,), 25, 60, 50, "gram"),
    ((), 300, 700, 700, "gram"),  # T > 256: several token blocks
    ((), 60, 40, 50, "rows"),
    ((2,), 30, 40, 60, "rows"),
    ((), 7, 5, 123, "rows"),
    ((), 300, 40, 300, "rows"),  # n > 256: several column slabs
]


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "case", NORM_CASES, ids=[f"{c[0]}-T{c[1]}-m{c[2]}-n{c[3]}-{c[4]}" for c in NORM_CASES]
)
def test_T13_gradient_norm(case, dtype, monkeypatch):
    """gradient_norm = ‖SᵀX‖_F = ⟨XXᵀ, SSᵀ⟩^½ (spec T13) on both of its code paths."""
    batch, T, m, n, path = case
    assert (T * (m + n) < m * n) == (path == "gram")
    X = gauss((*batch, T, n), 190).to(dtype)
    S = gauss((*batch, T, m), 191).to(dtype)
    Xd, Sd = X.double(), S.double()  # the values the function sees
    expected = (Sd.mT @ Xd).square().sum((-2, -1)).sqrt()
    gram_identity = ((Xd @ Xd.mT) * (Sd @ Sd.mT)).sum((-2, -1)).sqrt()
    assert rel_err(gram_identity, expected) <= 1e-12  # the identity itself
    calls = _count_row_col_energies(monkeypatch)
    out = gradient_norm(X, S)
    assert len(calls) == (1 if path == "rows" else 0)
    assert out.shape == batch
    assert out.dtype == (F64 if dtype == F64 else torch.float32)
    assert rel_err(out, expected) <= (1e-12 if dtype == F64 else 1e-5)


@pytest.mark.parametrize("case", NORM_CASES[:1] + NORM_CASES[3:4], ids=["gram", "rows"])
def test_T13_gradient_norm_nan_is_not_finite(case):
    batch, T, m, n, _ = case
    X, S = gauss((*batch, T, n), 192), gauss((*batch, T, m), 193)
    X[3, 7] = float("nan")
    assert not torch.isfinite(gradient_norm(X, S)).any()


@pytest.mark.parametrize("power", [1.0, 0.5, 0.25])
@pytest.mark.parametrize("loss_reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch", [(), (3,)], ids=["single", "L3"])
def test_T14_metric_ema(batch, dtype, loss_reduction, power):
    """One step from v = 1: M_in = (β2 + (1−β2)·mean_t x_t² + δ)^p, M_out likewise with c_red·Σ_t s_t².

    c_red = T for a mean-reduced loss and 1/T for a sum (spec §6.1, T14).
    """
    T, m, n = 27, 41, 53
    X, S = gauss((*batch, T, n), 200).to(dtype), gauss((*batch, T, m), 201).to(dtype)
    Xd, Sd = X.double(), S.double()
    c_red = T if loss_reduction == "mean" else 1.0 / T
    exp_in = (Xd**2).sum(-2) / T
    exp_out = c_red * (Sd**2).sum(-2)
    stat_in, stat_out = kfac_statistics(X, S, loss_reduction=loss_reduction)
    acc = F64 if dtype == F64 else torch.float32  # statistics accumulate in fp32 (fp64 for fp64)
    assert stat_in.dtype == stat_out.dtype == acc
    assert stat_in.shape == (*batch, n) and stat_out.shape == (*batch, m)
    tol = 1e-12 if dtype == F64 else 1e-6
    assert rel_err(stat_in, exp_in) <= tol and rel_err(stat_out, exp_out) <= tol

    beta2, damping = 0.99, 1e-3
    v_in = ema(torch.ones(*batch, n, dtype=acc), stat_in, beta2)
    v_out = ema(torch.ones(*batch, m, dtype=acc), stat_out, beta2)
    assert rel_err(v_in, beta2 + (1 - beta2) * exp_in) <= tol
    M_in, M_out = effective_metric(v_in, damping, power), effective_metric(v_out, damping, power)
    assert rel_err(M_in, (beta2 + (1 - beta2) * exp_in + damping) ** power) <= tol
    assert rel_err(M_out, (beta2 + (1 - beta2) * exp_out + damping) ** power) <= tol


def test_T14_damping_before_power():
    v = torch.tensor([0.0, 1.0, 4.0], dtype=F64)
    assert torch.allclose(effective_metric(v, 0.5, 0.5), torch.tensor([0.5, 1.5, 4.5], dtype=F64).sqrt())
    assert torch.equal(ema(v, torch.full_like(v, 2.0), 0.75), 0.75 * v + 0.25 * 2.0)


# ----------------------------------------------------------------------------------------------------
# T15: dtypes
# ----------------------------------------------------------------------------------------------------


def _plain_bf16_lorsum(A0, B0, X, S, eta, lam, iters):
    """ "Plain PyTorch in bf16": the §3.3 half-steps written with bf16 tensors throughout.

    Every product, sum and scaling is a bf16 op (its result rounded to bf16, as PyTorch's bf16 matmul
    does), in the spec's r-wide parenthesisation. PyTorch has no bf16 Cholesky/solve on CPU, so the r×r
    solve is the one place a user must upcast: it is done in fp32 and rounded back to bf16. This is the
    baseline of DESIGN.md's rule "bf16 within twice the error that plain PyTorch in bf16 makes".
    """
    bf = torch.bfloat16
    r = A0.shape[-2]
    I = torch.eye(r, dtype=bf)
    lam_b = torch.tensor(lam, dtype=bf)
    c1 = torch.tensor(-eta, dtype=bf)

    def a_step(B):
        gram = B.mT @ B + lam_b * I
        rhs = lam_b * A0 + (B.mT @ B0) @ A0 + c1 * ((B.mT @ S.mT) @ X)
        return torch.linalg.solve(gram.float(), rhs.float()).to(bf)

    def b_step(A):
        gram = A @ A.mT + lam_b * I
        rhs = lam_b * B0 + B0 @ (A0 @ A.mT) + c1 * (S.mT @ (X @ A.mT))
        return torch.linalg.solve(gram.float().mT, rhs.float().mT).mT.to(bf)  # rhs · gram⁻¹

    if iters == 0:
        return a_step(B0), b_step(A0)
    B = B0
    for _ in range(iters):
        A = a_step(B)
        B = b_step(A)
    return A, B


@pytest.mark.parametrize("iters", [0, 1, 2])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_T15_bf16_in_bf16_out_fp32_math(shape, iters):
    """bf16 in ⇒ bf16 out, math in fp32 (spec T15, DESIGN.md tolerance rule).

    The reference is the fp64 formula on the bf16 inputs' exact values (those are what the function
    sees). Two bounds: (1) DESIGN.md's rule, at most twice the error of plain PyTorch in bf16
    (``_plain_bf16_lorsum``); (2) fp32 math leaves an error of ~1e-7 before the final rounding to bf16
    (ulp ~4e-3), so the result is the fp64 reference rounded to bf16 but for a handful of ties: its error
    is within 10% of that rounding error. Plain bf16 math is 1.2–8× the rounding error on these problems,
    so (2) is what tells fp32 math from bf16 math.
    """
    m, n, r, T = shape
    A0, B0, X, S = make_problem(m, n, r, T, seed=20, dtype=torch.bfloat16)
    eta, lam = 0.2, 0.01
    A_ref, B_ref = als_dense(
        B0.double() @ A0.double() - eta * S.double().mT @ X.double(), A0.double(), B0.double(), lam, iters
    )
    A, B = low_rank_sum([(A0, B0), (X, S.mT)], [1.0, -eta], lmbd=lam, iters=iters)
    assert A.dtype == B.dtype == torch.bfloat16
    A_pl, B_pl = _plain_bf16_lorsum(A0, B0, X, S, eta, lam, iters)
    for ours, plain, ref in ((A, A_pl, A_ref), (B, B_pl, B_ref)):
        err = rel_err(ours, ref)
        assert err <= 2 * rel_err(plain, ref)
        assert err <= 1.1 * rel_err(ref.to(torch.bfloat16), ref)


@pytest.mark.parametrize("iters", [0, 2])
def test_T15_fp16_in_fp16_out(iters):
    m, n, r, T = SHAPES[0]
    A0, B0, X, S = make_problem(m, n, r, T, seed=21, dtype=torch.float16)
    A_ref, B_ref = als_dense(
        B0.double() @ A0.double() - 0.2 * S.double().mT @ X.double(), A0.double(), B0.double(), 0.01, iters
    )
    A, B = low_rank_sum([(A0, B0), (X, S.mT)], [1.0, -0.2], lmbd=0.01, iters=iters)
    assert A.dtype == B.dtype == torch.float16
    # fp32 math: the only error left is the final rounding to fp16 (see the bf16 test).
    assert rel_err(A, A_ref) <= 1.1 * rel_err(A_ref.half(), A_ref)
    assert rel_err(B, B_ref) <= 1.1 * rel_err(B_ref.half(), B_ref)


@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "scaled"])
@pytest.mark.parametrize("iters", [0, 1, 3])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_T15_fp32_within_1e5_of_fp64(shape, iters, scaled):
    m, n, r, T = shape
    A0, B0, X, S = make_problem(m, n, r, T, seed=22)
    m_in, m_out = make_metrics(m, n) if scaled else (torch.ones(n, dtype=F64), torch.ones(m, dtype=F64))
    eta, lam = 0.3, 0.01
    Y_M = B0 @ A0 - eta * (S.mT @ X) / m_out[:, None] / m_in
    A_ref, B_ref = als_dense(Y_M, A0, B0, lam, iters, m_in, m_out)
    f = [t.float() for t in (A0, B0, X, S, m_in, m_out)]
    pairs = [(f[0], f[1]), (f[2], f[3].mT)]
    if scaled:
        A, B = scaled_low_rank_sum(pairs, [1.0, -eta], (f[4], f[5]), lmbd=lam, iters=iters)
    else:
        A, B = low_rank_sum(pairs, [1.0, -eta], lmbd=lam, iters=iters)
    assert A.dtype == B.dtype == torch.float32
    assert rel_err(A, A_ref) <= 1e-5 and rel_err(B, B_ref) <= 1e-5


@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "scaled"])
@pytest.mark.parametrize("iters", [0, 2])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_T15_fp64_math_is_fp64_accurate(shape, iters, scaled):
    """fp64 in ⇒ fp64 out with fp64 math: within ~1e-12 of the independent fp64 formula (DESIGN.md).

    A well-conditioned problem (cond of the r×r Grams ≲ 10, λ = 0.1), so fp64 arithmetic alone gives
    ~1e-15; an error at the fp32 level (~1e-7) means an fp32-sized perturbation inside the fp64 path.
    """
    m, n, r, T = shape
    A0, B0, X, S = make_problem(m, n, r, T, seed=23)
    m_in, m_out = make_metrics(m, n) if scaled else (torch.ones(n, dtype=F64), torch.ones(m, dtype=F64))
    eta, lam = 0.3, 0.1
    Y_M = B0 @ A0 - eta * (S.mT @ X) / m_out[:, None] / m_in
    A_ref, B_ref = als_dense(Y_M, A0, B0, lam, iters, m_in, m_out)
    pairs = [(A0, B0), (X, S.mT)]
    if scaled:
        A, B = scaled_low_rank_sum(pairs, [1.0, -eta], (m_in, m_out), lmbd=lam, iters=iters)
    else:
        A, B = low_rank_sum(pairs, [1.0, -eta], lmbd=lam, iters=iters)
    assert A.dtype == B.dtype == F64
    assert rel_err(A, A_ref) <= 1e-11 and rel_err(B, B_ref) <= 1e-11


# ----------------------------------------------------------------------------------------------------
# Regressions against the official code (spec §11)
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_P1_iters0_is_a_jacobi_round_not_a_no_op(shape):
    """The official low_rank_sum(k=0) returns (A0, B0) (spec §11 P1); ours is one Jacobi round."""
    m, n, r, T = shape
    A0, B0, X, S = make_problem(m, n, r, T, seed=24, dtype=torch.float32)
    eta, lam = 0.2, 0.01
    A, B = low_rank_sum([(A0, B0), (X, S.mT)], [1.0, -eta], lmbd=lam, iters=0)
    # Far from the no-op: the step moves each factor by a sizeable fraction of the RPLoRA update.
    A_exp, B_exp = rplora_jacobi(*d64(A0, B0), S.double().mT @ X.double(), eta, lam)
    assert rel_err(A, A0) >= 0.5 * rel_err(A_exp, A0.double()) > 1e-3
    assert rel_err(B, B0) >= 0.5 * rel_err(B_exp, B0.double()) > 1e-3
    assert rel_err(A, A_exp) <= 1e-5 and rel_err(B, B_exp) <= 1e-5


@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "scaled"])
@pytest.mark.parametrize("iters", [0, 1, 2])
def test_P9_fp64_factors_work(iters, scaled):
    """The official code crashes on fp64 factors (spec §11 P9): ours runs, in fp64, and returns fp64."""
    m, n, r, T = SHAPES[2]
    A0, B0, X, S = make_problem(m, n, r, T, seed=25)
    pairs = [(A0, B0), (X.float(), S.float().mT)]  # fp64 factors, fp32 data: math in fp64
    if scaled:
        A, B = scaled_low_rank_sum(pairs, [1.0, -0.1], make_metrics(m, n), lmbd=0.01, iters=iters)
    else:
        A, B = low_rank_sum(pairs, [1.0, -0.1], lmbd=0.01, iters=iters)
    assert A.dtype == B.dtype == F64
    assert torch.isfinite(A).all() and torch.isfinite(B).all()
    Y = B0 @ A0 - 0.1 * S.float().double().mT @ X.float().double()
    if not scaled:
        A_ref, B_ref = als_dense(Y, A0, B0, 0.01, iters)
        assert rel_err(A, A_ref) <= 1e-6 and rel_err(B, B_ref) <= 1e-6


# ----------------------------------------------------------------------------------------------------
# Batching, bad input, NaN
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "scaled"])
@pytest.mark.parametrize("iters", [0, 2])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_batched_layers_equal_separate_calls(shape, iters, scaled):
    """A leading layer dimension L = 3 with per-layer coefficients and λ (shape (L,)) = 3 separate calls."""
    m, n, r, T = shape
    L = 3
    probs = [make_problem(m, n, r, T, seed=30 + i) for i in range(L)]
    mets = [make_metrics(m, n, seed=40 + i) for i in range(L)]
    A0, B0, X, S = (torch.stack([p[i] for p in probs]) for i in range(4))
    M_in, M_out = torch.stack([mt[0] for mt in mets]), torch.stack([mt[1] for mt in mets])
    etas = [0.1, 0.3, 0.7]
    lams = [1e-3, 0.02, 0.5]
    c1 = torch.tensor([-e for e in etas], dtype=F64)
    lam_t = torch.tensor(lams, dtype=F64)
    c0 = torch.tensor(1.0, dtype=F64)  # a 0-d tensor coefficient
    if scaled:
        A, B = scaled_low_rank_sum([(A0, B0), (X, S.mT)], [c0, c1], (M_in, M_out), lmbd=lam_t, iters=iters)
    else:
        A, B = low_rank_sum([(A0, B0), (X, S.mT)], [c0, c1], lmbd=lam_t, iters=iters)
    assert A.shape == (L, r, n) and B.shape == (L, m, r)
    for i in range(L):
        a0, b0, x, s = probs[i]
        if scaled:
            a, b = scaled_low_rank_sum(
                [(a0, b0), (x, s.mT)], [1.0, -etas[i]], mets[i], lmbd=lams[i], iters=iters
            )
        else:
            a, b = low_rank_sum([(a0, b0), (x, s.mT)], [1.0, -etas[i]], lmbd=lams[i], iters=iters)
        assert rel_err(A[i], a) <= 1e-12 and rel_err(B[i], b) <= 1e-12
        # And each layer against the independent formula, so a shared wrong answer cannot pass (the fp32
        # tolerance: the 5×3 odd shape's Grams are the worst conditioned; fp64 precision itself is
        # test_T15_fp64_math_is_fp64_accurate's job).
        mi, mo = mets[i] if scaled else (torch.ones(n, dtype=F64), torch.ones(m, dtype=F64))
        Y_M = b0 @ a0 - etas[i] * (s.mT @ x) / mo[:, None] / mi
        a_ref, b_ref = als_dense(Y_M, a0, b0, lams[i], iters, mi, mo)
        assert rel_err(A[i], a_ref) <= 1e-5 and rel_err(B[i], b_ref) <= 1e-5


def _bad_inputs():
    m, n, r, T = 6, 8, 2, 5
    A0, B0, X, S = make_problem(m, n, r, T, seed=50, dtype=torch.float32)
    ok = [(A0, B0), (X, S.mT)]
    cases = {
        "too few coefficients": (ok, [1.0], {}, r"2 factor pairs but 1 coefficients"),
        "too many coefficients": (ok, [1.0, -0.1, 0.3], {}, r"2 factor pairs but 3 coefficients"),
        "no pairs": ([], [], {}, r"at least one factor pair"),
        "negative iters": (ok, [1.0, -0.1], {"iters": -1}, r"iters must be an integer >= 0"),
        "float iters": (ok, [1.0, -0.1], {"iters": 1.5}, r"iters must be an integer >= 0"),
        "bool iters": (ok, [1.0, -0.1], {"iters": True}, r"iters must be an integer >= 0"),
        "A0/B0 rank mismatch": ([(A0, B0[:, :1]), (X, S.mT)], [1.0, -0.1], {}, r"pairs\[0\]"),
        "1-D A0": ([(A0[0], B0), (X, S.mT)], [1.0, -0.1], {}, r"pairs\[0\]"),
        "X has wrong n": ([(A0, B0), (X[:, :-1], S.mT)], [1.0, -0.1], {}, r"pairs\[1\]"),
        "S has wrong m": ([(A0, B0), (X, S[:, :-1].mT)], [1.0, -0.1], {}, r"pairs\[1\]"),
        "X and S have different T": ([(A0, B0), (X[:-1], S.mT)], [1.0, -0.1], {}, r"pairs\[1\]"),
        "S not transposed": ([(A0, B0), (X, S)], [1.0, -0.1], {}, r"pairs\[1\]"),
        "layer counts differ": (
            [(A0.expand(3, r, n), B0.expand(3, m, r)), (X.expand(2, T, n), S.mT.expand(2, m, T))],
            [1.0, -0.1],
            {},
            r"pairs\[1\]|batch|layer",
        ),
    }
    return cases


BAD = _bad_inputs()


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_raises_value_error(name):
    pairs, coeffs, kw, match = BAD[name]
    with pytest.raises(ValueError, match=match):
        low_rank_sum(pairs, coeffs, lmbd=0.01, **kw)


@pytest.mark.parametrize(
    "which", ["m_in too short", "m_out too long", "swapped", "m_in 2-D wrong last dim", "layer counts differ"]
)
def test_bad_metrics_raise_value_error(which):
    m, n, r, T = 6, 8, 2, 5
    A0, B0, X, S = make_problem(m, n, r, T, seed=51, dtype=torch.float32)
    m_in, m_out = torch.ones(n), torch.ones(m)
    pairs = [(A0, B0), (X, S.mT)]
    metrics = {
        "m_in too short": (m_in[:-1], m_out),
        "m_out too long": (m_in, torch.ones(m + 1)),
        "swapped": (m_out, m_in),
        "m_in 2-D wrong last dim": (m_in[:, None], m_out),
        "layer counts differ": (torch.ones(2, n), torch.ones(2, m)),
    }[which]
    if which == "layer counts differ":
        pairs = [(A0.expand(3, r, n), B0.expand(3, m, r)), (X.expand(3, T, n), S.mT.expand(3, m, T))]
    with pytest.raises(ValueError, match="metrics"):
        scaled_low_rank_sum(pairs, [1.0, -0.1], metrics, lmbd=0.01, iters=1)


def test_bad_loss_reduction_raises():
    X, S = gauss((5, 8), 52), gauss((5, 6), 53)
    with pytest.raises(ValueError, match="loss_reduction"):
        kfac_statistics(X, S, loss_reduction="batchmean")


@pytest.mark.parametrize("where", ["X", "S", "A0", "B0", "m_in", "inf in X"])
@pytest.mark.parametrize("iters", [0, 1, 2])
def test_nan_input_gives_non_finite_output(where, iters):
    """NaN never passes: a NaN (or inf) anywhere in the input makes both output factors non-finite."""
    m, n, r, T = SHAPES[0]
    A0, B0, X, S = make_problem(m, n, r, T, seed=54, dtype=torch.float32)
    m_in, m_out = make_metrics(m, n, dtype=torch.float32)
    target = {"X": X, "S": S, "A0": A0, "B0": B0, "m_in": m_in, "inf in X": X}[where]
    target.view(-1)[3] = float("inf") if where.startswith("inf") else float("nan")
    pairs = [(A0, B0), (X, S.mT)]
    if where.startswith("m_"):
        A, B = scaled_low_rank_sum(pairs, [1.0, -0.1], (m_in, m_out), lmbd=0.01, iters=iters)
    else:
        A, B = low_rank_sum(pairs, [1.0, -0.1], lmbd=0.01, iters=iters)
    assert not torch.isfinite(A).all()
    assert not torch.isfinite(B).all()
