"""The Triton ops against the torch reference and the native CUDA kernels, on a CUDA GPU.

Ops: the column sums of squares, the fused K-FAC metric step, the row/column energies of G = SᵀX, the
batched r×r solve, LoRSum's half-steps (torch products around the Triton solve), both token products of
one pass (pair_products, the fused chained-product kernel), AdaPreLoRA's factor solve (torch products
around the Triton ridged solves) and its surrogate energies (tangent_energies: torch Grams, Triton quadratic
forms), at the sizes of bench_native_ops.py. Rows go to bench/results/triton_ops.csv (one per
op, backend and size). Without CUDA everything is skipped: Triton on the CPU is its interpreter, whose
speed means nothing. A backend that is missing for an op (no native CUDA kernel built, no triton) is
skipped for that op.

    .venv/bin/python -m pytest bench/bench_triton_ops.py --benchmark-only -q
"""

from __future__ import annotations

import pytest
import torch

from lorsum_kernels import _native, backends, ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton benchmarks need a CUDA GPU")

BACKENDS = ["torch", "native", "triton"]
DEVICE = torch.device("cuda")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _skip_missing(op: str, backend: str) -> None:
    if backend == "native" and not _native.has_native_op(op, "cuda"):
        pytest.skip(f"no native CUDA kernel for {op}")
    if backend == "triton" and not backends.triton_available():
        pytest.skip("triton is not importable")


def _run(benchmark, record, op, backend, config, fn, rounds=20):
    _skip_missing(op, backend)

    def timed():
        fn()
        torch.cuda.synchronize()  # a launch returns before the kernel ends

    timed()  # compiles the Triton kernel for this shape class outside the timed rounds
    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=2)
    record("triton_ops.csv", op, backend, config, DEVICE)


def _randn(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.randn(*shape, generator=g, device=DEVICE).to(dtype)


# ---- memory-bound: column sums of squares and the K-FAC metric step: (n, T, L) ----------------------
STAT_SIZES = [(1024, 4096, 1), (1024, 512, 24), (4096, 2048, 4)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_name)
@pytest.mark.parametrize("size", STAT_SIZES, ids=lambda s: "n{}_T{}_L{}".format(*s))
def test_col_sq_sums(benchmark, record, size, dtype, backend):
    n, T, L = size
    x = _randn(L, T, n, dtype=dtype)
    _run(benchmark, record, "col_sq_sums", backend, f"n={n} T={T} L={L} {_name(dtype)}",
         lambda: ops.col_sq_sums(x, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_name)
@pytest.mark.parametrize("size", STAT_SIZES, ids=lambda s: "m=n{}_T{}_L{}".format(*s))
def test_kfac_metric_update(benchmark, record, size, dtype, backend):
    d, T, L = size
    X, S = _randn(L, T, d, dtype=dtype, seed=1), _randn(L, T, d, dtype=dtype, seed=2)
    v_in, v_out = torch.rand(L, d, device=DEVICE), torch.rand(L, d, device=DEVICE)
    _run(benchmark, record, "kfac_metric_update", backend, f"m=n={d} T={T} L={L} {_name(dtype)}",
         lambda: ops.kfac_metric_update(X, S, v_in, v_out, 0.95, 1e-3, -0.5, 1 / T, float(T),
                                        backend=backend))


# ---- compute-bound: row/column energies of G = SᵀX: (m = n, T, L) ----------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_name)
@pytest.mark.parametrize("size", [(1024, 512, 4), (1024, 4096, 1), (4096, 512, 1)],
                         ids=lambda s: "m{}_T{}_L{}".format(*s))
def test_row_col_energies(benchmark, record, size, dtype, backend):
    d, T, L = size
    X, S = _randn(L, T, d, dtype=dtype, seed=3), _randn(L, T, d, dtype=dtype, seed=4)
    if backend == "torch":  # the reference computes in one dtype: the functional layer casts X, S once
        X, S = X.float(), S.float()
    _run(benchmark, record, "row_col_energies", backend, f"m=n={d} T={T} L={L} {_name(dtype)}",
         lambda: ops.row_col_energies(X, S, backend=backend), rounds=10)


# ---- batched r×r solve: (r, N, L) ------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("left", [True, False], ids=["left", "right"])
@pytest.mark.parametrize("size", [(16, 1024, 24), (64, 4096, 24), (8, 1024, 1)],
                         ids=lambda s: "r{}_N{}_L{}".format(*s))
def test_spd_solve(benchmark, record, size, left, backend):
    r, N, L = size
    F = _randn(L, r, 4 * r, seed=5)
    gram = F @ F.mT / (4 * r)
    rhs = _randn(L, r, N, seed=6) if left else _randn(L, N, r, seed=6)
    _run(benchmark, record, "spd_solve", backend, f"r={r} N={N} L={L} {'left' if left else 'right'} float32",
         lambda: ops.spd_solve(gram, rhs, left=left, backend=backend))


# ---- LoRSum half-steps, as PSI-LoRA calls them: (m = n, r, T, L) ------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", [(1024, 16, 4096, 1), (1024, 8, 512, 24), (4096, 16, 512, 1)],
                         ids=lambda s: "m{}_r{}_T{}_L{}".format(*s))
@pytest.mark.parametrize("side", ["in", "out"])
def test_half_step(benchmark, record, side, size, backend):
    d, r, T, L = size
    A, B = _randn(L, r, d, seed=7), _randn(L, d, r, seed=8)
    Am, Bm = _randn(L, r, d, seed=9), _randn(L, d, r, seed=10)
    X, S = _randn(L, T, d, seed=11), _randn(L, T, d, seed=12)
    fn = ops.lorsum_update_in if side == "in" else ops.lorsum_update_out
    hat = B if side == "in" else A
    _run(benchmark, record, f"lorsum_update_{side}", backend, f"m=n={d} r={r} T={T} L={L} float32",
         lambda: fn(hat, (A, B), [(X, S.mT), (Am, Bm)], [1.0, -0.1, -0.09], 1e-3, backend=backend))


# ---- both token products of one pass, weight and momentum factors side by side: (m = n, r, T, L) ------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_name)
@pytest.mark.parametrize("size", [(1024, 16, 4096, 1), (1024, 8, 512, 24), (4096, 16, 512, 1), (4096, 64, 2048, 4)],
                         ids=lambda s: "m{}_r{}_T{}_L{}".format(*s))
def test_pair_products(benchmark, record, size, dtype, backend):
    d, r, T, L = size
    X, S = _randn(L, T, d, dtype=dtype, seed=13), _randn(L, T, d, dtype=dtype, seed=14)
    W = torch.cat([_randn(L, d, r, seed=15), _randn(L, d, r, seed=16)], -1)
    V = torch.cat([_randn(L, r, d, seed=17), _randn(L, r, d, seed=18)], -2)
    _run(benchmark, record, "pair_products", backend, f"m=n={d} w=v={2 * r} T={T} L={L} {_name(dtype)}",
         lambda: ops.pair_products(X, S.mT, W, V, backend=backend), rounds=10)


# ---- AdaPreLoRA's H-weighted factor solve: (m = n, r, L) ---------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", [(1024, 8, 24), (4096, 16, 1), (4096, 64, 24)],
                         ids=lambda s: "m{}_r{}_L{}".format(*s))
def test_adaprelora_solve(benchmark, record, size, backend):
    d, r, L = size
    A, B = _randn(L, r, d, seed=19) * d**-0.5, _randn(L, d, r, seed=20) * d**-0.5
    g_A, g_B = _randn(L, r, d, seed=21), _randn(L, d, r, seed=22)
    p = torch.rand(L, d, device=DEVICE) + 0.5
    q = torch.rand(L, d, device=DEVICE) + 0.5
    _run(benchmark, record, "adaprelora_solve", backend, f"m=n={d} r={r} L={L} float32",
         lambda: ops.adaprelora_solve(A, B, g_A, g_B, p, q, ridge=1e-6, backend=backend))


# ---- AdaPreLoRA's surrogate statistics, the energies of B·g_A + g_B·A: (m = n, r, L) -----------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", [(1024, 8, 24), (4096, 16, 1), (4096, 64, 24)],
                         ids=lambda s: "m{}_r{}_L{}".format(*s))
def test_tangent_energies(benchmark, record, size, backend):
    d, r, L = size
    A, B = _randn(L, r, d, seed=23) * d**-0.5, _randn(L, d, r, seed=24) * d**-0.5
    g_A, g_B = _randn(L, r, d, seed=25), _randn(L, d, r, seed=26)
    _run(benchmark, record, "tangent_energies", backend, f"m=n={d} r={r} L={L} float32",
         lambda: ops.tangent_energies(B, g_A, g_B, A, backend=backend))
