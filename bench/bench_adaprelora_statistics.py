"""What AdaPreLoRA's exact statistics cost against the surrogate (spec/adaprelora.md §3.5, §4).

Times one AdaPreLoRA step's statistics, and the whole functional step for context, with
``statistics="exact"`` (row/column energies of G = SᵀX from the captured X, S, in m×block slabs) and
``statistics="surrogate"`` (energies of B·g_A + g_B·A from the factor gradients), at m = n = 1024, r = 16,
T = 2048 token rows, fp32, one layer, on the CPU (torch backend unless LORSUM_BACKEND says otherwise).

Memory: tracemalloc does not see torch's allocator, so the transient bytes are measured with
``torch.profiler.profile(profile_memory=True)`` (the running sum of the allocator's [memory] events,
outputs included) and stated analytically next to it. Run:

    .venv/bin/python -m pytest bench/bench_adaprelora_statistics.py --benchmark-only

Each test appends a JSON row (median, IQR, peak bytes, and the device, threads, versions and commit of
``lorsum_kernels.benchmark.env``) to bench/results/adaprelora_statistics.jsonl (or to the folder
``$LORSUM_BENCH_RESULTS`` names, as for every benchmark).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from lorsum_kernels.backends import resolve_backend
from lorsum_kernels.benchmark.env import environment
from lorsum_kernels.benchmark.memory import tensor_peak_bytes
from lorsum_kernels.functional import adaprelora_step, exact_statistics, surrogate_statistics

M = N = 1024
R = 16
T = 2048
RESULTS = Path(os.environ.get("LORSUM_BENCH_RESULTS") or Path(__file__).parent / "results")
RESULTS = RESULTS / "adaprelora_statistics.jsonl"


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(1, T, N, generator=g) / N**0.5
    S = torch.randn(1, T, M, generator=g) / T
    A = torch.randn(1, R, N, generator=g) / N**0.5
    B = torch.randn(1, M, R, generator=g) * 0.01
    G = S.mT @ X  # only to build consistent factor gradients for the surrogate; not timed
    g_A, g_B = B.mT @ G, G @ A.mT
    return dict(X=X, S=S, A=A, B=B, g_A=g_A, g_B=g_B)


def _state(momentum: bool = True):
    z = dict(dtype=torch.float32)
    state = {"t": torch.zeros(1, **z), "row_stat": torch.zeros(1, M, **z), "col_stat": torch.zeros(1, N, **z)}
    if momentum:
        state.update(exp_avg_A=torch.zeros(1, R, N, **z), exp_avg_B=torch.zeros(1, M, R, **z))
    return state


def profiled_peak_bytes(fn) -> int:
    """Peak of the allocator's running total during one call (transients plus the outputs)."""
    fn()  # warm up
    return tensor_peak_bytes(fn)


def _record(benchmark, name: str, peak: int, analytic: int | None, **extra) -> None:
    if benchmark.disabled:  # --benchmark-disable: the call ran once, untimed; nothing to report
        return
    stats = benchmark.stats.stats
    row = dict(
        bench=name, m=M, n=N, r=R, T=T, dtype="float32", median_s=stats.median, iqr_s=stats.iqr,
        rounds=stats.rounds, peak_transient_bytes_profiler=peak, transient_bytes_analytic=analytic,
        backend=resolve_backend("auto", "cpu", "row_col_energies"), **environment("cpu"),
        time=time.strftime("%Y-%m-%dT%H:%M:%S"), **extra,
    )
    benchmark.extra_info.update(row)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as fh:
        fh.write(json.dumps(row) + "\n")
    print(f"\n{name}: median {stats.median * 1e3:.2f} ms, peak transient {peak / 2**20:.2f} MiB (profiler)"
          + ("" if analytic is None else f", {analytic / 2**20:.2f} MiB (analytic)"))


@pytest.mark.parametrize("block_size", [256, 64])
def test_statistics_exact(benchmark, problem, block_size):
    X, S = problem["X"], problem["S"]
    fn = lambda: exact_statistics(X, S, block_size=block_size)  # noqa: E731
    peak = profiled_peak_bytes(fn)
    benchmark(fn)
    # Three m×block fp32 slabs (product, square, previous square) + the (m) and (n) outputs.
    analytic = 4 * (3 * M * block_size + M + N)
    _record(benchmark, f"statistics_exact_b{block_size}", peak, analytic, gradient_bytes=4 * M * N)


def test_statistics_surrogate(benchmark, problem):
    p = problem
    fn = lambda: surrogate_statistics(p["A"], p["B"], p["g_A"], p["g_B"])  # noqa: E731
    peak = profiled_peak_bytes(fn)
    benchmark(fn)
    # g/s copies ((m+n)r), Z = [B F] and W = [E; A] (2r(m+n)), Z·(WWᵀ) and (ZᵀZ)·W (2r(m+n)), the
    # elementwise products (2r(m+n)), two 2r×2r Grams and the outputs: an upper bound (some are freed early).
    analytic = 4 * (7 * R * (M + N) + 2 * (2 * R) ** 2 + M + N)
    _record(benchmark, "statistics_surrogate", peak, analytic)


@pytest.mark.parametrize("statistics", ["exact", "surrogate"])
def test_full_step(benchmark, problem, statistics):
    p = problem
    data = dict(X=p["X"], S=p["S"]) if statistics == "exact" else {}
    fn = lambda: adaprelora_step(p["A"], p["B"], p["g_A"], p["g_B"], _state(), lr=1e-3, **data)  # noqa: E731
    peak = profiled_peak_bytes(fn)
    benchmark(fn)
    _record(benchmark, f"step_{statistics}", peak, None, momentum="input",
            backend_env=os.environ.get("LORSUM_BACKEND", ""))
