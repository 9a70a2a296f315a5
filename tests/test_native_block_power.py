"""Native block power iteration (LoRSum half-steps, pair products, batched SPD solve) against the reference.

Covers the CPU kernels of csrc/cpu/block_power.cpp and csrc/cpu/spd_solve.cpp: odd shapes, fp32/fp64/bf16,
non-contiguous inputs, a singular Gram, NaN, opcheck, both CPU code paths (AVX-512 and the portable ATen
one), thread-count independence, and the optimizers stepped with backend="native" against "torch".
"""

from __future__ import annotations

import pytest
import torch

from lorsum_kernels import _native, ops, reference

from .conftest import rel_err, train_tiny

pytestmark = pytest.mark.skipif(
    not _native.has_native_op("lorsum_update_in", "cpu"),
    reason=f"native block power ops not built: {_native.native_error}",
)

# (L, T, m, n, r): every value of r ∈ {1, 3, 16}, m, n ∈ {5, 123, 256}, T ∈ {1, 37, 512} and L ∈ {1, 3}
# appears, with r ≤ min(m, n) as for any LoRA layer (the optimizers reject a larger rank).
SHAPES = [
    (1, 37, 5, 123, 3),
    (3, 37, 123, 5, 1),
    (1, 512, 123, 256, 16),
    (3, 1, 256, 123, 3),
    (3, 512, 5, 5, 3),
    (1, 37, 256, 256, 16),
    (3, 37, 123, 123, 16),
]
CKPT_IDS = [f"L{L}_T{T}_m{m}_n{n}_r{r}" for L, T, m, n, r in SHAPES]


def _problem(L, T, m, n, r, *, dtype=torch.float64, metrics=False, seed=0, per_layer=False):
    """A LoRSum half-step problem as PSI-LoRA poses it: pairs [(A0, B0), (X, Sᵀ), (A_m, B_m)]."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    A0, B0 = randn(L, r, n, scale=n**-0.5), randn(L, m, r, scale=m**-0.5 * 3)
    X, S = randn(L, T, n), randn(L, T, m, scale=0.1)
    A_m, B_m = randn(L, r, n, scale=0.3), randn(L, m, r, scale=0.3)
    coeffs = [1.0, -0.5, -0.05]
    if per_layer:
        coeffs = [1.0, torch.linspace(-0.6, -0.4, L, dtype=dtype), -0.05]
    out = dict(A0=A0, B0=B0, pairs=[(X, S.mT), (A_m, B_m)], coeffs=coeffs, lmbd=1e-2, metrics=None)
    if metrics:
        out["metrics"] = (
            (torch.rand(L, n, generator=g, dtype=torch.float64) + 0.5).to(dtype),
            (torch.rand(L, m, generator=g, dtype=torch.float64) + 0.5).to(dtype),
        )
    return out


def _cast(p, dtype, *, big_dtype=None):
    """The problem with its factors in `dtype` and X, S (the gradient pair) in `big_dtype`."""
    big_dtype = big_dtype or dtype
    c = lambda t: t.to(dtype)
    pairs = [tuple(t.to(big_dtype if j == 0 else dtype) for t in pair) for j, pair in enumerate(p["pairs"])]
    return dict(
        A0=c(p["A0"]), B0=c(p["B0"]), pairs=pairs,
        coeffs=[v.to(dtype) if isinstance(v, torch.Tensor) else v for v in p["coeffs"]],
        lmbd=p["lmbd"], metrics=None if p["metrics"] is None else tuple(c(t) for t in p["metrics"]),
    )


def _half_step(side, p, backend, hat=None):
    fn = ops.lorsum_update_in if side == "in" else ops.lorsum_update_out
    if hat is None:
        hat = p["B0"] if side == "in" else p["A0"]
    return fn(hat, (p["A0"], p["B0"]), p["pairs"], p["coeffs"], p["lmbd"], p["metrics"], backend=backend)


@pytest.fixture(params=["avx512", "generic"])
def cpu_path(request, monkeypatch):
    """Both CPU code paths: the AVX-512 kernels (where the CPU has them) and the portable ATen path."""
    if request.param == "generic":
        monkeypatch.setenv("LORSUM_CPU_KERNELS", "generic")
    else:
        monkeypatch.delenv("LORSUM_CPU_KERNELS", raising=False)
    return request.param


# ---- accuracy --------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["in", "out"])
@pytest.mark.parametrize("metrics", [False, True], ids=["plain", "scaled"])
@pytest.mark.parametrize("shape", SHAPES, ids=CKPT_IDS)
def test_half_step_fp32_and_fp64(shape, metrics, side):
    p64 = _problem(*shape, metrics=metrics, per_layer=metrics)
    p32 = _cast(p64, torch.float32)
    exact = _half_step(side, _cast(p32, torch.float64), "torch")  # fp64 reference on the fp32 values
    # fp64 through the native op: the same math, to rounding.
    assert rel_err(_half_step(side, p64, "native"), _half_step(side, p64, "torch")) < 1e-11
    out = _half_step(side, p32, "native")
    assert out.dtype == torch.float32 and out.shape == exact.shape
    assert rel_err(out, exact) < 1e-5


@pytest.mark.parametrize("side", ["in", "out"])
@pytest.mark.parametrize("shape", SHAPES[:4], ids=CKPT_IDS[:4])
def test_half_step_generic_path(shape, side, cpu_path):
    p32 = _cast(_problem(*shape, metrics=True), torch.float32, big_dtype=torch.bfloat16)
    exact = _half_step(side, _cast(p32, torch.float64), "torch")
    assert rel_err(_half_step(side, p32, "native"), exact) < 1e-5


def _torch_bf16_half_step(side, p, monkeypatch):
    """Plain PyTorch in bf16: the reference with every tensor in bf16, except the r×r Cholesky solve, which
    torch does not implement in bf16 on the CPU (it runs in fp32 and is rounded back)."""
    solve = reference.spd_solve
    monkeypatch.setattr(reference, "spd_solve",
                        lambda gram, rhs, left=True: solve(gram.float(), rhs.float(), left=left).to(gram.dtype))
    try:
        return _half_step(side, p, "torch")
    finally:
        monkeypatch.setattr(reference, "spd_solve", solve)


@pytest.mark.parametrize("side", ["in", "out"])
@pytest.mark.parametrize("shape", SHAPES, ids=CKPT_IDS)
def test_half_step_bf16(shape, side, monkeypatch):
    # Everything bf16 (the result too): within twice the error plain PyTorch makes in bf16.
    p16 = _cast(_problem(*shape, metrics=True), torch.bfloat16)
    exact = _half_step(side, _cast(p16, torch.float64), "torch")
    out = _half_step(side, p16, "native")
    assert out.dtype == torch.bfloat16
    torch_err = rel_err(_torch_bf16_half_step(side, p16, monkeypatch), exact)
    assert rel_err(out, exact) <= 2 * torch_err
    # bf16 X and S with fp32 factors (what the optimizers pass): fp32 accuracy on the bf16 values.
    mixed = _cast(_problem(*shape, metrics=True), torch.float32, big_dtype=torch.bfloat16)
    assert rel_err(_half_step(side, mixed, "native"), _half_step(side, _cast(mixed, torch.float64), "torch")) < 1e-5


@pytest.mark.parametrize("iters", [0, 1, 3])
def test_low_rank_sum_native_matches_torch(iters):
    from lorsum_kernels.functional import low_rank_sum, scaled_low_rank_sum

    p = _cast(_problem(3, 37, 123, 256, 16, metrics=True), torch.float32)
    pairs = [(p["A0"], p["B0"]), *p["pairs"]]
    for backend_args in [dict(), dict(metrics=p["metrics"])]:
        fn = scaled_low_rank_sum if backend_args else low_rank_sum
        nat = fn(pairs, p["coeffs"], **backend_args, lmbd=1e-2, iters=iters, backend="native")
        ref = fn(pairs, p["coeffs"], **backend_args, lmbd=1e-2, iters=iters, backend="torch")
        for a, b in zip(nat, ref):
            assert rel_err(a, b) < 1e-5


# ---- layouts, broadcasting, edge cases -------------------------------------------------------------


@pytest.mark.parametrize("side", ["in", "out"])
def test_half_step_non_contiguous(side):
    p = _cast(_problem(3, 37, 123, 5, 3, metrics=True), torch.float32)
    X, St = p["pairs"][0]
    A_m, B_m = p["pairs"][1]
    wide_X = torch.randn(3, 37, 9)
    wide_X[..., 2:7] = X
    views = dict(
        A0=p["A0"].mT.contiguous().mT,  # column-major
        B0=p["B0"].transpose(0, 1).contiguous().transpose(0, 1),  # permuted batch
        pairs=[
            (wide_X[..., 2:7], St.contiguous()),  # sliced columns; F_out a contiguous m×T (not S.mT)
            (A_m.mT.contiguous().mT, B_m.mT.contiguous().mT),
        ],
        coeffs=p["coeffs"], lmbd=torch.tensor(1e-2),
        metrics=(p["metrics"][0][:1].expand(3, -1), p["metrics"][1][:, None, :].squeeze(1)),
    )
    plain = dict(p, metrics=(p["metrics"][0][:1].expand(3, -1).contiguous(), p["metrics"][1]))
    expected = _half_step(side, _cast(plain, torch.float64), "torch")
    assert rel_err(_half_step(side, views, "native"), expected) < 1e-5


def test_half_step_broadcasts_shared_metric_and_2d():
    # Unbatched (2-D) inputs, and metrics shared by every layer of a batch.
    p = _cast(_problem(1, 37, 123, 5, 3, metrics=True), torch.float32)
    flat = {k: (v[0] if isinstance(v, torch.Tensor) else v) for k, v in p.items()}
    flat["pairs"] = [tuple(t[0] for t in pair) for pair in p["pairs"]]
    flat["metrics"] = tuple(t[0] for t in p["metrics"])
    for side in ["in", "out"]:
        out = _half_step(side, flat, "native")
        assert out.dim() == 2
        assert rel_err(out, _half_step(side, _cast(flat, torch.float64), "torch")) < 1e-5
    batched = _cast(_problem(3, 37, 123, 5, 3), torch.float32)
    batched["metrics"] = (torch.rand(5) + 0.5, torch.rand(123) + 0.5)  # shared by the 3 layers
    assert rel_err(_half_step("in", batched, "native"), _half_step("in", _cast(batched, torch.float64), "torch")) < 1e-5


def test_half_step_no_pairs_and_zero_tokens():
    p = _cast(_problem(3, 0, 123, 5, 3), torch.float32)
    for side in ["in", "out"]:
        exact = _half_step(side, _cast(p, torch.float64), "torch")
        assert rel_err(_half_step(side, p, "native"), exact) < 1e-5
        anchor_only = dict(p, pairs=[], coeffs=[0.7])
        assert rel_err(_half_step(side, anchor_only, "native"),
                       _half_step(side, _cast(anchor_only, torch.float64), "torch")) < 1e-5


@pytest.mark.parametrize("side", ["in", "out"])
def test_half_step_singular_gram(side, cpu_path):
    # B = 0 (the standard LoRA init): the Gram B̂ᵀB̂ is exactly zero.
    p = _cast(_problem(3, 37, 123, 256, 16), torch.float32)
    p = dict(p, B0=torch.zeros_like(p["B0"]))
    if side == "out":
        p["A0"] = torch.zeros_like(p["A0"])
    # With λ > 0 the system is λ·I; with λ = 0 the Gram is zero, and so is the residual: the floored
    # relative ridge makes it factorisable and the half-step leaves the anchor unchanged.
    for lmbd in (1e-2, 0.0):
        out = _half_step(side, dict(p, lmbd=lmbd), "native")
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, _half_step(side, dict(p, lmbd=lmbd), "torch"), rtol=1e-5, atol=1e-7)
    out = _half_step(side, dict(p, lmbd=0.0), "native")
    assert torch.equal(out, p["A0"] if side == "in" else p["B0"])


@pytest.mark.parametrize("where", ["X", "S", "anchor"])
@pytest.mark.parametrize("side", ["in", "out"])
def test_half_step_nan_propagates(side, where, cpu_path):
    p = _cast(_problem(3, 37, 123, 5, 3), torch.float32)
    X, St = p["pairs"][0]
    X, S = X.clone(), St.mT.clone()
    if where == "X":
        X[1, 5, 2] = float("nan")
    elif where == "S":
        S[1, 5, 7] = float("nan")
    else:
        p["A0"] = p["A0"].clone()
        p["A0"][1, 0, 0] = float("nan")
    p["pairs"] = [(X, S.mT), p["pairs"][1]]
    out = _half_step(side, p, "native")
    ref = _half_step(side, p, "torch")
    assert not torch.isfinite(out[1]).all()  # the poisoned layer is not silently finite
    assert torch.equal(torch.isfinite(out), torch.isfinite(ref))
    torch.testing.assert_close(out[0], ref[0], rtol=1e-5, atol=1e-6)  # the others are untouched


def test_half_step_independent_of_thread_count():
    p = _cast(_problem(3, 512, 256, 123, 16, metrics=True), torch.float32)
    threads = torch.get_num_threads()
    outs = []
    for n in sorted({1, max(threads, 2)}):
        torch.set_num_threads(n)
        try:
            outs.append((_half_step("in", p, "native"), _half_step("out", p, "native")))
        finally:
            torch.set_num_threads(threads)
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: a.update(B0=a["B0"][..., :2]), r"A0 .* is \(\.\.\., r, n\) and B0 .* their ranks r differ"),
        (lambda a: a.update(f_in=a["f_in"][:1]), r"got 1 f_in factors but 2 f_out factors"),
        (lambda a: a.update(coeffs=a["coeffs"][:2]), r"coeffs must be \(J\+1,\) or \(J\+1, L\)"),
        (lambda a: a.update(lmbd=torch.ones(2, 2)), r"lmbd must be a 0-d tensor or one value per layer"),
        (lambda a: a.update(f_out=[a["f_out"][0][:, :-1], a["f_out"][1]]), r"pair 0 .* does not stand for"),
        (lambda a: a.update(m_in=a["m_in"][:2]), r"m_in must be \(\.\.\., n\)"),
        (lambda a: a.update(m_out=None), r"give both metrics"),
        (lambda a: a.update(B_hat=a["B_hat"][:2]), r"B_hat has batch shape"),
        (lambda a: a.update(A0=a["A0"].int()), r"A0 must be float32, float64, bfloat16 or float16"),
    ],
)
def test_half_step_rejects_bad_input(mutate, match):
    p = _cast(_problem(3, 37, 123, 5, 3, metrics=True), torch.float32)
    args = dict(B_hat=p["B0"], A0=p["A0"], B0=p["B0"], f_in=[q[0] for q in p["pairs"]],
                f_out=[q[1] for q in p["pairs"]], coeffs=torch.tensor(p["coeffs"], dtype=torch.float64),
                lmbd=torch.tensor(1e-2), m_in=p["metrics"][0], m_out=p["metrics"][1])
    mutate(args)
    with pytest.raises(RuntimeError, match=rf"lorsum_update_in: {match}"):
        torch.ops.lorsum.lorsum_update_in(**args)


# ---- pair products (the wide-factor token products) ------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(1, 37, 5, 123, 3), (3, 512, 256, 123, 19), (2, 1, 123, 256, 1)], ids=str)
def test_pair_products(shape, dtype, cpu_path):
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


def test_pair_products_wide_factor_equals_separate():
    # [B̂ | B̂_m] in one pass gives the two A-step products of PSI-LoRA's weight and momentum steps.
    g = torch.Generator().manual_seed(4)
    X, S = torch.randn(3, 300, 70, generator=g), torch.randn(3, 300, 90, generator=g)
    B, B_m = torch.randn(3, 90, 8, generator=g), torch.randn(3, 90, 5, generator=g)
    wide, _ = ops.pair_products(X, S.mT, torch.cat([B, B_m], -1), backend="native")
    one, _ = ops.pair_products(X, S.mT, B, backend="native")
    two, _ = ops.pair_products(X, S.mT, B_m, backend="native")
    torch.testing.assert_close(wide, torch.cat([one, two], -2), rtol=0, atol=0)


# ---- the batched solve -----------------------------------------------------------------------------


def _spd(batch, r, *, dtype=torch.float64, seed=5):
    g = torch.Generator().manual_seed(seed)
    F = torch.randn(*batch, r, 3 * r, generator=g, dtype=torch.float64)
    return (F @ F.mT / (3 * r)).to(dtype)


@pytest.mark.parametrize("left", [True, False], ids=["left", "right"])
@pytest.mark.parametrize("r, N, batch", [(1, 5, (3,)), (3, 123, (1,)), (16, 256, (2, 3)), (3, 1, ())], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_spd_solve(r, N, batch, left, dtype, cpu_path):
    gram = _spd(batch, r, dtype=dtype)
    g = torch.Generator().manual_seed(6)
    rhs = torch.randn(*batch, *((r, N) if left else (N, r)), generator=g).to(dtype)
    out = ops.spd_solve(gram, rhs, left=left, backend="native")
    exact = reference.spd_solve(gram.double(), rhs.double(), left=left)
    assert out.dtype == dtype and out.shape == rhs.shape
    assert rel_err(out, exact) < (1e-5 if dtype == torch.float32 else 1e-12)


def test_spd_solve_broadcast_and_non_contiguous():
    gram = _spd((1, 3), 4)  # broadcast over the first batch dimension of rhs
    rhs = torch.randn(2, 3, 9, 4, dtype=torch.float64).mT  # (2, 3, 4, 9), transposed view
    out = ops.spd_solve(gram, rhs, backend="native")
    assert out.shape == (2, 3, 4, 9)
    assert rel_err(out, reference.spd_solve(gram, rhs)) < 1e-12
    out = ops.spd_solve(gram.mT, rhs.mT, left=False, backend="native")
    assert rel_err(out, reference.spd_solve(gram.mT, rhs.mT, left=False)) < 1e-12


def test_spd_solve_zero_gram_and_fallback_ridge():
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


def test_spd_solve_nan():
    gram = _spd((3,), 4, dtype=torch.float32)
    gram[1, 2, 1] = float("nan")
    rhs = torch.randn(3, 4, 6)
    out = ops.spd_solve(gram, rhs, backend="native")
    assert torch.isnan(out[1]).all()
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[2]).all()
    rhs[2, 0, 0] = float("nan")
    assert not torch.isfinite(ops.spd_solve(gram, rhs, backend="native")[2]).all()


def test_spd_solve_rejects_bad_input():
    with pytest.raises(RuntimeError, match=r"spd_solve: gram must be square"):
        torch.ops.lorsum.spd_solve(torch.ones(3, 2), torch.ones(3, 4))
    with pytest.raises(RuntimeError, match=r"spd_solve: rhs must be \(\.\.\., r, N\) for left=True"):
        torch.ops.lorsum.spd_solve(torch.eye(3), torch.ones(4, 5))
    with pytest.raises(RuntimeError, match=r"spd_solve: the batch dimensions .* do not broadcast"):
        torch.ops.lorsum.spd_solve(torch.eye(3).expand(2, 3, 3), torch.ones(4, 3, 5))


# ---- opcheck, fake tensors, compile ----------------------------------------------------------------


def _opcheck_cases():
    p = _cast(_problem(2, 9, 7, 5, 3, metrics=True), torch.float32)
    X, St = p["pairs"][0]
    common = ([q[0] for q in p["pairs"]], [q[1] for q in p["pairs"]],
              torch.tensor(p["coeffs"], dtype=torch.float64), torch.tensor(1e-2, dtype=torch.float64))
    per_layer = torch.tensor([[1.0, 1.0], [-0.5, -0.4], [-0.05, -0.05]], dtype=torch.float64)
    return [
        ("lorsum_update_in", (p["B0"], p["A0"], p["B0"], *common, *p["metrics"])),
        ("lorsum_update_in", (p["B0"], p["A0"], p["B0"], common[0], common[1], per_layer,
                              torch.tensor([1e-2, 2e-2], dtype=torch.float64), None, None)),
        ("lorsum_update_out", (p["A0"], p["A0"], p["B0"], *common, *p["metrics"])),
        ("lorsum_update_out", (p["A0"].double(), p["A0"].double(), p["B0"].double(), [X.bfloat16()],
                               [St.bfloat16()], torch.tensor([1.0, -0.5], dtype=torch.float64),
                               torch.tensor(0.0, dtype=torch.float64), None, None)),
        ("pair_products", (X, St, p["B0"], p["A0"])),
        ("pair_products", (X.bfloat16(), St.bfloat16(), p["B0"], None)),
        ("spd_solve", (_spd((2,), 3, dtype=torch.float32), torch.randn(2, 3, 6), True)),
        ("spd_solve", (_spd((2,), 3), torch.randn(1, 6, 3, dtype=torch.float64), False)),
    ]


@pytest.mark.parametrize("case", range(len(_opcheck_cases())))
def test_opcheck(case):
    name, args = _opcheck_cases()[case]
    torch.library.opcheck(getattr(torch.ops.lorsum, name).default, args)


def test_fake_tensor_and_compile():
    from torch._subclasses.fake_tensor import FakeTensorMode

    p = _cast(_problem(2, 9, 7, 5, 3), torch.float32)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = {k: mode.from_tensor(v) for k, v in (("A0", p["A0"]), ("B0", p["B0"]))}
        out = torch.ops.lorsum.lorsum_update_out(
            fake["A0"], fake["A0"], fake["B0"], [], [], torch.tensor([1.0], dtype=torch.float64),
            torch.tensor(0.1, dtype=torch.float64))
    assert out.shape == p["B0"].shape and out.dtype == torch.float32

    X, St = p["pairs"][0]
    coeffs, lmbd = torch.tensor([1.0, -0.5], dtype=torch.float64), torch.tensor(1e-2, dtype=torch.float64)

    def step(A0, B0, X, S):  # the ops themselves (ops.py's backend lookup is not traceable)
        A = torch.ops.lorsum.lorsum_update_in(B0, A0, B0, [X], [S.mT], coeffs, lmbd)
        return torch.ops.lorsum.lorsum_update_out(A, A0, B0, [X], [S.mT], coeffs, lmbd)

    compiled = torch.compile(step, backend="eager", fullgraph=True)
    expected = ops.lorsum_update_out(
        ops.lorsum_update_in(p["B0"], (p["A0"], p["B0"]), [(X, St)], [1.0, -0.5], 1e-2, backend="torch"),
        (p["A0"], p["B0"]), [(X, St)], [1.0, -0.5], 1e-2, backend="torch")
    assert rel_err(compiled(p["A0"], p["B0"], X, St.mT), expected) < 1e-5


# ---- the optimizers, native against torch ----------------------------------------------------------


def _train(opt_cls, backend, steps=7, **kw):
    return train_tiny(lambda model: opt_cls(model, backend=backend, **kw), steps)


@pytest.mark.parametrize(
    "opt_name, kw",
    [
        ("LoRSum", dict(lr=0.05, momentum=0.9, iters=1)),
        ("LoRSum", dict(lr=0.05, momentum=0.9, iters=0, dampening=0.1)),
        ("ScaledLoRSum", dict(lr=0.05, metric="kfac", iters=1)),
        ("ScaledLoRSum", dict(lr=0.05, metric="shampoo", iters=2, metric_power=0.25)),
    ],
    ids=["lorsum-momentum-k1", "lorsum-momentum-k0", "scaled-kfac", "scaled-shampoo"],
)
def test_optimizer_native_equals_torch(opt_name, kw):
    from lorsum_kernels import optim

    opt_cls = getattr(optim, opt_name)
    p_nat, s_nat = _train(opt_cls, "native", **kw)
    p_ref, s_ref = _train(opt_cls, "torch", **kw)
    assert p_nat.keys() == p_ref.keys() and s_nat.keys() == s_ref.keys()
    for key in p_ref:
        assert rel_err(p_nat[key], p_ref[key]) < 1e-5, key
    for key in s_ref:
        if s_ref[key].is_floating_point():
            assert rel_err(s_nat[key], s_ref[key]) < 1e-5, key
        else:
            assert torch.equal(s_nat[key], s_ref[key]), key  # step counters, skipped steps
    assert any("momentum" in k[1] or "metric" in k[1] for k in s_ref)
