"""Peak memory of one full training step (forward, backward, optimizer step) per optimizer.

The model is a stack of ``layers`` LoRA layers ``d×d`` (rank ``rank``) with tanh between them, fed
``tokens`` rows. One warm-up step creates the optimizer state; the measured step is the second one, so
the figure includes the state, the X/S cache from forward to ``step()``, and the step's transients.

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the memory allocated
  before the step (model, state, inputs stay allocated and are reported separately).
* CPU: each configuration runs in its own subprocess (``python -m lorsum_kernels.benchmark.memory``);
  the peak resident set is reset through ``/proc/self/clear_refs`` just before the measured step and
  read back as ``VmHWM``, so the figure is the step's peak RSS over the RSS it started from, not the
  import's. Allocator caching makes RSS an upper bound of the live tensors.
"""

from __future__ import annotations

import argparse
import json
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


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return -1


def measure_one(name: str, dim: int, rank: int, layers: int, tokens: int, device: torch.device) -> dict:
    model = build(dim, rank, layers, device)
    x = torch.randn(tokens, dim, device=device)
    opt = lk.create_optimizer(model, name, lr=1e-3)

    def step():
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()

    step()  # creates the optimizer state
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        return dict(optimizer=name, resident_bytes=before, step_peak_bytes=peak, measure="cuda allocator")
    before = _rss_kib("VmRSS:")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    step()
    peak = _rss_kib("VmHWM:")
    return dict(optimizer=name, resident_bytes=before * 1024, step_peak_bytes=(peak - before) * 1024,
                measure="process peak RSS")


def run(optimizers, dim, rank, layers, tokens, device: torch.device) -> list[dict]:
    rows = []
    for name in optimizers:
        if device.type == "cuda":
            rows.append(measure_one(name, dim, rank, layers, tokens, device))
            continue
        cmd = [sys.executable, "-m", "lorsum_kernels.benchmark.memory", "--one", name, "--dim", str(dim),
               "--rank", str(rank), "--layers", str(layers), "--tokens", str(tokens)]
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
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(json.dumps(measure_one(args.one, args.dim, args.rank, args.layers, args.tokens,
                                 torch.device("cpu"))))


if __name__ == "__main__":
    main()
