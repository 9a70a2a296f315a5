"""AdaPreLoRA: the H-weighted factor solve, the Adafactor statistics and the optimizer.

The numbered properties T1–T13 of spec/adaprelora.md §8 are checked against explicit fp64 formulas that
form the m×n matrices (fine at test sizes); fp32 results are compared with fp64 references within the
1e-5 relative Frobenius error of DESIGN.md.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

import lorsum_kernels as lk
from lorsum_kernels import ops, reference
from lorsum_kernels.functional import (
    adafactor_debias,
    adafactor_decay,
    adafactor_ema,
    adafactor_scales,
    adaprelora_direction,
    exact_statistics,
    scaled_gd_direction,
    surrogate_statistics,
)

from .conftest import TinyLoRAMLP

D = torch.float64
SHAPES = [(12, 9, 3), (5, 123, 3), (40, 30, 4), (17, 17, 1)]  # (m, n, r)


def rel_err(actual, expected) -> float:
    a, e = actual.double(), expected.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - e).norm() / e.norm().clamp_min(1e-300)).item()


def problem(m, n, r, *, batch=(), seed=0, dtype=D):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(*batch, r, n, generator=g, dtype=D)
    B = torch.randn(*batch, m, r, generator=g, dtype=D)
    G = torch.randn(*batch, m, n, generator=g, dtype=D)
    p = torch.rand(*batch, m, generator=g, dtype=D) * 1.5 + 0.5
    q = torch.rand(*batch, n, generator=g, dtype=D) * 1.5 + 0.5
    return [t.to(dtype) for t in (A, B, G, p, q)]


def explicit(A, B, G, p, q):
    """fp64 explicit quantities of spec §1–3: T, Π_B, Π_A, the overlap O and the H-norm."""
    P, Q = torch.diag_embed(p), torch.diag_embed(q)
    T = G / (p.unsqueeze(-1) * q.unsqueeze(-2))
    M_B, M_A = B.mT @ P @ B, A @ Q @ A.mT
    Pi_B = B @ torch.linalg.solve(M_B, B.mT @ P)
    Pi_A = Q @ A.mT @ torch.linalg.solve(M_A, A)
    return dict(P=P, Q=Q, T=T, Pi_B=Pi_B, Pi_A=Pi_A, O=Pi_B @ T @ Pi_A)


def hnorm(Y, p, q):
    return (p.unsqueeze(-1) * q.unsqueeze(-2) * Y * Y).sum((-2, -1)).sqrt()


def solve(A, B, G, p, q, ridge=0.0):
    """The reference solve with the unscaled gradients of G."""
    return reference.adaprelora_solve(A, B, B.mT @ G, G @ A.mT, p, q, ridge=ridge)


# --------------------------------------------------------------------------------------------------
# T1–T9: the closed form


@pytest.mark.parametrize("m,n,r", SHAPES)
def test_t1_normal_equations(m, n, r):
    A, B, G, p, q = problem(m, n, r)
    dA, dB = solve(A, B, G, p, q)
    e = explicit(A, B, G, p, q)
    resid = B @ dA + dB @ A - e["T"]
    scale = G.norm()
    assert (B.mT @ e["P"] @ resid @ e["Q"]).norm() / scale < 1e-11
    assert (e["P"] @ resid @ e["Q"] @ A.mT).norm() / scale < 1e-11


@pytest.mark.parametrize("m,n,r", SHAPES)
def test_t2_projection_optimality(m, n, r):
    A, B, G, p, q = problem(m, n, r, seed=1)
    dA, dB = solve(A, B, G, p, q)
    e = explicit(A, B, G, p, q)
    J = B @ dA + dB @ A
    proj = e["Pi_B"] @ e["T"] + e["T"] @ e["Pi_A"] - e["O"]
    assert rel_err(J, proj) < 1e-11
    best = hnorm(J - e["T"], p, q)
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        E_A, E_B = torch.randn(r, n, generator=g, dtype=D), torch.randn(m, r, generator=g, dtype=D)
        other = B @ (dA + 1e-2 * E_A) + (dB + 1e-2 * E_B) @ A
        assert hnorm(other - e["T"], p, q) > best


@pytest.mark.parametrize("m,n,r", SHAPES)
def test_t3_overlap_split_evenly_and_balance_optimal(m, n, r):
    A, B, G, p, q = problem(m, n, r, seed=3)
    dA, dB = solve(A, B, G, p, q)
    e = explicit(A, B, G, p, q)
    assert rel_err(B @ dA, e["Pi_B"] @ e["T"] - 0.5 * e["O"]) < 1e-11
    assert rel_err(dB @ A, e["T"] @ e["Pi_A"] - 0.5 * e["O"]) < 1e-11
    imbalance = hnorm(B @ dA - dB @ A, p, q)
    g = torch.Generator().manual_seed(4)
    for _ in range(5):
        X = 1e-3 * torch.randn(r, r, generator=g, dtype=D)  # a gauge move within the solution family
        other = hnorm(B @ (dA - X @ A) - (dB + B @ X) @ A, p, q)
        assert other > imbalance
    # The criterion is not "equal norms": the two contributions differ in H-norm (spec §3.3 caution).
    assert not torch.isclose(hnorm(B @ dA, p, q), hnorm(dB @ A, p, q), rtol=1e-3)


@pytest.mark.parametrize("side", ["A", "B"])
def test_t4_full_rank_reproduces_adafactor(side):
    m, n = (7, 5) if side == "A" else (5, 7)
    r = min(m, n)  # A (r×n) square and invertible, or B (m×r) square and invertible
    A, B, G, p, q = problem(m, n, r, seed=5)
    dA, dB = solve(A, B, G, p, q)
    assert rel_err(B @ dA + dB @ A, G / (p.unsqueeze(-1) * q.unsqueeze(-2))) < 1e-11
    ones_p, ones_q = torch.ones_like(p), torch.ones_like(q)
    dA, dB = solve(A, B, G, ones_p, ones_q)
    assert rel_err(B @ dA + dB @ A, G) < 1e-11


@pytest.mark.parametrize("m,n,r", SHAPES)
def test_t5_gauge_invariance(m, n, r):
    A, B, G, p, q = problem(m, n, r, seed=6)
    C = torch.randn(r, r, generator=torch.Generator().manual_seed(7), dtype=D) + 2 * torch.eye(r, dtype=D)
    dA, dB = solve(A, B, G, p, q)
    A2, B2 = torch.linalg.solve(C, A), B @ C
    dA2, dB2 = solve(A2, B2, G, p, q)
    # A backward-stable solve of the transformed problem is accurate to ~eps·cond(its r×r Grams): C's
    # conditioning (3.3e3 for r = 4) squared into them (1.6e7) is the only allowance.
    cond = max(torch.linalg.cond(A2 @ A2.mT).item(), torch.linalg.cond(B2.mT @ B2).item())
    tol = 10 * torch.finfo(D).eps * cond
    assert rel_err(dA2, torch.linalg.solve(C, dA)) < tol
    assert rel_err(dB2, dB @ C) < tol
    eta = 0.1
    step = (B - eta * dB) @ (A - eta * dA)
    step2 = (B2 - eta * dB2) @ (A2 - eta * dA2)
    assert rel_err(step2, step) < tol


def test_t6_metric_scale_invariance():
    A, B, G, p, q = problem(12, 9, 3, seed=8)
    dA, dB = solve(A, B, G, p, q)
    dA2, dB2 = solve(A, B, G, 3.0 * p, q / 3.0)
    assert rel_err(dA2, dA) < 1e-12 and rel_err(dB2, dB) < 1e-12
    dA3, dB3 = solve(A, B, G, 4.0 * p, q)
    assert rel_err(dA3, dA / 4.0) < 1e-12 and rel_err(dB3, dB / 4.0) < 1e-12
    # Through the statistics: scaling R changes nothing (p = sqrt(R/ΣR)); scaling C by c² divides by c.
    R, C = torch.rand(12, dtype=D) + 0.5, torch.rand(9, dtype=D) + 0.5
    g_A, g_B = B.mT @ G, G @ A.mT
    base = adaprelora_direction(A, B, g_A, g_B, R, C, ridge=0.0)
    same = adaprelora_direction(A, B, g_A, g_B, 7.0 * R, C, ridge=0.0)
    smaller = adaprelora_direction(A, B, g_A, g_B, R, 25.0 * C, ridge=0.0)
    assert rel_err(same[0], base[0]) < 1e-12 and rel_err(same[1], base[1]) < 1e-12
    assert rel_err(smaller[0], base[0] / 5) < 1e-12 and rel_err(smaller[1], base[1] / 5) < 1e-12


@pytest.mark.parametrize("m,n,r", SHAPES)
def test_t7_reduction_at_identity_metric(m, n, r):
    A, B, G, _, _ = problem(m, n, r, seed=9)
    p, q = torch.ones(m, dtype=D), torch.ones(n, dtype=D)
    dA, dB = solve(A, B, G, p, q)
    P_B = B @ torch.linalg.solve(B.mT @ B, B.mT)
    P_A = A.mT @ torch.linalg.solve(A @ A.mT, A)
    # The product is the Frobenius projection (LoRA-Pro's product with s = 1).
    assert rel_err(B @ dA + dB @ A, P_B @ G + G @ P_A - P_B @ G @ P_A) < 1e-11
    # The factors are LoRA-Pro's family with X = −½ (BᵀB)⁻¹ K (AAᵀ)⁻¹ (not the Sylvester X).
    g_A, g_B = B.mT @ G, G @ A.mT
    M_B, M_A = B.mT @ B, A @ A.mT
    X = -0.5 * torch.linalg.solve(M_B, B.mT @ G @ A.mT) @ torch.linalg.inv(M_A)
    lora_pro_A = torch.linalg.solve(M_B, g_A) + X @ A
    lora_pro_B = (torch.eye(m, dtype=D) - P_B) @ g_B @ torch.linalg.inv(M_A) - B @ X
    assert rel_err(dA, lora_pro_A) < 1e-10 and rel_err(dB, lora_pro_B) < 1e-10
    # X = 0 instead: ScaledGD's dA (reg 0).
    sgd_A, _ = scaled_gd_direction(A, B, g_A, g_B, reg=0.0)
    assert rel_err(dA - X @ A, sgd_A) < 1e-10  # spd_solve's fp64 relative ridge is 1e-14


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_t8_cold_start(dtype):
    m, n, r = 12, 9, 3
    A, _, G, p, q = problem(m, n, r, seed=10)
    B = torch.zeros(m, r, dtype=D)
    ridge = 1e-6
    dA, dB = reference.adaprelora_solve(*(t.to(dtype) for t in (A, B, B.mT @ G, G @ A.mT, p, q)), ridge=ridge)
    assert torch.isfinite(dA).all() and torch.isfinite(dB).all()
    assert torch.equal(dA, torch.zeros_like(dA))
    e = explicit(A, torch.eye(m, r, dtype=D), G, p, q)  # Π_A does not involve B
    assert rel_err(dB @ A.to(dtype), e["T"] @ e["Pi_A"]) < 1e-5
    # Through the public function and in a batch, with zero statistics for one layer as well.
    R = torch.stack([p.square(), torch.zeros(m, dtype=D)])
    C = torch.stack([q.square(), torch.zeros(n, dtype=D)])
    A2, B2, G2 = A.expand(2, r, n), B.expand(2, m, r), G.expand(2, m, n)
    out = adaprelora_direction(A2.float(), B2.float(), (B2.mT @ G2).float(), (G2 @ A2.mT).float(), R, C)
    assert all(torch.isfinite(t).all() for t in out)


@pytest.mark.parametrize("m,n,r", SHAPES)
def test_t9_lora_scale(m, n, r):
    A, B, G, p, q = problem(m, n, r, seed=11)
    R, C = p.square() * 3.0, q.square()  # p = sqrt(R/ΣR) is p up to a constant, which T6 removes
    g_A, g_B = B.mT @ G, G @ A.mT
    dA, dB = adaprelora_direction(A, B, g_A, g_B, R, C, ridge=0.0)
    for s in (0.25, 2.0, 16.0):
        dAs, dBs = adaprelora_direction(A, B, s * g_A, s * g_B, R, C, scale=s, ridge=0.0)
        assert rel_err(s * (B @ dAs + dBs @ A), B @ dA + dB @ A) < 1e-12
    # One scale per layer of a batch.
    s = torch.tensor([0.5, 4.0], dtype=D)
    As, Bs = A.expand(2, r, n), B.expand(2, m, r)
    s3 = s.view(2, 1, 1)
    dAs, dBs = adaprelora_direction(As, Bs, s3 * g_A, s3 * g_B, R, C, scale=s, ridge=0.0)
    prod = s.view(2, 1, 1) * (Bs @ dAs + dBs @ As)
    assert rel_err(prod, (B @ dA + dB @ A).expand(2, m, n)) < 1e-12


# --------------------------------------------------------------------------------------------------
# T10, exact statistics, T11: the statistics


@pytest.mark.parametrize("m,n,r", SHAPES)
def test_t10_surrogate_energies_match_formed_matrix(m, n, r):
    A, B, G, _, _ = problem(m, n, r, batch=(2,), seed=12)
    E, F = B.mT @ G, G @ A.mT
    Gt = B @ E + F @ A
    rows, cols = reference.tangent_energies(B, E, F, A)
    assert rel_err(rows, Gt.square().sum(-1)) < 2e-13 and rel_err(cols, Gt.square().sum(-2)) < 2e-13
    # fp32 against the fp64 reference, and the public function with the LoRA scale.
    rows32, cols32 = ops.tangent_energies(*(t.float() for t in (B, E, F, A)))
    assert rel_err(rows32, Gt.square().sum(-1)) < 1e-5 and rel_err(cols32, Gt.square().sum(-2)) < 1e-5
    s = 3.0
    rows_s, cols_s = surrogate_statistics(A.float(), B.float(), (s * E).float(), (s * F).float(), scale=s)
    assert rows_s.dtype == torch.float32
    assert rel_err(rows_s, Gt.square().sum(-1)) < 1e-5 and rel_err(cols_s, Gt.square().sum(-2)) < 1e-5


def test_surrogate_at_cold_start_is_g_ata():
    A, _, G, _, _ = problem(12, 9, 3, seed=13)
    B = torch.zeros(12, 3, dtype=D)
    rows, cols = surrogate_statistics(A, B, B.mT @ G, G @ A.mT)
    Gt = G @ A.mT @ A
    assert rel_err(rows, Gt.square().sum(-1)) < 1e-12 and rel_err(cols, Gt.square().sum(-2)) < 1e-12


@pytest.mark.parametrize("m,n,T,block", [(5, 123, 17, 7), (40, 30, 64, 256), (33, 65, 9, 1)])
def test_exact_statistics_match_formed_gradient(m, n, T, block):
    g = torch.Generator().manual_seed(14)
    X, S = torch.randn(3, T, n, generator=g, dtype=D), torch.randn(3, T, m, generator=g, dtype=D)
    G = S.mT @ X
    rows, cols = exact_statistics(X, S, block_size=block)
    assert rel_err(rows, G.square().sum(-1)) < 1e-13 and rel_err(cols, G.square().sum(-2)) < 1e-13
    rows32, cols32 = exact_statistics(X.float(), S.float(), block_size=block)
    assert rows32.dtype == torch.float32
    assert rel_err(rows32, G.square().sum(-1)) < 1e-5 and rel_err(cols32, G.square().sum(-2)) < 1e-5
    # bf16 captures: accumulated in fp32, so only the inputs' rounding remains; plain bf16 torch
    # (forming G in bf16 and reducing there) is the yardstick of DESIGN.md.
    Xb, Sb = X.bfloat16(), S.bfloat16()
    rows_b, _ = exact_statistics(Xb, Sb, block_size=block)
    plain = (Sb.mT @ Xb).square().sum(-1)
    assert rel_err(rows_b, G.square().sum(-1)) <= 2 * rel_err(plain, G.square().sum(-1))


def test_exact_statistics_never_hold_an_m_by_n_tensor():
    # T12 (transient part): every tensor produced while computing the energies is at most one m×block
    # slab (or an input-sized copy), never m×n.
    m, n, T, block = 256, 256, 32, 64
    X, S = torch.randn(1, T, n), torch.randn(1, T, m)
    with _MaxNumel() as mode:
        exact_statistics(X, S, block_size=block)
    assert mode.max_numel <= max(m * block, T * max(m, n))
    assert mode.max_numel < m * n // 2


def test_adafactor_schedule_ema_and_debias():
    t = torch.tensor([1.0, 2.0, 10.0])
    beta = adafactor_decay(t)
    torch.testing.assert_close(beta, 1 - t ** -0.8)
    assert beta[0] == 0  # the first step overwrites the state
    assert adafactor_decay(t, beta2=0.99) == 0.99
    R0, C0 = torch.rand(3, 4, dtype=D), torch.rand(3, 5, dtype=D)
    rows, cols = torch.rand(3, 4, dtype=D), torch.rand(3, 5, dtype=D)
    eps1 = 1e-3  # large enough to see
    R, C = adafactor_ema(R0, C0, rows, cols, t.double(), eps1=eps1)
    b = (1 - t.double() ** -0.8).unsqueeze(-1)
    torch.testing.assert_close(R, b * R0 + (1 - b) * (rows + 5 * eps1))
    torch.testing.assert_close(C, b * C0 + (1 - b) * (cols + 4 * eps1))
    # A fixed β2 is bias-corrected: a constant statistic is recovered exactly from a zero state.
    R, C = torch.zeros(4, dtype=D), torch.zeros(5, dtype=D)
    for step in range(1, 4):
        R, C = adafactor_ema(R, C, rows[0], cols[0], step, beta2=0.9, eps1=0.0)
        Rh, Ch = adafactor_debias(R, C, step, beta2=0.9)
        torch.testing.assert_close(Rh, rows[0])
        torch.testing.assert_close(Ch, cols[0])
    assert adafactor_debias(R, C, 3)[0] is R  # the schedule needs no correction
    p, q = adafactor_scales(torch.tensor([1.0, 3.0, 0.0]), torch.tensor([4.0, 0.0]))
    torch.testing.assert_close(p, torch.tensor([0.5, 0.75**0.5, 1e-15]))
    torch.testing.assert_close(q, torch.tensor([2.0, 1e-15]))


def test_t11_matches_torch_adafactor_over_steps():
    # Full rank (r = n, A invertible): J = T_t exactly, so B·dA + dB·A must be torch Adafactor's update
    # direction G_t / sqrt(V̂_t) at every step of the 1 − t^(−0.8) schedule, clipping off.
    m, n, T = 7, 5, 11
    g = torch.Generator().manual_seed(15)
    A, B = torch.randn(n, n, generator=g, dtype=D), torch.randn(m, n, generator=g, dtype=D)
    W = torch.zeros(m, n, dtype=D, requires_grad=True)
    ada = torch.optim.Adafactor([W], lr=1e-6, eps=(1e-30, 1e-3), d=1e30)
    R, C = torch.zeros(m, dtype=D), torch.zeros(n, dtype=D)
    for step in range(1, 4):
        X, S = torch.randn(T, n, generator=g, dtype=D), torch.randn(T, m, generator=g, dtype=D)
        G = S.mT @ X
        alpha = max(1e-3, (W.detach().norm() / (m * n) ** 0.5).item()) * min(1e-6, step**-0.5)
        before = W.detach().clone()
        W.grad = G.clone()
        ada.step()
        U = (before - W.detach()) / alpha
        rows, cols = exact_statistics(X, S)
        R, C = adafactor_ema(R, C, rows, cols, step)
        dA, dB = adaprelora_direction(A, B, B.mT @ G, G @ A.mT, R, C, ridge=0.0)
        assert rel_err(B @ dA + dB @ A, U) < 1e-9, step
    # One step in closed form: G / sqrt(rowsum(G²)·colsum(G²)/ΣG²).
    R1, C1 = adafactor_ema(torch.zeros(m, dtype=D), torch.zeros(n, dtype=D), *exact_statistics(X, S), 1)
    dA, dB = adaprelora_direction(A, B, B.mT @ G, G @ A.mT, R1, C1, ridge=0.0)
    V = G.square().sum(1, keepdim=True) * G.square().sum(0, keepdim=True) / G.square().sum()
    assert rel_err(B @ dA + dB @ A, G / V.sqrt()) < 1e-10


# --------------------------------------------------------------------------------------------------
# precision, batching, bad input of the public function


@pytest.mark.parametrize("m,n,r", SHAPES)
def test_direction_fp32_and_bf16_against_fp64(m, n, r):
    A, B, G, p, q = problem(m, n, r, batch=(3,), seed=16)
    R, C = p.square(), q.square()
    args = (A, B, B.mT @ G, G @ A.mT, R, C)
    ref = adaprelora_direction(*args)
    out = adaprelora_direction(*(t.float() for t in args))
    assert out[0].dtype == torch.float32
    assert rel_err(out[0], ref[0]) < 1e-5 and rel_err(out[1], ref[1]) < 1e-5
    # Batched = per layer.
    for i in range(3):
        single = adaprelora_direction(*(t[i] for t in args))
        assert rel_err(single[0], ref[0][i]) < 1e-12 and rel_err(single[1], ref[1][i]) < 1e-12
    # bf16 factors: fp32 math inside, so the bf16 result is within 2× of the correctly rounded one.
    bf = [t.bfloat16() for t in args]
    ref_b = adaprelora_direction(*(t.double() for t in bf))
    out_b = adaprelora_direction(*bf)
    assert out_b[0].dtype == torch.bfloat16
    for o, e in zip(out_b, ref_b):
        assert rel_err(o, e) <= 2 * rel_err(e.bfloat16(), e) + 1e-6


def test_direction_bad_input():
    A, B, G, p, q = problem(12, 9, 3)
    g_A, g_B = B.mT @ G, G @ A.mT
    with pytest.raises(ValueError, match="shapes of their factors"):
        adaprelora_direction(A, B, g_A.mT, g_B, p, q)
    with pytest.raises(ValueError, match="row must be"):
        adaprelora_direction(A, B, g_A, g_B, q, p)
    with pytest.raises(ValueError, match="ridge"):
        adaprelora_direction(A, B, g_A, g_B, p, q, ridge=-1.0)
    with pytest.raises(ValueError, match="scale"):
        adaprelora_direction(A, B, g_A, g_B, p, q, scale=0.0)
    with pytest.raises(ValueError, match="rank"):
        A4, B4 = torch.randn(4, 3, dtype=D), torch.randn(5, 4, dtype=D)
        adaprelora_direction(A4, B4, torch.zeros_like(A4), torch.zeros_like(B4), torch.ones(5), torch.ones(3))
    with pytest.raises(ValueError, match="backend"):
        adaprelora_direction(A, B, g_A, g_B, p, q, backend="cuda-magic")
    with pytest.raises(ValueError, match="block_size"):
        exact_statistics(torch.randn(4, 3), torch.randn(4, 5), block_size=0)


def test_ridged_cholesky_handles_zero_and_singular_grams():
    zero = torch.zeros(2, 3, 3)
    L = reference.ridged_cholesky(zero, 0.0)
    assert torch.isfinite(L).all() and (L.diagonal(dim1=-2, dim2=-1) > 0).all()
    v = torch.randn(3, 1)
    singular = (v @ v.mT).expand(2, 3, 3)  # rank 1: ridge 0 fails, the fallback takes over
    L = reference.ridged_cholesky(singular, 0.0)
    assert torch.isfinite(L).all()
    rhs = singular @ torch.randn(3, 2)
    assert torch.isfinite(torch.cholesky_solve(rhs, L)).all()


# --------------------------------------------------------------------------------------------------
# T12, T13: memory and cost


class _MaxNumel(TorchDispatchMode):
    """Records the largest tensor any op produces (views included)."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


def _solve_flops(m, n, r) -> int:
    A, B = torch.randn(r, n), torch.randn(m, r)
    g_A, g_B = torch.randn(r, n), torch.randn(m, r)
    p, q = torch.rand(m) + 0.5, torch.rand(n) + 0.5
    with FlopCounterMode(display=False) as counter:
        ops.adaprelora_solve(A, B, g_A, g_B, p, q, ridge=1e-6)
    return counter.get_total_flops()


def _surrogate_flops(m, n, r) -> int:
    with FlopCounterMode(display=False) as counter:
        ops.tangent_energies(torch.randn(m, r), torch.randn(r, n), torch.randn(m, r), torch.randn(r, n))
    return counter.get_total_flops()


@pytest.mark.parametrize("flops", [_solve_flops, _surrogate_flops], ids=["solve", "surrogate"])
def test_t13_cost_scales_like_m_plus_n_times_r_squared(flops):
    # Counted, not timed (DESIGN.md: targets are benchmarks, never timed tests). FlopCounterMode counts
    # the products; the triangular solves have the same r²(m+n) form.
    base = flops(2048, 1024, 8)
    assert 3.6 < flops(2048, 1024, 16) / base < 4.4  # doubling r quadruples it
    assert 1.9 < flops(4096, 2048, 8) / base < 2.1  # linear in m + n, not m·n
    assert base == pytest.approx(flops(1024, 2048, 8), rel=0.02)


# --------------------------------------------------------------------------------------------------
# the optimizer


def Net(r=3, alpha=6.0, dtype=torch.float32, seed=0):  # noqa: N802 - used like the class it was
    """conftest's three-layer LoRA MLP with 13 input features, seeded."""
    torch.manual_seed(seed)
    return TinyLoRAMLP(d_in=13, r=r, alpha=alpha, dtype=dtype)


def batches(k=4, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(3, 7, 13, generator=g).to(dtype), torch.randint(0, 5, (3, 7), generator=g))
            for _ in range(k)]


def loss_fn(model, x, y):
    return nn.functional.cross_entropy(model(x).reshape(-1, 5).float(), y.reshape(-1))


def train(model, opt, data):
    losses = []
    for x, y in data:
        opt.zero_grad()
        loss = loss_fn(model, x, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


VARIANTS = [
    dict(statistics="exact", momentum="input"),
    dict(statistics="exact", momentum=None),
    dict(statistics="exact", momentum="adam"),
    dict(statistics="surrogate", momentum="input"),
    dict(statistics="surrogate", momentum="adam", betas=(0.9, 0.99)),
]


def _gradient_of_merged_weights(model, data):
    """∂L/∂W of each LoRA layer (W = W0 + s·B·A), via a copy whose base weights require gradients."""
    twin = copy.deepcopy(model)
    for layer in twin.lora_layers():
        layer.base.weight.requires_grad_(True)
    for x, y in data:
        loss_fn(twin, x, y).backward()
    return [layer.base.weight.grad for layer in twin.lora_layers()]


def test_optimizer_first_step_matches_fp64_closed_form():
    # alpha/r = 2: the step is taken on the balanced factors √s·A, √s·B, with the true G's statistics.
    model = Net(alpha=6.0)
    lr = 0.05
    data = batches(1)
    Gs = _gradient_of_merged_weights(model, data)
    before = [(layer.lora_A.weight.detach().double(), layer.lora_B.weight.detach().double(), layer.scaling)
              for layer in model.lora_layers()]
    opt = lk.AdaPreLoRA(model, lr=lr, momentum=None, ridge=0.0)
    train(model, opt, data)
    for layer, (A, B, s), G in zip(model.lora_layers(), before, Gs):
        G = G.double()
        Ab, Bb = s**0.5 * A, s**0.5 * B
        R, C = G.square().sum(1) + G.shape[1] * 1e-30, G.square().sum(0) + G.shape[0] * 1e-30
        dA, dB = adaprelora_direction(Ab, Bb, Bb.mT @ G, G @ Ab.mT, R, C, ridge=0.0)
        assert rel_err(layer.lora_A.weight, (Ab - lr * dA) / s**0.5) < 1e-5
        assert rel_err(layer.lora_B.weight, (Bb - lr * dB) / s**0.5) < 1e-5
        st = opt.state[layer.lora_A.weight]
        assert rel_err(st["row_stat"], R) < 1e-5 and rel_err(st["col_stat"], C) < 1e-5


def _set_balanced(model, template):
    """Give ``model`` raw factors with the same balanced factors (√s·A, √s·B) as ``template``."""
    with torch.no_grad():
        for dst, src in zip(model.lora_layers(), template.lora_layers()):
            ratio = (src.scaling / dst.scaling) ** 0.5
            dst.lora_A.weight.copy_(src.lora_A.weight * ratio)
            dst.lora_B.weight.copy_(src.lora_B.weight * ratio)
            dst.base.load_state_dict(src.base.state_dict())
        model.head.load_state_dict(template.head.state_dict())


def _merged(model):
    return [layer.scaling * layer.lora_B.weight @ layer.lora_A.weight for layer in model.lora_layers()]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(str(x) for x in v.values()))
def test_optimizer_step_is_defined_on_the_merged_weight(variant):
    # Same merged (balanced) factors, α/r = 0.5 vs 8: identical trajectories of s·B·A.
    ref_model, other = Net(alpha=1.5), Net(alpha=24.0, seed=1)
    _set_balanced(other, ref_model)
    for m in (ref_model, other):
        train(m, lk.AdaPreLoRA(m, lr=0.02, **variant), batches(3))
    for a, b in zip(_merged(ref_model), _merged(other)):
        assert rel_err(b, a) < 1e-5
    # ...and the run did move the weights (a non-moving optimizer would pass the check above).
    assert rel_err(_merged(ref_model)[0], _merged(Net(alpha=1.5))[0]) > 1e-3


def test_input_momentum_first_step_equals_sgd_variant_and_adam_moves_by_lr():
    data = batches(1)
    start = [layer.lora_A.weight.detach().clone() for layer in Net().lora_layers()]
    moved = {}
    for momentum in (None, "input", "adam"):
        model = Net()
        train(model, lk.AdaPreLoRA(model, lr=1e-3, momentum=momentum), data)
        moved[momentum] = [layer.lora_A.weight.detach() - s for layer, s in zip(model.lora_layers(), start)]
    for a, b in zip(moved["input"], moved[None]):  # bias-corrected input momentum: m̂_1 = g_1
        assert rel_err(a, b) < 1e-5
    # Adam on the direction: the first step moves each coordinate of the balanced factor by lr.
    root = Net().l1.scaling ** 0.5
    for d in moved["adam"]:
        step = d.abs() * root
        assert torch.allclose(step, torch.full_like(step, 1e-3), rtol=1e-3)
    assert rel_err(moved["adam"][0], moved[None][0]) > 0.1


def test_gradient_accumulation_gives_exact_statistics():
    data = batches(2)
    model = Net()
    G = _gradient_of_merged_weights(model, data)
    opt = lk.AdaPreLoRA(model, lr=1e-3, momentum=None)
    for x, y in data:  # two micro-batches, one step
        loss_fn(model, x, y).backward()
    opt.step()
    for layer, g in zip(model.lora_layers(), G):
        st = opt.state[layer.lora_A.weight]
        assert rel_err(st["row_stat"], g.square().sum(1)) < 1e-5
        assert rel_err(st["col_stat"], g.square().sum(0)) < 1e-5
    # The per-micro-batch approximation (sum of the energies) is measurably different.
    twin = Net()
    parts = [_gradient_of_merged_weights(twin, [b])[0] for b in data]
    approx = sum(p.square().sum(1) for p in parts)
    assert rel_err(approx, G[0].square().sum(1)) > 1e-2


def test_state_holds_no_m_by_n_tensor_and_step_transients_stay_small():
    # T12: per pair the state is m + n (+ the momenta) and a step count; no m×n tensor survives or is
    # produced during a step with exact statistics (block 32, T = 16 token rows).
    torch.manual_seed(0)
    m = n = 96
    model = nn.Sequential(lk.LoRALinear(nn.Linear(n, m), 2, 4.0))  # r = 2
    nn.init.normal_(model[0].lora_B.weight, std=0.1)
    r = 2
    for momentum, k in [(None, 0), ("input", 1), ("adam", 2)]:
        opt = lk.AdaPreLoRA(model, lr=1e-3, momentum=momentum, block_size=32)
        x = torch.randn(16, n)
        model(x).square().sum().backward()
        with _MaxNumel() as mode:
            opt.step()
        st = opt.state[model[0].lora_A.weight]
        method = {k: v for k, v in st.items() if k not in ("step", "skipped_steps")}
        assert sum(v.numel() for v in method.values()) == m + n + 1 + k * r * (m + n)
        assert max(v.numel() for v in method.values()) < m * n
        assert mode.max_numel <= max(m * 32, 16 * max(m, n), (m + n) * 2)
        opt.zero_grad()
        opt.remove_hooks()


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(str(x) for x in v.values()))
def test_state_dict_round_trip_continues_bit_identically(variant):
    data = batches(4)
    model = Net()
    opt = lk.AdaPreLoRA(model, lr=0.02, weight_decay=0.01, **variant)
    train(model, opt, data[:2])
    saved_opt, saved_model = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    train(model, opt, data[2:])
    resumed = Net(seed=5)
    resumed.load_state_dict(saved_model)
    opt2 = lk.AdaPreLoRA(resumed, lr=0.02, weight_decay=0.01, **variant)
    opt2.load_state_dict(saved_opt)
    train(resumed, opt2, data[2:])
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert int(opt2.state[resumed.l1.lora_A.weight]["step"]) == 4


def test_bf16_parameters_keep_fp32_state_through_load_state_dict():
    model = Net(dtype=torch.bfloat16)
    opt = lk.AdaPreLoRA(model, lr=1e-2, momentum="adam")
    train(model, opt, batches(2, dtype=torch.bfloat16))
    opt2 = lk.AdaPreLoRA(model, lr=1e-2, momentum="adam")
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for layer in model.lora_layers():
        st = opt2.state[layer.lora_A.weight]
        for key in ("row_stat", "col_stat", "t", "exp_avg_A", "exp_avg_sq_B"):
            assert st[key].dtype == torch.float32, key
        torch.testing.assert_close(st["row_stat"], opt.state[layer.lora_A.weight]["row_stat"], rtol=0, atol=0)
    train(model, opt2, batches(1, seed=3, dtype=torch.bfloat16))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_fp64_parameters_keep_fp64_math_and_state():
    model = Net(dtype=D)
    data = batches(1, dtype=D)
    G = _gradient_of_merged_weights(model, data)[0]
    s = model.l1.scaling
    A, B = (s**0.5 * w.detach().clone() for w in (model.l1.lora_A.weight, model.l1.lora_B.weight))
    opt = lk.AdaPreLoRA(model, lr=0.05, momentum=None, ridge=0.0)
    train(model, opt, data)
    assert all(v.dtype == D for v in opt.state[model.l1.lora_A.weight].values() if v.is_floating_point())
    dA, _ = adaprelora_direction(A, B, B.mT @ G, G @ A.mT, G.square().sum(1), G.square().sum(0), ridge=0.0)
    assert rel_err(model.l1.lora_A.weight, (A - 0.05 * dA) / s**0.5) < 1e-12


# --------------------------------------------------------------------------------------------------
# bad input (DESIGN.md)


def _snapshot(model, opt):
    params = [p.detach().clone() for p in model.parameters()]
    state = {id(p): {k: v.clone() for k, v in st.items()}
             for p, st in opt.state.items() if isinstance(st, dict)}
    return params, state


def _assert_unchanged(model, opt, snap):
    params, state = snap
    for a, b in zip(model.parameters(), params):
        assert torch.equal(a, b)
    for p, st in opt.state.items():
        if isinstance(st, dict):
            for k, v in st.items():
                assert torch.equal(v, state[id(p)][k]), k


def test_constructor_rejects_bad_arguments():
    model = Net()
    with pytest.raises(ValueError, match="no trainable LoRA layers"):
        lk.AdaPreLoRA(nn.Linear(3, 3))
    bad = [
        dict(statistics="approx"), dict(momentum="nesterov"), dict(betas=(1.0, None)), dict(betas=(0.9, 1.5)),
        dict(betas=(0.9,)), dict(ridge=-1e-6), dict(block_size=0), dict(decay_rate=0.0), dict(lr=-1.0),
        dict(adam_beta2=1.0), dict(weight_decay=-0.1), dict(backend="cuda-magic"),
    ]
    for kw in bad:
        with pytest.raises(ValueError):
            lk.AdaPreLoRA(model, **kw)
    assert isinstance(lk.create_optimizer(model, "adaprelora", statistics="surrogate"), lk.AdaPreLoRA)


def test_missing_capture_raises_before_any_change():
    model = Net()
    opt = lk.AdaPreLoRA(model, lr=0.1)
    train(model, opt, batches(1))
    snap = _snapshot(model, opt)
    model.eval()  # the capture hooks record nothing in eval mode, but gradients still flow
    x, y = batches(1, seed=9)[0]
    loss_fn(model, x, y).backward()
    with pytest.raises(RuntimeError, match="no captured"):
        opt.step()
    _assert_unchanged(model, opt, snap)


def test_load_state_dict_rejects_mismatched_shapes():
    opt = lk.AdaPreLoRA(Net(r=3), lr=0.1)
    other = lk.AdaPreLoRA(Net(r=2), lr=0.1)
    snap_state = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(other.state_dict())
    assert str(opt.state_dict()) == str(snap_state)


@pytest.mark.parametrize("variant", VARIANTS[:4], ids=lambda v: "-".join(str(x) for x in v.values()))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nonfinite_gradient_skips_only_that_layer(variant, bad):
    model = Net()
    opt = lk.AdaPreLoRA(model, lr=0.05, **variant)
    train(model, opt, batches(1))
    snap = _snapshot(model, opt)
    x, y = batches(1, seed=7)[0]
    opt.zero_grad()
    loss_fn(model, x, y).backward()
    model.l2.lora_B.weight.grad[0, 0] = bad  # l2 shares its bucket with l3
    opt.step()
    params, state = snap
    names = [n for n, _ in model.named_parameters()]
    for name, p, old in zip(names, model.parameters(), params):
        if name.startswith("l2."):
            assert torch.equal(p, old), name
        elif "lora" in name:
            assert not torch.equal(p, old), name
    st = opt.state[model.l2.lora_A.weight]
    for k, v in st.items():
        if k not in ("step", "skipped_steps"):
            assert torch.equal(v, state[id(model.l2.lora_A.weight)][k]), k
    assert int(st["skipped_steps"]) == 1 and int(st["step"]) == 1
    assert int(opt.state["skipped_steps"]) == 1
    assert int(opt.state[model.l3.lora_A.weight]["step"]) == 2


def test_factor_grads_check_flags_each_layer_and_takes_absent_gradients_as_finite():
    """``_factor_grads_finite`` (the methods that read .grad as well as the captured data): all the
    factors' gradients checked at once, per layer; a layer without gradients is not flagged."""
    torch.manual_seed(0)
    model = TinyLoRAMLP()
    opt = lk.AdaPreLoRA(model, lr=1e-2)
    layers = opt._layers
    for layer in layers:
        for p in (layer.A, layer.B):
            p.grad = torch.randn_like(p)
    layers[0].A.grad[0, 1] = float("nan")
    layers[1].B.grad = None
    layers[2].B.grad[2, 0] = -float("inf")
    assert opt._factor_grads_finite(layers).tolist() == [False, True, False]
    layers[2].B.grad = None
    assert opt._factor_grads_finite(layers).tolist() == [False, True, True]
    for layer in layers:
        layer.A.grad = layer.B.grad = None
    assert opt._factor_grads_finite(layers).tolist() == [True, True, True]
