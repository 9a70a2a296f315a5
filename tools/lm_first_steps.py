"""The loss over the first steps of SmolLM2-135M with PEFT LoRA r=16 (α=32) on all seven linear modules of
every block, on random-token batches: the sharp-start check of the README's clipping figures (issue #17).

One run per call (one optimizer and its keyword arguments, one CPU thread), the `--lm` demo's 30-step
schedule (linear warm-up over 3 steps), prints one JSON line: the losses, and the last step's
``update_norm`` / ``grad_norm`` when the optimizer keeps them. Needs the demo's model (make demo).

    python tools/lm_first_steps.py lorsum 0.3 '{"max_update_norm": null}' --steps 4
    python tools/lm_first_steps.py adamw 3e-3 '{"weight_decay": 0.0}'
"""

from __future__ import annotations

import argparse
import json

import torch


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name")
    parser.add_argument("lr", type=float)
    parser.add_argument("kwargs", nargs="?", default="{}", help="JSON keyword arguments of the optimizer")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128, help="tokens per sequence (4 sequences a batch)")
    args = parser.parse_args(argv)
    from peft import LoraConfig, get_peft_model

    from lorsum_kernels import create_optimizer
    from lorsum_kernels.demo import smollm
    from lorsum_kernels.demo.runner import lr_schedule

    torch.set_num_threads(1)
    kwargs = json.loads(args.kwargs)
    torch.manual_seed(0)
    base = smollm.load_model()
    torch.manual_seed(0)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(base, lora)
    model.train()
    opt = create_optimizer(model, args.name, lr=args.lr, **kwargs)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(30))
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(args.steps):
        ids = torch.randint(0, base.config.vocab_size, (4, args.tokens), generator=g)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        schedule.step()
        opt.zero_grad()
        losses.append(round(loss.item(), 3))
    norms = {key: float(getattr(opt, key)) for key in ("update_norm", "grad_norm")
             if getattr(opt, key, None) is not None}
    print(json.dumps({"name": args.name, "lr": args.lr, "kwargs": kwargs, "losses": losses, **norms}))


if __name__ == "__main__":
    main()
