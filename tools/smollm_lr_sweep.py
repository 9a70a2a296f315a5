"""One point of the SmolLM2 (``--lm``) learning-rate sweep in docs/demo_tuning.md ("SmolLM2").

Trains one ``--lm`` default run (30 steps, seed 0) with ``smollm.METHODS[NAME]`` set to the given lr and
keyword arguments, and scores it on validation blocks 32–63, disjoint from blocks 0–31 that the demo
reports, so the sweep does not choose on the reported perplexity. Prints one JSON line.

    python tools/smollm_lr_sweep.py lorsum 0.3 '{}'
    python tools/smollm_lr_sweep.py scaled_lorsum 3 '{"beta2_warmup": true}'
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from lorsum_kernels.demo import bbc, smollm
from lorsum_kernels.demo.runner import Method

TUNING_BLOCKS = slice(smollm.VAL_BLOCKS, 2 * smollm.VAL_BLOCKS)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(smollm.METHODS))
    parser.add_argument("lr", type=float)
    parser.add_argument("kwargs", nargs="?", default="{}", help="JSON keyword arguments of the optimizer")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--base", action="store_true", help="also the untrained model's tuning-block perplexity")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    kwargs = json.loads(args.kwargs)
    smollm.METHODS[args.name] = Method(smollm.METHODS[args.name].label, args.lr, kwargs)
    data = smollm.prepare_data(128, 0)
    articles = bbc.load_articles()
    _, val, _ = bbc.split(articles.labels, 0)
    texts = [articles.texts[i] for i in val.tolist()]
    data["val"] = smollm.token_blocks(texts, smollm.load_tokenizer(), 128, TUNING_BLOCKS.stop)[TUNING_BLOCKS]
    start = time.perf_counter()
    row = smollm.train_run(smollm.LMConfig(args.name, steps=30, baseline=args.base), data)
    print(json.dumps({"name": args.name, "lr": args.lr, "kwargs": kwargs, "tuning_ppl": row["val_ppl"],
                      "base_ppl": row["base_ppl"], "final_loss": row["final_loss"], "step_ms": row["step_ms"],
                      "wall_s": time.perf_counter() - start}))


if __name__ == "__main__":
    main()
