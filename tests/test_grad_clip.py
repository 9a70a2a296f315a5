"""``max_grad_norm``: gradient clipping inside the step, for every optimizer of the package (optim/base.py)."""

from __future__ import annotations

import copy

import pytest
import torch

import lorsum_kernels as lk

from .conftest import TinyLoRAMLP
from .test_optim_lorsum import _poison_first_layer_grad, batches, loss_of, merged_grads

CASES = {
    "lorsum": (lk.LoRSum, dict(lr=0.3, iters=1, momentum=0.9)),
    "scaled_lorsum": (lk.ScaledLoRSum, dict(lr=0.3, metric="kfac", normalize_step=False)),
    "scaled_lorsum_normalized": (lk.ScaledLoRSum, dict(lr=1e-2)),
    "svdlora": (lk.SVDLoRA, dict(lr=0.3)),
    "adaprelora_exact": (lk.AdaPreLoRA, dict(lr=1e-2, statistics="exact")),
    "adaprelora_surrogate": (lk.AdaPreLoRA, dict(lr=1e-2, statistics="surrogate")),
    "scaled_adamw": (lk.ScaledAdamW, dict(lr=1e-2)),
    "scaled_gd": (lk.ScaledGD, dict(lr=0.3)),
}


def _model(dtype=torch.float64):
    torch.manual_seed(0)
    return TinyLoRAMLP(dtype=dtype)


def _params(model):
    return [p.detach().clone() for p in model.parameters() if p.requires_grad]


def test_grad_norm_is_the_norm_of_what_the_step_consumes():
    # Capture-based: each layer's weight gradient G = dL/dW, plus the head's .grad.
    model = _model()
    batch = batches(1, dtype=torch.float64)[0]
    expected = torch.stack([g.norm() for g in merged_grads(model, batch)] + [
        p.grad.norm() for p in _head_grads(model, batch)]).norm()
    opt = lk.LoRSum(model, lr=0.1, max_grad_norm=1e9)
    loss_of(model, batch).backward()
    opt.step()
    torch.testing.assert_close(opt.grad_norm.double(), expected, rtol=1e-6, atol=0)


def test_grad_norm_of_gradient_based_methods_is_clip_grad_norm():
    # Methods stepping from .grad clip exactly what torch.nn.utils.clip_grad_norm_ would.
    model = _model()
    batch = batches(1, dtype=torch.float64)[0]
    opt = lk.ScaledAdamW(model, lr=1e-2, max_grad_norm=1e9)
    loss_of(model, batch).backward()
    expected = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1e9)
    opt.step()
    torch.testing.assert_close(opt.grad_norm.double(), expected.double(), rtol=1e-6, atol=0)


def _head_grads(model, batch):
    twin = copy.deepcopy(model)
    loss_of(twin, batch).backward()
    return list(twin.head.parameters())


@pytest.mark.parametrize("name", list(CASES))
def test_clip_above_the_norm_changes_nothing(name):
    cls, kw = CASES[name]
    runs = []
    for clip in (None, 1e9):
        model = _model()
        opt = cls(model, max_grad_norm=clip, **kw)
        for batch in batches(3, dtype=torch.float64):
            opt.zero_grad()
            loss_of(model, batch).backward()
            opt.step()
        runs.append(_params(model))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", list(CASES))
def test_clipped_step_equals_the_step_on_a_rescaled_loss(name):
    # Clipping scales every gradient the step consumes by c = τ / (‖g‖ + 1e-6); training without
    # clipping on c·loss (c taken from the clipped run's norm at that step) must give the same factors.
    cls, kw = CASES[name]
    clipped, plain = _model(), _model()
    tau = 0.05
    opt_c = cls(clipped, max_grad_norm=tau, **kw)
    opt_p = cls(plain, **kw)
    coefficients = []
    for batch in batches(4, dtype=torch.float64):
        opt_c.zero_grad()
        loss_of(clipped, batch).backward()
        opt_c.step()
        c = (tau / (opt_c.grad_norm + 1e-6)).clamp(max=1.0)
        coefficients.append(c.item())
        opt_p.zero_grad()
        (c * loss_of(plain, batch)).backward()
        opt_p.step()
        for a, b in zip(_params(clipped), _params(plain)):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert min(coefficients) < 0.9, "the clip never engaged: the test would not see a wrong factor"


def test_non_finite_norm_skips_the_whole_step():
    # One layer's NaN makes the global norm NaN (as with clip_grad_norm_): nothing moves, all counted.
    model = _model(torch.float32)
    handle = _poison_first_layer_grad(model)
    opt = lk.LoRSum(model, lr=0.1, max_grad_norm=1.0)
    before = _params(model)
    loss_of(model, batches(1)[0]).backward()
    opt.step()
    assert not torch.isfinite(opt.grad_norm)
    for a, b in zip(before, _params(model)):
        assert torch.equal(a, b)
    # one skipped step (counted as GradScaler counts), each LoRA layer's own count too
    assert opt.state["skipped_steps"].item() == 1
    assert all(opt.state[layer.A]["skipped_steps"].item() == 1 for layer in lk.find_lora_layers(model))
    handle.remove()
    opt.zero_grad()
    loss_of(model, batches(1, seed=3)[0]).backward()
    opt.step()
    assert torch.isfinite(opt.grad_norm)
    assert not torch.equal(before[0], _params(model)[0])


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan")])
def test_bad_max_grad_norm_raises(value):
    with pytest.raises(ValueError, match="max_grad_norm"):
        lk.LoRSum(_model(), lr=0.1, max_grad_norm=value)
