"""How ``lorsum-bench`` and the tools time a call: library timers, not a hand-written loop.

``time_ms(fn, device, warmup, reps)`` -> ``Timing``: per-call times in ms (one sample per timed block),
and the name of the timer that took them.

* On a CUDA device, with triton importable: ``triton.testing.do_bench`` (CUDA events, the L2 cache flushed
  before each run; its default 100 ms of timed runs, more when that gives fewer than ``reps`` samples).
* Otherwise (the CPU; a GPU without a working triton): ``torch.utils.benchmark``'s
  ``Timer.blocked_autorange`` at the process's thread count (the Timer's default is one thread),
  synchronizing CUDA where present. A block runs the call as many times as keeps the timer's overhead
  negligible, so each sample is the mean of one block; blocks are collected for ``min_run_time`` seconds
  and until there are at least ``reps``.
  ``timer=time.process_time`` measures CPU time instead of wall time (the roofline profile's choice).

``warmup`` calls run untimed first (the first Triton launch compiles, ``torch.compile`` traces, the
allocator grows); the library timers add their own short warm-up. ``event_ms(fn)`` times a single call with
CUDA events, for measurements that need other work between calls (a backward before each optimizer
step) that a timer cannot interleave.

``summary(times)``: median and the 20th/80th percentiles (nearest rank), the figures every row reports.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.benchmark import Timer
from torch.utils.benchmark.utils.timer import timer as _default_timer

__all__ = ["Timing", "event_ms", "summary", "time_ms"]


@dataclass
class Timing:
    times_ms: list[float]  # one per sample (a block's mean per call)
    timer: str  # "torch.utils.benchmark" or "triton.testing.do_bench"


def _do_bench():
    try:
        from triton.testing import do_bench

        return do_bench
    except Exception:  # triton absent or broken: torch's timer serves
        return None


def time_ms(fn: Callable[[], object], device: torch.device | str, warmup: int = 2, reps: int = 10, *,
            min_run_time: float = 0.05, timer: Callable[[], float] | None = None) -> Timing:
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    do_bench = _do_bench() if device.type == "cuda" and timer is None else None
    if do_bench is not None:
        try:
            times = do_bench(fn, return_mode="all")
            if len(times) < reps:  # a slow call: give the timed runs the budget reps samples need
                times = do_bench(fn, warmup=0, rep=1.2 * reps * statistics.median(times), return_mode="all")
            return Timing(list(times), "triton.testing.do_bench")
        except Exception:  # triton's runtime unusable here: torch's timer serves (fn's own errors recur)
            pass
    bench = Timer("fn()", globals={"fn": fn}, timer=timer or _default_timer,
                  num_threads=torch.get_num_threads())
    blocks = [bench.blocked_autorange(min_run_time=min_run_time)]
    while (have := sum(len(m.raw_times) for m in blocks)) < reps:  # a slow call: a block took min_run_time
        block_s = statistics.median(blocks[0].raw_times)
        blocks.append(bench.blocked_autorange(min_run_time=(reps - have) * block_s))
    return Timing([1e3 * t for m in blocks for t in m.times], "torch.utils.benchmark")


def event_ms(fn: Callable[[], object]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def _nearest_rank(data: list[float], q: float) -> float:
    data = sorted(data)
    return data[min(len(data) - 1, max(0, round(q * (len(data) - 1))))]


def summary(times_ms: list[float]) -> dict:
    """``{median_ms, p20_ms, p80_ms, rounds}`` of per-call times in ms, rounded to 4 decimals."""
    return dict(median_ms=round(statistics.median(times_ms), 4),
                p20_ms=round(_nearest_rank(times_ms, 0.2), 4), p80_ms=round(_nearest_rank(times_ms, 0.8), 4),
                rounds=len(times_ms))
