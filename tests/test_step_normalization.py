"""normalize_step=True (optim/step_normalization.py), of LoRSum and ScaledLoRSum: each layer's merged-weight
step has RMS lr per entry at its first step, never more than its statistics allow later, whatever the
gradient's scale."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from torch import nn

import lorsum_kernels as lk

from .conftest import TinyLoRAMLP


def _layers(model):
    return [m for m in model.modules() if isinstance(m, lk.LoRALinear)]


def _merged(layer):
    return (layer.scaling * layer.lora_B.weight @ layer.lora_A.weight).detach().clone()


def _model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(lk.LoRALinear(nn.Linear(37, 23), r=3, alpha=6), nn.Tanh(),
                          lk.LoRALinear(nn.Linear(23, 11), r=2, alpha=8))
    model = model.double()
    for layer in _layers(model):  # B ≠ 0, so both half-steps move the weight
        nn.init.normal_(layer.lora_B.weight, std=0.1)
    return model


# Both optimizers with the option; ScaledLoRSum at δ = 0 (its metric is then invariant to the loss's scale
# too).
NORMALIZED = {
    "lorsum": lambda model, **kw: lk.LoRSum(model, normalize_step=True, max_update_norm=None, **kw),
    "scaled_lorsum": lambda model, **kw: lk.ScaledLoRSum(model, normalize_step=True, max_update_norm=None,
                                                         damping=0.0, min_lmbd=0.0, **kw),
}


def _step_rms(model, opt, x, y, loss_scale=1.0):
    before = [_merged(layer) for layer in _layers(model)]
    opt.zero_grad()
    (loss_scale * ((model(x) - y) ** 2).mean()).backward()
    opt.step()
    return [float((_merged(l) - b).norm() / math.sqrt(b.numel())) for l, b in zip(_layers(model), before)]


@pytest.mark.parametrize("name", sorted(NORMALIZED))
@pytest.mark.parametrize("loss_scale", [1e-4, 1.0, 1e4])
def test_first_step_has_rms_lr_per_entry_whatever_the_gradient_scale(loss_scale, name):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 37, generator=g, dtype=torch.float64)
    y = torch.randn(64, 11, generator=g, dtype=torch.float64)
    model = _model()
    opt = NORMALIZED[name](model, lr=1e-3)
    rms = _step_rms(model, opt, x, y, loss_scale)
    # ‖ΔW‖ is measured by its bound (first + second order), so the step is at most lr and close to it
    assert all(0.9e-3 < r <= 1e-3 * (1 + 1e-9) for r in rms), rms


@pytest.mark.parametrize("name", sorted(NORMALIZED))
def test_a_growing_gradient_is_cut_to_its_statistics(name):
    """The step runs at the lagged lr; when the gradient jumps 100× the step is shrunk to what v̂ with the
    new size allows (β = 0.999: √(t·(1−β)/(1−β^t))-ish above lr at most), never the lagged lr's 100×."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 37, generator=g, dtype=torch.float64)
    y = torch.randn(64, 11, generator=g, dtype=torch.float64)
    model = _model()
    beta = 0.999
    opt = NORMALIZED[name](model, lr=1e-3, normalize_beta=beta)
    for _ in range(3):
        _step_rms(model, opt, x, y)
    rms = _step_rms(model, opt, x, y, loss_scale=100.0)
    t = 4  # u jumps ~100×: v̂ ≈ (1−β)·u²/(1−β^t) so the step is at most lr·√((1−β^t)/(1−β)) ≈ 2·lr
    bound = 1e-3 * math.sqrt((1 - beta ** t) / (1 - beta))
    assert all(r <= bound * 1.01 for r in rms), (rms, bound)
    assert all(r > 0.5e-3 for r in rms), rms  # cut, not collapsed (the large step is not linear in the lr)


@pytest.mark.parametrize("name", sorted(NORMALIZED))
def test_normalized_state_is_per_layer_and_counts_steps(name):
    model = TinyLoRAMLP()
    opt = NORMALIZED[name](model, lr=1e-3)
    x = torch.randn(2, 7, 12)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    for layer in (model.l1, model.l2, model.l3):
        state = opt.state[layer.lora_A.weight]
        assert state["step_norm_count"].item() == 2
        assert state["step_norm_sq"].item() > 0


@pytest.mark.parametrize("cls", [lk.LoRSum, lk.ScaledLoRSum])
def test_plain_step_keeps_no_normalization_state_and_bad_options_raise(cls):
    model = TinyLoRAMLP()
    opt = cls(model, normalize_step=False)
    for layer in (model.l1, model.l2, model.l3):
        assert "step_norm_sq" not in opt.state[layer.lora_A.weight]
    with pytest.raises(ValueError, match="normalize_beta"):
        cls(TinyLoRAMLP(), normalize_step=True, normalize_beta=1.0, max_update_norm=None)
    with pytest.raises(ValueError, match="max_update_norm=None"):
        cls(TinyLoRAMLP(), normalize_step=True, max_update_norm=1.0)


@pytest.mark.parametrize("cls", [lk.LoRSum, lk.ScaledLoRSum])
def test_k0_normalized_is_a_whole_step(cls):
    """The first step is computed 2-4 times (measuring its size): not a token-sum step."""
    normalized = cls(TinyLoRAMLP(), iters=0, normalize_step=True, max_update_norm=None)
    plain = cls(TinyLoRAMLP(), iters=0, normalize_step=False)
    assert not normalized._steps_from_token_sums(normalized.param_groups[0])
    assert plain._steps_from_token_sums(plain.param_groups[0])


@pytest.mark.parametrize("cls, plain_kw", [(lk.LoRSum, dict(lr=0.3, max_update_norm=1.0)),
                                           (lk.ScaledLoRSum, dict(lr=0.1))])
def test_a_checkpoint_from_before_the_option_loads_and_keeps_the_plain_step(cls, plain_kw):
    """State dicts written before normalize_step existed (the plain step was the only one) have neither the
    group option nor the statistics: they load into an optimizer built with the option on and go on with the
    plain step."""
    model = TinyLoRAMLP()
    plain = cls(model, normalize_step=False, **plain_kw)
    x = torch.randn(2, 7, 12)
    plain.zero_grad()
    model(x).square().mean().backward()
    plain.step()
    saved = plain.state_dict()
    for group in saved["param_groups"]:
        group.pop("normalize_step", None)
        group.pop("normalize_beta", None)
    twin = TinyLoRAMLP()
    twin.load_state_dict(model.state_dict())
    resumed = cls(twin, normalize_step=True, max_update_norm=None)
    resumed.load_state_dict(saved)
    for opt, net in ((plain, model), (resumed, twin)):
        opt.zero_grad()
        net(x).square().mean().backward()
        opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.skipif(not lk._native.has_native_op("finish_normalized_step", "cpu"), reason="no native op")
@pytest.mark.parametrize("capture", ["auto", "cache"])
@pytest.mark.parametrize("name", sorted(NORMALIZED))
def test_the_in_place_finish_trains_as_the_batched_composite(name, capture):
    """On the CPU in fp32 the normalised step is finished and written in place, layer by layer
    (``ops.finish_normalized_step``, natively); training with it gives what the batched composite
    (``_finish_normalized`` and ``_write_bucket``) gives, within fp32 rounding, a skipped (non-finite) step
    and the measured first step included, the streamed results and the cached ones alike."""
    trained = []
    for in_place in (True, False):
        torch.manual_seed(0)
        model = TinyLoRAMLP()
        opt = NORMALIZED[name](model, lr=1e-2, capture=capture)
        writes = []
        if in_place:
            real = opt._write_normalized
            opt._write_normalized = lambda result, real=real: writes.append(len(result[1])) or real(result)
        else:
            opt._finishes_in_place = lambda *args: False
        g = torch.Generator().manual_seed(3)
        for step in range(5):
            x = torch.randn(2, 7, 12, generator=g)
            if step == 2:
                x[1, 3, 4] = float("nan")  # every layer's data: the step is skipped, nothing written
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        assert (sum(writes) == 5 * 3) if in_place else not writes
        state = {(i, k): v.clone() for i, layer in enumerate(_layers(model)) for k, v in
                 opt.state[layer.lora_A.weight].items()}
        trained.append(([p.detach().clone() for p in model.parameters()], state))
    (p_in_place, s_in_place), (p_composite, s_composite) = trained
    for a, b in zip(p_in_place, p_composite):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert s_in_place.keys() == s_composite.keys()
    for key, value in s_in_place.items():
        torch.testing.assert_close(value, s_composite[key], rtol=1e-5, atol=1e-9, msg=str(key))
    assert all(int(s_in_place[(i, "skipped_steps")]) == 1 for i in range(3))


@pytest.mark.parametrize("capture", ["auto", "cache"])
@pytest.mark.parametrize("name", sorted(NORMALIZED))
def test_an_accelerator_reads_each_scale_until_it_is_known(name, capture, monkeypatch):
    """On an accelerator a host read of a layer's ``step_norm_scale`` waits for the device, once per layer in
    backward: the optimizer reads it until the layer's first step has been taken, then no more
    (``_scales_known_positive``), and trains as it does reading it every step. Run on the CPU as if it
    were an accelerator (``guards.host_waits_for``); a skipped first step keeps its layers unknown."""
    from lorsum_kernels.optim import guards

    monkeypatch.setattr(guards, "host_waits_for", lambda device: True)
    reads = []
    real_bool = torch.Tensor.__bool__

    def spy_bool(t):
        caller = sys._getframe(1).f_code.co_name
        if caller in ("_scales_known_positive", "step_at_layer_lr"):
            reads.append((step, caller))
        return real_bool(t)

    monkeypatch.setattr(torch.Tensor, "__bool__", spy_bool)
    trained = []
    for cached in (True, False):
        torch.manual_seed(0)
        model = TinyLoRAMLP()
        opt = NORMALIZED[name](model, lr=1e-2, capture=capture)
        opt._prepare_one_layer_step = lambda *args: None  # the CPU's native one-layer path: not on a GPU
        if not cached:
            opt._scales_known_positive = lambda group, layers: False
        reads.clear()
        g = torch.Generator().manual_seed(3)
        for step in range(6):
            x = torch.randn(2, 7, 12, generator=g)
            if step == 0:
                x[1, 3, 4] = float("nan")  # the first step skipped: every scale stays 0, read again
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        if cached:
            # steps 0 and 1 measure (every scale 0), step 2 finds them positive, later steps read nothing
            assert {s for s, _ in reads} == {0, 1, 2}, str(reads)
            assert len(opt._positive_scales) == 3
            opt.load_state_dict(opt.state_dict())
            assert not opt._positive_scales
        else:
            assert not opt._positive_scales
        trained.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*trained):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("in_place", [True, False])
@pytest.mark.parametrize("capture", ["auto", "cache"])
@pytest.mark.parametrize("name", sorted(NORMALIZED))
def test_a_zero_lr_step_keeps_factors_and_statistics_and_is_not_skipped(name, capture, in_place):
    """lr = 0 (a warm-up from 0, as transformers' schedules start; a schedule's end): the step is zero and
    measures nothing. The layers' factors and ``step_norm_*`` statistics stay (bit for bit, but for the
    scale, recomputed from them), the step is
    counted as taken, not skipped, and training goes on as if it had not happened (LoRSum, whose state is
    only the statistics: the same factors as the run without the zero steps). Before, u = ‖ΔW‖/0 put inf in
    v, or NaN at a first step: that step was counted as skipped, and a layer with statistics never moved
    again."""
    def train(lrs):
        torch.manual_seed(0)
        model = TinyLoRAMLP()
        model.head.requires_grad_(False)  # AdamW's moments would take the zero step's gradient
        opt = NORMALIZED[name](model, lr=1e-2, capture=capture)
        if not in_place:
            opt._finishes_in_place = lambda *args: False
        g = torch.Generator().manual_seed(3)
        batches = [torch.randn(2, 7, 12, generator=g) for _ in range(5)]
        for x, lr in zip(batches, lrs):
            if lr is None:
                continue  # the run without the zero steps skips their batches
            opt.param_groups[0]["lr"] = lr
            before = [p.detach().clone() for p in model.parameters()]
            stats = [{k: v.clone() for k, v in opt.state[layer.lora_A.weight].items()
                      if k.startswith("step_norm")} for layer in _layers(model)]
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
            if lr == 0:
                for a, b in zip(model.parameters(), before):
                    assert torch.equal(a, b)
                for layer, old in zip(_layers(model), stats):
                    new = opt.state[layer.lora_A.weight]
                    assert torch.equal(new["step_norm_sq"], old["step_norm_sq"])
                    assert torch.equal(new["step_norm_count"], old["step_norm_count"])
                    # recomputed from them (by the reference: the native finish rounds its own way, 1 ulp)
                    torch.testing.assert_close(new["step_norm_scale"], old["step_norm_scale"], rtol=1e-6,
                                               atol=0)
        assert int(opt.state["skipped_steps"]) == 0
        for layer in _layers(model):
            st = opt.state[layer.lora_A.weight]
            assert int(st["step"]) == sum(lr is not None for lr in lrs) and int(st["skipped_steps"]) == 0
            assert int(st["step_norm_count"]) == sum(bool(lr) for lr in lrs)
            assert (float(st["step_norm_scale"]) > 0) == any(lrs) and math.isfinite(float(st["step_norm_sq"]))
        return [p.detach().clone() for p in model.parameters()]

    with_zeros = train([0.0, 1e-2, 1e-2, 0.0, 1e-2])
    start = train([None] * 5)  # nothing stepped: the initial factors
    lora = [i for i, (n, _) in enumerate(TinyLoRAMLP().named_parameters()) if "lora_" in n]
    assert lora and all(not torch.equal(with_zeros[i], start[i]) for i in lora)  # the nonzero steps moved
    if name == "lorsum":
        without = train([None, 1e-2, 1e-2, None, 1e-2])
        for a, b in zip(with_zeros, without):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("in_place", [True, False])
@pytest.mark.parametrize("name", sorted(NORMALIZED))
def test_a_step_within_the_factors_rounding_keeps_the_statistics(name, in_place):
    """A step at 1e-10 of the lr its statistics came from moves the merged weight by less than the factors'
    fp32 rounding (``_numerics.STEP_NOISE_FLOOR``·ε·‖A‖‖B‖): it would measure that rounding (and
    ScaledLoRSum's re-solve in its new metric, 0.23 ε‖A‖‖B‖ at any lr) as its size, and did: one layer's v
    147 times too large, its next step 0.09 of its size (tools/step_noise_ratio.py --effect), until the EMA
    forgot. It is taken and the statistics stay;
    the steps after it are those of a run without it, within rounding."""
    def train(tiny: bool):
        torch.manual_seed(0)
        model = TinyLoRAMLP()
        model.head.requires_grad_(False)
        opt = NORMALIZED[name](model, lr=1e-3, capture="cache")
        if not in_place:
            opt._finishes_in_place = lambda *args: False
        g = torch.Generator().manual_seed(3)
        moves = []
        for step in range(8):
            x = torch.randn(2, 7, 12, generator=g)
            if step == 4 and not tiny:
                continue
            opt.param_groups[0]["lr"] = 1e-13 if step == 4 else 1e-3
            stats = [{k: v.clone() for k, v in opt.state[layer.lora_A.weight].items()}
                     for layer in _layers(model)]
            before = [_merged(layer) for layer in _layers(model)]
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
            if step == 4:
                for layer, old in zip(_layers(model), stats):
                    new = opt.state[layer.lora_A.weight]
                    assert torch.equal(new["step_norm_sq"], old["step_norm_sq"]), layer
                    assert torch.equal(new["step_norm_count"], old["step_norm_count"]), layer
            else:
                moves.append([float((_merged(l) - b).norm()) for l, b in zip(_layers(model), before)])
        assert int(opt.state["skipped_steps"]) == 0
        return moves

    with_tiny, without = train(True), train(False)
    for a, b in zip(with_tiny[4:], without[4:]):  # the steps after it
        assert a == pytest.approx(b, rel=2e-2), (a, b)

