"""The result rows of the op and step benchmarks: one CSV schema and one writer, for ``lorsum-bench`` and
the pytest benchmarks in bench/.

* ``SPEED_FIELDS``: the columns of a speed row, in order: when, which case (op, backend, config: the
  ``ops_suite`` case's), the per-call times (median, p20, p80 in ms, and how many samples), the speedup
  over the torch reference of the same run (empty when the reference was not timed first), the achieved
  bandwidth over the case's memory-traffic floor and, on a GPU, its fraction of the measured copy bandwidth
  (empty elsewhere), which timer took the samples (``torch.utils.benchmark``, ``triton.testing.do_bench``
  or ``pytest-benchmark``), then ``env.environment``'s device, threads, versions and commit.
* ``SPEED_FILE``: the file speed rows are appended to, in ``lorsum-bench --out`` and in bench/results/.
* ``speed_row(case, backend, times_ms, env, timer, ...)``: one row as a dict.
* ``append(path, fields, rows)``: appends rows, writing the header for a new file. A file whose header lacks
  some of ``fields`` is rewritten once with the wider header: its rows unchanged, the new columns empty, so
  older files (bench/results/native_ops.csv has the columns of this schema but ``speedup_vs_torch``,
  ``gbps``, ``frac_copy_bw`` and ``timer``) stay readable by name. Columns a row lacks are left empty;
  keys the header lacks are dropped.
"""

from __future__ import annotations

import csv
import datetime
from pathlib import Path

from .timing import summary

__all__ = ["SPEED_FIELDS", "SPEED_FILE", "append", "now", "speed_row"]

SPEED_FILE = "lorsum_bench.csv"
SPEED_FIELDS = ["timestamp", "op", "backend", "config", "median_ms", "p20_ms", "p80_ms", "rounds",
                "speedup_vs_torch", "gbps", "frac_copy_bw", "timer", "device", "threads", "torch", "triton",
                "commit"]


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def speed_row(case, backend: str, times_ms: list[float], env: dict, timer: str, *,
              floor_bytes: int | None = None, torch_median_ms: float | None = None,
              copy_gbps: float | None = None, timestamp: str | None = None) -> dict:
    """``case`` has ``op`` and ``config`` (an ``ops_suite.Case`` or ``OpCase``); ``env`` is
    ``env.environment(device)``; ``torch_median_ms`` the reference's median on the same case and run (the
    reference's own row says 1.0)."""
    row = dict(timestamp=timestamp or now(), op=case.op, backend=backend, config=case.config,
               **summary(times_ms), speedup_vs_torch="", gbps="", frac_copy_bw="", timer=timer, **env)
    if backend == "torch":
        row["speedup_vs_torch"] = 1.0
    elif torch_median_ms is not None:
        row["speedup_vs_torch"] = round(torch_median_ms / row["median_ms"], 2)
    if floor_bytes is not None:
        gbps = floor_bytes / (row["median_ms"] * 1e-3) / 1e9
        row["gbps"] = round(gbps, 2)
        if copy_gbps:
            row["frac_copy_bw"] = round(gbps / copy_gbps, 3)
    return row


def append(path: Path, fields: list[str], rows: list[dict]) -> None:
    if not rows:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = list(fields)
    if path.exists() and path.stat().st_size > 0:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            old_rows = list(reader)
            old_header = list(reader.fieldnames or [])
        header = old_header + [name for name in fields if name not in old_header]
        if header != old_header:
            with path.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=header)
                writer.writeheader()
                writer.writerows(old_rows)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)
        f.flush()
