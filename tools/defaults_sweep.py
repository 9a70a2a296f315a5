"""The defaults sweep of issue #17: every method's learning rates over four tasks and three training seeds.

Tasks (each scored on data the demos do not report):

* ``bbc``: the demo's BBC News topics, all-MiniLM-L6-v2 + LoRA r=8 on q/k/v, 120 steps x 16 x 64 tokens
  (``minilm.train_run``); validation accuracy (%).
* ``fortunes``: Debian's fortunes by topic (``demo/fortunes.py``; ``apt-get install fortunes``), the same
  model and run; validation accuracy (%).
* ``lm``: SmolLM2-135M + LoRA r=16 on all seven linear modules, 30 steps x 4 x 128 tokens of the BBC train
  articles (``smollm.train_run``); perplexity on validation blocks 32-63, which the ``--lm`` demo does not
  report (lower is better).
* ``lm_attn``: the same with the ``--lm`` demo's LoRA, r=8 on q/k/v/o only (added after the first three:
  the lr ScaledLoRSum wants differs between the two LM tasks, and the defaults are judged on both demos).

Each point (task, method, lr, seed) runs in a process of its own at the class defaults plus ``GRID``'s
keyword arguments (the demos' per-task settings are not used), one CPU thread; ``run`` executes the
points not yet in the results file, ``--jobs`` at a time, seed 0 of every task first, and appends one JSON
line per point, so an interrupted sweep resumes. ``report`` writes the tables of docs/defaults_sweep.md:
the mean over the seeds present per (method, lr, task), the setting each method's rule picks (the one
whose worst task is closest to that task's best for the method: within 1 point of accuracy and 2% of
perplexity on every task, if one is), and each method's lr sensitivity (the lrs within that margin of the
task's best).

    python tools/defaults_sweep.py run --out docs/defaults_sweep.jsonl --jobs 2 [--tasks bbc,fortunes] [--prune 3]
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

# lr grid and keyword arguments per entry (on top of the class defaults). An entry may name the optimizer
# it runs ("optimizer", default: the entry's name) and start from LoRA-One's initialisation ("lora_one"):
# "lora_one" is LoRA-One followed by AdaPreLoRA at its lr. The entries of one optimizer (and LoRA-One flag)
# form one method: the rule picks one setting among all their points.
GRID: dict[str, dict] = {
    "adamw": {"lrs": [1e-3, 3e-3, 1e-2], "kwargs": {"weight_decay": 0.0}},
    "lorsum": {"lrs": [0.03, 0.1, 0.3, 1.0], "kwargs": {}},
    # the official code's δ and β2 (the class defaults before this sweep) with the β2 warm-up and the step clip
    "scaled_lorsum": {"lrs": [0.1, 0.3, 1.0, 3.0], "kwargs": {
        "beta2_warmup": True, "damping": 0.1, "betas": (0.9, 0.999), "max_update_norm": 1.0}},
    # the official GLUE settings (δ = 1e-5, β2 = 0.99): the metric normalises both sides of the step, which
    # is then invariant to the loss scale as Adam's is, so it needs no step clip; 0.2 is those experiments' lr
    "scaled_lorsum_adaptive": {"lrs": [0.03, 0.1, 0.2, 0.3], "optimizer": "scaled_lorsum", "kwargs": {
        "beta2_warmup": True, "damping": 1e-5, "betas": (0.9, 0.99), "max_update_norm": None}},
    # LoRSum with each layer's step scaled to RMS lr per entry (optim/step_normalization.py): the lr is then
    # the merged weight's step size itself, not a multiple of the gradient (no step clip: it is in those
    # units)
    "lorsum_normalized": {"lrs": [1e-4, 2e-4, 4e-4], "optimizer": "lorsum", "kwargs": {
        "normalize_step": True, "max_update_norm": None}},
    # ScaledLoRSum's metric direction at LoRSum's per-layer normalised size (the adaptive entry's settings)
    "scaled_lorsum_normalized": {"lrs": [1.5e-4, 2e-4, 3e-4], "optimizer": "scaled_lorsum", "kwargs": {
        "beta2_warmup": True, "damping": 1e-5, "betas": (0.9, 0.99), "normalize_step": True,
        "max_update_norm": None}},
    # the same without the low-rank momentum buffer (β1 = 0), whose LoRSum doubles the step's token work
    # (issue #16: ScaledLoRSum's step against LoRSum's at its defaults); 2e-4 ran first (the lr the entry
    # with momentum chose), the others for its lr sensitivity
    "scaled_lorsum_normalized_no_momentum": {
        "lrs": [1.5e-4, 2e-4, 3e-4], "optimizer": "scaled_lorsum", "kwargs": {
            "beta2_warmup": True, "damping": 1e-5, "betas": (0.0, 0.99), "normalize_step": True,
            "max_update_norm": None}},
    "adaprelora": {"lrs": [3e-4, 1e-3, 3e-3], "kwargs": {}},
    "scaled_adamw": {"lrs": [1e-3, 3e-3, 1e-2], "kwargs": {}},
    # after LoRA-One the factors' tangent space holds the gradient's top subspace, so a step at AdaPreLoRA's lr
    # moves the merged weight several times further than from PEFT's init (3e-3 diverges on the LM task)
    "lora_one": {"lrs": [3e-4, 1e-3], "kwargs": {}, "optimizer": "adaprelora", "lora_one": True},
}
TASKS = ("bbc", "fortunes", "lm", "lm_attn")
HIGHER_IS_BETTER = {"bbc": True, "fortunes": True, "lm": False, "lm_attn": False}
MARGIN = {"bbc": 1.0, "fortunes": 1.0, "lm": 2.0, "lm_attn": 2.0}  # points of accuracy; % of perplexity
TIE = 0.05  # margins: worst gaps closer than this are tied, and the smaller mean gap over the tasks wins


def _use_setting(methods: dict, optimizer: str, lr: float, kwargs: dict) -> None:
    """Make a demo's ``METHODS[optimizer]`` the point: the class defaults plus ``kwargs`` at ``lr`` (the
    demo's own per-task settings are replaced)."""
    from lorsum_kernels.demo.runner import Method

    label = methods[optimizer].label if optimizer in methods else optimizer
    methods[optimizer] = Method(label, lr, dict(kwargs))


def run_point(task: str, method: str, lr: float, seed: int) -> dict:
    """One training run in this process; returns its JSON row."""
    import torch

    from lorsum_kernels.demo import bbc, minilm, smollm

    torch.set_num_threads(int(os.environ.get("LORSUM_SWEEP_THREADS", "1")))
    entry = GRID[method]
    optimizer, kwargs, lora_one = entry.get("optimizer", method), entry["kwargs"], entry.get("lora_one", False)
    start = time.perf_counter()
    if task in ("bbc", "fortunes"):
        _use_setting(minilm.METHODS, optimizer, lr, kwargs)
        data = minilm.prepare_data(64, 0, corpus=task)
        row = minilm.train_run(minilm.RunConfig(optimizer, seed=seed, eval_split="val", lora_one=lora_one), data,
                               progress=False)
        metric = 100 * row["accuracy"]
    else:
        _use_setting(smollm.METHODS, optimizer, lr, kwargs)
        data = smollm.prepare_data(128, 0)
        articles = bbc.load_articles()
        _, val, _ = bbc.split(articles.labels, 0)
        texts = [articles.texts[i] for i in val.tolist()]
        tuning = slice(smollm.VAL_BLOCKS, 2 * smollm.VAL_BLOCKS)
        data["val"] = smollm.token_blocks(texts, smollm.load_tokenizer(), 128, tuning.stop)[tuning]
        lora = {"rank": 16, "targets": smollm.ALL_LINEAR} if task == "lm" else {}  # lm_attn: the demo's LoRA
        row = smollm.train_run(smollm.LMConfig(optimizer, seed=seed, lora_one=lora_one, **lora), data)
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
              for lr in GRID[method]["lrs"]]
    todo = [p for p in points if (p[0], p[1], float(p[2]), p[3]) not in done]
    if args.prune is not None:  # settings already that far from their method's best on some task cannot win
        summary = choose(_read(args.out))
        worst = {(e, lr): w for e, s in summary.items() for lr, w in s["worst_present"].items()}
        pruned = [p for p in todo if worst.get((p[1], float(p[2])), 0.0) > args.prune]
        todo = [p for p in todo if p not in pruned]
        print(f"pruned {len(pruned)} points (worst gap over {args.prune:g} margins)", flush=True)
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


def family(entry_name: str) -> str:
    """The method an entry belongs to: its optimizer, or ``lora_one`` for LoRA-One's entries."""
    entry = GRID[entry_name]
    return "lora_one" if entry.get("lora_one") else entry.get("optimizer", entry_name)


def choose(rows: list[dict]) -> dict[str, dict]:
    """Per entry of ``GRID`` with rows: the mean and count per (lr, task), each lr's worst and mean gap in
    margin units against the best of the entry's method (all entries of the same ``family``) on each task,
    the lr sensitivity (the lrs within the margin of that best) and ``chosen``: the lr of the method's
    choice (the smallest worst gap; ties within ``TIE`` go to the smaller mean gap), in the entry holding
    it (None in the method's other entries)."""
    runs = defaultdict(list)
    for r in rows:
        if r["method"] in GRID and float(r["lr"]) in GRID[r["method"]]["lrs"]:  # the grid's points only
            runs[(r["method"], float(r["lr"]), r["task"])].append(r["metric"])
    cells = {e: {(lr, t): (sum(v) / len(v), len(v)) for (m, lr, t), v in runs.items() if m == e} for e in GRID}
    best = {}
    for e, c in cells.items():
        for (lr, t), (mean, _) in c.items():
            key = (family(e), t)
            best[key] = mean if key not in best else (max if HIGHER_IS_BETTER[t] else min)(best[key], mean)
    out = {}
    for e in GRID:
        lrs = sorted({lr for lr, _ in cells[e]})
        if not lrs:
            continue
        tasks = [t for t in TASKS if (family(e), t) in best]

        def gap(lr, t):  # in units of the task's margin: 1.0 is the edge of "close to the best"
            if (lr, t) not in cells[e]:
                return float("inf")
            mean, top = cells[e][lr, t][0], best[family(e), t]
            return ((top - mean) if HIGHER_IS_BETTER[t] else 100 * (mean / top - 1)) / MARGIN[t]

        worst = {lr: max(gap(lr, t) for t in tasks) for lr in lrs}
        mean_gap = {lr: sum(gap(lr, t) for t in tasks) / len(tasks) for lr in lrs}
        present = {lr: max(gap(lr, t) for t in tasks if (lr, t) in cells[e]) for lr in lrs}
        out[e] = dict(cells=cells[e], worst=worst, mean_gap=mean_gap, worst_present=present, sensitivity={t: [lr for lr in lrs if gap(lr, t) <= 1.0]
                                                                 for t in tasks})
    for f in {family(e) for e in out}:
        points = [(s["worst"][lr], s["mean_gap"][lr], e, lr) for e, s in out.items() if family(e) == f
                  for lr in s["worst"]]
        # worst gaps within TIE of the smallest are a tie (seed noise is far larger), broken by the mean gap
        least = min(p[0] for p in points)
        _, _, winner, lr = min((p for p in points if p[0] <= least + TIE), key=lambda p: p[1])
        for e in out:
            if family(e) == f:
                out[e]["chosen"] = lr if e == winner else None
    return out


def report(args) -> None:
    summary = choose(_read(args.results))
    tasks = [t for t in TASKS if any(t == k[1] for s in summary.values() for k in s["cells"])]
    print("Mean over the seeds present (n); accuracy in % (higher is better), perplexity (lower is better).\n")
    print("| method | lr | " + " | ".join(tasks) + " | worst gap / margin |")
    print("|---|---|" + "---|" * len(tasks) + "---|")
    for method, s in summary.items():
        for lr in sorted(s["worst"]):
            cells = [f"{s['cells'][lr, t][0]:.2f} ({s['cells'][lr, t][1]})" if (lr, t) in s["cells"] else ""
                     for t in tasks]
            mark = " **chosen**" if lr == s["chosen"] else ""
            worst = f"{s['worst'][lr]:.2f}"
            if worst == "inf" and s["worst_present"][lr] != float("inf"):  # pruned: not run on every task
                worst = f"≥ {s['worst_present'][lr]:.2f} (not run on every task)"
            print(f"| {method} | {lr:g} | " + " | ".join(cells) + f" | {worst}{mark} |")
    print("\nlr sensitivity: the lrs of the grid within 1 point (accuracy) or 2% (perplexity) of the method's "
          "best on each task.\n")
    print("| method | " + " | ".join(tasks) + " |")
    print("|---|" + "---|" * len(tasks))
    for method, s in summary.items():
        cells = [", ".join(f"{lr:g}" for lr in s["sensitivity"].get(t, [])) for t in tasks]
        print(f"| {method} | " + " | ".join(cells) + " |")
    chosen = {family(e): (e, s["chosen"]) for e, s in summary.items() if s["chosen"] is not None}
    for e, s in summary.items():
        base = chosen.get(GRID[e].get("optimizer", e))
        if not GRID[e].get("lora_one") or s["chosen"] is None or base is None:
            continue
        print(f"\n{e} at its choice (lr {s['chosen']:g}) against {base[0]} at its own (lr {base[1]:g}), "
              "the difference in margin units (negative: LoRA-One is worse).\n")
        print("| task | " + e + " | " + base[0] + " | difference / margin |\n|---|---|---|---|")
        for t in tasks:
            mine, theirs = s["cells"].get((s["chosen"], t)), summary[base[0]]["cells"].get((base[1], t))
            if mine and theirs:
                diff = (mine[0] - theirs[0]) if HIGHER_IS_BETTER[t] else 100 * (1 - mine[0] / theirs[0])
                print(f"| {t} | {mine[0]:.2f} ({mine[1]}) | {theirs[0]:.2f} ({theirs[1]}) | {diff / MARGIN[t]:+.2f} |")


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
    r.add_argument("--prune", type=float, default=None,
                   help="skip the points of a setting whose worst gap on the tasks it has rows for exceeds this")
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
