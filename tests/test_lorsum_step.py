"""One PSI-LoRA / Scaled PSI-LoRA step (lorsum_kernels.functional.lorsum_step) against fp64 closed forms.

spec/lorsum.md §5.1 (weight step with low-rank heavy-ball momentum, buffer step), §6.4 (scaled "normal"
mode: metric EMA, λ floor, unpreconditioned buffer), §13 T12 (momentum exactness) and T14 (metric EMA).
The expected values are the exact block minimisers of the proximal sub-problem with the m×n target
formed densely; none comes from the code under test.
"""

from __future__ import annotations

import pytest
import torch

from lorsum_kernels.functional import low_rank_sum
from lorsum_kernels.functional.lorsum_step import psi_lora_step, scaled_psi_lora_step

from .conftest import rel_err

F64 = torch.float64


def gauss(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def make_bucket(L, m, n, r, T, seed):
    """L same-shape layers: balanced factors, inputs X and mean-loss output gradients S."""
    A = gauss((L, r, n), seed) / n**0.25
    B = gauss((L, m, r), seed + 1) / m**0.25
    X = gauss((L, T, n), seed + 2)
    S = gauss((L, T, m), seed + 3) / T
    return A, B, X, S


def als_dense(Y, A0, B0, lam, iters, m_in=None, m_out=None):
    """Exact block minimisers of ½‖M_out^½(BA − Y)M_in^½‖² + (λ/2)(‖M_out^½(B−B0)‖² + ‖(A−A0)M_in^½‖²),
    batched over the leading dimension; ``iters = 0`` is one Jacobi round (spec §3.3–3.4, §6.2)."""
    r = A0.shape[-2]
    I = torch.eye(r, dtype=F64)
    mo = torch.ones(B0.shape[:-1], dtype=F64) if m_out is None else m_out.double()
    mi = torch.ones(A0.shape[:-2] + A0.shape[-1:], dtype=F64) if m_in is None else m_in.double()
    lam = torch.as_tensor(lam, dtype=F64).reshape(-1, 1, 1)

    def a_step(B):
        BtM = B.mT * mo.unsqueeze(-2)
        return torch.linalg.solve(BtM @ B + lam * I, BtM @ Y + lam * A0)

    def b_step(A):
        AM = A * mi.unsqueeze(-2)
        return torch.linalg.solve((AM @ A.mT + lam * I).mT, (Y @ AM.mT + lam * B0).mT).mT

    if iters == 0:
        return a_step(B0), b_step(A0)
    B = B0
    for _ in range(iters):
        A = a_step(B)
        B = b_step(A)
    return A, B


SHAPES = [(40, 50, 4, 25), (5, 123, 3, 7)]
SHAPE_IDS = ["m40-n50-r4", "m5-n123-r3"]


@pytest.mark.parametrize("per_layer_lr", [False, True], ids=["scalar-lr", "tensor-lr"])
@pytest.mark.parametrize("iters", [0, 1, 2])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_psi_without_momentum_is_one_lorsum(shape, iters, per_layer_lr):
    """momentum = 0: (A, B) ← LoRSum([(A,B), (X,Sᵀ)], [1, −η], k, λ = η·λ0) (spec §5.1)."""
    m, n, r, T = shape
    L = 2
    A, B, X, S = make_bucket(L, m, n, r, T, seed=1)
    lmbd = 0.05
    lr = torch.tensor([0.1, 0.4], dtype=F64) if per_layer_lr else 0.2
    A_new, B_new, buf = psi_lora_step(
        A, B, X, S, None, lr=lr, lmbd=lmbd, lmbd_momentum=lmbd, iters=iters, momentum=0.0, dampening=0.0
    )
    assert buf is None
    eta = lr if per_layer_lr else torch.full((L,), lr, dtype=F64)
    A_ls, B_ls = low_rank_sum([(A, B), (X, S.mT)], [1.0, -lr], lmbd=lr * lmbd, iters=iters)
    assert rel_err(A_new, A_ls) <= 1e-12 and rel_err(B_new, B_ls) <= 1e-12
    Y = B @ A - eta[:, None, None] * (S.mT @ X)
    A_exp, B_exp = als_dense(Y, A, B, eta * lmbd, iters)
    assert rel_err(A_new, A_exp) <= 1e-6 and rel_err(B_new, B_exp) <= 1e-6


@pytest.mark.parametrize("iters", [0, 1, 3])
def test_psi_zero_momentum_with_a_buffer_equals_no_buffer(iters):
    """β = 0 with a buffer present: the buffer pair enters with coefficient 0, the weights are unchanged."""
    m, n, r, T = SHAPES[0]
    A, B, X, S = make_bucket(2, m, n, r, T, seed=2)
    A_m, B_m = gauss((2, r, n), 20), gauss((2, m, r), 21)
    kw = {"lr": 0.2, "lmbd": 0.05, "lmbd_momentum": 0.05, "iters": iters, "momentum": 0.0, "dampening": 0.0}
    A1, B1, _ = psi_lora_step(A, B, X, S, (A_m, B_m), **kw)
    A0, B0, _ = psi_lora_step(A, B, X, S, None, **kw)
    assert rel_err(A1, A0) <= 1e-12 and rel_err(B1, B0) <= 1e-12


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_psi_proximal_weights_given_in_place_of_lr_times_lmbd(momentum, monkeypatch):
    """``proximal=(λ, λ_mom)`` is the step at λ and λ_mom whatever the lr: with a per-layer lr tensor it
    equals the step whose lmbd makes lr·lmbd those numbers, and the λ it passes on is the number itself (no
    tensor: on a GPU each would be a launch)."""
    import lorsum_kernels.functional.lorsum_step as module

    m, n, r, T = SHAPES[1]
    A, B, X, S = make_bucket(2, m, n, r, T, seed=4)
    buffer = (gauss((2, r, n), 40), gauss((2, m, r), 41)) if momentum else None
    lr = torch.tensor([0.1, 0.4], dtype=F64)
    kw = dict(iters=1, momentum=momentum, dampening=0.0)
    ours = psi_lora_step(A, B, X, S, buffer, lr=lr, lmbd=123.0, lmbd_momentum=456.0, proximal=(0.02, 0.03),
                         **kw)
    theirs = psi_lora_step(A, B, X, S, buffer, lr=lr, lmbd=0.02 / lr, lmbd_momentum=0.03 / lr, **kw)
    for a, b in zip(ours[:2] + (ours[2] or ()), theirs[:2] + (theirs[2] or ())):
        assert rel_err(a, b) <= 1e-12
    if not momentum:
        seen = []
        monkeypatch.setattr(module, "low_rank_sum", lambda *a, lmbd, **k: seen.append(lmbd) or low_rank_sum(
            *a, lmbd=lmbd, **k))
        psi_lora_step(A, B, X, S, None, lr=lr, lmbd=1.0, lmbd_momentum=1.0, proximal=(0.02, 0.03), **kw)
        assert seen == [0.02]


def test_scaled_psi_proximal_weight_given_in_place_of_lr_times_lmbd():
    """``proximal``: η·λ0 itself, floored at min_lmbd as lr·lmbd is."""
    m, n, r, T = SHAPES[0]
    A, B, X, S = make_bucket(2, m, n, r, T, seed=8)
    ones = (torch.ones(2, n, dtype=F64), torch.ones(2, m, dtype=F64))
    lr = torch.tensor([0.1, 0.4], dtype=F64)
    kw = dict(min_lmbd=0.01, iters=1, betas=(0.0, 0.9), damping=0.1, metric="kfac", metric_power=1.0,
              loss_reduction="mean")
    for lam in (0.02, 0.001):  # above the floor, below it
        ours = scaled_psi_lora_step(A, B, X, S, ones, None, lr=lr, lmbd=7.0, proximal=lam, **kw)
        theirs = scaled_psi_lora_step(A, B, X, S, ones, None, lr=lr, lmbd=lam / lr, **kw)
        assert rel_err(ours[0], theirs[0]) <= 1e-12 and rel_err(ours[1], theirs[1]) <= 1e-12


@pytest.mark.parametrize("dampening", [0.0, 0.1])
@pytest.mark.parametrize("iters", [0, 1, 3])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_psi_step_with_momentum(shape, iters, dampening):
    """Weight step: Y = BA − η((1−d)G + β·B_mA_m), λ = ηλ0; buffer step: Y_m = β·B_mA_m + (1−d)G anchored at
    (A_m, B_m), λ = η·λ_mom (spec §5.1)."""
    m, n, r, T = shape
    L, r_m = 2, r + 1
    A, B, X, S = make_bucket(L, m, n, r, T, seed=3)
    A_m, B_m = gauss((L, r_m, n), 30), gauss((L, m, r_m), 31) / m
    lr, lmbd, lmbd_mom, beta = 0.2, 0.05, 0.02, 0.9
    A_new, B_new, (A_m_new, B_m_new) = psi_lora_step(
        A,
        B,
        X,
        S,
        (A_m, B_m),
        lr=lr,
        lmbd=lmbd,
        lmbd_momentum=lmbd_mom,
        iters=iters,
        momentum=beta,
        dampening=dampening,
    )
    G = S.mT @ X
    Y = B @ A - lr * ((1 - dampening) * G + beta * B_m @ A_m)
    A_exp, B_exp = als_dense(Y, A, B, lr * lmbd, iters)
    assert rel_err(A_new, A_exp) <= 1e-6 and rel_err(B_new, B_exp) <= 1e-6
    Y_m = beta * B_m @ A_m + (1 - dampening) * G
    A_m_exp, B_m_exp = als_dense(Y_m, A_m, B_m, lr * lmbd_mom, iters)
    assert A_m_new.shape == A_m.shape and B_m_new.shape == B_m.shape
    assert rel_err(A_m_new, A_m_exp) <= 1e-6 and rel_err(B_m_new, B_m_exp) <= 1e-6


@pytest.mark.parametrize("dampening", [0.0, 0.1])
@pytest.mark.parametrize("mn", [(40, 50), (50, 40), (5, 123)], ids=str)
def test_psi_momentum_buffer_after_two_steps(mn, dampening):
    """Exact regime (r_m = min(m, n), λ_mom ≈ 0, k = 6): after two steps from B_m = 0 the buffer is
    B_mA_m = β·(1−d)G_1 + (1−d)G_2, PyTorch-SGD momentum (spec §5.1, T12); the second weight step uses it."""
    m, n = mn
    L, r, T = 2, 3, 25
    r_m = min(m, n)
    A, B, X1, S1 = make_bucket(L, m, n, r, T, seed=4)
    X2, S2 = gauss((L, T, n), 40), gauss((L, T, m), 41) / T
    A_m, B_m = gauss((L, r_m, n), 42), torch.zeros(L, m, r_m, dtype=F64)  # the optimizer's initial state
    lr, lmbd, beta = 0.1, 0.05, 0.9
    kw = {
        "lr": lr,
        "lmbd": lmbd,
        "lmbd_momentum": 1e-11,
        "iters": 6,
        "momentum": beta,
        "dampening": dampening,
    }
    G1, G2 = S1.mT @ X1, S2.mT @ X2

    A1, B1, buf1 = psi_lora_step(A, B, X1, S1, (A_m, B_m), **kw)
    assert rel_err(buf1[1] @ buf1[0], (1 - dampening) * G1) <= 1.5e-5
    A2, B2, buf2 = psi_lora_step(A1, B1, X2, S2, buf1, **kw)
    assert rel_err(buf2[1] @ buf2[0], beta * (1 - dampening) * G1 + (1 - dampening) * G2) <= 1.5e-5

    # The second weight step's target carries the first buffer: Y = B1A1 − η((1−d)G2 + β·B_m1A_m1).
    Y2 = B1 @ A1 - lr * ((1 - dampening) * G2 + beta * buf1[1] @ buf1[0])
    A_exp, B_exp = als_dense(Y2, A1, B1, lr * lmbd, 6)
    assert rel_err(A2, A_exp) <= 1e-6 and rel_err(B2, B_exp) <= 1e-6


# ----------------------------------------------------------------------------------------------------
# Scaled PSI-LoRA (spec §6.4)
# ----------------------------------------------------------------------------------------------------


def expected_stats(X, S, metric, loss_reduction):
    T = X.shape[-2]
    c = T if loss_reduction == "mean" else 1.0 / T
    if metric == "kfac":
        return (X**2).sum(-2) / T, c * (S**2).sum(-2)
    G = S.mT @ X
    return c * (G**2).sum(-2), c * (G**2).sum(-1)  # diag(GᵀG) (n), diag(GGᵀ) (m)


@pytest.mark.parametrize("with_momentum", [False, True], ids=["no-buffer", "buffer"])
@pytest.mark.parametrize("loss_reduction", ["mean", "sum"])
@pytest.mark.parametrize("metric", ["kfac", "shampoo"])
@pytest.mark.parametrize("iters", [0, 2])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_scaled_psi_step(shape, iters, metric, loss_reduction, with_momentum):
    """1) v ← β2·v + (1−β2)·stat; M = (v + δ)^p. 2) weights: scaled LoRSum of
    Y_M = BA − η·M_out⁻¹((1−β1)G + β1·B_mA_m)M_in⁻¹ with λ = max(ηλ0, λ_min). 3) buffer: plain LoRSum of
    β1·B_mA_m + (1−β1)G, λ = ηλ0 (no floor)."""
    m, n, r, T = shape
    L = 2
    A, B, X, S = make_bucket(L, m, n, r, T, seed=5)
    A_m, B_m = gauss((L, r, n), 50), gauss((L, m, r), 51) / m
    g = torch.Generator().manual_seed(52)
    v_in0, v_out0 = (
        0.5 + torch.rand(L, n, generator=g, dtype=F64),
        0.5 + torch.rand(L, m, generator=g, dtype=F64),
    )
    lr, lmbd, min_lmbd, betas, damping, power = 0.2, 0.05, 1e-5, (0.9, 0.99), 1e-3, 0.5
    A_new, B_new, (v_in, v_out), buf = scaled_psi_lora_step(
        A,
        B,
        X,
        S,
        (v_in0, v_out0),
        (A_m, B_m) if with_momentum else None,
        lr=lr,
        lmbd=lmbd,
        min_lmbd=min_lmbd,
        iters=iters,
        betas=betas,
        damping=damping,
        metric=metric,
        metric_power=power,
        loss_reduction=loss_reduction,
    )
    st_in, st_out = expected_stats(X, S, metric, loss_reduction)
    v_in_exp, v_out_exp = (
        betas[1] * v_in0 + (1 - betas[1]) * st_in,
        betas[1] * v_out0 + (1 - betas[1]) * st_out,
    )
    assert rel_err(v_in, v_in_exp) <= 1e-12 and rel_err(v_out, v_out_exp) <= 1e-12
    M_in, M_out = (v_in_exp + damping) ** power, (v_out_exp + damping) ** power
    D = (1 - betas[0]) * (S.mT @ X) + (betas[0] * B_m @ A_m if with_momentum else 0.0)
    Y_M = B @ A - lr * D / M_out.unsqueeze(-1) / M_in.unsqueeze(-2)
    A_exp, B_exp = als_dense(Y_M, A, B, max(lr * lmbd, min_lmbd), iters, M_in, M_out)
    assert rel_err(A_new, A_exp) <= 1e-6 and rel_err(B_new, B_exp) <= 1e-6
    if not with_momentum:
        assert buf is None
        return
    Y_m = betas[0] * B_m @ A_m + (1 - betas[0]) * (S.mT @ X)
    A_m_exp, B_m_exp = als_dense(Y_m, A_m, B_m, lr * lmbd, iters)
    assert rel_err(buf[0], A_m_exp) <= 1e-6 and rel_err(buf[1], B_m_exp) <= 1e-6


def test_scaled_psi_metric_after_one_step_from_one():
    """Spec T14: from v = 1, M_in = (β2 + (1−β2)·mean_t x_t² + δ)^p exactly (elementwise)."""
    m, n, r, T = SHAPES[0]
    A, B, X, S = make_bucket(1, m, n, r, T, seed=6)
    beta2, damping, power = 0.99, 0.1, 0.5
    _, _, (v_in, v_out), _ = scaled_psi_lora_step(
        A,
        B,
        X,
        S,
        (torch.ones(1, n, dtype=F64), torch.ones(1, m, dtype=F64)),
        None,
        lr=0.1,
        lmbd=0.01,
        min_lmbd=1e-5,
        iters=1,
        betas=(0.9, beta2),
        damping=damping,
        metric="kfac",
        metric_power=power,
        loss_reduction="mean",
    )
    M_in = (v_in + damping) ** power
    assert rel_err(M_in, (beta2 + (1 - beta2) * (X**2).mean(-2) + damping) ** power) <= 1e-14
    assert rel_err(v_out, beta2 + (1 - beta2) * T * (S**2).sum(-2)) <= 1e-14


def test_scaled_psi_lambda_floor():
    """λ = max(η·λ0, λ_min) for the weight step (spec §6.4 step 3): with η·λ0 ≪ λ_min the floor is used."""
    m, n, r, T = SHAPES[0]
    A, B, X, S = make_bucket(1, m, n, r, T, seed=7)
    ones = (torch.ones(1, n, dtype=F64), torch.ones(1, m, dtype=F64))
    lr, min_lmbd = 0.5, 0.3
    A_new, B_new, (v_in, v_out), _ = scaled_psi_lora_step(
        A,
        B,
        X,
        S,
        ones,
        None,
        lr=lr,
        lmbd=1e-6,
        min_lmbd=min_lmbd,
        iters=1,
        betas=(0.0, 0.9),
        damping=0.1,
        metric="kfac",
        metric_power=1.0,
        loss_reduction="mean",
    )
    M_in, M_out = v_in + 0.1, v_out + 0.1
    Y_M = B @ A - lr * (S.mT @ X) / M_out.unsqueeze(-1) / M_in.unsqueeze(-2)
    A_exp, B_exp = als_dense(Y_M, A, B, min_lmbd, 1, M_in, M_out)
    assert rel_err(A_new, A_exp) <= 1e-6 and rel_err(B_new, B_exp) <= 1e-6
    A_no_floor, _ = als_dense(Y_M, A, B, lr * 1e-6, 1, M_in, M_out)
    assert rel_err(A_new, A_no_floor) > 1e-3  # the floor matters here


@pytest.mark.parametrize("loss_reduction", ["mean", "sum"])
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_scaled_psi_kfac_runs_the_fused_metric_op_and_equals_the_composite(loss_reduction, backend, monkeypatch):
    """ScaledLoRSum's K-FAC metric goes through a fused op (issue #12 item 3; issue #16): without momentum
    the metric step folded into the first A-step (``kfac_lorsum_update_in``), with it ``kfac_metric_update``;
    either gives what statistics + EMA + damping + power and the scaled LoRSum give. A per-layer β2 (the
    warm-up) takes it too when all layers share one value on the CPU, and the composite path when they
    differ."""
    from lorsum_kernels import ops
    from lorsum_kernels.functional import effective_metric, ema, kfac_statistics, scaled_low_rank_sum

    g = torch.Generator().manual_seed(3)
    L, T, m, n, r = 2, 17, 23, 13, 3
    A, B = torch.randn(L, r, n, generator=g, dtype=torch.float64), torch.randn(L, m, r, generator=g, dtype=torch.float64)
    X, S = torch.randn(L, T, n, generator=g, dtype=torch.float64), torch.randn(L, T, m, generator=g, dtype=torch.float64)
    v = (torch.rand(L, n, generator=g, dtype=torch.float64) + 0.5, torch.rand(L, m, generator=g, dtype=torch.float64) + 0.5)
    calls = []
    for name in ("kfac_metric_update", "kfac_lorsum_update_in", "kfac_lorsum_rounds"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _n=name, _f=real, **k: calls.append(_n) or _f(*a, **k))
    kw = dict(lr=0.3, lmbd=1e-2, min_lmbd=1e-5, iters=1, damping=0.1, metric="kfac", metric_power=0.5,
              loss_reduction=loss_reduction, backend=backend)
    A_f, B_f, (v_in, v_out), _ = scaled_psi_lora_step(A, B, X, S, v, None, betas=(0.0, 0.9), **kw)
    # the rounds with the folded first A-step; on the torch backend through its composite
    fold = ["kfac_lorsum_rounds"] + (["kfac_lorsum_update_in", "kfac_metric_update"] if backend == "torch" else [])
    assert calls == fold
    stat_in, stat_out = kfac_statistics(X, S, loss_reduction=loss_reduction, backend="torch")
    assert rel_err(v_in, ema(v[0], stat_in, 0.9)) < 1e-13
    assert rel_err(v_out, ema(v[1], stat_out, 0.9)) < 1e-13
    metrics = (effective_metric(v_in, 0.1, 0.5), effective_metric(v_out, 0.1, 0.5))
    A_c, B_c = scaled_low_rank_sum([(A, B), (X, S.mT)], [1.0, -0.3], metrics, lmbd=0.3 * 1e-2, iters=1,
                                   backend="torch")
    assert rel_err(A_f, A_c) < 1e-12 and rel_err(B_f, B_c) < 1e-12
    A_s, B_s, *_ = scaled_psi_lora_step(A, B, X, S, v, None, betas=(0.0, torch.full((L, 1), 0.9, dtype=torch.float64)), **kw)
    assert calls == fold * 2  # one β2 shared by the layers: the fused op, the same result
    assert torch.equal(A_f, A_s) and torch.equal(B_f, B_s)
    per_layer = torch.tensor([[0.9], [0.5]], dtype=torch.float64)
    _, _, (w_in, w_out), _ = scaled_psi_lora_step(A, B, X, S, v, None, betas=(0.0, per_layer), **kw)
    assert calls == fold * 2  # differing β2: the composite
    assert rel_err(w_in, ema(v[0], stat_in, per_layer)) < 1e-13
    assert rel_err(w_out, ema(v[1], stat_out, per_layer)) < 1e-13
    momentum = (torch.randn(L, r, n, generator=g, dtype=torch.float64), torch.randn(L, m, r, generator=g, dtype=torch.float64))
    _, _, (u_in, u_out), _ = scaled_psi_lora_step(A, B, X, S, v, momentum, betas=(0.9, 0.9), **kw)
    assert calls[2 * len(fold):] == ["kfac_metric_update"]  # the buffer's LoRSum in lock step: the metric op on its own
    assert torch.equal(u_in, v_in) and torch.equal(u_out, v_out)
    assert effective_metric(v_in, 0.1, 0.5).shape == (L, n)


@pytest.mark.parametrize("iters", [0, 1, 2])
def test_scaled_psi_kfac_folded_metric_fp32_native_matches_torch(iters):
    """In fp32 on the CPU (bf16 token data too) the folded metric step runs the native fused op, which sums
    the statistics in the A-step's passes: the same step as the torch backend's two ops, to fp32 rounding,
    for every number of ALS rounds (0: one Jacobi round)."""
    g = torch.Generator().manual_seed(5)
    L, T, m, n, r = 3, 70, 37, 53, 4
    A, B = torch.randn(L, r, n, generator=g) * 0.1, torch.randn(L, m, r, generator=g) * 0.1
    X, S = torch.randn(L, T, n, generator=g), torch.randn(L, T, m, generator=g) * 1e-2
    v = (torch.rand(L, n, generator=g), torch.rand(L, m, generator=g))
    kw = dict(lr=2e-2, lmbd=1e-2, min_lmbd=1e-6, iters=iters, damping=1e-5, metric="kfac", metric_power=0.5,
              loss_reduction="mean", betas=(0.0, 0.99))
    for data_dtype in (torch.float32, torch.bfloat16):
        Xd, Sd = X.to(data_dtype), S.to(data_dtype)
        native = scaled_psi_lora_step(A, B, Xd, Sd, v, None, backend="native", **kw)
        torch_ = scaled_psi_lora_step(A, B, Xd, Sd, v, None, backend="torch", **kw)
        for a, b in zip([*native[:2], *native[2]], [*torch_[:2], *torch_[2]]):
            assert a.dtype == b.dtype == torch.float32
            assert rel_err(a, b) < 1e-5
