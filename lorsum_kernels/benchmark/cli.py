"""``lorsum-bench``: speed of every hot-path op and whole step on every backend present, and peak memory.

    lorsum-bench [--device cpu|cuda] [--dtype float32,bfloat16] [--ops col_sq_sums,...] [--grid quick]
    lorsum-bench --memory [--dim 1024 --rank 16 --layers 8 --tokens 2048] [--optimizers adamw,lorsum,...]

Speed: each (op, configuration, backend) is run ``--warmup`` times, then timed ``--reps`` times (CUDA
events on a GPU, ``perf_counter`` on the CPU). The table gives median and p20/p80 in ms, the speedup
over the torch reference of the same run, the achieved bandwidth over the op's memory-traffic floor and,
on a GPU, that bandwidth as a fraction of the measured device-to-device copy bandwidth. Rows are appended
to ``bench/results/lorsum_bench.csv`` (device, versions, commit) and one PNG per op is drawn next to it
when matplotlib is installed. ``--memory`` measures one training step per optimizer (see ``memory.py``)
and appends to ``bench/results/memory.csv``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from ..backends import BACKENDS, resolve_backend
from . import memory
from .ops_suite import cases

RESULTS = Path(os.environ.get("LORSUM_BENCH_RESULTS", Path.cwd() / "bench" / "results"))
SPEED_FIELDS = ["timestamp", "op", "config", "backend", "median_ms", "p20_ms", "p80_ms", "speedup_vs_torch",
                "gbps", "frac_copy_bw", "device", "torch", "triton", "commit"]
MEMORY_FIELDS = ["timestamp", "optimizer", "config", "step_peak_mib", "vs_adamw", "state_mib",
                 "process_peak_rss_mib", "measure", "device", "torch", "commit"]


def environment(device: torch.device) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or "cpu"
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        name = f"{name} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # triton absent or broken: the benchmark still runs
        triton_version = "none"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=False).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    return dict(device=name, torch=torch.__version__, triton=triton_version, commit=commit)


def time_ms(fn, device: torch.device, warmup: int, reps: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return times


def copy_bandwidth_gbps(device: torch.device) -> float | None:
    """Device-to-device copy bandwidth (read + write) of a 1 GiB buffer: the GPU's practical ceiling."""
    if device.type != "cuda":
        return None
    src = torch.empty(256 * 1024 * 1024, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = statistics.median(time_ms(lambda: dst.copy_(src), device, 3, 10))
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def _quantile(data, q):
    data = sorted(data)
    return data[min(len(data) - 1, round(q * (len(data) - 1)))]


def available_backends(op: str, device: torch.device) -> list[str]:
    names = []
    for name in BACKENDS:
        try:
            resolve_backend(name, device, op)
        except RuntimeError:
            continue
        names.append(name)
    return names


def _append(path: Path, fields: list[str], rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)


def run_speed(args, device: torch.device) -> list[dict]:
    env = environment(device)
    copy_bw = copy_bandwidth_gbps(device)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    rows = []
    for dtype in args.dtype:
        for case in cases(device, dtype, args.grid):
            if args.ops and case.op not in args.ops:
                continue
            medians = {}
            for backend in available_backends(case.dispatch_op, device):
                t = time_ms(lambda b=backend: case.run(b), device, args.warmup, args.reps)
                med = statistics.median(t)
                medians[backend] = med
                gbps = case.floor_bytes / (med * 1e-3) / 1e9
                rows.append(dict(timestamp=now, op=case.op, config=case.config, backend=backend,
                                 median_ms=round(med, 4), p20_ms=round(_quantile(t, 0.2), 4),
                                 p80_ms=round(_quantile(t, 0.8), 4), gbps=round(gbps, 2),
                                 frac_copy_bw=round(gbps / copy_bw, 3) if copy_bw else "", **env))
            for row in rows:
                if row["op"] == case.op and row["config"] == case.config and "torch" in medians:
                    row["speedup_vs_torch"] = round(medians["torch"] / row["median_ms"], 2)
    print(f"device: {env['device']}  torch {env['torch']}  triton {env['triton']}  commit {env['commit']}"
          + (f"  copy bandwidth {copy_bw:.0f} GB/s" if copy_bw else ""))
    header = f"{'op':<20}{'config':<34}{'backend':<8}{'median ms':>10}{'p20':>9}{'p80':>9}{'vs torch':>9}{'GB/s':>8}"
    print(header + ("  frac copy" if copy_bw else ""))
    for r in rows:
        print(f"{r['op']:<20}{r['config']:<34}{r['backend']:<8}{r['median_ms']:>10.3f}{r['p20_ms']:>9.3f}"
              f"{r['p80_ms']:>9.3f}{r.get('speedup_vs_torch', float('nan')):>9.2f}{r['gbps']:>8.1f}"
              + (f"  {r['frac_copy_bw']:.2f}" if copy_bw else ""))
    _append(RESULTS / "lorsum_bench.csv", SPEED_FIELDS, rows)
    if not args.no_plot:
        plot(rows, RESULTS)
    return rows


def plot(rows: list[dict], folder: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots")
        return
    for op in sorted({r["op"] for r in rows}):
        mine = [r for r in rows if r["op"] == op]
        configs = list(dict.fromkeys(r["config"] for r in mine))
        backends = list(dict.fromkeys(r["backend"] for r in mine))
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(configs)), 4))
        width = 0.8 / len(backends)
        for i, backend in enumerate(backends):
            ys = [next((r["median_ms"] for r in mine if r["config"] == c and r["backend"] == backend), 0)
                  for c in configs]
            ax.bar([j + i * width for j in range(len(configs))], ys, width, label=backend)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(configs))], configs, rotation=30, ha="right",
                      fontsize=7)
        ax.set_ylabel("median ms")
        ax.set_yscale("log")
        ax.set_title(f"{op} ({mine[0]['device']})", fontsize=9)
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / f"{op}.png", dpi=110)
        plt.close(fig)


def run_memory(args, device: torch.device) -> list[dict]:
    env = environment(device)
    rows = memory.run(args.optimizers, args.dim, args.rank, args.layers, args.tokens, device)
    cfg = f"{args.layers} layers {args.dim}x{args.dim} r={args.rank} T={args.tokens} fp32"
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    print(f"device: {env['device']}  torch {env['torch']}  commit {env['commit']}\nconfig: {cfg}")
    print(f"{'optimizer':<16}{'step peak MiB':>15}{'vs adamw':>10}{'state MiB':>11}{'process RSS MiB':>17}"
          "  measure")
    out = []
    for r in rows:
        row = dict(timestamp=now, optimizer=r["optimizer"], config=cfg,
                   step_peak_mib=round(r["step_peak_bytes"] / 2**20, 2), vs_adamw=round(r["vs_adamw"], 3),
                   state_mib=round(r["state_bytes"] / 2**20, 3),
                   process_peak_rss_mib=round(r["process_peak_rss_bytes"] / 2**20, 1), measure=r["measure"],
                   **env)
        out.append(row)
        print(f"{row['optimizer']:<16}{row['step_peak_mib']:>15.2f}{row['vs_adamw']:>10.3f}"
              f"{row['state_mib']:>11.3f}{row['process_peak_rss_mib']:>17.1f}  {row['measure']}")
    _append(RESULTS / "memory.csv", MEMORY_FIELDS, out)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="lorsum-bench", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32,bfloat16",
                        type=lambda s: [getattr(torch, name) for name in s.split(",")])
    parser.add_argument("--ops", default="", type=lambda s: [x for x in s.split(",") if x])
    parser.add_argument("--grid", default="full", choices=["full", "quick", "tiny"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--memory", action="store_true", help="peak memory of one training step instead")
    parser.add_argument("--optimizers", default=",".join(memory.DEFAULT_OPTIMIZERS),
                        type=lambda s: s.split(","))
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=2048)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.memory:
        run_memory(args, device)
    else:
        run_speed(args, device)


if __name__ == "__main__":
    main()
