"""Shared benchmark plumbing: the ``record`` fixture appends one CSV row per measurement to bench/results/.

The row is ``lorsum_kernels.benchmark.results``'s, the schema ``lorsum-bench`` writes too (the op, the
backend, the configuration, median and p20/p80 of the timings in ms, the speedup over the torch reference,
the achieved bandwidth, the timer, then the device, threads, torch/triton versions and git commit of
``lorsum_kernels.benchmark.env``), so a figure in the README names where it came from. Rows go to
``bench/results/lorsum_bench.csv``, the file ``lorsum-bench --out bench/results`` appends to, or to the
folder ``$LORSUM_BENCH_RESULTS`` names (as for ``lorsum-bench``; a trial run that should not touch the
committed rows).
Run with ``make bench`` (``pytest bench --benchmark-only``).
"""

from __future__ import annotations

from pathlib import Path

import os

import pytest
import torch

from lorsum_kernels.benchmark.env import environment
from lorsum_kernels.benchmark.results import SPEED_FIELDS, SPEED_FILE, append, speed_row

RESULTS = Path(os.environ.get("LORSUM_BENCH_RESULTS") or Path(__file__).parent / "results")
_ENV: dict = {}  # per device type, measured once a session
_TORCH_MS: dict = {}  # (op, config, device) -> the reference's median this session: the speedup's base


@pytest.fixture
def record(benchmark):
    """Call ``record(case, backend, device, floor_bytes=None)`` after ``benchmark(...)`` to append its row;
    ``case`` has ``op`` and ``config`` (an ``ops_suite`` case)."""

    def write(case, backend: str, device: torch.device, floor_bytes: int | None = None) -> dict | None:
        if benchmark.disabled:  # --benchmark-disable: the call ran once, untimed; nothing to report
            return None
        env = _ENV.setdefault(device.type, environment(device))
        key = (case.op, case.config, device.type)
        row = speed_row(case, backend, [t * 1e3 for t in benchmark.stats.stats.data], env, "pytest-benchmark",
                        floor_bytes=floor_bytes, torch_median_ms=_TORCH_MS.get(key))
        if backend == "torch":
            _TORCH_MS[key] = row["median_ms"]
        append(RESULTS / SPEED_FILE, SPEED_FIELDS, [row])
        return row

    return write
