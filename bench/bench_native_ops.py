"""Every native CPU op against its torch reference, same process, realistic sizes.

Ops: LoRSum's half-steps (lorsum_update_in/out with the gradient and a momentum pair, as PSI-LoRA calls
them), the batched r×r solve, the row/column energies of G = SᵀX, the fused K-FAC metric step, the
column sums of squares, AdaPreLoRA's H-weighted factor solve and its surrogate statistics (the row and
column energies of B·E + F·A). Rows go to bench/results/native_ops.csv (one per op, backend and size).

    .venv/bin/python -m pytest bench/bench_native_ops.py --benchmark-only -q
"""

from __future__ import annotations

import pytest
import torch

from lorsum_kernels import _native, ops

pytestmark = pytest.mark.skipif(not _native.has_native_op("lorsum_update_in", "cpu"),
                                reason="native block power ops not built")

BACKENDS = ["torch", "native"]
DTYPES = [torch.float32, torch.bfloat16]


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _run(benchmark, record, op, backend, config, fn, rounds=5):
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1)
    record("native_ops.csv", op, backend, config, torch.device("cpu"))


# ---- LoRSum half-steps: (m = n, r, T, L) -----------------------------------------------------------
HALF_STEP_SIZES = [(1024, 16, 4096, 1), (1024, 8, 512, 24), (1024, 64, 2048, 1), (4096, 16, 512, 1)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("size", HALF_STEP_SIZES, ids=lambda s: "m{}_r{}_T{}_L{}".format(*s))
@pytest.mark.parametrize("side", ["in", "out"])
def test_half_step(benchmark, record, side, size, dtype, backend):
    d, r, T, L = size
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(L, r, d, generator=g), torch.randn(L, d, r, generator=g)
    Am, Bm = torch.randn(L, r, d, generator=g), torch.randn(L, d, r, generator=g)
    X, S = torch.randn(L, T, d, generator=g).to(dtype), torch.randn(L, T, d, generator=g).to(dtype)
    if backend == "torch":  # the reference computes in one dtype: the functional layer casts X, S once
        X, S = X.float(), S.float()
    fn = ops.lorsum_update_in if side == "in" else ops.lorsum_update_out
    hat = B if side == "in" else A
    _run(benchmark, record, f"lorsum_update_{side}", backend, f"m=n={d} r={r} T={T} L={L} {_name(dtype)}",
         lambda: fn(hat, (A, B), [(X, S.mT), (Am, Bm)], [1.0, -0.1, -0.09], 1e-3, backend=backend))


# ---- batched r×r solve: (r, N, L) ------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", [(16, 1024, 24), (64, 4096, 24), (8, 1024, 1)], ids=lambda s: "r{}_N{}_L{}".format(*s))
def test_spd_solve(benchmark, record, size, backend):
    r, N, L = size
    g = torch.Generator().manual_seed(1)
    F = torch.randn(L, r, 4 * r, generator=g)
    gram = F @ F.mT / (4 * r)
    rhs = torch.randn(L, r, N, generator=g)
    _run(benchmark, record, "spd_solve", backend, f"r={r} N={N} L={L} float32",
         lambda: ops.spd_solve(gram, rhs, backend=backend), rounds=20)


# ---- row/column energies of G = SᵀX: (m = n, T, L) -------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("size", [(1024, 512, 4), (1024, 4096, 1), (4096, 512, 1)], ids=lambda s: "m{}_T{}_L{}".format(*s))
def test_row_col_energies(benchmark, record, size, dtype, backend):
    d, T, L = size
    g = torch.Generator().manual_seed(2)
    X, S = torch.randn(L, T, d, generator=g).to(dtype), torch.randn(L, T, d, generator=g).to(dtype)
    _run(benchmark, record, "row_col_energies", backend, f"m=n={d} T={T} L={L} {_name(dtype)}",
         lambda: ops.row_col_energies(X, S, backend=backend), rounds=3)


# ---- diagonal K-FAC metric: statistics, EMA, damping, power: (m = n, T, L) ------------------------
METRIC_SIZES = [(1024, 4096, 1), (1024, 512, 24), (4096, 4096, 1)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("size", METRIC_SIZES, ids=lambda s: "m{}_T{}_L{}".format(*s))
def test_kfac_metric_update(benchmark, record, size, dtype, backend):
    d, T, L = size
    g = torch.Generator().manual_seed(3)
    X, S = torch.randn(L, T, d, generator=g).to(dtype), torch.randn(L, T, d, generator=g).to(dtype)
    v_in, v_out = torch.rand(L, d, generator=g), torch.rand(L, d, generator=g)
    _run(benchmark, record, "kfac_metric_update", backend, f"m=n={d} T={T} L={L} {_name(dtype)}",
         lambda: ops.kfac_metric_update(X, S, v_in, v_out, 0.999, 0.1, 0.5, 1.0 / T, float(T), backend=backend),
         rounds=10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("size", METRIC_SIZES, ids=lambda s: "m{}_T{}_L{}".format(*s))
def test_col_sq_sums(benchmark, record, size, dtype, backend):
    d, T, L = size
    X = torch.randn(L, T, d, generator=torch.Generator().manual_seed(4)).to(dtype)
    _run(benchmark, record, "col_sq_sums", backend, f"n={d} T={T} L={L} {_name(dtype)}",
         lambda: ops.col_sq_sums(X, backend=backend), rounds=10)


# ---- AdaPreLoRA's H-weighted factor solve: (m = n, r, L) -----------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", [(d, r, L) for d in (1024, 4096) for r in (8, 16, 64) for L in (1, 24)],
                         ids=lambda s: "m{}_r{}_L{}".format(*s))
def test_adaprelora_solve(benchmark, record, size, backend):
    if backend == "native" and not _native.has_native_op("adaprelora_solve", "cpu"):
        pytest.skip("native adaprelora_solve not built")
    d, r, L = size
    g = torch.Generator().manual_seed(5)
    A, B = torch.randn(L, r, d, generator=g) * d**-0.5, torch.randn(L, d, r, generator=g) * d**-0.5
    g_A, g_B = torch.randn(L, r, d, generator=g), torch.randn(L, d, r, generator=g)
    p, q = torch.rand(L, d, generator=g) + 0.5, torch.rand(L, d, generator=g) + 0.5
    _run(benchmark, record, "adaprelora_solve", backend, f"m=n={d} r={r} L={L} float32",
         lambda: ops.adaprelora_solve(A, B, g_A, g_B, p, q, ridge=1e-6, backend=backend))


# ---- AdaPreLoRA's surrogate statistics, the energies of B·g_A + g_B·A: (m = n, r, L) -----------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", [(d, r, L) for d in (1024, 4096) for r in (8, 16, 64) for L in (1, 24)],
                         ids=lambda s: "m{}_r{}_L{}".format(*s))
def test_tangent_energies(benchmark, record, size, backend):
    if backend == "native" and not _native.has_native_op("tangent_energies", "cpu"):
        pytest.skip("native tangent_energies not built")
    d, r, L = size
    g = torch.Generator().manual_seed(6)
    A, B = torch.randn(L, r, d, generator=g) * d**-0.5, torch.randn(L, d, r, generator=g) * d**-0.5
    g_A, g_B = torch.randn(L, r, d, generator=g), torch.randn(L, d, r, generator=g)
    _run(benchmark, record, "tangent_energies", backend, f"m=n={d} r={r} L={L} float32",
         lambda: ops.tangent_energies(B, g_A, g_B, A, backend=backend))
