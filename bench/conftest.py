"""Shared benchmark plumbing: every benchmark appends one CSV row per measurement to bench/results/.

A row holds the op, the backend, the configuration, median and p20/p80 of the timings (ms), the device
name, torch/triton versions and the git commit, so a figure in the README can name where it came from.
Run with ``make bench`` (``pytest bench --benchmark-only``).
"""

from __future__ import annotations

import csv
import datetime
import os
import platform
import statistics
import subprocess
from pathlib import Path

import pytest
import torch

RESULTS = Path(__file__).parent / "results"
FIELDS = ["timestamp", "op", "backend", "config", "median_ms", "p20_ms", "p80_ms", "rounds", "device",
          "threads", "torch", "triton", "commit"]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or 'cpu'} ({os.cpu_count()} cores)"


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).parent, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception:
        return "none"


def _percentile(data, q):
    data = sorted(data)
    return data[min(len(data) - 1, max(0, round(q * (len(data) - 1))))]


@pytest.fixture
def record(benchmark, request):
    """Call ``record(file, op, backend, config, device)`` after ``benchmark(...)`` to append its row."""

    def write(file: str, op: str, backend: str, config: str, device: torch.device) -> None:
        data = [t * 1e3 for t in benchmark.stats.stats.data]
        row = dict(
            timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            op=op, backend=backend, config=config,
            median_ms=f"{statistics.median(data):.4f}", p20_ms=f"{_percentile(data, 0.2):.4f}",
            p80_ms=f"{_percentile(data, 0.8):.4f}", rounds=len(data), device=device_name(device),
            threads=torch.get_num_threads(), torch=torch.__version__, triton=_triton_version(), commit=_commit(),
        )
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / file
        new = not path.exists()
        with path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            if new:
                writer.writeheader()
            writer.writerow(row)

    return write
