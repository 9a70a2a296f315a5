"""Measurements behind statements in docs/demo_tuning.md and the README's demo section, on the MiniLM task.

``factors``: one demo run (validation split) that also reports how far the LoRA factors travel (relative
change of all A's from their initialisation, norm of all B's) at a few steps, and at the end the largest
eigenvalue of each layer's balanced r×r Grams ``B̄ᵀB̄`` and ``ĀĀᵀ`` (``B̄ = √s·B``, ``Ā = √s·A``), the
matrices Scaled AdamW damps with δ.

``step-split``: the median time of forward + backward and of ``optimizer.step()`` over a few steps.

``metric``: ScaledLoRSum's diagonal metric after a few steps: medians of the EMAs ``v_in``, ``v_out`` and of
the inverse effective metrics ``(v + δ)^(−p)`` over all layers' entries.

    python tools/demo_diagnostics.py factors --optimizer scaled_adamw --lr 3e-3 --kwargs '{"reg": 100}'
    python tools/demo_diagnostics.py step-split --optimizer lorsum
    python tools/demo_diagnostics.py metric --optimizer scaled_lorsum --steps 10

One intra-op thread by default (``--threads``), the setting of the tuning runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from lorsum_kernels.demo import minilm
from lorsum_kernels.demo.runner import lr_schedule


def _setup(args):
    torch.set_num_threads(args.threads)
    data = minilm.prepare_data(64, 0)
    model = minilm.build_model(args.seed, len(data["classes"]))
    model.train()
    lr = minilm.METHODS[args.optimizer].lr if args.lr is None else args.lr
    opt = minilm.make_optimizer(model, args.optimizer, lr, json.loads(args.kwargs) if args.kwargs else None)
    return data, model, opt


def _factors(model, name: str) -> list[torch.Tensor]:
    return [p.detach() for n, p in model.named_parameters() if name in n]


def factors(args) -> None:
    data, model, opt = _setup(args)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(args.steps))
    A0 = [a.clone() for a in _factors(model, "lora_A")]
    a0_norm = torch.stack([a.norm() for a in A0]).norm()
    report = {0, 5, 11, 30, 60, args.steps - 1}
    for i, batch in enumerate(minilm.batch_stream(data["train"], 16, args.steps, args.seed)):
        opt.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        sched.step()
        if i in report:
            dA = torch.stack([(a - a0).norm() for a, a0 in zip(_factors(model, "lora_A"), A0)]).norm()
            B = torch.stack([b.norm() for b in _factors(model, "lora_B")]).norm()
            print(f"step {i:4d}  loss {loss.item():.3f}  ‖A − A0‖/‖A0‖ {dA / a0_norm:.3f}  ‖B‖ {B:.3f}")
    s = minilm.ALPHA / minilm.RANK
    gram_B = [torch.linalg.eigvalsh(s * b.T @ b).max().item() for b in _factors(model, "lora_B")]
    gram_A = [torch.linalg.eigvalsh(s * a @ a.T).max().item() for a in _factors(model, "lora_A")]
    for name, values in (("B̄ᵀB̄", gram_B), ("ĀĀᵀ", gram_A)):
        print(f"largest eigenvalue of {name} over {len(values)} layers: max {max(values):.3f}, "
              f"median {statistics.median(values):.3f}")
    print(f"validation accuracy {100 * minilm.evaluate(model, data['val']):.2f}%")


def step_split(args) -> None:
    data, model, opt = _setup(args)
    forward_backward, step = [], []
    for i, batch in enumerate(minilm.batch_stream(data["train"], 16, args.warmup + args.steps, args.seed)):
        opt.zero_grad()
        start = time.perf_counter()
        model(**batch).loss.backward()
        middle = time.perf_counter()
        opt.step()
        end = time.perf_counter()
        if i >= args.warmup:
            forward_backward.append(middle - start)
            step.append(end - middle)
    fb, st = 1e3 * statistics.median(forward_backward), 1e3 * statistics.median(step)
    print(f"{args.optimizer}: median forward + backward {fb:.0f} ms, optimizer.step() {st:.0f} ms "
          f"({100 * fb / (fb + st):.0f}% of the step in forward + backward), {args.steps} steps, "
          f"{args.threads} thread(s)")


def metric(args) -> None:
    data, model, opt = _setup(args)
    for batch in minilm.batch_stream(data["train"], 16, args.steps, args.seed):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    group = opt.param_groups[0]
    damping, power = group["damping"], group["metric_power"]
    for side in ("in", "out"):
        v = torch.cat([opt.state[layer.A][f"metric_{side}"] for layer in opt._layers])
        inverse = (v + damping).pow(-power)
        print(f"v_{side}: median {v.median():.3g} (min {v.min():.3g}, max {v.max():.3g}); "
              f"M_{side}^-1 = (v + {damping:g})^-{power:g}: median {inverse.median():.3g}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["factors", "step-split", "metric"])
    parser.add_argument("--optimizer", default="scaled_adamw", choices=sorted(minilm.METHODS))
    parser.add_argument("--lr", type=float, default=None, help="default: the demo's")
    parser.add_argument("--kwargs", default=None, help="JSON overrides of the demo's hyperparameters")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="factors: 120; step-split: 6")
    parser.add_argument("--warmup", type=int, default=4, help="step-split: steps not timed")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.what == "factors":
        args.steps = args.steps or 120
        factors(args)
    elif args.what == "metric":
        args.steps = args.steps or 10
        metric(args)
    else:
        args.steps = args.steps or 6
        step_split(args)


if __name__ == "__main__":
    main()
