"""The defaults sweep of issue #17: every method's learning rates over three tasks and three training seeds.

Tasks (each scored on data the demos do not report):

* ``bbc``: the demo's BBC News topics, all-MiniLM-L6-v2 + LoRA r=8 on q/k/v, 120 steps x 16 x 64 tokens
  (``minilm.train_run``); validation accuracy (%).
* ``fortunes``: Debian's fortunes by topic (``demo/fortunes.py``; ``apt-get install fortunes``), the same
  model and run; validation accuracy (%).
* ``lm``: SmolLM2-135M + LoRA r=16 on all seven linear modules, 30 steps x 4 x 128 tokens of the BBC train
  articles (``smollm.train_run``); perplexity on validation blocks 32-63, which the ``--lm`` demo does not
  report (lower is better).

Each point (task, method, lr, seed) runs in a process of its own at the class defaults plus ``GRID``'s
keyword arguments (the demos' per-task settings are not used), one CPU thread; ``run`` executes the
points not yet in the results file, ``--jobs`` at a time, seed 0 of every task first, and appends one JSON
line per point, so an interrupted sweep resumes. ``report`` writes the tables of docs/defaults_sweep.md:
the mean over the seeds present per (method, lr, task), the setting each method's rule picks (the one
whose worst task is closest to that task's best for the method: within 1 point of accuracy and 2% of
perplexity on every task, if one is), and each method's lr sensitivity (the lrs within that margin of the
task's best).

    python tools/defaults_sweep.py run --out docs/defaults_sweep.jsonl --jobs 2 [--tasks bbc,fortunes]
    python tools/defaults_sweep.py report docs/defaults_sweep.jsonl > docs/defaults_sweep.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

# lr grid and keyword arguments per method (on top of the class defaults). "lora_one" is LoRA-One's
# initialisation followed by AdaPreLoRA at its lr (classification tasks).
GRID: dict[str, dict] = {
    "adamw": {"lrs": [1e-3, 3e-3, 1e-2], "kwargs": {"weight_decay": 0.0}},
    "lorsum": {"lrs": [0.03, 0.1, 0.3, 1.0], "kwargs": {}},
    "scaled_lorsum": {"lrs": [0.1, 0.3, 1.0, 3.0], "kwargs": {"beta2_warmup": True}},
    "adaprelora": {"lrs": [3e-4, 1e-3, 3e-3], "kwargs": {}},
    "scaled_adamw": {"lrs": [1e-3, 3e-3, 1e-2], "kwargs": {}},
    "lora_one": {"lrs": [3e-4, 1e-3, 3e-3], "kwargs": {}},
}
TASKS = ("bbc", "fortunes", "lm")
HIGHER_IS_BETTER = {"bbc": True, "fortunes": True, "lm": False}
MARGIN = {"bbc": 1.0, "fortunes": 1.0, "lm": 2.0}  # points of accuracy; % of perplexity


def run_point(task: str, method: str, lr: float, seed: int) -> dict:
    """One training run in this process; returns its JSON row."""
    import torch

    from lorsum_kernels.demo import bbc, minilm, smollm
    from lorsum_kernels.demo.runner import Method

    torch.set_num_threads(int(os.environ.get("LORSUM_SWEEP_THREADS", "1")))
    optimizer = "adaprelora" if method == "lora_one" else method
    kwargs = GRID[method]["kwargs"]
    start = time.perf_counter()
    if task in ("bbc", "fortunes"):
        minilm.METHODS[optimizer] = Method(minilm.METHODS[optimizer].label, lr, dict(kwargs))
        data = minilm.prepare_data(64, 0, corpus=task)
        row = minilm.train_run(minilm.RunConfig(optimizer, seed=seed, eval_split="val",
                                                lora_one=method == "lora_one"), data, progress=False)
        metric = 100 * row["accuracy"]
    else:
        if method == "lora_one":
            raise ValueError("lora_one has no LM run yet")
        smollm.METHODS[optimizer] = Method(smollm.METHODS[optimizer].label, lr, dict(kwargs))
        data = smollm.prepare_data(128, 0)
        articles = bbc.load_articles()
        _, val, _ = bbc.split(articles.labels, 0)
        texts = [articles.texts[i] for i in val.tolist()]
        tuning = slice(smollm.VAL_BLOCKS, 2 * smollm.VAL_BLOCKS)
        data["val"] = smollm.token_blocks(texts, smollm.load_tokenizer(), 128, tuning.stop)[tuning]
        row = smollm.train_run(smollm.LMConfig(optimizer, seed=seed, rank=16, targets=smollm.ALL_LINEAR), data)
        metric = row["val_ppl"]
    losses = row["losses"]
    return {"task": task, "method": method, "lr": lr, "kwargs": kwargs, "seed": seed, "metric": metric,
            "final_loss": row["final_loss"], "first_losses": [round(v, 4) for v in losses[:5]],
            "wall_s": round(time.perf_counter() - start, 1)}


def _key(row: dict) -> tuple:
    return row["task"], row["method"], float(row["lr"]), int(row["seed"])


def _read(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run(args) -> None:
    done = {_key(r) for r in _read(args.out)}
    points = [(task, method, lr, seed) for seed in args.seeds for task in args.tasks for method in args.methods
              for lr in GRID[method]["lrs"] if not (task == "lm" and method == "lora_one")]
    todo = [p for p in points if (p[0], p[1], float(p[2]), p[3]) not in done]
    print(f"{len(points)} points, {len(todo)} to run", flush=True)
    lock = threading.Lock()

    def one(point):
        task, method, lr, seed = point
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        cmd = [sys.executable, __file__, "point", task, method, repr(lr), str(seed)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        if out.returncode != 0 or not lines:
            print(f"FAILED {point}: {out.stderr.strip().splitlines()[-1:] }", flush=True)
            return
        with lock:
            with open(args.out, "a") as f:
                f.write(lines[-1] + "\n")
            print(lines[-1], flush=True)

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(one, todo))


def report(args) -> None:
    rows = _read(args.results)
    runs = defaultdict(list)
    for r in rows:
        runs[(r["method"], float(r["lr"]), r["task"])].append(r["metric"])
    tasks = [t for t in TASKS if any(k[2] == t for k in runs)]
    print("Mean over the seeds present (n); accuracy in % (higher is better), perplexity (lower is better).\n")
    print("| method | lr | " + " | ".join(tasks) + " | worst gap / margin |")
    print("|---|---|" + "---|" * len(tasks) + "---|")
    chosen, sensitivity = {}, {}
    for method in GRID:
        lrs = sorted({k[1] for k in runs if k[0] == method})
        if not lrs:
            continue
        mean = {(lr, t): sum(v) / len(v) for (m, lr, t), v in runs.items() if m == method for v in [v]}
        best = {t: (max if HIGHER_IS_BETTER[t] else min)(mean[lr, t] for lr in lrs if (lr, t) in mean)
                for t in tasks if any((lr, t) in mean for lr in lrs)}

        def gap(lr, t):  # in units of the task's margin: 1.0 is the edge of "close to the best"
            if (lr, t) not in mean:
                return float("inf")
            if HIGHER_IS_BETTER[t]:
                return (best[t] - mean[lr, t]) / MARGIN[t]
            return 100 * (mean[lr, t] / best[t] - 1) / MARGIN[t]

        worst = {lr: max(gap(lr, t) for t in best) for lr in lrs}
        chosen[method] = min(lrs, key=lambda lr: worst[lr])
        sensitivity[method] = {t: [lr for lr in lrs if gap(lr, t) <= 1.0] for t in best}
        for lr in lrs:
            cells = []
            for t in tasks:
                n = len(runs.get((method, lr, t), []))
                cells.append(f"{mean[lr, t]:.2f} ({n})" if (lr, t) in mean else "")
            mark = " **chosen**" if lr == chosen[method] else ""
            print(f"| {method} | {lr:g} | " + " | ".join(cells) + f" | {worst[lr]:.2f}{mark} |")
    print("\nlr sensitivity: the lrs of the grid within 1 point (accuracy) or 2% (perplexity) of the method's "
          "best on each task.\n")
    print("| method | " + " | ".join(tasks) + " |")
    print("|---|" + "---|" * len(tasks))
    for method, per_task in sensitivity.items():
        cells = [", ".join(f"{lr:g}" for lr in per_task.get(t, [])) for t in tasks]
        print(f"| {method} | " + " | ".join(cells) + " |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("point")
    p.add_argument("task", choices=TASKS)
    p.add_argument("method", choices=sorted(GRID))
    p.add_argument("lr", type=float)
    p.add_argument("seed", type=int)
    r = sub.add_parser("run")
    r.add_argument("--out", required=True)
    r.add_argument("--jobs", type=int, default=2)
    r.add_argument("--tasks", type=lambda s: s.split(","), default=list(TASKS))
    r.add_argument("--methods", type=lambda s: s.split(","), default=list(GRID))
    r.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=[0, 1, 2])
    q = sub.add_parser("report")
    q.add_argument("results")
    args = parser.parse_args(argv)
    if args.command == "point":
        print(json.dumps(run_point(args.task, args.method, args.lr, args.seed)), flush=True)
    elif args.command == "run":
        run(args)
    else:
        report(args)


if __name__ == "__main__":
    main()
