"""row_col_energies on every backend against reference.row_col_energies.

Contract: X (..., T, n) and S (..., T, m) with the same batch shape and T give the row and column energies of
G = SᵀX, rows (..., m) = Σ_j G² and cols (..., n) = Σ_i G², without forming G in memory; contiguous, on X's
device, in fp64 if either input is fp64 else fp32 (mixed and half inputs computed in fp32 on their values):
within 1e-5 (fp64: 1e-12) of the exact energies of the same numbers, and bf16 / fp16 far more accurate
than plain PyTorch in that dtype; run-to-run deterministic; non-contiguous views read as their copies; no
tokens give zeros; a NaN reaches exactly the energies whose row or column of G it poisons, in its layer only.
Native: both CPU code paths, the T×T-Gram route, thread-count independence, opcheck and the input checks;
CUDA: inputs on another device refused; Triton: its input checks and dispatch.
"""

from __future__ import annotations

import pytest
import torch

from lorsum_kernels import ops, reference

from ..problems import (NATIVE_CPU, NATIVE_CUDA, TRITON, activations, assert_deterministic,
                        assert_independent_of_thread_count, cpu64, over_backends, per_backend, rel_err,
                        spy_on_launcher, use_cpu_path, with_cpu_paths)

OP = "row_col_energies"
F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
SAME = [(d, d) for d in (F32, F64, BF16, F16)]

# (batch, T, n, m), (X dtype, S dtype). Native: odd sizes around the 16-lane vectors and the 128×192 tiles
# of its kernel, the ones with 4·T·(m+n) ≤ m·n (T = 1, and (2, 30, 300, 280)) taking its T×T-Gram route.
# CUDA: every r-free value of the layer grid (m, n ∈ {5, 123, 256}, T ∈ {1, 37, 512}, L ∈ {1, 3}) and mixed
# dtypes. Triton: small shapes in the interpreter, mixed dtypes (bf16 pairs run upcast in the interpreter,
# its tl.dot mishandles bf16, and on the tensor cores on a GPU), and more than one tile each way with several
# token blocks (the second reduction over tiles).
GRIDS = {
    NATIVE_CPU: with_cpu_paths(NATIVE_CPU, [
        (shape, dtypes) for shape in [((1,), 37, 123, 5), ((3,), 1, 5, 123), ((1,), 512, 123, 256),
                                      ((3,), 37, 256, 256), ((2,), 300, 193, 129), ((2,), 30, 280, 300)]
        for dtypes in SAME]),
    NATIVE_CUDA: with_cpu_paths(NATIVE_CUDA, [
        (shape, dtypes) for shape in [((1,), 37, 123, 5), ((3,), 37, 5, 123), ((1,), 512, 256, 123),
                                      ((3,), 1, 123, 256), ((3,), 512, 5, 5), ((1,), 37, 256, 256),
                                      ((3,), 37, 123, 123)]
        for dtypes in SAME[:3]] + [(((3,), 37, 123, 256), dtypes) for dtypes in [(F32, BF16), (BF16, F16), (F64, F32)]]),
    TRITON: with_cpu_paths(TRITON, [
        (shape, dtypes) for shape in [((), 37, 5, 33), ((2,), 1, 33, 5), ((2, 1), 37, 33, 33)]
        for dtypes in [(F32, F32), (F64, F64), (F32, F64), (BF16, BF16), (F16, F16), (BF16, F32)]]
        + [(((2,), 70, 90, 75), (d, d)) for d in (F32, F64)]),
}


def _id(v):
    (batch, T, n, m), (xd, sd), path = v
    name = lambda d: str(d).removeprefix("torch.")  # noqa: E731
    return f"b{'x'.join(map(str, batch)) or '0'}_T{T}_n{n}_m{m}-{name(xd)}-{name(sd)}-{path}"


def _check(X, S, out):
    """out is row_col_energies(X, S): the reference's shapes and dtype on X's device, contiguous, within the
    fp32 (fp64) target of the exact energies of the same numbers, and for a half dtype within twice the
    error of plain PyTorch in that dtype (G formed in it)."""
    rows, cols = out
    for o, e in zip(out, reference.row_col_energies(X, S)):
        assert o.shape == e.shape and o.dtype == e.dtype and o.device == X.device and o.is_contiguous()
    acc = torch.float64 if torch.float64 in (X.dtype, S.dtype) else torch.float32
    assert rows.dtype == cols.dtype == acc
    assert rows.shape == S.shape[:-2] + S.shape[-1:] and cols.shape == X.shape[:-2] + X.shape[-1:]
    exact_rows, exact_cols = reference.row_col_energies(cpu64(X), cpu64(S))
    tol = 1e-12 if acc == torch.float64 else 1e-5
    assert rel_err(rows, exact_rows) < tol and rel_err(cols, exact_cols) < tol
    if X.dtype == S.dtype and X.dtype in (BF16, F16):
        torch_err = rel_err((S.mT @ X).float().square().sum(-1), exact_rows)
        assert rel_err(rows, exact_rows) <= 2 * torch_err


# ---- accuracy, layouts, edge cases: every backend ----------------------------------------------------------


@per_backend(OP, "shape,dtypes,path", GRIDS, ids=_id)
def test_matches_reference(be, shape, dtypes, path, monkeypatch):
    use_cpu_path(monkeypatch, path)
    X, S = activations(*shape, dtype=dtypes[0], s_dtype=dtypes[1], s_scale=0.1, device=be.device)
    _check(X, S, be.run(OP, X, S))
    assert_deterministic(lambda: be.run(OP, X, S))


@over_backends(OP)
def test_non_contiguous_and_batch_shapes(be):
    # Sliced columns of X and a column-major S: read in place or copied, the results of the contiguous copies.
    X, S = activations(2, 70, 41, 33, dtype=F32, s_scale=0.1, device=be.device)
    wide = torch.randn(2, 70, 50, device=be.device)
    wide[..., 3:44] = X
    rows, cols = be.run(OP, wide[..., 3:44], S.mT.contiguous().mT)
    er, ec = reference.row_col_energies(cpu64(X), cpu64(S))
    assert rel_err(rows, er) < 1e-5 and rel_err(cols, ec) < 1e-5
    # Unbatched and multi-dimensional batches.
    r2, c2 = be.run(OP, X[0], S[0])
    assert r2.shape == (33,) and rel_err(r2, er[0]) < 1e-5 and rel_err(c2, ec[0]) < 1e-5
    r4, c4 = be.run(OP, X.view(1, 2, 70, 41), S.view(1, 2, 70, 33))
    assert r4.shape == (1, 2, 33) and rel_err(r4[0], er) < 1e-5 and rel_err(c4[0], ec) < 1e-5
    # A column-major X and sliced columns of S: the summation order depends on the shapes alone.
    X, S = activations(3, 37, 123, 70, dtype=F32, seed=6, device=be.device)
    X_cm = X.mT.contiguous().mT
    S_sl = torch.cat([S, S], dim=-1)[..., 3:73]
    views = be.run(OP, X_cm, S_sl)
    exp = reference.row_col_energies(cpu64(X), cpu64(S_sl))
    assert rel_err(views[0], exp[0]) < 1e-5 and rel_err(views[1], exp[1]) < 1e-5
    contiguous = be.run(OP, X, S_sl.contiguous())
    assert torch.equal(views[0], contiguous[0]) and torch.equal(views[1], contiguous[1])
    # Tokens contiguous in X, strided S.
    g = torch.Generator().manual_seed(2)
    X = torch.randn(2, 33, 37, generator=g).to(be.device).mT  # (2, 37, 33)
    S = torch.randn(3, 40, 12, generator=g).to(be.device)[1:, 1:38, ::2]  # (2, 37, 6)
    out = be.run(OP, X, S)
    _check(X, S, out)
    for a, b in zip(out, be.run(OP, X.contiguous(), S.contiguous())):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


@over_backends(OP)
@pytest.mark.parametrize("batch,T,n,m", [((2,), 0, 5, 3), ((0,), 7, 5, 3), ((2,), 7, 0, 3), ((3,), 0, 4, 6),
                                         ((3,), 37, 123, 0)], ids=str)
def test_empty(be, batch, T, n, m):
    # No tokens: zero energies; no rows or columns: empty results, and zeros on the other side.
    X, S = activations(batch, T, n, m, dtype=F32, device=be.device)
    rows, cols = be.run(OP, X, S)
    assert rows.shape == batch + (m,) and cols.shape == batch + (n,)
    assert not rows.any() and not cols.any()


@over_backends(OP)
@pytest.mark.parametrize("T", [40, 4], ids=["blocked", "gram-route"])
def test_nan_poisons_one_column_of_G(be, T):
    X, S = activations(3, T, 200, 130, dtype=F32, s_scale=0.1, device=be.device)
    X[1, T // 2, 150] = float("nan")  # poisons column 150 of G[1], hence every row energy of layer 1
    rows, cols = be.run(OP, X, S)
    assert torch.isnan(rows[1]).all() and torch.isnan(cols[1, 150])
    assert torch.isfinite(cols[1, :150]).all() and torch.isfinite(cols[1, 151:]).all()
    assert torch.isfinite(rows[0]).all() and torch.isfinite(rows[2]).all()
    assert torch.isfinite(cols[0]).all() and torch.isfinite(cols[2]).all()


@over_backends(OP)
def test_nan_propagates_like_reference(be):
    X, S = activations(2, 37, 5, 33, dtype=F32, seed=3, device=be.device)
    S[0, 4, 7] = float("nan")  # G[0] row 7 is NaN: rows[0, 7] and every cols[0] entry
    X[1, 2, 3] = float("nan")  # G[1] column 3 is NaN: cols[1, 3] and every rows[1] entry
    out = be.run(OP, X, S)
    for o, e in zip(out, reference.row_col_energies(X, S)):
        assert torch.equal(o.isnan(), e.isnan())
        torch.testing.assert_close(o, e, rtol=1e-5, atol=0, equal_nan=True)
    assert out[0].isnan().sum() == 1 + 33 and out[1].isnan().sum() == 5 + 1


# ---- native CPU: threads, the op's registration, input checks ----------------------------------------------


@over_backends(OP, NATIVE_CPU)
def test_independent_of_thread_count(be):
    X, S = activations(1, 600, 400, 300, dtype=F32, s_scale=0.1)
    assert_independent_of_thread_count(lambda: be.run(OP, X, S))


@over_backends(OP, NATIVE_CPU)
def test_native_rejects_bad_input(be):
    with pytest.raises(RuntimeError, match=r"row_col_energies: X .* must be \(\.\.\., T, m\) with the same"):
        torch.ops.lorsum.row_col_energies(torch.ones(3, 5, 4), torch.ones(3, 6, 4))
    with pytest.raises(RuntimeError, match=r"row_col_energies: S must be float32, float64, bfloat16 or float16"):
        torch.ops.lorsum.row_col_energies(torch.ones(5, 4), torch.ones(5, 4, dtype=torch.int32))


@over_backends(OP, NATIVE_CPU)
@pytest.mark.parametrize(
    "make",
    [
        lambda: activations(2, 9, 5, 7, dtype=F32, s_scale=0.1),
        lambda: (activations(2, 9, 5, 7, dtype=F32)[0].bfloat16(), activations(2, 9, 5, 7, dtype=F64)[1]),
        lambda: (torch.randn(4, 3).mT, torch.randn(5, 3).mT),
    ],
    ids=["fp32", "bf16-fp64", "transposed"],
)
def test_opcheck(be, make):
    torch.library.opcheck(torch.ops.lorsum.row_col_energies.default, make())


# ---- CUDA: the device of the inputs, opcheck ---------------------------------------------------------------


@over_backends(OP, NATIVE_CUDA)
def test_inputs_on_another_device_are_rejected(be):
    X = torch.randn(3, 37, 5, device=be.device)
    with pytest.raises(RuntimeError, match="S must be a CUDA tensor"):
        torch.ops.lorsum.row_col_energies(X, torch.randn(3, 37, 4))


@over_backends(OP, NATIVE_CUDA)
def test_cuda_opcheck(be):
    # Schema, fake (meta) implementation, autograd registration and AOT dispatch on CUDA tensors.
    args = activations(2, 37, 5, 7, dtype=F32, seed=18, device=be.device)
    torch.library.opcheck(torch.ops.lorsum.row_col_energies, args)


# ---- Triton: input checks, dispatch ------------------------------------------------------------------------


def _launcher():
    from lorsum_kernels.triton_kernels import energies

    return energies.row_col_energies


@over_backends(OP, TRITON)
def test_triton_rejects_mismatched_shapes(be):
    X, S = activations(2, 7, 5, 3, dtype=F32, device=be.device)
    with pytest.raises(ValueError, match=r"same batch shape and T"):
        _launcher()(X, S[:, :4])
    with pytest.raises(ValueError, match=r"same batch shape and T"):
        _launcher()(X, S[:1])


@over_backends(OP, TRITON)
def test_dispatch_reaches_the_triton_launcher(be, monkeypatch):
    X, S = activations(2, 7, 5, 3, dtype=F32, device=be.device)
    calls = spy_on_launcher(monkeypatch, OP, _launcher())
    out = ops.row_col_energies(X, S, backend="triton")
    assert len(calls) == 1
    for a, b in zip(out, _launcher()(X, S)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
