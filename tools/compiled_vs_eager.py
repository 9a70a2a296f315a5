"""A PEFT model trained eagerly and under ``torch.compile`` (Inductor by default), step for step: the largest
difference of the LoRA factors after the last step, per optimizer. The capture must hand the compiled
backward's X and S over as copies (Inductor reuses their memory after its op): with the capture of 73836e0
(before 8ee075b) this printed 0.53 for LoRSum and 1.3 for AdaPreLoRA after 3 steps, since 2.8e-7 and 8.3e-7
(AMD EPYC, torch 2.13.0 CPU).

    python tools/compiled_vs_eager.py [--optimizers lorsum,adaprelora] [--steps 3] [--backend inductor]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import lorsum_kernels as lk  # noqa: E402


def tiny_peft_llama() -> torch.nn.Module:
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=32)
    return peft.get_peft_model(transformers.LlamaForCausalLM(config),
                               peft.LoraConfig(r=4, target_modules="all-linear"))


def trained(name: str, steps: int, backend: str | None) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = tiny_peft_llama()
    opt = lk.create_optimizer(model, name)  # before the first compiled forward: the graphs see its hooks
    run = model if backend is None else torch.compile(model, backend=backend)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        run(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    torch.compiler.reset()
    return [p.detach().clone() for p in model.parameters() if p.requires_grad]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizers", default="lorsum,adaprelora")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--backend", default="inductor")
    args = parser.parse_args(argv)
    for name in args.optimizers.split(","):
        eager, compiled = trained(name, args.steps, None), trained(name, args.steps, args.backend)
        diff = max((a - b).abs().max().item() for a, b in zip(eager, compiled))
        print(f"{name}: largest factor difference, {args.backend} against eager after {args.steps} steps: "
              f"{diff:.3g}")


if __name__ == "__main__":
    main()
