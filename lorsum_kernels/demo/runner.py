"""What the real-model demos (``minilm.py``, ``smollm.py``) share: how a run is configured, trained, timed,
isolated in its own process and reported. Task modules import this; it imports no task module.

* ``Method``: an optimizer's demo label, tuned learning rate, keyword arguments and tuning grid.
* ``batch_indices``: the seeded stream of batch indices (per-epoch reshuffles), the same for every run of
  a task so every optimizer sees the same batches in the same order.
* ``lr_schedule``: linear warm-up over the first 10% of the steps, then linear decay to 0.
* ``train_steps``: the timed loop (``zero_grad``, forward, backward, ``step``, scheduler) and its
  ``TrainLog``: per-step losses and times, and the process's RSS before the first step and at its peak.
* ``Runner``: one fresh ``forkserver`` process per run, so ``ru_maxrss`` is that run's alone.
* ``results_table``, ``plot_losses``, ``versions``: the printed table, the loss-curve figure, the versions
  line.
"""

from __future__ import annotations

import os
import resource
import statistics
import textwrap
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from ..benchmark.env import versions as env_versions

# Set before transformers (imported lazily, in the functions) reads them.
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never reach for the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the parent tokenizes before forking runs
# transformers 5.23 warns on every PEFT forward that `is_gradient_checkpointing` is deprecated (PEFT's
# call, nothing the demo can change).
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

__all__ = [
    "Method", "Runner", "TrainLog", "batch_indices", "lr_schedule", "peak_rss_mb", "plot_losses",
    "quiet_transformers", "results_table", "rss_mb", "train_steps", "versions",
]


@dataclass(frozen=True)
class Method:
    label: str
    lr: float | None  # the LoRA factors' learning rate; None: the optimizer class's default
    kwargs: dict = field(default_factory=dict)  # set on top of the class defaults
    grid: tuple = ()  # the points tried: dicts of lr and keyword overrides


def quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def batch_indices(n: int, batch_size: int, steps: int, seed: int) -> Iterator[torch.Tensor]:
    """``steps`` index batches into ``n`` items from seeded per-epoch shuffles (the same stream for every
    run with the same seed)."""
    g = torch.Generator().manual_seed(seed + 1)
    order = torch.empty(0, dtype=torch.int64)
    for _ in range(steps):
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(n, generator=g)])
        idx, order = order[:batch_size], order[batch_size:]
        yield idx


def lr_schedule(steps: int) -> Callable[[int], float]:
    """The LambdaLR factor: linear warm-up over the first 10% of the steps, then linear decay to 0."""
    warmup = max(1, steps // 10)
    return lambda i: (i + 1) / warmup if i < warmup else max(0.0, (steps - i) / max(1, steps - warmup))


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


@dataclass
class TrainLog:
    losses: list[float]
    times: list[float]  # seconds per step: zero_grad, forward, backward, optimizer and scheduler step
    rss_before_mb: float  # the process's RSS just before the first step
    peak_rss_mb: float  # its peak right after the last step (before any evaluation)

    @property
    def final_loss(self) -> float:
        return statistics.fmean(self.losses[-10:])  # one batch's loss is noisy

    @property
    def step_ms(self) -> float:
        return 1e3 * statistics.median(self.times)

    @property
    def train_delta_mb(self) -> float:
        return self.peak_rss_mb - self.rss_before_mb


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, batches: Iterable, steps: int,
                loss_of: Callable[[nn.Module, object], torch.Tensor], desc: str,
                progress: bool = True) -> TrainLog:
    """Train on ``batches`` (``steps`` of them) under ``lr_schedule(steps)``; ``loss_of(model, batch)``."""
    from tqdm.auto import tqdm

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(steps))
    rss_before = rss_mb()
    losses, times = [], []
    bar = tqdm(total=steps, desc=desc, disable=not progress, leave=True, dynamic_ncols=True)
    for batch in batches:
        start = time.perf_counter()
        opt.zero_grad()
        loss = loss_of(model, batch)
        loss.backward()
        opt.step()
        sched.step()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
        bar.update()
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    return TrainLog(losses, times, rss_before, peak_rss_mb())


def _worker(fn, cfg, data, conn) -> None:
    try:
        conn.send(("ok", fn(cfg, data)))
    except BaseException:  # report anything, including KeyboardInterrupt, to the parent
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


class Runner:
    """Runs ``fn(cfg, data)`` in a fresh forkserver child per call (so ``ru_maxrss`` is that run's
    alone), or in this process. ``fn`` must be a module-level function (it is pickled by name)."""

    def __init__(self, fn, subprocess: bool, preload: list[str]):
        self.fn = fn
        self.ctx = None
        if subprocess:
            import multiprocessing as mp

            self.ctx = mp.get_context("forkserver")
            # Imported once in the fork server; each run's process then starts in well under a second.
            self.ctx.set_forkserver_preload(
                ["torch", "transformers", "peft", "tqdm", "lorsum_kernels", *preload])

    def __call__(self, cfg, data: dict) -> dict:
        if self.ctx is None:
            return self.fn(cfg, data)
        parent, child = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=_worker, args=(self.fn, cfg, data, child))
        proc.start()
        child.close()
        try:
            status, payload = parent.recv()
        except EOFError:
            proc.join()
            raise RuntimeError(f"the run {cfg.optimizer} died (exit code {proc.exitcode})") from None
        proc.join()
        if status != "ok":
            raise RuntimeError(f"the run {cfg.optimizer} failed:\n{payload}")
        return payload


def results_table(rows: list[dict], *, label_width: int, metric: str,
                  metric_cell: Callable[[dict], str]) -> str:
    """The markdown table of the runs: method, lr, the task's metric (``metric_cell(row)``, at most 8
    characters), final train loss, median step, peak RSS, Δ train."""
    header = (f"| {'method':<{label_width}} | {'lr':>7} | {metric:>8} | {'final train loss':>16} | "
              f"{'median step':>11} | {'peak RSS':>9} | {'Δ train':>8} |")
    rule = "|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|"
    lines = [header, rule]
    for r in rows:
        lines.append(
            f"| {r['label']:<{label_width}} | {r['lr']:>7.3g} | {metric_cell(r):>8} | "
            f"{r['final_loss']:>16.4f} | {r['step_ms']:>8.0f} ms | {r['peak_rss_mb']:>6.0f} MB | "
            f"{r['train_delta_mb']:>5.0f} MB |"
        )
    return "\n".join(lines)


def plot_losses(rows: list[dict], path: Path, title: str, legend: Callable[[dict], str],
                log_scale: bool) -> None:
    """Each run's train loss (a short moving average: one batch's loss is noisy) against the step."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        losses = torch.tensor(r["losses"])
        k = max(1, min(10, len(losses) // 10))
        smooth = losses.unfold(0, k, 1).mean(1) if len(losses) >= k else losses
        ax.plot(range(k, k + len(smooth)), smooth.tolist(), label=legend(r))
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (moving average)")
    if log_scale:
        ax.set_yscale("log")
    ax.set_title(textwrap.fill(title, 90), fontsize=9)
    ax.grid(True, which="both" if log_scale else "major", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def versions() -> str:
    """The versions line of a demo's report (``lorsum_kernels.benchmark.env``: one helper for every report)."""
    return env_versions("torch", "transformers", "peft")
