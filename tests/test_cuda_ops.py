"""The CUDA ops (csrc/cuda/: each <op>.cu through its <op>_binding.cpp) against lorsum_kernels.reference.

Every op registered for the CUDA dispatch key, on CUDA tensors: odd shapes (r ∈ {1, 3, 16}, m, n ∈ {5, 123,
256}, T ∈ {1, 37, 512}, L ∈ {1, 3}), fp32 / fp64 / bf16, non-contiguous inputs, a zero Gram, NaN
propagation, the on-device fallback ridge, bitwise run-to-run determinism (data-parallel ranks must stay
identical) and torch.library.opcheck. Skipped without a GPU, and per op where the build has no CUDA kernel.

Tolerances (DESIGN.md "Numerical policy"): results from fp32 arithmetic within 1e-5 relative Frobenius error
of an fp64 reference computed on the same input values; bf16 results within twice the error that plain
PyTorch makes in bf16; NaN never passes (conftest.rel_err is inf for any non-finite value).
"""

from __future__ import annotations

import pytest
import torch

from lorsum_kernels import _native, reference

from .conftest import rel_err

# The device the ops run on, and their namespace (module-level so that the checks can be pointed elsewhere).
DEVICE = "cuda"


def _ops():
    return torch.ops.lorsum


def _needs(op: str):
    return pytest.mark.skipif(
        not _native.has_native_op(op, "cuda"),
        reason=f"lorsum::{op} has no CUDA kernel in this build ({_native.native_error or 'built without CUDA'})",
    )


pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# (L, T, m, n, r): every value of r ∈ {1, 3, 16}, m, n ∈ {5, 123, 256}, T ∈ {1, 37, 512} and L ∈ {1, 3}
# appears, with r ≤ min(m, n) as for any LoRA layer.
SHAPES = [
    (1, 37, 5, 123, 3),
    (3, 37, 123, 5, 1),
    (1, 512, 123, 256, 16),
    (3, 1, 256, 123, 3),
    (3, 512, 5, 5, 3),
    (1, 37, 256, 256, 16),
    (3, 37, 123, 123, 16),
]
SHAPE_IDS = [f"L{L}_T{T}_m{m}_n{n}_r{r}" for L, T, m, n, r in SHAPES]
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, g, dtype=torch.float32, scale=1.0) -> torch.Tensor:
    """Normal numbers drawn on the CPU (the same on every device), then moved to DEVICE."""
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(DEVICE)


def _cpu64(t):
    return None if t is None else t.detach().cpu().double()


def _fp32_tol(dtype: torch.dtype) -> float:
    return 1e-12 if dtype == torch.float64 else 1e-5


def _assert_deterministic(fn):
    """Two runs of fn() give bitwise identical tensors."""
    first, second = fn(), fn()
    if isinstance(first, torch.Tensor):
        first, second = (first,), (second,)
    for a, b in zip(first, second):
        assert torch.equal(a, b) or (a.isnan().equal(b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()))


# ---- references of the fused ops (reference.py defines them in newer versions) --------------------------


def _pair_products_ref(f_in, f_out, W=None, V=None):
    fn = getattr(reference, "pair_products", None)
    if fn is not None:
        return fn(f_in, f_out, W, V)
    batch, n, m = f_in.shape[:-2], f_in.shape[-1], f_out.shape[-2]
    P = torch.empty(batch + (0, n), dtype=f_in.dtype) if W is None else (W.mT @ f_out) @ f_in
    Q = torch.empty(batch + (m, 0), dtype=f_in.dtype) if V is None else f_out @ (f_in @ V.mT)
    return P, Q


# ---- spd_solve -----------------------------------------------------------------------------------------


def _spd(L, r, g, dtype, *, cond_floor=0.5):
    """Well-conditioned symmetric positive definite r×r matrices (condition number below about 10)."""
    M = torch.randn(L, r, 2 * r, generator=g, dtype=torch.float64)
    gram = M @ M.mT / (2 * r) + cond_floor * torch.eye(r, dtype=torch.float64)
    return gram.to(dtype).to(DEVICE)


def _solve_ref(gram, rhs, left):
    return reference.spd_solve(_cpu64(gram), _cpu64(rhs), left=left)


@_needs("spd_solve")
@pytest.mark.parametrize("left", [True, False], ids=["left", "right"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("r,N,L", [(1, 5, 1), (3, 123, 3), (16, 256, 1), (16, 1, 3), (64, 300, 2), (80, 37, 2)],
                         ids=lambda v: str(v))
def test_spd_solve_matches_reference(r, N, L, dtype, left):
    # r = 80 exercises the ATen path for r > 64.
    g = _gen(7)
    gram = _spd(L, r, g, dtype)
    rhs = _randn(L, r, N, g=g, dtype=dtype) if left else _randn(L, N, r, g=g, dtype=dtype)
    out = _ops().spd_solve(gram, rhs, left)
    assert out.dtype == dtype and out.shape == rhs.shape
    assert rel_err(out, _solve_ref(gram, rhs, left)) < _fp32_tol(dtype) * (10 if dtype == torch.float64 else 1)
    _assert_deterministic(lambda: _ops().spd_solve(gram, rhs, left))


@_needs("spd_solve")
@pytest.mark.parametrize("left", [True, False], ids=["left", "right"])
def test_spd_solve_bf16(left):
    g = _gen(8)
    gram = _spd(3, 16, g, torch.bfloat16)
    rhs = _randn(3, 16, 123, g=g, dtype=torch.bfloat16)
    rhs = rhs if left else rhs.mT.contiguous()
    out = _ops().spd_solve(gram, rhs, left)
    assert out.dtype == torch.bfloat16
    exact = _solve_ref(gram, rhs, left)
    # Within twice the error of the exact solution rounded to bf16 (torch has no bf16 Cholesky to compare).
    assert rel_err(out, exact) <= 2 * rel_err(exact.to(torch.bfloat16), exact)
    # fp32 gram with bf16 right sides: fp32 result at fp32 accuracy.
    out32 = _ops().spd_solve(gram.float(), rhs, left)
    assert out32.dtype == torch.float32 and rel_err(out32, exact) < 1e-5


@_needs("spd_solve")
def test_spd_solve_broadcast_and_non_contiguous():
    g = _gen(9)
    gram = _spd(1, 5, g, torch.float32)[0]
    rhs = _randn(3, 5, 37, g=g)
    out = _ops().spd_solve(gram, rhs, True)  # one matrix for every right side
    assert out.shape == (3, 5, 37) and rel_err(out, _solve_ref(gram.expand(3, 5, 5), rhs, True)) < 1e-5
    grams = _spd(3, 5, g, torch.float32).unsqueeze(1)  # (3, 1, 5, 5) with (2, 5, 37): batch (3, 2)
    rhs2 = _randn(2, 5, 37, g=g)
    out = _ops().spd_solve(grams, rhs2, True)
    assert out.shape == (3, 2, 5, 37)
    assert rel_err(out, _solve_ref(grams.expand(3, 2, 5, 5), rhs2.expand(3, 2, 5, 37), True)) < 1e-5
    # Column-major right sides and a transposed (symmetric) Gram, both solve sides.
    rhs_cm = rhs.mT.contiguous().mT
    grams3 = _spd(3, 5, g, torch.float32)
    for left, b in [(True, rhs_cm), (False, rhs_cm.mT)]:
        out = _ops().spd_solve(grams3.mT, b, left)
        assert rel_err(out, _solve_ref(grams3, b, left)) < 1e-5
        assert torch.equal(out, _ops().spd_solve(grams3.contiguous(), b.contiguous(), left))


@_needs("spd_solve")
@pytest.mark.parametrize("dtype,neg", [(torch.float32, 1e-5), (torch.float64, 1e-10)], ids=["fp32", "fp64"])
def test_spd_solve_fallback_ridge(dtype, neg):
    # diag(1, -neg, 1): the relative ridge (1e-7 / 1e-14 of the mean diagonal) leaves the second pivot
    # negative, the fallback ridge (+1e-4 / +1e-8) makes it positive. Without the on-device fallback the
    # result is NaN; with it, it is rhs / (diag + fallback·s), exactly what reference.ridged_cholesky defines.
    ridge, fallback = (1e-7, 1e-4) if dtype == torch.float32 else (1e-14, 1e-8)
    diag = torch.tensor([1.0, -neg, 1.0], dtype=torch.float64)
    gram = torch.stack([torch.diag(diag), torch.eye(3, dtype=torch.float64)]).to(dtype).to(DEVICE)
    rhs = _randn(2, 3, 7, g=_gen(10), dtype=dtype)
    out = _ops().spd_solve(gram, rhs, True)
    s = diag.mean()
    expected = torch.stack([_cpu64(rhs[0]) / (diag + (ridge + fallback) * s)[:, None],
                            _cpu64(rhs[1]) / (1 + ridge)])
    assert rel_err(out, expected) < _fp32_tol(dtype)
    # A rank-one PSD Gram: factorable (with the ridge or the fallback), finite, a small residual.
    v = torch.randn(3, 1, generator=_gen(11), dtype=torch.float64)
    rank1 = (v @ v.mT).to(dtype).to(DEVICE)
    b = rank1 @ _randn(3, 4, g=_gen(12), dtype=dtype)
    z = _ops().spd_solve(rank1, b, True)
    assert z.isfinite().all() and rel_err(rank1 @ z, b) < 1e-3


@_needs("spd_solve")
def test_spd_solve_zero_gram_and_non_finite():
    # An all-zero Gram (B = 0 at the standard LoRA init, λ = 0) with zero right sides: zero, not NaN.
    out = _ops().spd_solve(torch.zeros(2, 3, 3, device=DEVICE), torch.zeros(2, 3, 5, device=DEVICE), True)
    assert torch.equal(out, torch.zeros_like(out))
    out = _ops().spd_solve(torch.zeros(3, 3, device=DEVICE, dtype=torch.float64),
                           torch.zeros(4, 3, device=DEVICE, dtype=torch.float64), False)
    assert torch.equal(out, torch.zeros_like(out))
    # A NaN or infinite Gram poisons its own solutions only; a NaN right side poisons its own column only.
    g = _gen(13)
    gram = _spd(3, 4, g, torch.float32)
    rhs = _randn(3, 4, 9, g=g)
    gram[1, 2, 1] = gram[1, 1, 2] = float("nan")
    gram[2, 0, 0] = float("inf")
    rhs[0, 3, 4] = float("nan")
    out = _ops().spd_solve(gram, rhs, True)
    assert out[1].isnan().all() and not out[2].isfinite().any()
    assert out[0, :, 4].isnan().all()
    assert out[0, :, :4].isfinite().all() and out[0, :, 5:].isfinite().all()


# ---- pair_products -------------------------------------------------------------------------------------


@_needs("pair_products")
@pytest.mark.parametrize("wide", [False, True], ids=["w=r", "w=2r"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_pair_products_gradient_pair(shape, dtype, wide):
    # P = (S·W)ᵀ·X and Q = Sᵀ·(X·Vᵀ) for the gradient pair (X, Sᵀ); W = [B̂ | B̂_m] when wide. Factors in
    # fp32 (fp64 for fp64), X and S in `dtype`.
    L, T, m, n, r = shape
    w = 2 * r if wide else r
    g = _gen(14)
    fdt = torch.float64 if dtype == torch.float64 else torch.float32
    X, S = _randn(L, T, n, g=g, dtype=dtype), _randn(L, T, m, g=g, dtype=dtype, scale=0.1)
    W, V = _randn(L, m, w, g=g, dtype=fdt), _randn(L, w, n, g=g, dtype=fdt)
    P, Q = _ops().pair_products(X, S.mT, W, V)
    exp_P, exp_Q = _pair_products_ref(_cpu64(X), _cpu64(S).mT, _cpu64(W), _cpu64(V))
    assert P.shape == (L, w, n) and Q.shape == (L, m, w) and P.dtype == Q.dtype == fdt
    assert rel_err(P, exp_P) < _fp32_tol(dtype) and rel_err(Q, exp_Q) < _fp32_tol(dtype)
    _assert_deterministic(lambda: _ops().pair_products(X, S.mT, W, V))


@_needs("pair_products")
def test_pair_products_factor_pair_mixed_and_absent():
    g = _gen(15)
    L, m, n, r, q = 3, 123, 256, 16, 3
    A_m, B_m = _randn(L, q, n, g=g), _randn(L, m, q, g=g)  # a contiguous f_out (m×q): rows copied
    W, V = _randn(L, m, r, g=g), _randn(L, r, n, g=g)
    P, Q = _ops().pair_products(A_m, B_m, W, V)
    exp_P, exp_Q = _pair_products_ref(_cpu64(A_m), _cpu64(B_m), _cpu64(W), _cpu64(V))
    assert rel_err(P, exp_P) < 1e-5 and rel_err(Q, exp_Q) < 1e-5
    # bf16 X with fp32 S.
    X, S = _randn(L, 37, n, g=g, dtype=torch.bfloat16), _randn(L, 37, m, g=g)
    P, Q = _ops().pair_products(X, S.mT, W, V)
    exp_P, exp_Q = _pair_products_ref(_cpu64(X), _cpu64(S).mT, _cpu64(W), _cpu64(V))
    assert rel_err(P, exp_P) < 1e-5 and rel_err(Q, exp_Q) < 1e-5
    # Absent factors give empty products; no tokens give zeros.
    P, Q = _ops().pair_products(X, S.mT, None, V)
    assert P.shape == (L, 0, n) and rel_err(Q, exp_Q) < 1e-5
    P, Q = _ops().pair_products(X, S.mT, W, None)
    assert Q.shape == (L, m, 0) and rel_err(P, exp_P) < 1e-5
    P, Q = _ops().pair_products(X[:, :0], S[:, :0].mT, W, V)
    assert torch.equal(P, torch.zeros_like(P)) and torch.equal(Q, torch.zeros_like(Q))


@_needs("pair_products")
def test_pair_products_nan():
    g = _gen(16)
    X, S = _randn(2, 512, 123, g=g), _randn(2, 512, 5, g=g)
    W, V = _randn(2, 5, 3, g=g), _randn(2, 3, 123, g=g)
    X[0, 300, 7] = float("nan")
    P, Q = _ops().pair_products(X, S.mT, W, V)
    assert P[0, :, 7].isnan().all() and P[0, :, :7].isfinite().all() and P[0, :, 8:].isfinite().all()
    assert Q[0].isnan().all()
    assert P[1].isfinite().all() and Q[1].isfinite().all()


# ---- LoRSum half-steps --------------------------------------------------------------------------------


def _problem(L, T, m, n, r, *, dtype=torch.float32, big_dtype=None, metrics=False, per_layer=False, seed=0):
    """A half-step as PSI-LoRA poses it: pairs [(A0, B0), (X, Sᵀ), (A_m, B_m)], with current iterates off the
    anchor (so every term of the right-hand side is non-zero)."""
    g = _gen(seed)
    big_dtype = big_dtype or dtype
    A0, B0 = _randn(L, r, n, g=g, dtype=dtype, scale=n**-0.5), _randn(L, m, r, g=g, dtype=dtype, scale=3 * m**-0.5)
    A_hat = (A0.double() * 0.9 + _randn(L, r, n, g=g, dtype=torch.float64, scale=0.1 * n**-0.5)).to(dtype)
    B_hat = (B0.double() * 1.1 + _randn(L, m, r, g=g, dtype=torch.float64, scale=0.3 * m**-0.5)).to(dtype)
    X, S = _randn(L, T, n, g=g, dtype=big_dtype), _randn(L, T, m, g=g, dtype=big_dtype, scale=0.1)
    A_m, B_m = _randn(L, r, n, g=g, dtype=dtype, scale=0.3), _randn(L, m, r, g=g, dtype=dtype, scale=0.3)
    coeffs = [1.0, -0.5, -0.05]
    if per_layer:
        coeffs = [1.0, torch.linspace(-0.6, -0.4, L, dtype=torch.float64), -0.05]
    p = {"A0": A0, "B0": B0, "A_hat": A_hat, "B_hat": B_hat, "pairs": [(X, S.mT), (A_m, B_m)], "coeffs": coeffs,
         "lmbd": 1e-2, "metrics": None}
    if metrics:
        p["metrics"] = (
            (torch.rand(L, n, generator=g, dtype=torch.float64) + 0.5).to(dtype).to(DEVICE),
            (torch.rand(L, m, generator=g, dtype=torch.float64) + 0.5).to(dtype).to(DEVICE),
        )
    return p


def _coeff_table(coeffs, L):
    """The schema's coeffs: (J+1,) when shared, else (J+1, L); float64 on the CPU."""
    ts = [torch.as_tensor(c, dtype=torch.float64).cpu() for c in coeffs]
    if all(t.ndim == 0 for t in ts):
        return torch.stack(ts)
    return torch.stack([t.expand(L) for t in ts])


def _native_half_step(side, p, *, scalars_on=None):
    op = _ops().lorsum_update_in if side == "in" else _ops().lorsum_update_out
    hat = p["B_hat"] if side == "in" else p["A_hat"]
    L = p["A0"].shape[0] if p["A0"].dim() > 2 else 1
    coeffs = _coeff_table(p["coeffs"], L)
    lmbd = torch.as_tensor(p["lmbd"], dtype=torch.float64).cpu()
    if scalars_on is not None:
        coeffs, lmbd = coeffs.to(scalars_on), lmbd.to(scalars_on)
    m_in, m_out = p["metrics"] if p["metrics"] is not None else (None, None)
    return op(hat, p["A0"], p["B0"], [f for f, _ in p["pairs"]], [f for _, f in p["pairs"]], coeffs, lmbd, m_in, m_out)


def _reference_half_step(side, p, *, dtype=torch.float64, device="cpu"):
    """reference.lorsum_update_in/out on copies of the problem in `dtype` on `device`."""
    def c(t):
        return t.detach().to(device=device, dtype=dtype)
    fn = reference.lorsum_update_in if side == "in" else reference.lorsum_update_out
    hat = p["B_hat"] if side == "in" else p["A_hat"]
    coeffs = [c(v) if isinstance(v, torch.Tensor) else v for v in p["coeffs"]]
    metrics = None if p["metrics"] is None else tuple(c(t) for t in p["metrics"])
    return fn(c(hat), (c(p["A0"]), c(p["B0"])), [(c(a), c(b)) for a, b in p["pairs"]], coeffs, p["lmbd"], metrics)


@_needs("lorsum_update_in")
@pytest.mark.parametrize("side", ["in", "out"])
@pytest.mark.parametrize("metrics", [False, True], ids=["plain", "scaled"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_half_step_fp32_and_fp64(shape, metrics, side):
    p64 = _problem(*shape, dtype=torch.float64, metrics=metrics, per_layer=metrics)
    out64 = _native_half_step(side, p64)
    assert out64.dtype == torch.float64 and rel_err(out64, _reference_half_step(side, p64)) < 1e-11
    p32 = _problem(*shape, dtype=torch.float32, metrics=metrics, per_layer=metrics)
    out = _native_half_step(side, p32)
    exact = _reference_half_step(side, p32)  # fp64 on the fp32 values
    assert out.dtype == torch.float32 and out.shape == exact.shape and out.device.type == torch.device(DEVICE).type
    assert rel_err(out, exact) < 1e-5
    _assert_deterministic(lambda: _native_half_step(side, p32))


@_needs("lorsum_update_in")
@pytest.mark.parametrize("side", ["in", "out"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_half_step_bf16(shape, side, monkeypatch):
    # bf16 X and S with fp32 factors (what the optimizers pass): fp32 accuracy on the bf16 values.
    mixed = _problem(*shape, dtype=torch.float32, big_dtype=torch.bfloat16, metrics=True)
    assert rel_err(_native_half_step(side, mixed), _reference_half_step(side, mixed)) < 1e-5
    # Everything bf16, the result too: within twice the error plain PyTorch makes in bf16 (its r×r solve in
    # fp32, rounded back: torch has no bf16 Cholesky).
    p16 = _problem(*shape, dtype=torch.bfloat16, metrics=True)
    out = _native_half_step(side, p16)
    assert out.dtype == torch.bfloat16
    solve = reference.spd_solve
    monkeypatch.setattr(reference, "spd_solve",
                        lambda gram, rhs, left=True: solve(gram.float(), rhs.float(), left=left).to(gram.dtype))
    torch_bf16 = _reference_half_step(side, p16, dtype=torch.bfloat16, device=DEVICE)
    exact = _reference_half_step(side, p16)
    assert rel_err(out, exact) <= 2 * rel_err(torch_bf16, exact)


@_needs("lorsum_update_in")
@pytest.mark.parametrize("side", ["in", "out"])
def test_half_step_scalars_on_device_and_views(side):
    p = _problem(3, 37, 123, 5, 3, metrics=True, per_layer=True)
    on_cpu = _native_half_step(side, p)
    on_device = _native_half_step(side, p, scalars_on=DEVICE)
    assert rel_err(on_device, on_cpu) < 1e-6
    # Non-contiguous factors and metrics, F_out of the gradient pair as a contiguous m×T matrix.
    X, St = p["pairs"][0]
    wide_X = torch.zeros(3, 37, 9, device=DEVICE)
    wide_X[..., 2:7] = X
    views = dict(p, A0=p["A0"].mT.contiguous().mT, B0=p["B0"].transpose(0, 1).contiguous().transpose(0, 1),
                 pairs=[(wide_X[..., 2:7], St.contiguous()), p["pairs"][1]],
                 metrics=(p["metrics"][0].mT.contiguous().mT, p["metrics"][1][:, None, :].squeeze(1)))
    assert rel_err(_native_half_step(side, views), _reference_half_step(side, p)) < 1e-5


@_needs("lorsum_update_in")
def test_half_step_zero_gram_no_pairs_and_nan():
    # Standard LoRA init (B = 0) with λ = 0: the A-step's Gram is exactly zero and its right side too, so
    # Â = A0, finite; the B-step from A = 0 likewise keeps B0.
    p = _problem(3, 37, 123, 5, 3)
    zero_B = dict(p, B0=torch.zeros_like(p["B0"]), B_hat=torch.zeros_like(p["B0"]), lmbd=0.0)
    out = _native_half_step("in", zero_B)
    assert out.isfinite().all() and torch.equal(out, p["A0"])
    zero_A = dict(p, A0=torch.zeros_like(p["A0"]), A_hat=torch.zeros_like(p["A0"]), lmbd=0.0)
    out = _native_half_step("out", zero_A)
    assert out.isfinite().all() and torch.equal(out, p["B0"])
    # No pairs (anchor only), and no tokens.
    for side in ["in", "out"]:
        anchor_only = dict(p, pairs=[], coeffs=[0.7])
        assert rel_err(_native_half_step(side, anchor_only), _reference_half_step(side, anchor_only)) < 1e-5
        no_tokens = _problem(3, 0, 123, 5, 3)
        assert rel_err(_native_half_step(side, no_tokens), _reference_half_step(side, no_tokens)) < 1e-5
    # A NaN in X never gives a finite result for its layer.
    X, St = p["pairs"][0]
    X = X.clone()
    X[1, 3, 2] = float("nan")
    bad = dict(p, pairs=[(X, St), p["pairs"][1]])
    for side in ["in", "out"]:
        out = _native_half_step(side, bad)
        assert not out[1].isfinite().all() and out[0].isfinite().all() and out[2].isfinite().all()


# ---- inputs on the wrong device, opcheck ---------------------------------------------------------------


OPCHECK_OPS = ["spd_solve", "spd_solve", "pair_products", "lorsum_update_in",
               "lorsum_update_out"]


def _opcheck_cases():
    g = _gen(18)
    X, S = _randn(2, 37, 5, g=g), _randn(2, 37, 7, g=g)
    A0, B0 = _randn(2, 3, 5, g=g), _randn(2, 7, 3, g=g)
    coeffs = torch.tensor([1.0, -0.5], dtype=torch.float64, device=DEVICE)
    lmbd = torch.tensor(1e-2, dtype=torch.float64, device=DEVICE)
    m_in, m_out = _randn(2, 5, g=g).abs() + 0.5, _randn(2, 7, g=g).abs() + 0.5
    return [
        ("spd_solve", (_spd(2, 3, g, torch.float32), _randn(2, 3, 5, g=g), True)),
        ("spd_solve", (_spd(2, 3, g, torch.float32), _randn(2, 5, 3, g=g), False)),
        ("pair_products", (X, S.mT, B0, A0)),
        ("lorsum_update_in", (B0, A0, B0, [X], [S.mT], coeffs, lmbd, m_in, m_out)),
        ("lorsum_update_out", (A0, A0, B0, [X], [S.mT], coeffs, lmbd, None, None)),
    ]


@pytest.mark.parametrize("case", range(len(OPCHECK_OPS)), ids=[f"{i}-{op}" for i, op in enumerate(OPCHECK_OPS)])
def test_opcheck(case):
    # Schema, fake (meta) implementation, autograd registration and AOT dispatch on CUDA tensors.
    if not _native.has_native_op(OPCHECK_OPS[case], "cuda"):
        pytest.skip(f"lorsum::{OPCHECK_OPS[case]} has no CUDA kernel in this build")
    name, args = _opcheck_cases()[case]
    assert name == OPCHECK_OPS[case]
    torch.library.opcheck(getattr(_ops(), name), args)
