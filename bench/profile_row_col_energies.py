"""Roofline profile of the Adafactor row/column energies (``row_col_energies``), native against torch.

Why this op is not 2× faster at m = n = 1024: it is not bound by memory traffic. ``G = Sᵀ·X`` takes
``2·T·m·n`` flops and reads ``T·(m+n)`` numbers, so its arithmetic intensity is ``m·n / (2·(m+n))``
flops per byte in fp32 (256 at m = n = 1024), far right of this CPU's ridge point: both backends are
capped by the FMA throughput, which the torch reference (a GEMM per slab, then squares) already reaches.
Only a formula with fewer flops can win, and the token-Gram form ``rows = diag(Sᵀ(XXᵀ)S)`` costs
``4·T²·(m+n)`` flops, fewer than ``2·T·m·n`` only when ``2·T·(m+n) < m·n``.

This script measures, on one thread (the benchmark's setting): the fp32 GEMM throughput (the compute
roof) and the copy bandwidth (the memory roof), then each backend's achieved GFLOP/s and its fraction of
the roofline bound, and a torch.profiler table of the reference showing where its time goes. Times are CPU
time per call (median of ``torch.utils.benchmark`` blocks timed with ``time.process_time``: the shared
``lorsum_kernels.benchmark.timing``), at the fp32 sizes of the shared case list
(``lorsum_kernels.benchmark.ops_suite``, the ones bench/bench_ops.py and ``lorsum-bench`` time); the device
and commit are ``lorsum_kernels.benchmark.env``'s. It writes the report to
``bench/results/row_col_energies_profile.txt``.

    OMP_NUM_THREADS=1 .venv/bin/python bench/profile_row_col_energies.py
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from lorsum_kernels import _native, ops
from lorsum_kernels.benchmark.env import commit, device_name
from lorsum_kernels.benchmark.ops_suite import case_list
from lorsum_kernels.benchmark.timing import time_ms

CASES = case_list("full", [torch.float32], ["row_col_energies"])


def _cpu_time(fn, rounds: int) -> float:
    """Seconds of CPU time per call: the median of at least ``rounds`` blocks, after one untimed call."""
    return statistics.median(time_ms(fn, "cpu", 1, rounds, timer=time.process_time).times_ms) / 1e3


def main() -> str:
    torch.set_num_threads(1)
    lines = [f"row_col_energies roofline, {device_name('cpu')}, 1 thread, torch {torch.__version__}, "
             f"commit {commit()}", ""]
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    gemm = 2 * 2048**3 / _cpu_time(lambda: a @ b, 5) / 1e9
    big = torch.randn(64 * 2**20 // 4)  # 64 MiB: out of cache
    copy_gbs = 2 * big.numel() * 4 / _cpu_time(lambda: big.clone(), 10) / 1e9
    lines.append(f"compute roof: fp32 GEMM 2048^3      {gemm:7.1f} GFLOP/s")
    lines.append(f"memory roof:  64 MiB copy (r + w)   {copy_gbs:7.1f} GB/s  -> ridge {gemm / copy_gbs:.0f} flop/B")
    lines.append("")
    header = (f"{'m=n':>5} {'T':>5} {'L':>2} {'flop/B':>7} {'token-Gram/direct':>17} {'backend':>7} "
              f"{'ms':>8} {'GFLOP/s':>8} {'of roof':>8}")
    lines += [header, "-" * len(header)]
    backends = ["torch"] + (["native"] if _native.has_native_op("row_col_energies", "cpu") else [])
    g = torch.Generator().manual_seed(0)
    for case in CASES:
        d, T, L = case.shape.d, case.shape.T, case.shape.L
        X, S = torch.randn(L, T, d, generator=g), torch.randn(L, T, d, generator=g)
        flops = 2 * T * d * d * L
        bytes_read = 4 * L * T * 2 * d
        intensity = flops / bytes_read
        roof = min(gemm, intensity * copy_gbs)
        gram_ratio = 4 * T * T * 2 * d / (2 * T * d * d)
        for backend in backends:
            sec = _cpu_time(lambda: ops.row_col_energies(X, S, backend=backend), 3)
            rate = flops / sec / 1e9
            lines.append(f"{d:>5} {T:>5} {L:>2} {intensity:>7.0f} {gram_ratio:>17.2f} {backend:>7} "
                         f"{1e3 * sec:>8.1f} {rate:>8.1f} {rate / roof:>7.0%}")
    lines.append("")
    lines.append("GFLOP/s counts the direct formula's 2·T·m·n flops whatever the backend computes; a row above "
                 "100% of the roof took the token-Gram route (fewer flops).")
    lines.append("")
    X, S = torch.randn(4, 512, 1024, generator=g), torch.randn(4, 512, 1024, generator=g)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        ops.row_col_energies(X, S, backend="torch")
    lines.append("torch reference, m = n = 1024, T = 512, L = 4: where the time goes")
    lines.append(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
    return "\n".join(lines)


if __name__ == "__main__":
    report = main()
    print(report)
    out = Path(__file__).parent / "results" / "row_col_energies_profile.txt"
    out.write_text(report + "\n")
    print(f"wrote {out}")
