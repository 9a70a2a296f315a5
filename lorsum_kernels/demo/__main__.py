"""``python -m lorsum_kernels.demo``: the BBC News demos on real models, offline (``make demo``).

Default: topic classification with LoRA on all-MiniLM-L6-v2 with every optimizer of the package, the
LoRA + AdamW baseline and LoRA-One (``minilm.py``); a table on stdout and ``demo_out/`` (table.md,
loss_curves.png, results.json). Under 10 minutes on 2 CPU cores.

Flags: ``--steps N`` / ``--batch-size`` / ``--max-len`` change the run; ``--long`` is a longer run (more
steps, longer inputs: about 4× the time); ``--optimizers adamw,lorsum,...`` picks the runs (``lora_one``
is LoRA-One followed by ``--lora-one-with``, by default the method chosen on validation); ``--lm`` switches to language modelling with
SmolLM2-135M-Instruct on the BBC text, reporting validation perplexity (``smollm.py``; slower, not part
of the 10-minute budget); ``--tune`` reruns the learning-rate grid of docs/demo_tuning.md on the
validation split (about an hour per training seed; ``--seeds 0,1,2`` ranks each point by its mean
over those seeds, as docs/demo_tuning.md did).
"""

from __future__ import annotations

import argparse

from . import minilm, smollm


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def cli(argv=None):
    parser = argparse.ArgumentParser(prog="python -m lorsum_kernels.demo",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--max-len", type=int, default=None, help="tokens per article")
    parser.add_argument("--long", action="store_true", help="a longer run (about 4x the default time)")
    parser.add_argument("--lm", action="store_true", help="SmolLM2-135M language modelling instead")
    parser.add_argument("--optimizers", type=_names, default=None,
                        help=f"comma-separated, from {','.join(minilm.DEFAULT_ORDER)}")
    parser.add_argument("--lora-one-with", default=None, choices=sorted(minilm.METHODS),
                        help=f"the optimizer after LoRA-One's initialisation (default {minilm.LORA_ONE_WITH})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="demo_out")
    parser.add_argument("--in-process", action="store_true",
                        help="run everything in this process (peak RSS is then cumulative over the runs)")
    parser.add_argument("--tune", action="store_true", help="rerun the learning-rate grid on validation")
    parser.add_argument("--seeds", type=lambda t: [int(v) for v in _names(t)], default=None,
                        help="--tune: training seeds per grid point, comma-separated (default: --seed)")
    args = parser.parse_args(argv)

    if args.lm:
        defaults = smollm.LONG if args.long else smollm.DEFAULT
        known = set(smollm.METHODS)
    else:
        defaults = minilm.LONG if args.long else minilm.DEFAULT
        known = set(minilm.DEFAULT_ORDER)
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    unknown = [n for n in args.optimizers if n not in known]
    if unknown:
        parser.error(f"unknown optimizers {unknown}; choose from {sorted(known)}")

    if args.lm:
        return smollm.main(args)
    if args.tune:
        return minilm.tune(args)
    return minilm.main(args)


if __name__ == "__main__":
    cli()
