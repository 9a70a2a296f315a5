"""Peak memory of one full training step (forward, backward, optimizer step) per optimizer.

The model is a stack of ``layers`` LoRA layers ``d×d`` (rank ``rank``) with tanh between them, fed
``tokens`` rows. One warm-up step creates the optimizer state; the measured step is the second one, so
the figure includes the X/S cache from forward to ``step()`` and the step's transients; the optimizer
state (allocated by the first step) is reported separately.

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the memory allocated
  before the step (model, state, inputs stay allocated and are reported separately); the absolute
  ``max_memory_allocated`` of the step is reported beside it. With ``cuda_snapshot``, the allocator's
  history is recorded during the measured step (``torch.cuda.memory._record_memory_history``) and saved
  as a snapshot pickle (``torch.cuda.memory._dump_snapshot``): drop it on https://pytorch.org/memory_viz to
  see every allocation of the step with its Python stack.
* CPU: each configuration runs in its own subprocess (``python -m lorsum_kernels.benchmark.memory``).
  The step's peak is the peak of live tensor bytes above those live before it, from the allocator events
  that ``torch.profiler`` records (the CPU counterpart of ``max_memory_allocated``); the subprocess's peak
  resident set (``ru_maxrss``: imports, model, both steps) is reported beside it. RSS alone was tried and
  rejected: glibc keeps freed pages, so a step's RSS growth depends on what earlier steps left behind.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

import lorsum_kernels as lk

DEFAULT_OPTIMIZERS = ["adamw", "lorsum", "scaled_lorsum", "adaprelora", "scaled_adamw"]


def build(dim: int, rank: int, layers: int, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    blocks = []
    for _ in range(layers):
        layer = lk.LoRALinear(nn.Linear(dim, dim, bias=False), rank, alpha=2 * rank)
        nn.init.normal_(layer.lora_B.weight, std=0.02)
        blocks += [layer, nn.Tanh()]
    return nn.Sequential(*blocks).to(device)


def tensor_peak_bytes(fn) -> int:
    """Peak of live tensor bytes allocated by ``fn`` on the CPU, above what was live before it: the
    running sum of the allocator events that ``torch.profiler`` records with ``profile_memory=True``
    (what ``max_memory_allocated`` is on a GPU)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # The raw kineto events keep every allocation and free in order; the aggregated FunctionEvents do not.
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def check_cuda_snapshot(cuda_snapshot: str | None, device: torch.device) -> None:
    """A snapshot is the CUDA caching allocator's: refuse it, before any work, for another device."""
    if cuda_snapshot is not None and (device.type != "cuda" or not torch.cuda.is_available()):
        raise ValueError(f"cuda_snapshot ({cuda_snapshot}) needs a CUDA device: the snapshot is the CUDA "
                         f"caching allocator's history, and this run is on {device}"
                         + ("" if torch.cuda.is_available() else " (torch.cuda.is_available() is False)"))


@contextlib.contextmanager
def cuda_memory_history(path: str | None, max_entries: int = 200_000):
    """Record the CUDA allocator's events (with Python stacks) inside the block and write them to ``path``
    as a ``torch.cuda.memory._snapshot`` pickle; nothing when ``path`` is None. These are torch's private
    but documented tools (https://pytorch.org/docs/stable/torch_cuda_memory.html)."""
    if path is None:
        yield
        return
    torch.cuda.memory._record_memory_history(max_entries=max_entries)
    try:
        yield
    finally:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.cuda.memory._dump_snapshot(str(target))
        torch.cuda.memory._record_memory_history(enabled=None)


def measure_one(name: str, dim: int, rank: int, layers: int, tokens: int, device: torch.device,
                opt_kw: dict | None = None, cuda_snapshot: str | None = None) -> dict:
    """One optimizer's step memory. ``cuda_snapshot``: a file for the allocator snapshot of the measured
    step (CUDA only; ValueError otherwise)."""
    check_cuda_snapshot(cuda_snapshot, device)
    model = build(dim, rank, layers, device)
    x = torch.randn(tokens, dim, device=device)
    opt = lk.create_optimizer(model, name, lr=1e-3, **(opt_kw or {}))

    def step():
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()

    step()  # creates the optimizer state
    state_bytes = sum(t.numel() * t.element_size() for st in opt.state.values() if isinstance(st, dict)
                      for t in st.values() if isinstance(t, torch.Tensor))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        with cuda_memory_history(cuda_snapshot):
            step()
            torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return dict(optimizer=name, state_bytes=state_bytes, step_peak_bytes=peak - before,
                    cuda_max_allocated_bytes=peak, process_peak_rss_bytes=0, measure="cuda allocator",
                    cuda_snapshot=cuda_snapshot)
    peak = tensor_peak_bytes(step)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return dict(optimizer=name, state_bytes=state_bytes, step_peak_bytes=peak, cuda_max_allocated_bytes=None,
                process_peak_rss_bytes=rss, measure="cpu allocator (profiler)", cuda_snapshot=None)


def run(optimizers, dim, rank, layers, tokens, device: torch.device, opt_kw: dict | None = None,
        cuda_snapshot: str | None = None) -> list[dict]:
    """One row per optimizer; ``opt_kw`` maps an optimizer name to its extra ``create_optimizer`` arguments.
    ``cuda_snapshot``: a folder that gets one allocator snapshot per optimizer, ``<optimizer>.pickle`` (CUDA
    only; ValueError otherwise, before any measurement)."""
    check_cuda_snapshot(cuda_snapshot, device)
    rows = []
    for name in optimizers:
        kw = (opt_kw or {}).get(name, {})
        if device.type == "cuda":
            snapshot = str(Path(cuda_snapshot) / f"{name}.pickle") if cuda_snapshot else None
            rows.append(measure_one(name, dim, rank, layers, tokens, device, kw, snapshot))
            continue
        cmd = [sys.executable, "-m", "lorsum_kernels.benchmark.memory", "--one", name, "--dim", str(dim),
               "--rank", str(rank), "--layers", str(layers), "--tokens", str(tokens), "--opt-kw", repr(kw)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = next((r["step_peak_bytes"] for r in rows if r["optimizer"] == "adamw"), None)
    for r in rows:
        r["vs_adamw"] = r["step_peak_bytes"] / base if base else float("nan")
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="one configuration's step memory (used by lorsum-bench)")
    parser.add_argument("--one", required=True)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--opt-kw", default="{}", help="optimizer keyword arguments, a Python dict literal")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(json.dumps(measure_one(args.one, args.dim, args.rank, args.layers, args.tokens,
                                 torch.device("cpu"), ast.literal_eval(args.opt_kw))))


if __name__ == "__main__":
    main()
