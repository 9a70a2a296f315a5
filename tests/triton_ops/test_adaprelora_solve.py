"""Triton adaprelora_solve (lorsum_kernels.triton_kernels.adaprelora) against reference.adaprelora_solve,
and the caller-ridge solve it is built on (triton_kernels.spd.ridged_spd_solve).

Compiled on a GPU, or in Triton's interpreter (conftest.py). Each call runs four r×r solve launches,
each factoring its matrix op by op in the interpreter (about 0.3 s a matrix at r = 16), so r = 16
appears once.

Tolerances (DESIGN.md "Numerical policy"): fp32 results within 1e-5 relative Frobenius error of the fp64
reference on the same input values; NaN never passes (conftest.rel_err is inf for any non-finite value).
"""

from __future__ import annotations

import pytest
import torch

from lorsum_kernels import backends, ops, reference

from ..conftest import TinyLoRAMLP, rel_err
from .conftest import DEVICE

pytestmark = pytest.mark.triton
DTYPES = [torch.float32, torch.float64]
RIDGE = 1e-6
# A failed factorisation takes the square root of a non-positive pivot, and divides by it, on purpose
# (numpy warns about it in the interpreter).
FAILED_PIVOT = pytest.mark.filterwarnings("ignore:invalid value encountered in (sqrt|divide):RuntimeWarning")


def _solve(*args, ridge=RIDGE):
    from lorsum_kernels.triton_kernels import adaprelora

    return adaprelora.adaprelora_solve(*args, ridge=ridge)


def _problem(batch, m, n, r, *, dtype=torch.float64, seed=0, momentum=False):
    """A, B, g_A, g_B, p, q as AdaPreLoRA poses them (tests/test_native_adaprelora_solve.py): g_A = BᵀG
    and g_B = GAᵀ for one G, or (momentum) gradients that come from no single G."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*batch, *shape, generator=g, dtype=torch.float64) * scale

    A, B = randn(r, n, scale=n**-0.5), randn(m, r, scale=m**-0.5 * 3)
    if momentum:
        g_A, g_B = randn(r, n), randn(m, r)
    else:
        G = randn(m, n)
        g_A, g_B = B.mT @ G, G @ A.mT
    p = torch.rand(*batch, m, generator=g, dtype=torch.float64) * 1.5 + 0.5
    q = torch.rand(*batch, n, generator=g, dtype=torch.float64) * 1.5 + 0.5
    return [t.to(dtype).to(DEVICE) for t in (A, B, g_A, g_B, p, q)]


def _exact(args, ridge=RIDGE, dtype=torch.float64):
    return reference.adaprelora_solve(*[t.to(dtype) for t in args], ridge=ridge)


def _err(out, expected):
    return max(rel_err(a, e) for a, e in zip(out, expected))


def _tol(dtype):
    return 1e-11 if dtype == torch.float64 else 1e-5


# (batch, m, n, r): every r ∈ {1, 3, 16}, m, n ∈ {5, 33}, batch ∈ {(), (3,), (2, 2)}, r ≤ min(m, n).
SHAPES = [((), 5, 33, 3), ((3,), 33, 5, 1), ((2, 2), 5, 5, 3), ((), 33, 33, 16)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(shape, dtype):
    batch, m, n, r = shape
    args = _problem(*shape, dtype=dtype, momentum=r == 1)
    dA, dB = _solve(*args)
    assert dA.shape == batch + (r, n) and dB.shape == batch + (m, r)
    assert dA.dtype == dB.dtype == dtype and dA.device == dB.device == DEVICE
    assert _err((dA, dB), _exact(args)) < _tol(dtype)


@pytest.mark.parametrize("ridge", [0.0, torch.tensor(1e-3), torch.tensor([0.0, 1e-6, 1e-2])],
                         ids=["number", "0-d", "per-layer"])
def test_ridge_forms_and_broadcast_batch(ridge):
    # p and q shared by the layers (broadcast as the reference does); the ridge a number, a 0-d tensor or
    # one value per layer, each layer factored with its own.
    A, B, g_A, g_B, p, q = _problem((3,), 33, 5, 3, dtype=torch.float32, seed=1)
    args = (A, B, g_A, g_B, p[0], q[0])
    out = _solve(*args, ridge=ridge)
    assert _err(out, _exact(args, ridge)) < 1e-5


def test_ridge_changes_the_result_per_layer():
    # A ridge large enough to matter: each layer must match the reference with its own value.
    args = _problem((2,), 5, 33, 3, seed=2)
    ridge = torch.tensor([0.0, 0.5], dtype=torch.float64)
    out = _solve(*args, ridge=ridge)
    assert _err(out, _exact(args, ridge)) < 1e-11
    assert _err([t[1] for t in out], [t[1] for t in _exact(args, 0.0)]) > 1e-3


@FAILED_PIVOT
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ridge", [0.0, RIDGE], ids=["ridge0", "ridge1e-6"])
def test_zero_grams(dtype, ridge):
    A, B, _, g_B, p, q = _problem((2,), 33, 5, 3, dtype=dtype, seed=3)
    # Standard LoRA init, B = 0: M_B = 0 and g_A = BᵀG = 0, so dA = 0 and dB·A is T projected on row(A).
    zero_B = [A, torch.zeros_like(B), torch.zeros_like(A), g_B, p, q]
    dA, dB = _solve(*zero_B, ridge=ridge)
    assert torch.equal(dA, torch.zeros_like(dA))
    assert rel_err(dB, _exact(zero_B, ridge)[1]) < _tol(dtype)
    # A = B = 0 with gradients (momenta) left over: both Grams zero, factored at the floored scale (with the
    # fallback ridge when ridge = 0). Huge but finite; the floor is the dtype's, so the reference runs in it.
    g_A = (_problem((2,), 33, 5, 3, seed=4)[2] * 1e-6).to(dtype)
    zero_both = [torch.zeros_like(A), torch.zeros_like(B), g_A, g_B, p, q]
    out = _solve(*zero_both, ridge=ridge)
    assert all(t.isfinite().all() for t in out)
    assert _err(out, _exact(zero_both, ridge, dtype=dtype)) < _tol(dtype)


@FAILED_PIVOT
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fallback_ridge_per_layer(dtype, monkeypatch):
    # A zero column of B makes M_B exactly singular: with ridge 0 the first factorisation of layer 0 meets
    # a zero pivot and takes the fallback ridge; the other layers keep their own ridges. The fp64 reference
    # gets the fallback ridge of the dtype under test, so that it makes the same choice.
    monkeypatch.setitem(reference.FALLBACK_RIDGE, torch.float64, reference.FALLBACK_RIDGE[dtype])
    args = _problem((3,), 33, 5, 3, dtype=dtype, seed=5)
    args[1][0, :, 1] = 0
    args[2][0, 1] = 0  # g_A = BᵀG has that row zero too
    ridge = torch.tensor([0.0, 0.0, 1e-2], dtype=torch.float64)
    out = _solve(*args, ridge=ridge)
    assert all(t.isfinite().all() for t in out)
    assert _err(out, _exact(args, ridge)) < _tol(dtype)


@FAILED_PIVOT
def test_nan_where_both_factorisations_fail():
    # A negative p (outside the contract) makes M_B negative definite: no ridge rescues it. That layer comes
    # out NaN, as from the native kernels (the reference goes on with LAPACK's partial factor); the
    # other layers are untouched.
    args = _problem((3,), 33, 5, 3, dtype=torch.float32, seed=6)
    args[4][1] = -args[4][1]
    dA, dB = _solve(*args)
    assert dA[1].isnan().all() and dB[1].isnan().all()
    exact = _exact(args)
    for layer in (0, 2):
        assert _err((dA[layer], dB[layer]), (exact[0][layer], exact[1][layer])) < 1e-5


@FAILED_PIVOT
@pytest.mark.parametrize("where", ["A", "B", "g_A", "g_B", "p", "q"])
def test_nan_poisons_its_layer_only(where):
    args = _problem((3,), 5, 33, 3, dtype=torch.float32, seed=7)
    k = ["A", "B", "g_A", "g_B", "p", "q"].index(where)
    args[k][1].view(-1)[2] = float("nan")
    dA, dB = _solve(*args)
    expected = reference.adaprelora_solve(*args, ridge=RIDGE)
    assert not (dA[1].isfinite().all() and dB[1].isfinite().all())
    # NaN wherever the reference has one in that layer (the reference's partial factor may leave more
    # finite entries than ours, never fewer).
    assert (dA[1].isnan() | ~expected[0][1].isnan()).all() and (dB[1].isnan() | ~expected[1][1].isnan()).all()
    exact = _exact(args)
    for layer in (0, 2):
        assert _err((dA[layer], dB[layer]), (exact[0][layer], exact[1][layer])) < 1e-5


def test_non_contiguous_and_expanded_inputs():
    A, B, g_A, g_B, p, q = _problem((3,), 33, 5, 3, dtype=torch.float32, seed=8)
    wide_q = torch.rand(3, 2 * 5, device=DEVICE)
    wide_q[:, ::2] = q
    views = [
        A.mT.contiguous().mT,  # column-major
        B.transpose(0, 1).contiguous().transpose(0, 1),  # permuted batch
        g_A.mT.contiguous().mT,
        g_B.mT.contiguous().mT,
        p.mT.contiguous().mT,  # batch-fast storage
        wide_q[:, ::2],  # strided columns
    ]
    assert not any(v.is_contiguous() for v in views)
    plain = _solve(A, B, g_A, g_B, p, q)
    for a, b in zip(_solve(*views), plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # One layer's inputs expanded over the batch (stride 0): every layer's result is that layer's, as
    # when the same inputs are materialized. Compared at the same batch shape: a launch over another
    # batch shape may round differently (the interpreter's numpy reductions did on one CPU: 2e-5 relative).
    expanded = [t[:1].expand(2, *t.shape[1:]) for t in (A, B, g_A, g_B, p, q)]
    materialized = _solve(*[t.contiguous() for t in expanded])
    for a, b in zip(_solve(*expanded), materialized):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(a[1], a[0], rtol=0, atol=0)


def test_mixed_and_half_dtypes():
    args = _problem((2,), 33, 5, 3, seed=9)
    # bf16 statistics with fp32 factors and gradients: fp32 results at fp32 accuracy on those values.
    mixed = [t.float() for t in args[:4]] + [t.bfloat16() for t in args[4:]]
    out = _solve(*mixed)
    assert [t.dtype for t in out] == [torch.float32] * 2 and _err(out, _exact(mixed)) < 1e-5
    # One fp64 input: fp64 arithmetic and results.
    wide = [args[0]] + [t.float() for t in args[1:]]
    out = _solve(*wide)
    assert [t.dtype for t in out] == [torch.float64] * 2 and _err(out, _exact(wide)) < 1e-11
    # All bf16: solved in fp32, returned in bf16 (rounding only).
    half = [t.bfloat16() for t in args]
    out = _solve(*half)
    assert [t.dtype for t in out] == [torch.bfloat16] * 2 and _err(out, _exact(half)) < 1e-2


def test_rank_above_the_register_tile_uses_torch(monkeypatch):
    from lorsum_kernels.triton_kernels import spd

    monkeypatch.setattr(spd, "MAX_R", 2)
    args = _problem((2,), 5, 33, 3, seed=10)
    ridge = torch.tensor([1e-6, 1e-2], dtype=torch.float64)
    assert _err(_solve(*args, ridge=ridge), _exact(args, ridge)) < 1e-12


@FAILED_PIVOT
def test_ridged_spd_solve_per_matrix():
    from lorsum_kernels.triton_kernels import spd

    g = torch.Generator().manual_seed(11)
    F = torch.randn(3, 3, 9, generator=g, dtype=torch.float64)
    gram = (F @ F.mT).to(DEVICE)
    gram[0, :, 1] = gram[0, 1, :] = 0  # singular: ridge 0 takes the fallback on this matrix only
    rhs = torch.randn(3, 5, 3, generator=g, dtype=torch.float64).to(DEVICE)
    ridge = torch.tensor([0.0, 0.0, 0.3], dtype=torch.float64)
    out = spd.ridged_spd_solve(gram, rhs, ridge, left=False)
    chol = reference.ridged_cholesky(gram, ridge.to(DEVICE))
    torch.testing.assert_close(out, torch.cholesky_solve(rhs.mT, chol).mT, rtol=1e-10, atol=1e-12)
    # A number, and None (the dtype's relative ridge: spd_solve).
    torch.testing.assert_close(spd.ridged_spd_solve(gram[1:], rhs[1:], 0.3, left=False),
                               torch.cholesky_solve(rhs[1:].mT, reference.ridged_cholesky(gram[1:], 0.3)).mT,
                               rtol=1e-10, atol=1e-12)
    assert torch.equal(spd.ridged_spd_solve(gram, rhs, None, left=False), spd.spd_solve(gram, rhs, left=False))
    with pytest.raises(ValueError, match=r"and the ridge \(2,\) do not broadcast"):
        spd.ridged_spd_solve(gram, rhs, ridge[:2], left=False)


@pytest.mark.parametrize("batch,m,n,r", [((0,), 5, 7, 3), ((2,), 5, 7, 0), ((2,), 0, 7, 0), ((2,), 0, 0, 2)],
                         ids=str)
def test_empty_shapes(batch, m, n, r):
    A, B = torch.randn(*batch, r, n, device=DEVICE), torch.randn(*batch, m, r, device=DEVICE)
    p, q = torch.rand(*batch, m, device=DEVICE) + 0.5, torch.rand(*batch, n, device=DEVICE) + 0.5
    dA, dB = _solve(A, B, A.clone(), B.clone(), p, q)
    assert dA.shape == A.shape and dB.shape == B.shape and dA.dtype == dB.dtype == torch.float32


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda a: a.update(B=a["B"][..., :2]), ValueError, r"must be \(\.\.\., m, r\) with the same r"),
        (lambda a: a.update(g_A=a["g_A"][..., :-1]), ValueError, r"g_A must end in \(3, 7\)"),
        (lambda a: a.update(g_B=a["g_B"].mT), ValueError, r"g_B must end in \(5, 3\)"),
        (lambda a: a.update(p=a["p"][..., :-1]), ValueError, r"p must end in \(5,\)"),
        (lambda a: a.update(q=a["q"][:2]), ValueError, r"do not broadcast"),
        (lambda a: a.update(ridge=torch.ones(2)), ValueError, r"do not broadcast"),
        (lambda a: a.update(ridge=torch.tensor(1)), TypeError, r"ridge tensor must be floating"),
        (lambda a: a.update(A=a["A"].int()), TypeError, r"A must be one of"),
        (lambda a: a.update(A=a["A"][0, 0]), ValueError, r"A must have at least 2 dimensions"),
    ],
)
def test_rejects_bad_input(mutate, error, match):
    A, B, g_A, g_B, p, q = _problem((3,), 5, 7, 3, dtype=torch.float32)
    args = {"A": A, "B": B, "g_A": g_A, "g_B": g_B, "p": p, "q": q, "ridge": RIDGE}
    mutate(args)
    with pytest.raises(error, match=rf"adaprelora_solve: .*{match}"):
        _solve(*[args[k] for k in ("A", "B", "g_A", "g_B", "p", "q")], ridge=args["ridge"])


def test_registered_and_dispatched(monkeypatch):
    from lorsum_kernels import triton_kernels
    from lorsum_kernels.triton_kernels import adaprelora

    assert "adaprelora_solve" in backends.TRITON_OPS
    args = _problem((2,), 5, 7, 3, dtype=torch.float32)
    ridge = torch.tensor([1e-6, 1e-3])
    calls = []
    real = adaprelora.adaprelora_solve

    def spy(*a, **kw):
        calls.append(kw)
        return real(*a, **kw)

    monkeypatch.setattr(triton_kernels, "adaprelora_solve", spy)
    out = ops.adaprelora_solve(*args, ridge=ridge, backend="triton")
    assert len(calls) == 1 and calls[0]["ridge"] is ridge
    for a, b in zip(out, real(*args, ridge=ridge)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("statistics", ["exact", "surrogate"])
def test_optimizer_triton_equals_torch(statistics):
    # AdaPreLoRA with both of its ops forced to Triton (the solve and row_col_energies or
    # tangent_energies), three steps with input momentum, against the torch backend.
    import lorsum_kernels as lk

    def train(backend):
        torch.manual_seed(0)
        model = TinyLoRAMLP(d_in=12, d_hidden=20, d_out=5, r=3, alpha=6.0).to(DEVICE)
        opt = lk.AdaPreLoRA(model, lr=1e-2, backend=backend, statistics=statistics, momentum="input")
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            x = torch.randn(2, 7, 12, generator=g).to(DEVICE)
            y = torch.randint(0, 5, (2, 7), generator=g).to(DEVICE)
            loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    tri, ref = train("triton"), train("torch")
    for key in ref:
        assert rel_err(tri[key], ref[key]) < 1e-5, key
