"""Triton tangent_energies (lorsum_kernels.triton_kernels.tangent) against reference.tangent_energies, and
dispatch to it.

Compiled on a GPU, or in Triton's interpreter (conftest.py). What is checked mirrors
tests/test_native_tangent_energies.py: fp32/fp64 accuracy, bf16/fp16 and mixed dtypes (the native op's
dtype contract), ranks that differ between B and F, batch broadcasting, empty shapes, non-contiguous and
expanded inputs, zeros and the clamp, NaN propagation as in the reference, bad input (AdaPreLoRA with the
surrogate statistics on Triton: in test_adaprelora_solve.py).

Tolerances (DESIGN.md "Numerical policy"): fp32 results within 1e-5 relative Frobenius error of the fp64
reference on the same input values; bf16 results within twice the error plain PyTorch makes in bf16;
NaN never passes (conftest.rel_err is inf for any non-finite value).
"""

from __future__ import annotations

import pytest
import torch

from lorsum_kernels import backends, ops, reference

from ..conftest import rel_err
from .conftest import DEVICE

pytestmark = pytest.mark.triton

# (batch, m, n, r_B, r_F): odd m and n, 0-, 1- and 2-D batches, rank 1, several 64-column blocks per side
# (the interpreter's widest), R = 80 (two 64-row tiles of the Gram) and ranks that differ.
SHAPES = [((), 5, 123, 3, 3), ((3,), 123, 5, 1, 1), ((2, 2), 37, 29, 16, 16), ((2,), 150, 70, 40, 40),
          ((2,), 33, 77, 2, 5)]
IDS = [f"b{'x'.join(map(str, b)) or '0'}_m{m}_n{n}_rB{rb}_rF{rf}" for b, m, n, rb, rf in SHAPES]


def _launcher():
    from lorsum_kernels.triton_kernels import tangent

    return tangent.tangent_energies


def _problem(batch, m, n, r_B, r_F, *, dtype=torch.float64, seed=0):
    """(B, E, F, A) on DEVICE: AdaPreLoRA's surrogate (E = BᵀG, F = GAᵀ for one G) when the ranks agree, else
    independent factors."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*batch, *shape, generator=g, dtype=torch.float64) * scale

    B, A = randn(m, r_B, scale=max(m, 1) ** -0.5 * 3), randn(r_F, n, scale=max(n, 1) ** -0.5)
    if r_B == r_F:
        G = randn(m, n)
        E, F = B.mT @ G, G @ A.mT
    else:
        E, F = randn(r_B, n), randn(m, r_F)
    return [t.to(dtype).to(DEVICE) for t in (B, E, F, A)]


def _exact(args):
    return reference.tangent_energies(*[t.double() for t in args])


def _err(out, expected):
    return max(rel_err(a, e) for a, e in zip(out, expected))


# ---- accuracy and dtypes ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_matches_reference(shape, dtype):
    batch, m, n = shape[:3]
    args = _problem(*shape, dtype=dtype)
    out = _launcher()(*args)
    for o, length in zip(out, (m, n)):
        assert o.shape == batch + (length,) and o.dtype == dtype and o.device == DEVICE and o.is_contiguous()
    assert _err(out, _exact(args)) < (1e-12 if dtype == torch.float64 else 1e-5)


def test_bf16_and_fp16():
    # One half dtype throughout: results in that dtype (as the native op and the reference return them),
    # computed in fp32. bf16 within twice the error plain PyTorch makes in bf16; fp16 within its rounding.
    args = _problem((2,), 37, 29, 3, 3)
    bf16 = [t.bfloat16() for t in args]
    out = _launcher()(*bf16)
    assert [t.dtype for t in out] == [torch.bfloat16] * 2
    torch_bf16 = reference.tangent_energies(*bf16)
    for a, t, e in zip(out, torch_bf16, _exact(bf16)):
        assert rel_err(a, e) <= 2 * rel_err(t, e)
    fp16 = [t.half() for t in args]
    out = _launcher()(*fp16)
    assert [t.dtype for t in out] == [torch.float16] * 2 and _err(out, _exact(fp16)) < 2e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_mixed_dtypes_promote(dtype):
    # One input in another dtype: results in the promoted dtype, arithmetic in fp64 if any input is fp64,
    # else fp32 (so fp32 accuracy on the given values).
    args = _problem((2,), 37, 29, 3, 3)
    want = torch.float64 if dtype == torch.float64 else torch.float32
    for k in range(4):
        cast = [t.to(dtype) if j == k else t.float() for j, t in enumerate(args)]
        out = _launcher()(*cast)
        assert [t.dtype for t in out] == [want] * 2
        assert _err(out, _exact(cast)) < (1e-12 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("ranks", [(2, 5), (0, 3), (7, 0)], ids=lambda rk: f"rB{rk[0]}_rF{rk[1]}")
def test_ranks_of_the_two_products_may_differ(ranks):
    # Z = [B F] and W = [E; A] only need B·E and F·A to be m×n: r_B ≠ r_F, an empty product included.
    args = _problem((2,), 33, 37, *ranks, dtype=torch.float32, seed=7)
    assert _err(_launcher()(*args), _exact(args)) < 1e-5


# ---- layouts, broadcasting, edge cases -------------------------------------------------------------


def test_batch_dimensions_broadcast_as_in_the_reference():
    B, E, F, A = _problem((3,), 37, 29, 3, 3, dtype=torch.float32)
    # B and F with batch (2, 1) against E and A with (3,): a (2, 3) batch whose expanded strides do not merge.
    two = [t[:2].unsqueeze(1) for t in (B, F)]
    for args in [(B, E[0], F, A[0]), (B[0], E, F[0], A), (two[0], E, two[1], A)]:
        out = _launcher()(*args)
        exact = _exact(args)
        assert [t.shape for t in out] == [t.shape for t in exact] and _err(out, exact) < 1e-5
    one = [t[0] for t in (B, E, F, A)]
    out = _launcher()(*one)
    assert out[0].shape == (37,) and out[1].shape == (29,) and _err(out, _exact(one)) < 1e-5


def test_non_contiguous_and_expanded_inputs():
    B, E, F, A = _problem((3,), 37, 70, 3, 3, dtype=torch.float32)
    wide = torch.zeros(3, 3, 2 * 70, device=DEVICE)
    wide[..., ::2] = A
    views = [
        B.mT.contiguous().mT,  # column-major: rows of V = Zᵀ contiguous
        E.transpose(0, 1).contiguous().transpose(0, 1),  # permuted batch
        F.mT.contiguous().mT,
        wide[..., ::2],  # strided columns (neither stride 1)
    ]
    assert not any(v.is_contiguous() for v in views)
    out = _launcher()(*views)
    assert _err(out, _exact(views)) < 1e-5
    for a, b in zip(out, _launcher()(B, E, F, A)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    # One layer's inputs expanded over the batch (stride 0): every layer's result is that layer's.
    expanded = [t[:1].expand(4, *t.shape[1:]) for t in (B, E, F, A)]
    single = _launcher()(*[t[0] for t in (B, E, F, A)])
    for a, b in zip(_launcher()(*expanded), single):
        torch.testing.assert_close(a, b.expand_as(a), rtol=1e-6, atol=0)


@pytest.mark.parametrize("batch,m,n,r", [((0,), 5, 7, 3), ((2,), 5, 7, 0), ((2,), 0, 7, 3), ((2,), 5, 0, 3),
                                         ((2,), 0, 0, 3)], ids=str)
def test_empty_shapes(batch, m, n, r):
    args = _problem(batch, m, n, r, r, dtype=torch.float32)
    for a, e in zip(_launcher()(*args), reference.tangent_energies(*args)):
        assert a.shape == e.shape and a.dtype == torch.float32 and torch.equal(a, e)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_zeros_give_exact_zeros_and_cancellation_is_clamped(dtype):
    B, E, F, A = _problem((2,), 37, 70, 16, 16, dtype=dtype)
    all_zero = [torch.zeros_like(t) for t in (B, E, F, A)]
    for args in [all_zero, [torch.zeros_like(B), E, torch.zeros_like(F), A]]:
        for a in _launcher()(*args):
            assert torch.equal(a, torch.zeros_like(a))
    # Standard LoRA init, B = 0 and E = BᵀG = 0: the energies of F·A alone.
    init = [torch.zeros_like(B), torch.zeros_like(E), F, A]
    assert _err(_launcher()(*init), _exact(init)) < (1e-12 if dtype == torch.float64 else 1e-5)
    # B·E + (−B)·E = 0 with nonzero factors: the quadratic forms cancel to rounding error, which the clamp
    # keeps from going negative (the reference clamps the same way).
    Z, W = torch.cat([B, -B], -1), torch.cat([E, E], -2)
    rows, cols = _launcher()(B, E, -B, E)
    for t, scale in [(rows, Z.square().sum(-1).amax() * W.square().sum()),
                     (cols, W.square().sum(-2).amax() * Z.square().sum())]:
        assert t.isfinite().all() and (t >= 0).all() and t.amax() <= 1e-4 * scale


@pytest.mark.parametrize("where", ["B", "E", "F", "A"])
def test_nan_propagates_as_in_the_reference(where):
    # A NaN in one entry poisons the energies the reference's products carry it to (a row of Z: its own row
    # energy and every column energy through ZᵀZ; a column of W: its own column and every row), in that
    # layer only.
    args = _problem((3,), 37, 70, 3, 3, dtype=torch.float32)
    k = "BEFA".index(where)
    args[k] = args[k].clone()
    args[k][1].view(-1)[7] = float("nan")
    out, exp = _launcher()(*args), reference.tangent_energies(*args)
    for a, e in zip(out, exp):
        assert e.isnan().any() and torch.equal(a.isnan(), e.isnan())
        assert a[[0, 2]].isfinite().all()


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda a: a.update(E=a["E"][..., :2, :]), ValueError,
         r"B \(3, 5, 3\) is \(\.\.\., m, r\) and E \(3, 2, 7\) must be \(\.\.\., r, n\) with the same r"),
        (lambda a: a.update(F=a["F"][..., :4, :]), ValueError, r"F \(3, 4, 3\) must be \(\.\.\., m, r_F\)"),
        (lambda a: a.update(A=a["A"][..., :-1]), ValueError,
         r"A must be \(\.\.\., r_F, n\) = \(\.\.\., 3, 7\) .* got shape \(3, 3, 6\)"),
        (lambda a: a.update(A=a["A"][..., :2, :]), ValueError, r"A must be \(\.\.\., r_F, n\)"),
        (lambda a: a.update(E=a["E"][:2]), ValueError,
         r"the batch dimensions of B, E, F and A do not broadcast"),
        (lambda a: a.update(B=a["B"].int()), TypeError, r"B must be one of float32, float64"),
        (lambda a: a.update(F=a["F"][0, 0]), ValueError, r"F must have at least 2 dimensions"),
    ],
)
def test_rejects_bad_input(mutate, error, match):
    B, E, F, A = _problem((3,), 5, 7, 3, 3, dtype=torch.float32)
    args = dict(B=B, E=E, F=F, A=A)
    mutate(args)
    with pytest.raises(error, match=rf"tangent_energies: {match}"):
        _launcher()(**args)


# ---- registry, dispatch and the optimizer ------------------------------------------------------------


def test_registered_and_dispatched(monkeypatch):
    from lorsum_kernels import triton_kernels

    assert "tangent_energies" in backends.TRITON_OPS
    B, E, F, A = _problem((2,), 5, 7, 3, 3, dtype=torch.float32)
    calls = []
    real = _launcher()

    def spy(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(triton_kernels, "tangent_energies", spy)
    out = ops.tangent_energies(B, E[0], F, A[0], backend="triton")  # broadcast batches reach it unexpanded
    assert len(calls) == 1 and calls[0][1].shape == E[0].shape
    for a, b in zip(out, real(B, E[0], F, A[0])):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    monkeypatch.setenv("LORSUM_BACKEND", "triton")
    ops.tangent_energies(B, E, F, A)
    assert len(calls) == 2
