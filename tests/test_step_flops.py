"""The flop counts the step-cost benchmark compares measured steps with (benchmark/step_flops.py) against
what the cached step actually multiplies, counted by ``torch.utils.flop_counter`` on the torch backend."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import lorsum_kernels as lk
from lorsum_kernels.benchmark.step_flops import gemm_flops_per_second, step_flops

T = 4096  # many tokens against small layers: the r×r solves the count leaves out stay under 5%

CASES = {
    # the plain step: the normalised one (the default) computes a layer's first step 2-4 times
    "lorsum_k1": (lk.LoRSum, dict(iters=1, normalize_step=False)),
    "lorsum_k0_momentum": (lk.LoRSum, dict(iters=0, momentum=0.9, normalize_step=False)),
    "lorsum_k2_momentum_rank": (lk.LoRSum, dict(iters=2, momentum=0.9, momentum_rank=3,
                                                normalize_step=False)),
    "scaled_kfac_momentum": (lk.ScaledLoRSum, dict(iters=1, normalize_step=False)),
    "scaled_shampoo": (lk.ScaledLoRSum, dict(iters=1, metric="shampoo", betas=(0.0, 0.99),
                                             normalize_step=False)),
    "adaprelora_exact": (lk.AdaPreLoRA, dict()),
    "adaprelora_surrogate": (lk.AdaPreLoRA, dict(statistics="surrogate")),
}


def _model():
    torch.manual_seed(0)
    layers = [lk.LoRALinear(nn.Linear(96, 160), 8, 16.0), lk.LoRALinear(nn.Linear(160, 96), 8, 16.0)]
    for layer in layers:
        nn.init.normal_(layer.lora_B.weight, std=0.1)
    return nn.Sequential(layers[0], nn.Tanh(), layers[1])


def _counted_step(name, tokens):
    """(matmul flops torch counts in the cached step, the optimizer) after one backward of ``tokens`` rows."""
    cls, kw = CASES[name]
    model = _model()
    capture = {} if kw.get("statistics") == "surrogate" else {"capture": "cache"}
    opt = cls(model, lr=1e-3, backend="torch", **capture, **kw)
    model(torch.randn(tokens, 96)).square().mean().backward()
    with FlopCounterMode(display=False) as counter:
        opt.step()
    return counter.get_total_flops(), opt


@pytest.mark.parametrize("name", list(CASES))
def test_counted_flops_match_the_cached_step(name):
    counted, opt = _counted_step(name, T)
    expected = step_flops(opt, T)
    if expected == 0:  # no token work: what the step multiplies does not grow with the tokens
        assert _counted_step(name, 2 * T)[0] == counted
        return
    if isinstance(opt, lk.ScaledLoRSum) and opt.param_groups[0]["metric"] == "kfac":
        expected -= sum(2 * T * (layer.in_features + layer.out_features) for layer in opt._layers)  # no matmul
    assert expected <= counted <= 1.05 * expected, (counted, expected)


def test_torch_optimizers_have_no_token_work_and_the_rate_is_positive():
    model = _model()
    assert step_flops(torch.optim.AdamW(model.parameters()), T) == 0
    assert gemm_flops_per_second(64, 64, 64, device=torch.device("cpu")) > 0
