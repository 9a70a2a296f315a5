"""torch.amp.GradScaler with every optimizer of the package (``_step_supports_amp_scaling``).

The scaler multiplies the loss, so the captured output-gradients S and every ``.grad`` arrive scaled; the
optimizer unscales all of them itself. A scaled step must equal the unscaled one, an inf/NaN gradient must
skip everything (and make the scaler back off), and ``scaler.unscale_`` before the step, which cannot
reach S, must be refused before anything changes for the methods that step from S.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorsum_kernels as lk

from .conftest import TinyLoRAMLP, rel_err

CONFIGS = {
    "lorsum": (lk.LoRSum, dict(lr=0.3, iters=2, momentum=0.9)),
    "scaled_lorsum_kfac": (lk.ScaledLoRSum, dict(lr=0.3, metric="kfac", normalize_step=False)),
    "scaled_lorsum_shampoo": (lk.ScaledLoRSum, dict(lr=0.3, metric="shampoo", normalize_step=False)),
    "scaled_lorsum_normalized": (lk.ScaledLoRSum, dict(lr=1e-2)),  # the class default's normalised step
    "svdlora": (lk.SVDLoRA, dict(lr=0.3)),
    "adaprelora_exact": (lk.AdaPreLoRA, dict(lr=1e-2)),
    "adaprelora_surrogate": (lk.AdaPreLoRA, dict(lr=1e-2, statistics="surrogate")),
    "scaled_gd": (lk.ScaledGD, dict(lr=0.1)),
    "scaled_adamw": (lk.ScaledAdamW, dict(lr=1e-2)),
}
GRAD_ONLY = {"adaprelora_surrogate", "scaled_gd", "scaled_adamw"}


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, 7, 12, generator=g), torch.randint(0, 5, (2, 7), generator=g)) for _ in range(n)]


def loss_of(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())


def make_pair(name, **extra):
    torch.manual_seed(0)
    model = TinyLoRAMLP()
    twin = copy.deepcopy(model)
    cls, kw = CONFIGS[name]
    return model, cls(model, other_lr=1e-2, **kw, **extra), twin, cls(twin, other_lr=1e-2, **kw, **extra)


@pytest.mark.parametrize("max_grad_norm", [None, 0.05], ids=["no-clip", "clip"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_scaled_steps_equal_unscaled_steps(name, max_grad_norm):
    model, opt, twin, twin_opt = make_pair(name, max_grad_norm=max_grad_norm)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1)  # the scale moves too
    for batch in batches(3):
        opt.zero_grad()
        loss_of(model, batch).backward()
        opt.step()
        twin_opt.zero_grad()
        scaler.scale(loss_of(twin, batch)).backward()
        scaler.step(twin_opt)
        scaler.update()
        if max_grad_norm is not None:  # the reported norm is the unscaled one
            assert rel_err(twin_opt.grad_norm, opt.grad_norm) < 1e-5
    assert scaler.get_scale() == 2.0**15  # three finite steps, each grew the scale
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        assert rel_err(q, p) < 1e-4, n
    assert twin_opt.state["skipped_steps"].item() == 0
    assert not hasattr(twin_opt, "grad_scale") and not hasattr(twin_opt, "found_inf")  # the scaler's, removed


@pytest.mark.parametrize("name", list(CONFIGS))
def test_inf_gradient_skips_the_whole_step_and_the_scaler_backs_off(name):
    torch.manual_seed(0)
    model = TinyLoRAMLP()
    cls, kw = CONFIGS[name]
    opt = cls(model, other_lr=1e-2, **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    state_before = {k: v.clone() for k, v in opt.state[model.l2.lora_A.weight].items() if k != "skipped_steps"}
    scaler.scale(loss_of(model, batches(1)[0])).backward()
    model.l3.lora_B.weight.grad[0, 0] = float("inf")  # one overflowed factor gradient
    scaler.step(opt)
    scaler.update()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    for k, v in state_before.items():
        assert torch.equal(opt.state[model.l2.lora_A.weight][k], v), k
    assert scaler.get_scale() == 2.0**11
    assert opt.state[model.head.weight]["step"].item() == 0
    assert opt.state["skipped_steps"].item() > 0
    # The next finite step goes through.
    opt.zero_grad()
    scaler.scale(loss_of(model, batches(1, seed=2)[0])).backward()
    scaler.step(opt)
    assert not torch.equal(model.l2.lora_A.weight, before["l2.lora_A.weight"])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_unscale_before_step(name):
    """``scaler.unscale_`` only reaches ``.grad``: fine for the methods that step from it, refused (before
    anything changes) for those that step from the captured S."""
    model, opt, twin, twin_opt = make_pair(name)
    batch = batches(1)[0]
    loss_of(model, batch).backward()
    opt.step()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    scaler.scale(loss_of(twin, batch)).backward()
    scaler.unscale_(twin_opt)
    before = {n: p.detach().clone() for n, p in twin.named_parameters()}
    if name in GRAD_ONLY:
        scaler.step(twin_opt)
        for (n, p), q in zip(model.named_parameters(), twin.parameters()):
            assert rel_err(q, p) < 1e-4, n
    else:
        with pytest.raises(RuntimeError, match="unscale_"):
            scaler.step(twin_opt)
        for n, p in twin.named_parameters():
            assert torch.equal(p, before[n]), n
        assert twin_opt.state[twin.l1.lora_A.weight]["step"].item() == 0


def test_fp16_autocast_with_scaler_tracks_fp32():
    """fp16 autocast on the CPU: the captured S is fp16 and scaled; the steps stay close to fp32 ones."""
    model, opt, twin, twin_opt = make_pair("lorsum")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14)
    for batch in batches(3):
        opt.zero_grad()
        loss_of(model, batch).backward()
        opt.step()
        twin_opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = loss_of(twin, batch)
        scaler.scale(loss).backward()
        assert twin_opt._capture.get(twin.l2)[1].dtype == torch.float16
        scaler.step(twin_opt)
        scaler.update()
    assert twin_opt.state["skipped_steps"].item() == 0
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        assert rel_err(q, p) < 3e-2, n
