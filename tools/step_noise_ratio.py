"""How far above the factors' rounding a normalised step is: the merged-update bound of each layer's step
over ε·‖A‖_F·‖B‖_F (``_numerics.STEP_NOISE_FLOOR`` is 16 of these), at the step after five at lr 1e-3, for a
range of lrs of that step (the conftest's TinyLoRAMLP, 64 × 12 inputs, fp32, the batched finish).

At 2026-12-05 (AMD EPYC, torch 2.13.0 CPU; the two same-shape layers): at lr 1e-3 ~8.5e4–9.7e4, at 1e-6
84–97, at 1e-8 0.9–1.0, and below that LoRSum's bound goes to 0 while ScaledLoRSum's stays at 0.23 on one
layer (its re-solve in the new metric): the steps under the floor, whose size that rounding would set,
measure nothing. ``--effect`` shows what measuring them did (the floor set to 0, as before e57d81d): the
layers' v after one step at 1e-10 over v before it, and their next steps' size over a run without it.

    python tools/step_noise_ratio.py [--lrs 1e-3,1e-6,1e-8,1e-10,1e-12] [--effect]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lorsum_kernels as lk  # noqa: E402
from lorsum_kernels.optim import step_normalization  # noqa: E402
from tests.conftest import TinyLoRAMLP  # noqa: E402


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(64, 12, generator=g), torch.randn(64, 5, generator=g)


def effect(name: str, lr: float, floor: float) -> tuple[list[float], list[float]]:
    """(v after a step at ``lr`` over v before it, the next step's size over a run without it), per layer of
    the two same-shape ones, with the finish's noise floor at ``floor``."""
    x, y = _data()
    saved, step_normalization.NOISE_FLOOR = step_normalization.NOISE_FLOOR, floor
    try:
        runs = []
        for tiny in (True, False):
            torch.manual_seed(0)
            model = TinyLoRAMLP()
            opt = lk.create_optimizer(model, name)
            opt._finishes_in_place = lambda *args: False  # the batched finish (the floor above is its)
            layers = [model.l2, model.l3]
            v = []
            for step_lr in [1e-3] * 5 + ([lr] if tiny else []) + [1e-3]:
                v.append([float(opt.state[m.lora_A.weight]["step_norm_sq"]) for m in layers])
                before = [(m.lora_B.weight @ m.lora_A.weight).detach().clone() for m in layers]
                opt.param_groups[0]["lr"] = step_lr
                ((model(x) - y) ** 2).mean().backward()
                opt.step()
                opt.zero_grad()
            moved = [float((m.lora_B.weight @ m.lora_A.weight - b).norm()) for m, b in zip(layers, before)]
            runs.append((v, moved))
    finally:
        step_normalization.NOISE_FLOOR = saved
    (v, moved), (_, moved_without) = runs
    return [a / b for a, b in zip(v[-1], v[-2])], [a / b for a, b in zip(moved, moved_without)]


def ratios_at(name: str, lr: float) -> list[float]:
    seen: list[float] = []
    bound_of = step_normalization.merged_update_bound

    def spy(A, B, A_new, B_new, *args, **kwargs):
        bound = bound_of(A, B, A_new, B_new, *args, **kwargs)
        unit = torch.finfo(A.dtype).eps * A.flatten(1).norm(dim=1) * B.flatten(1).norm(dim=1)
        seen[:] = (bound / unit).tolist()
        return bound

    x, y = _data()
    torch.manual_seed(0)
    model = TinyLoRAMLP()
    opt = lk.create_optimizer(model, name)
    opt._finishes_in_place = lambda *args: False  # the batched finish, whose bound the spy sees
    step_normalization.merged_update_bound = spy
    try:
        for step_lr in [1e-3] * 5 + [lr]:
            opt.param_groups[0]["lr"] = step_lr
            ((model(x) - y) ** 2).mean().backward()
            opt.step()
            opt.zero_grad()
    finally:
        step_normalization.merged_update_bound = bound_of
    return seen


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizers", default="lorsum,scaled_lorsum")
    parser.add_argument("--lrs", default="1e-3,1e-6,1e-8,1e-10,1e-12")
    parser.add_argument("--effect", action="store_true")
    args = parser.parse_args(argv)
    for name in args.optimizers.split(","):
        if args.effect:
            for floor in (0.0, step_normalization.NOISE_FLOOR):
                v_ratio, step_ratio = effect(name, 1e-10, floor)
                print(f"{name}, one step at lr 1e-10, floor {floor:g}: v after / before",
                      " ".join(f"{r:.3g}" for r in v_ratio), "| next step / without it",
                      " ".join(f"{r:.3g}" for r in step_ratio))
            continue
        for lr in (float(v) for v in args.lrs.split(",")):
            print(f"{name} lr {lr:g}: bound / (eps |A| |B|) per layer:",
                  " ".join(f"{v:.3g}" for v in ratios_at(name, lr)))


if __name__ == "__main__":
    main()
