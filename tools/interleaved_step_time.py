"""End-to-end step time of a package optimizer against LoRA + AdamW in one process (issue #16).

Two copies of the real-model benchmark's SmolLM2 LoRA model (``benchmark/real_model.build``: r=16 on all
seven linear modules, 4 × 512 random tokens, fp32), one trained with torch's AdamW and one with the named
optimizer at its class defaults, stepped in turn, so that the host's drift (±10% between runs here) hits both
alike. Prints the forward + backward and step() + zero_grad() times per step and the ratio of the medians of
their sums.

    python tools/interleaved_step_time.py lorsum [--kwargs '{"momentum": 0.9}'] [--blocks 30] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from lorsum_kernels import create_optimizer
from lorsum_kernels.benchmark import real_model


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name")
    parser.add_argument("--kwargs", default="{}", help="JSON keyword arguments of the optimizer")
    parser.add_argument("--blocks", type=int, default=30)
    parser.add_argument("--steps", type=int, default=5, help="timed steps each, after 2 warm-up steps")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    models = {"adamw": real_model.build(args.blocks, 16, "none", cpu),
              args.name: real_model.build(args.blocks, 16, "none", cpu)}
    opts = {"adamw": torch.optim.AdamW([p for p in models["adamw"].parameters() if p.requires_grad], lr=3e-3,
                                       weight_decay=0.0),
            args.name: create_optimizer(models[args.name], args.name, **json.loads(args.kwargs))}
    ids = torch.randint(0, models["adamw"].config.vocab_size, (4, 512), generator=torch.Generator().manual_seed(0))
    times = {key: ([], []) for key in models}
    for i in range(2 + args.steps):
        for key, model in models.items():
            t0 = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            t1 = time.perf_counter()
            opts[key].step()
            opts[key].zero_grad()
            t2 = time.perf_counter()
            if i >= 2:
                times[key][0].append(t1 - t0)
                times[key][1].append(t2 - t1)
    for key, (fb, st) in times.items():
        print(f"{key}: fwd+bwd {[round(x, 2) for x in fb]} s (median {statistics.median(fb):.2f}), "
              f"step median {1e3 * statistics.median(st):.0f} ms")
    total = {key: statistics.median([f + s for f, s in zip(*times[key])]) for key in times}
    print(f"end to end {args.name} / adamw = {total[args.name] / total['adamw']:.3f}")


if __name__ == "__main__":
    main()
