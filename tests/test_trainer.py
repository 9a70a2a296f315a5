"""The HF Trainer with the package's optimizers: ``Trainer(optimizers=(create_optimizer(...), sched))``.

A tiny PEFT LoRA Llama (built from a config, random weights, nothing from the hub) learns a toy sequence
task. Checked, for every optimizer of the package:

* the Trainer trains it with gradient accumulation (loss goes down);
* gradient accumulation is the big batch: 2 micro-batches of 4 give the step of one batch of 8 (the
  capture concatenates both micro-batches' rows, Σ Sₖᵀ·Xₖ), up to float rounding of the batched matmuls;
* a run resumed from a mid-training checkpoint, in a fresh process state (new model, new optimizer, new
  Trainer), ends bit-identical to the uninterrupted run in fp32: parameters and optimizer state.

Notes that the tests encode:

* A causal LM is used on purpose: its loss accepts ``num_items_in_batch``, so the Trainer's accumulated
  gradient is that of the big batch's mean loss. A model whose forward takes ``**kwargs`` but ignores
  ``num_items_in_batch`` (e.g. ``BertForSequenceClassification`` in transformers 5.23) gets an accumulated
  gradient ``gradient_accumulation_steps`` times too large (the Trainer then skips its ``1/GA`` scaling):
  harmless for AdamW, but the step of an SGD-like method (LoRSum) scales with it.
* ``max_grad_norm=0``: the Trainer clips ``.grad``, while the capture-based optimizers (LoRSum, Scaled
  LoRSum, AdaPreLoRA with exact statistics, SVDLoRA) build their LoRA step from the captured X and S, so
  clipping would reach only some of the methods.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
    get_linear_schedule_with_warmup,
)

from lorsum_kernels import create_optimizer  # noqa: E402
from lorsum_kernels.optim import OPTIMIZERS  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB, SEQ = 48, 12

# Per-optimizer settings that make a dozen steps of this toy task learn something; everything else is
# the class default. SVDLoRA and ScaledGD are SGD-like on the merged weight: large lr.
SETTINGS = {
    "lorsum": dict(lr=3e-2),  # its step normalised per layer (the default): RMS lr per entry, Adam-like
    "scaled_lorsum": dict(lr=3e-2),
    "svdlora": dict(lr=2.0),
    "adaprelora": dict(lr=3e-2),
    "scaled_gd": dict(lr=2.0),
    "scaled_adamw": dict(lr=3e-2),
}
OTHER_LR = 3e-2  # AdamW on the trainable lm_head copy (the optimizers' "other" group)
NAMES = [name for name in SETTINGS if name in OPTIMIZERS]
# The stateful methods, whose resume also restores method state (metrics, momenta, Adam moments).
RESUME = [name for name in ("lorsum", "scaled_lorsum", "adaprelora", "scaled_adamw") if name in OPTIMIZERS]


def make_model(seed: int = 0, dropout: float = 0.1):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2 * SEQ, attention_dropout=dropout,
    )
    model = LlamaForCausalLM(config)
    lora = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        modules_to_save=["lm_head"],  # a trainable non-LoRA module: the optimizers' "other" AdamW group
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def make_dataset(n: int = 32):
    """Arithmetic progressions mod VOCAB: the next token is predictable from the previous two."""
    g = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(n):
        start = torch.randint(0, VOCAB, (), generator=g)
        step = torch.randint(1, 4, (), generator=g)
        ids = (start + step * torch.arange(SEQ)) % VOCAB
        rows.append({"input_ids": ids, "attention_mask": torch.ones(SEQ, dtype=torch.int64), "labels": ids})
    return rows


def make_trainer(model, name, out, *, batch_size=4, accumulation=2, max_steps=8, **args):
    opt = create_optimizer(model, name, other_lr=OTHER_LR, **SETTINGS[name])
    sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=0, num_training_steps=max_steps)
    targs = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
        max_steps=max_steps, logging_steps=1, report_to=[], use_cpu=True, seed=0, data_seed=0,
        max_grad_norm=0.0, disable_tqdm=True, dataloader_num_workers=0, **{"save_strategy": "no", **args},
    )
    return Trainer(model=model, args=targs, train_dataset=make_dataset(), optimizers=(opt, sched))


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matrices: a second intra-op thread only adds synchronisation, which costs 10-20x on a loaded
    # 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def losses(trainer) -> list[float]:
    return [row["loss"] for row in trainer.state.log_history if "loss" in row]


@pytest.mark.parametrize("name", NAMES)
def test_trainer_trains_with_gradient_accumulation(name, tmp_path):
    model = make_model()
    before = trainable(model)
    trainer = make_trainer(model, name, tmp_path, max_steps=12)
    trainer.train()
    curve = losses(trainer)
    assert len(curve) == 12 and all(torch.isfinite(torch.tensor(curve)))
    assert sum(curve[-3:]) / 3 < 0.9 * sum(curve[:3]) / 3, curve
    after = trainable(model)
    assert all(not torch.equal(before[k], after[k]) for k in before)  # LoRA factors and lm_head all moved
    assert int(trainer.optimizer.optimizer.state["skipped_steps"]) == 0


@pytest.mark.parametrize("name", [n for n in ("lorsum", "adaprelora", "scaled_adamw") if n in OPTIMIZERS])
def test_gradient_accumulation_equals_the_big_batch(name, tmp_path):
    # Same seed, so the same shuffled order: micro-batches (0..3), (4..7) against the batch (0..7). No
    # dropout: masks drawn for 2 x 4 rows are not those drawn for 8.
    small = make_model(dropout=0.0)
    make_trainer(small, name, tmp_path / "ga", batch_size=4, accumulation=2, max_steps=4).train()
    big = make_model(dropout=0.0)
    make_trainer(big, name, tmp_path / "big", batch_size=8, accumulation=1, max_steps=4).train()
    a, b = trainable(small), trainable(big)
    for key in a:
        err = ((a[key] - b[key]).norm() / b[key].norm()).item()
        assert err < 1e-5, (key, err)  # rounding of the matmuls over 4 vs 8 rows, nothing more


def _optimizer_state(trainer) -> list[torch.Tensor]:
    opt = trainer.optimizer.optimizer  # under accelerate's AcceleratedOptimizer
    out = []
    for group in opt.param_groups:
        for p in group["params"]:
            out += [v for _, v in sorted(opt.state[p].items()) if isinstance(v, torch.Tensor)]
    return out


@pytest.mark.parametrize("name", RESUME)
def test_resume_from_a_mid_training_checkpoint_is_bit_identical(name, tmp_path):
    # 32 examples, 4 x 2 per step: 4 steps an epoch. Checkpoint 3 is mid-epoch, so the resume must
    # also skip the right batches and restore the RNG (attention dropout is on).
    full_model = make_model()
    full = make_trainer(full_model, name, tmp_path / "full", save_strategy="steps", save_steps=3)
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-3"
    assert (checkpoint / "optimizer.pt").is_file()

    resumed_model = make_model()
    with torch.no_grad():  # scramble what the checkpoint must restore, to prove it does
        for p in resumed_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    resumed = make_trainer(resumed_model, name, tmp_path / "resumed", save_strategy="steps", save_steps=3)
    params_before = {id(p) for g in resumed.optimizer.param_groups for p in g["params"]}
    resumed.train(resume_from_checkpoint=str(checkpoint))

    # The checkpoint was loaded into the same Parameter objects the optimizer holds.
    assert params_before == {id(p) for p in resumed_model.parameters() if p.requires_grad}
    a, b = trainable(full_model), trainable(resumed_model)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), (key, (a[key] - b[key]).abs().max().item())
    state_a, state_b = _optimizer_state(full), _optimizer_state(resumed)
    assert len(state_a) == len(state_b) > 0
    for x, y in zip(state_a, state_b):
        assert x.dtype == y.dtype and torch.equal(x, y)
    # The resumed Trainer's history starts with the checkpoint's 3 logged steps; the 5 after them were
    # computed anew and are the same losses, to the bit.
    assert len(losses(resumed)) == len(losses(full)) == 8
    assert losses(resumed)[3:] == losses(full)[3:]
