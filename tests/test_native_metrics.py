"""Native diagonal-metric ops against the reference: the fused K-FAC metric step (kfac_metric_update) and
the row/column energies of G = SᵀX (row_col_energies), from csrc/cpu/diag_metric.cpp and energies.cpp."""

from __future__ import annotations

import pytest
import torch

from lorsum_kernels import _native, ops, reference
from lorsum_kernels.functional import effective_metric, ema, kfac_statistics

from .conftest import rel_err

pytestmark = pytest.mark.skipif(
    not _native.has_native_op("row_col_energies", "cpu"),
    reason=f"native metric ops not built: {_native.native_error}",
)

# (L, T, m, n): odd sizes around the 16-lane vectors and the 128×192 tiles of the energies kernel; the
# ones with 4·T·(m+n) ≤ m·n (T = 1, and (2, 30, 300, 280)) take its T×T-Gram route.
SHAPES = [(1, 37, 5, 123), (3, 1, 123, 5), (1, 512, 256, 123), (3, 37, 256, 256), (2, 300, 129, 193),
          (2, 30, 300, 280)]
IDS = [f"L{L}_T{T}_m{m}_n{n}" for L, T, m, n in SHAPES]


@pytest.fixture(params=["avx512", "generic"])
def cpu_path(request, monkeypatch):
    if request.param == "generic":
        monkeypatch.setenv("LORSUM_CPU_KERNELS", "generic")
    else:
        monkeypatch.delenv("LORSUM_CPU_KERNELS", raising=False)
    return request.param


def _data(L, T, m, n, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(L, T, n, generator=g, dtype=torch.float64).to(dtype)
    S = (torch.randn(L, T, m, generator=g, dtype=torch.float64) * 0.1).to(dtype)
    return X, S


# ---- row/column energies ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_row_col_energies(shape, dtype, cpu_path):
    X, S = _data(*shape, dtype=dtype)
    rows, cols = ops.row_col_energies(X, S, backend="native")
    exact_rows, exact_cols = reference.row_col_energies(X.double(), S.double())
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert rows.dtype == cols.dtype == acc
    assert rows.shape == S.shape[:-2] + S.shape[-1:] and cols.shape == X.shape[:-1][:-1] + X.shape[-1:]
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert rel_err(rows, exact_rows) < tol and rel_err(cols, exact_cols) < tol
    if dtype in (torch.bfloat16, torch.float16):
        # Plain PyTorch in bf16/fp16 (G formed in that dtype) is far less accurate than fp32 accumulation.
        G16 = S.mT @ X
        torch_err = rel_err(G16.float().square().sum(-1), exact_rows)
        assert rel_err(rows, exact_rows) <= 2 * torch_err


def test_row_col_energies_non_contiguous_and_batch_shapes():
    X, S = _data(2, 70, 33, 41)
    wide = torch.randn(2, 70, 50)
    wide[..., 3:44] = X
    Xv, Sv = wide[..., 3:44], S.mT.contiguous().mT  # sliced columns; column-major S
    rows, cols = ops.row_col_energies(Xv, Sv, backend="native")
    er, ec = reference.row_col_energies(X.double(), S.double())
    assert rel_err(rows, er) < 1e-5 and rel_err(cols, ec) < 1e-5
    # Unbatched and multi-dimensional batches.
    r2, c2 = ops.row_col_energies(X[0], S[0], backend="native")
    assert r2.shape == (33,) and rel_err(r2, er[0]) < 1e-5 and rel_err(c2, ec[0]) < 1e-5
    r4, c4 = ops.row_col_energies(X.view(1, 2, 70, 41), S.view(1, 2, 70, 33), backend="native")
    assert r4.shape == (1, 2, 33) and rel_err(r4[0], er) < 1e-5 and rel_err(c4[0], ec) < 1e-5


def test_row_col_energies_empty():
    rows, cols = ops.row_col_energies(torch.empty(3, 0, 4), torch.empty(3, 0, 6), backend="native")
    assert torch.equal(rows, torch.zeros(3, 6)) and torch.equal(cols, torch.zeros(3, 4))


@pytest.mark.parametrize("T", [40, 4], ids=["blocked", "gram-route"])
def test_row_col_energies_nan(T):
    X, S = _data(3, T, 130, 200)
    X[1, T // 2, 150] = float("nan")  # poisons column 150 of G[1], hence every row energy of layer 1
    rows, cols = ops.row_col_energies(X, S, backend="native")
    assert torch.isnan(rows[1]).all() and torch.isnan(cols[1, 150])
    assert torch.isfinite(cols[1, :150]).all() and torch.isfinite(rows[0]).all() and torch.isfinite(rows[2]).all()


def test_row_col_energies_independent_of_thread_count():
    X, S = _data(1, 600, 300, 400)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = ops.row_col_energies(X, S, backend="native")
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(ops.row_col_energies(X, S, backend="native"), serial):
        assert torch.equal(a, b)


def test_row_col_energies_rejects_bad_input():
    with pytest.raises(RuntimeError, match=r"row_col_energies: X .* must be \(\.\.\., T, m\) with the same"):
        torch.ops.lorsum.row_col_energies(torch.ones(3, 5, 4), torch.ones(3, 6, 4))
    with pytest.raises(RuntimeError, match=r"row_col_energies: S must be float32, float64, bfloat16 or float16"):
        torch.ops.lorsum.row_col_energies(torch.ones(5, 4), torch.ones(5, 4, dtype=torch.int32))


# ---- fused K-FAC metric step -----------------------------------------------------------------------


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES[:4], ids=IDS[:4])
def test_kfac_metric_update(shape, dtype, state_dtype):
    L, T, m, n = shape
    X, S = _data(*shape, dtype=dtype)
    g = torch.Generator().manual_seed(9)
    v_in = torch.rand(L, n, generator=g).to(state_dtype)
    v_out = torch.rand(L, m, generator=g).to(state_dtype)
    args = (0.95, 0.1, 0.5, 1.0 / T, float(T))
    out = ops.kfac_metric_update(X, S, v_in, v_out, *args, backend="native")
    ref = reference.kfac_metric_update(X, S, v_in, v_out, *args)
    for a, b in zip(out, ref):
        assert a.dtype == b.dtype == state_dtype and a.shape == b.shape
        assert rel_err(a, b) < (1e-12 if state_dtype == dtype == torch.float64 else 2e-6)
    # It is the functional layer's K-FAC metric step (statistics, EMA, damping, power) in one op.
    stat_in, stat_out = kfac_statistics(X, S, backend="torch")
    new_in = ema(v_in, stat_in, 0.95)
    assert rel_err(out[0], new_in) < 1e-5
    assert rel_err(out[2], effective_metric(new_in, 0.1, 0.5)) < 1e-5
    assert rel_err(out[3], effective_metric(ema(v_out, stat_out, 0.95), 0.1, 0.5)) < 1e-5


def test_kfac_metric_update_nan_and_non_contiguous():
    X, S = _data(2, 50, 20, 30)
    v_in, v_out = torch.ones(30, 2).mT, torch.ones(2, 20)  # a transposed state
    S[0, 4, 4] = float("nan")  # a row that the [:, ::2] view keeps
    out = ops.kfac_metric_update(X[:, ::2], S[:, ::2], v_in, v_out, 0.9, 1e-3, 1.0, 0.04, 25.0, backend="native")
    ref = reference.kfac_metric_update(X[:, ::2], S[:, ::2], v_in, v_out, 0.9, 1e-3, 1.0, 0.04, 25.0)
    assert torch.isnan(out[1][0, 4]) and torch.isnan(out[3][0, 4])
    assert torch.isfinite(out[1][1]).all()
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=0, equal_nan=True)


def test_kfac_metric_update_rejects_bad_input():
    X, S = torch.ones(2, 5, 3), torch.ones(2, 5, 4)
    with pytest.raises(RuntimeError, match=r"kfac_metric_update: v_out must be \(\.\.\., m\)"):
        torch.ops.lorsum.kfac_metric_update(X, S, torch.ones(2, 3), torch.ones(2, 3), 0.9, 0.1, 1.0, 1.0, 1.0)
    with pytest.raises(RuntimeError, match=r"kfac_metric_update: the metric state must be float32 or float64"):
        torch.ops.lorsum.kfac_metric_update(X, S, torch.ones(2, 3).bfloat16(), torch.ones(2, 4), 0.9, 0.1, 1.0,
                                            1.0, 1.0)


# ---- opcheck ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, make",
    [
        ("row_col_energies", lambda: _data(2, 9, 7, 5)),
        ("row_col_energies", lambda: (_data(2, 9, 7, 5)[0].bfloat16(), _data(2, 9, 7, 5)[1].double())),
        ("row_col_energies", lambda: (torch.randn(4, 3).mT, torch.randn(5, 3).mT)),
        ("kfac_metric_update", lambda: (*_data(2, 9, 7, 5), torch.rand(2, 5), torch.rand(2, 7), 0.9, 0.1, 0.5, 0.1, 9.0)),
        ("kfac_metric_update", lambda: (*_data(1, 9, 7, 5, dtype=torch.bfloat16), torch.rand(1, 5).double(),
                                        torch.rand(1, 7).double(), 0.9, 0.0, 1.0, 1.0, 1.0)),
    ],
)
def test_opcheck(name, make):
    torch.library.opcheck(getattr(torch.ops.lorsum, name).default, make())
