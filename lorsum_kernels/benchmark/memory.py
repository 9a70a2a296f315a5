"""Peak memory of one full training step (forward, backward, optimizer step) per optimizer.

The model is a stack of ``layers`` LoRA layers ``d×d`` (rank ``rank``) with tanh between them, fed
``tokens`` rows. One warm-up step creates the optimizer state; the measured step is the second one, so
the figure includes the X/S cache from forward to ``step()`` and the step's transients; the optimizer
state (allocated by the first step) is reported separately.

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the memory allocated
  before the step (model, state, inputs stay allocated and are reported separately).
* CPU: each configuration runs in its own subprocess (``python -m lorsum_kernels.benchmark.memory``).
  The step's peak is the peak of live tensor bytes above those live before it, from the allocator events
  that ``torch.profiler`` records (the CPU counterpart of ``max_memory_allocated``); the subprocess's peak
  resident set (``ru_maxrss``: imports, model, both steps) is reported beside it. RSS alone was tried and
  rejected: glibc keeps freed pages, so a step's RSS growth depends on what earlier steps left behind.
"""

from __future__ import annotations

import argparse
import ast
import json
import resource
import subprocess
import sys

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


def measure_one(name: str, dim: int, rank: int, layers: int, tokens: int, device: torch.device,
                opt_kw: dict | None = None) -> dict:
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
        step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        return dict(optimizer=name, state_bytes=state_bytes, step_peak_bytes=peak, process_peak_rss_bytes=0,
                    measure="cuda allocator")
    peak = tensor_peak_bytes(step)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return dict(optimizer=name, state_bytes=state_bytes, step_peak_bytes=peak, process_peak_rss_bytes=rss,
                measure="cpu allocator (profiler)")


def run(optimizers, dim, rank, layers, tokens, device: torch.device, opt_kw: dict | None = None) -> list[dict]:
    """One row per optimizer; ``opt_kw`` maps an optimizer name to its extra ``create_optimizer`` arguments."""
    rows = []
    for name in optimizers:
        kw = (opt_kw or {}).get(name, {})
        if device.type == "cuda":
            rows.append(measure_one(name, dim, rank, layers, tokens, device, kw))
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
