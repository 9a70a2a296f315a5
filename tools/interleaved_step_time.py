"""Step time of two optimizers on the same model in one process (issue #16).

Two copies of the real-model benchmark's SmolLM2 LoRA model (``benchmark/real_model.build``: r=16 on all
seven linear modules, 4 × 512 random tokens, fp32; ``--model llama7b-blocks``: its two 7B-shaped blocks,
1 × 512 tokens), one per optimizer at its class defaults (or the given
keyword arguments), stepped in turn, so that the host's drift (±10–20% between runs here) hits both alike.
The optimizer named first is compared with the baseline (``--against``, LoRA + AdamW by default; another
package optimizer's name compares two methods' work, e.g. ScaledLoRSum against LoRSum with momentum).
Prints, per optimizer, the forward + backward and step() + zero_grad() times per step, and for a streamed
method the work it did inside backward (its streamed layer steps' time) plus step(); then the ratios of the
medians: end to end (forward + backward + step) and of the step's work.

    python tools/interleaved_step_time.py lorsum [--kwargs '{"momentum": 0.9}'] [--blocks 30] [--steps 5]
    python tools/interleaved_step_time.py scaled_lorsum --against lorsum --against-kwargs '{"momentum": 0.9}'
    python tools/interleaved_step_time.py scaled_lorsum --against lorsum --model llama7b-blocks
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from lorsum_kernels import create_optimizer
from lorsum_kernels.benchmark import real_model


def _optimizer(model, name: str, kwargs: dict):
    if name == "adamw":
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0)
    return create_optimizer(model, name, **kwargs)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name")
    parser.add_argument("--kwargs", default="{}", help="JSON keyword arguments of the optimizer")
    parser.add_argument("--against", default="adamw", help="the baseline optimizer (default: adamw)")
    parser.add_argument("--against-kwargs", default="{}", help="JSON keyword arguments of the baseline")
    parser.add_argument("--model", choices=real_model.MODELS, default="smollm2")
    parser.add_argument("--blocks", type=int, default=None, help="default: 30 (smollm2), 2 (llama7b-blocks)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps each, after 2 warm-up steps")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    runs = [(f"{args.name} {args.kwargs}", args.name, json.loads(args.kwargs)),
            (f"{args.against} {args.against_kwargs}", args.against, json.loads(args.against_kwargs))]
    smollm = args.model == "smollm2"
    blocks = args.blocks or (30 if smollm else 2)
    models = [real_model.build(blocks, 16, "none", cpu, args.model, 512) for _ in runs]
    opts = [_optimizer(model, name, kwargs) for model, (_, name, kwargs) in zip(models, runs)]
    ids = torch.randint(0, models[0].config.vocab_size, (4 if smollm else 1, 512),
                        generator=torch.Generator().manual_seed(0))
    streamed = [{"s": 0.0} for _ in runs]
    times = [([], [], []) for _ in runs]  # forward + backward, step() + zero_grad(), streamed work
    for i in range(2 + args.steps):
        if i == 2:  # the streamed methods stream from the second step on (capture="auto")
            for opt, total in zip(opts, streamed):
                real_model.time_streamed_work(opt, total, lambda: None)
        for model, opt, total, (fb, st, work) in zip(models, opts, streamed, times):
            total["s"] = 0.0
            fwd_bwd, step = real_model.timed_train_step(model, opt, ids)
            if i >= 2:
                fb.append(fwd_bwd)
                st.append(step)
                work.append(total["s"] + step)
    for (label, _, _), (fb, st, work) in zip(runs, times):
        print(f"{label}: fwd+bwd {[round(x, 2) for x in fb]} s (median {statistics.median(fb):.2f}), "
              f"step median {1e3 * statistics.median(st):.0f} ms, work (streamed + step) median "
              f"{1e3 * statistics.median(work):.0f} ms")
    end_to_end = [statistics.median([f + s for f, s in zip(fb, st)]) for fb, st, _ in times]
    work = [statistics.median(w) for _, _, w in times]
    print(f"end to end {runs[0][0]} / {runs[1][0]} = {end_to_end[0] / end_to_end[1]:.3f}")
    print(f"work {runs[0][0]} / {runs[1][0]} = {work[0] / work[1]:.3f}")


if __name__ == "__main__":
    main()
