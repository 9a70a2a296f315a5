"""The torch.optim contract where users poke at it (issue #11, items 2, 3 and 8): ``add_param_group``,
``load_state_dict`` from another optimizer or another model, skip counting, lr validation in ``step()``,
and the dtype of the other groups' AdamW state."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorsum_kernels as lk

from .conftest import TinyLoRAMLP


def loss_of(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())


def batches(n, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, 7, 12, generator=g).to(dtype), torch.randint(0, 5, (2, 7), generator=g))
            for _ in range(n)]


def train(model, opt, data):
    for batch in data:
        opt.zero_grad()
        loss_of(model, batch).backward()
        opt.step()


def lora_params(*layers):
    return [p for layer in layers for p in (layer.lora_A.weight, layer.lora_B.weight)]


def snapshot(opt):
    """Everything load_state_dict / add_param_group could change, deep-copied."""
    groups = [{k: (list(map(id, v)) if k == "params" else copy.deepcopy(v)) for k, v in g.items()}
              for g in opt.param_groups]
    state = {(id(k) if isinstance(k, torch.Tensor) else k):
             (v.clone() if isinstance(v, torch.Tensor) else {kk: vv.clone() for kk, vv in v.items()})
             for k, v in opt.state.items()}
    return groups, state


def assert_same_snapshot(a, b):
    assert a[0] == b[0]
    assert a[1].keys() == b[1].keys()
    for key, value in a[1].items():
        other = b[1][key]
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, other)
        else:
            assert value.keys() == other.keys(), key
            for k in value:
                assert value[k].dtype == other[k].dtype and torch.equal(value[k], other[k]), (key, k)


METHODS = {
    "lorsum_momentum": (lk.LoRSum, dict(lr=0.3, momentum=0.9)),
    "scaled_lorsum": (lk.ScaledLoRSum, dict(lr=0.3, beta2_warmup=True, normalize_step=False)),
    "adaprelora": (lk.AdaPreLoRA, dict(lr=1e-2)),
    "scaled_gd": (lk.ScaledGD, dict(lr=1e-2)),
    "scaled_adamw": (lk.ScaledAdamW, dict(lr=1e-2)),
    "svdlora": (lk.SVDLoRA, dict(lr=0.3)),
}


# ------------------------------------------------------------------------------------------------------
# item 2: add_param_group


@pytest.mark.parametrize("name", list(METHODS))
def test_add_param_group_of_lora_layers_equals_constructing_with_it(name):
    cls, kw = METHODS[name]
    torch.manual_seed(0)
    model = TinyLoRAMLP()
    twin = copy.deepcopy(model)
    late = {"lr": kw["lr"] / 2}
    ref = cls(model, **kw, param_groups=[
        {"params": lora_params(model.l1, model.l2)},
        {"params": lora_params(model.l3), **late},
        {"params": model.head.parameters()},
    ])
    opt = cls(twin, **kw, param_groups=[
        {"params": lora_params(twin.l1, twin.l2)},
        {"params": twin.head.parameters()},
    ])
    assert len(opt._layers) == 2
    opt.add_param_group({"params": lora_params(twin.l3), **late})
    assert [layer.module for layer in opt._layers] == [twin.l1, twin.l2, twin.l3]
    assert opt.param_groups[-1]["kind"] == "lora" and opt.param_groups[-1]["lr"] == kw["lr"] / 2
    for k in ref.state[model.l3.lora_A.weight]:  # initialised as the constructor does
        assert torch.equal(ref.state[model.l3.lora_A.weight][k], opt.state[twin.l3.lora_A.weight][k]), k
    data = batches(3)
    train(model, ref, data)
    train(twin, opt, data)
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), n
    assert not torch.equal(model.l3.lora_A.weight, TinyLoRAMLP().l3.lora_A.weight)
    for p, q in zip(model.parameters(), twin.parameters()):
        for k, v in ref.state.get(p, {}).items():
            assert torch.equal(v, opt.state[q][k]), k


@pytest.mark.parametrize("name", ["lorsum_momentum", "scaled_lorsum"])
def test_layers_find_their_current_group_after_load_state_dict_and_add_param_group(name):
    # The streamed step asks each layer's group in backward (LoRAOptimizer._group_of, a lookup by identity):
    # load_state_dict replaces the group dicts, and add_param_group adds layers; the answer is always the
    # group object now in param_groups, so an option set on it applies.
    cls, kw = METHODS[name]
    model = TinyLoRAMLP()
    opt = cls(model, **kw, param_groups=[{"params": lora_params(model.l1, model.l2)},
                                         {"params": model.head.parameters()}])
    train(model, opt, batches(1))
    assert opt._group_of(opt._layers[0]) is opt.param_groups[0]
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    opt.add_param_group({"params": lora_params(model.l3), "lr": kw["lr"] / 2})
    for layer in opt._layers:
        group = opt._group_of(layer)
        assert any(group is g for g in opt.param_groups) and any(p is layer.A for p in group["params"])
    assert opt._group_of(opt._layers[2])["lr"] == kw["lr"] / 2


def test_add_param_group_of_other_params_takes_the_other_defaults():
    torch.manual_seed(0)
    model = TinyLoRAMLP()
    model.head.requires_grad_(False)
    opt = lk.LoRSum(model, lr=0.3, other_lr=1e-3, other_betas=(0.8, 0.99), other_weight_decay=0.1)
    assert [g["kind"] for g in opt.param_groups] == ["lora"]
    model.head.requires_grad_(True)
    opt.add_param_group({"params": model.head.weight})  # a lone tensor, as torch allows
    opt.add_param_group({"params": [model.head.bias], "lr": 1e-2})
    g_w, g_b = opt.param_groups[1:]
    assert g_w["kind"] == g_b["kind"] == "other"
    assert (g_w["lr"], g_w["betas"], g_w["weight_decay"]) == (1e-3, (0.8, 0.99), 0.1)
    assert g_b["lr"] == 1e-2
    ref_w = model.head.weight.detach().clone().requires_grad_(True)
    ref = torch.optim.AdamW([ref_w], lr=1e-3, betas=(0.8, 0.99), weight_decay=0.1)
    for batch in batches(2):
        opt.zero_grad()
        loss_of(model, batch).backward()
        ref_w.grad = model.head.weight.grad.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(model.head.weight, ref_w)


def test_add_param_group_rejects_bad_groups_before_any_change():
    torch.manual_seed(0)
    model = TinyLoRAMLP()
    extra = nn.Linear(3, 3)
    opt = lk.LoRSum(model, lr=0.3, momentum=0.9, param_groups=[{"params": lora_params(model.l1, model.l2)}])
    before = snapshot(opt)
    layers = list(opt._layers)
    bad_groups = [
        ({"params": lora_params(model.l2)}, ValueError, "more than one parameter group"),
        ({"params": [model.head.weight, model.l1.lora_A.weight]}, ValueError, "mixes|more than one"),
        ({"params": [model.l3.lora_A.weight]}, ValueError, "same parameter group"),
        ({"params": lora_params(model.l3) + [extra.weight]}, ValueError, "mixes"),
        ({"params": lora_params(model.l3), "lr": float("inf")}, ValueError, "lr"),
        ({"params": lora_params(model.l3), "lr": "0.1"}, TypeError, "lr"),
        ({"params": lora_params(model.l3), "momentum_rank": 50}, ValueError, "momentum_rank"),
        ({"params": [extra.weight], "lr": -1.0}, ValueError, "lr"),
        ({"params": {extra.weight}}, TypeError, "ordered"),
        ({"params": []}, ValueError, "empty"),
    ]
    for group, exc, match in bad_groups:
        with pytest.raises(exc, match=match):
            opt.add_param_group(group)
        assert_same_snapshot(before, snapshot(opt))
        assert opt._layers == layers
    # And the generator was not advanced by the failed momentum_rank group: adding l3 now gives the
    # momentum factors the constructor would have drawn.
    opt.add_param_group({"params": lora_params(model.l3)})
    ref = lk.LoRSum(copy.deepcopy(model), lr=0.3, momentum=0.9)
    A_ref = ref.state[list(ref.param_groups[0]["params"])[4]]["momentum_in"]
    assert torch.equal(opt.state[model.l3.lora_A.weight]["momentum_in"], A_ref)


def test_add_param_group_between_backward_and_step_is_refused():
    torch.manual_seed(0)
    model = TinyLoRAMLP()
    opt = lk.LoRSum(model, lr=0.3, param_groups=[{"params": lora_params(model.l1, model.l2)},
                                                  {"params": model.head.parameters()}])
    loss_of(model, batches(1)[0]).backward()
    with pytest.raises(RuntimeError, match="captured"):
        opt.add_param_group({"params": lora_params(model.l3)})
    opt.step()
    opt.zero_grad()
    opt.add_param_group({"params": lora_params(model.l3)})
    A3 = model.l3.lora_A.weight.detach().clone()
    train(model, opt, batches(1, seed=2))
    assert not torch.equal(A3, model.l3.lora_A.weight)


# ------------------------------------------------------------------------------------------------------
# item 3: load_state_dict from another optimizer class or another model


def _trained(cls, kw, r=3, seed=0):
    torch.manual_seed(seed)
    model = TinyLoRAMLP(r=r)
    opt = cls(model, **kw)
    train(model, opt, batches(2))
    return model, opt


@pytest.mark.parametrize("src,dst", [
    ((lk.LoRSum, dict(lr=0.3, momentum=0.9)), (lk.ScaledLoRSum, dict(lr=0.3))),
    ((lk.LoRSum, dict(lr=0.3)), (lk.SVDLoRA, dict(lr=0.3))),
    ((lk.ScaledGD, dict(lr=0.1)), (lk.ScaledAdamW, dict(lr=0.1))),
    ((lk.ScaledAdamW, dict(lr=0.1)), (lk.AdaPreLoRA, dict(lr=0.1))),
], ids=["lorsum->scaled", "lorsum->svdlora", "scaled_gd->scaled_adamw", "scaled_adamw->adaprelora"])
@pytest.mark.parametrize("tagged", [True, False], ids=["tagged", "untagged"])
def test_load_state_dict_of_another_optimizer_class_raises_before_any_change(src, dst, tagged):
    _, src_opt = _trained(*src)
    model, opt = _trained(*dst, seed=1)
    saved = copy.deepcopy(src_opt.state_dict())
    if not tagged:  # a checkpoint without the class name: the group keys and layer state must tell
        saved.pop("optimizer", None)
        saved.pop("param_shapes", None)
    before = snapshot(opt)
    with pytest.raises(ValueError, match="another optimizer|does not match|keys"):
        opt.load_state_dict(saved)
    assert_same_snapshot(before, snapshot(opt))
    train(model, opt, batches(1, seed=5))  # still steps


@pytest.mark.parametrize("method", [
    (lk.ScaledGD, dict(lr=0.1)), (lk.SVDLoRA, dict(lr=0.3)), (lk.LoRSum, dict(lr=0.3, momentum=0.0)),
    (lk.ScaledLoRSum, dict(lr=0.3, betas=(0.0, 0.99), normalize_step=False)),
], ids=["scaled_gd", "svdlora", "lorsum", "scaled_lorsum_no_momentum"])
def test_load_state_dict_of_another_rank_raises_before_any_change(method):
    _, big = _trained(*method, r=4)
    model, opt = _trained(*method, r=2, seed=1)
    before = snapshot(opt)
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(copy.deepcopy(big.state_dict()))
    assert_same_snapshot(before, snapshot(opt))


@pytest.mark.parametrize("name", list(METHODS))
def test_checkpoints_without_the_new_entries_still_load(name):
    cls, kw = METHODS[name]
    model, opt = _trained(cls, kw)
    saved = copy.deepcopy(opt.state_dict())
    assert saved["optimizer"] == cls.__name__
    for key in ("optimizer", "param_shapes"):
        saved.pop(key)
    twin = TinyLoRAMLP()  # not a deepcopy: that would copy the capture hooks
    twin.load_state_dict(model.state_dict())
    opt2 = cls(twin, **kw)
    opt2.load_state_dict(saved)
    data = batches(2, seed=7)
    train(model, opt, data)
    train(twin, opt2, data)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_load_state_dict_with_another_head_shape_raises():
    torch.manual_seed(0)
    a, b = TinyLoRAMLP(d_out=5), TinyLoRAMLP(d_out=6)
    opt_a, opt_b = lk.ScaledGD(a, lr=0.1), lk.ScaledGD(b, lr=0.1)  # no head state yet: shapes must tell
    before = snapshot(opt_a)
    with pytest.raises(ValueError, match="shape"):
        opt_a.load_state_dict(opt_b.state_dict())
    assert_same_snapshot(before, snapshot(opt_a))


# ------------------------------------------------------------------------------------------------------
# item 8: skip counting, lr validation, other-group state dtype


def test_skipped_steps_counts_steps_not_layers():
    torch.manual_seed(0)
    model = TinyLoRAMLP()
    opt = lk.LoRSum(model, lr=0.3)
    for i in range(2):
        opt.zero_grad()
        x, y = batches(1, seed=i)[0]
        x[0, 0, 0] = float("nan")  # every layer's X and S and the head's gradient are bad
        loss_of(model, (x, y)).backward()
        opt.step()
        assert int(opt.state["skipped_steps"]) == i + 1
        for layer in model.lora_layers():
            assert int(opt.state[layer.lora_A.weight]["skipped_steps"]) == i + 1
    train(model, opt, batches(1, seed=9))  # a good step counts nothing
    assert int(opt.state["skipped_steps"]) == 2


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), -1.0, "0.1", True, None],
                         ids=["inf", "nan", "negative", "str", "bool", "none"])
def test_bad_lr_is_refused_at_construction(bad):
    model = TinyLoRAMLP()
    with pytest.raises((ValueError, TypeError), match="lr"):
        lk.LoRSum(model, lr=bad)
    with pytest.raises((ValueError, TypeError), match="other_lr"):
        lk.ScaledGD(model, lr=0.1, other_lr=bad)


@pytest.mark.parametrize("kind", ["lora", "other"])
@pytest.mark.parametrize("bad", [float("inf"), float("nan"), -1.0, "0.1", torch.tensor(float("inf"))],
                         ids=["inf", "nan", "negative", "str", "inf_tensor"])
def test_bad_lr_set_after_construction_is_refused_in_step_before_any_change(kind, bad):
    torch.manual_seed(0)
    model = TinyLoRAMLP()
    opt = lk.LoRSum(model, lr=0.3, momentum=0.9)
    train(model, opt, batches(1))
    opt.zero_grad()
    loss_of(model, batches(1, seed=4)[0]).backward()
    params = [p.detach().clone() for p in model.parameters()]
    before = snapshot(opt)
    group = next(g for g in opt.param_groups if g["kind"] == kind)
    good, group["lr"] = group["lr"], bad
    with pytest.raises((ValueError, TypeError), match="lr"):
        opt.step()
    group["lr"] = good
    assert_same_snapshot(before, snapshot(opt))
    for p, q in zip(params, model.parameters()):
        assert torch.equal(p, q)
    opt.step()  # the captured data are still there: the step goes through once lr is fixed
    assert all(not torch.equal(p, q) for p, q in zip(params, model.parameters()) if q.requires_grad)


# An option that decides which state each layer keeps, changed after construction: (class, kwargs, option,
# new value, message). The step would run without state it needs (or ignore state it has) and the state
# dict would no longer load.
STATE_OPTIONS = {
    "lorsum_momentum_on": (lk.LoRSum, dict(lr=1e-2), "momentum", 0.9, "momentum = 0.9.*cycle_momentum=False"),
    "lorsum_momentum_off": (lk.LoRSum, dict(lr=1e-2, momentum=0.9), "momentum", 0.0, "momentum = 0.0"),
    "lorsum_normalize_off": (lk.LoRSum, dict(lr=1e-2), "normalize_step", False, "normalize_step = False"),
    "scaled_lorsum_beta1_on": (lk.ScaledLoRSum, dict(lr=1e-2), "betas", (0.9, 0.99),
                               r"betas\[0\] = 0.9.*cycle_momentum=False"),
    "scaled_lorsum_warmup_off": (lk.ScaledLoRSum, dict(lr=1e-2), "beta2_warmup", False,
                                 "beta2_warmup = False"),
    "adaprelora_momentum_adam": (lk.AdaPreLoRA, dict(lr=1e-2), "momentum", "adam", "momentum = 'adam'"),
    "adaprelora_momentum_off": (lk.AdaPreLoRA, dict(lr=1e-2), "momentum", None, "momentum = None"),
}


@pytest.mark.parametrize("case", list(STATE_OPTIONS))
def test_an_option_that_decides_the_state_changed_after_construction_is_refused_before_any_change(case):
    """As torch's OneCycleLR and CyclicLR do by default (cycle_momentum=True: LoRSum's ``momentum``, or β1 of
    ``betas`` where the optimizer has them), or a user: ``step()`` raises before anything changes, naming
    the option, and goes through once it is restored."""
    cls, kwargs, option, value, message = STATE_OPTIONS[case]
    torch.manual_seed(0)
    model = TinyLoRAMLP()
    opt = cls(model, **kwargs)
    train(model, opt, batches(1))
    params = [p.detach().clone() for p in model.parameters()]
    before = snapshot(opt)
    group = opt.param_groups[0]
    good, group[option] = group[option], value  # as a scheduler sets it: after one step, before the next
    opt.zero_grad()
    with pytest.raises(ValueError, match=f"{cls.__name__}: param group 0 has {message}"):
        loss_of(model, batches(1, seed=4)[0]).backward()  # the step streamed in backward (capture="auto")
        opt.step()
    group[option] = good
    assert_same_snapshot(before, snapshot(opt))
    for p, q in zip(params, model.parameters()):
        assert torch.equal(p, q)
    opt.zero_grad()
    loss_of(model, batches(1, seed=4)[0]).backward()
    opt.step()
    assert any(not torch.equal(p, q) for p, q in zip(params, model.parameters()) if q.requires_grad)


@pytest.mark.parametrize("cls, kwargs", [(lk.LoRSum, dict(lr=1e-2, momentum=0.9)),
                                         (lk.ScaledLoRSum, dict(lr=1e-2, betas=(0.9, 0.99))),
                                         (lk.AdaPreLoRA, dict(lr=1e-2)), (lk.ScaledAdamW, dict(lr=1e-2))])
def test_one_cycle_lr_cycles_the_momentum_an_optimizer_was_built_with(cls, kwargs):
    """torch's OneCycleLR with its default cycle_momentum=True on an optimizer built with a momentum (LoRSum's
    ``momentum``, β1 of the others' ``betas``): it trains, every step taken, and the state dict resumes."""
    torch.manual_seed(0)
    model = TinyLoRAMLP()
    opt = cls(model, **kwargs)
    max_lr = [g["lr"] for g in opt.param_groups]
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=6)
    seen = set()
    for batch in batches(4):
        opt.zero_grad()
        loss_of(model, batch).backward()
        opt.step()
        sched.step()
        group = opt.param_groups[0]
        seen.add(group["momentum"] if "momentum" in opt.defaults and cls is lk.LoRSum else group["betas"][0])
    assert len(seen) > 1 and int(opt.state["skipped_steps"]) == 0  # the momentum did cycle
    resumed = cls(model, **kwargs)
    resumed.load_state_dict(opt.state_dict())
    assert resumed.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


@pytest.mark.parametrize("cls, key, suggestion", [(lk.LoRSum, "momentm", "momentum"),
                                                    (lk.ScaledLoRSum, "beta", "betas"),
                                                    (lk.AdaPreLoRA, "statistic", "statistics"),
                                                    (lk.ScaledAdamW, "max_grad_nrom", "max_grad_norm"),
                                                    (lk.SVDLoRA, "zzz", None)])
def test_a_misspelled_option_names_the_class_and_the_option_meant(cls, key, suggestion):
    """The subclasses pass their keyword arguments through to LoRAOptimizer, whose name Python's own error
    would carry: the error names the class built and the closest option it takes."""
    message = f"{cls.__name__}\\(\\) got an unexpected keyword argument '{key}'"
    message += f"; did you mean '{suggestion}'\\?$" if suggestion else "$"
    with pytest.raises(TypeError, match=message):
        cls(TinyLoRAMLP(), **{key: 1})


def test_tensor_lr_is_accepted():
    torch.manual_seed(0)
    model = TinyLoRAMLP()
    twin = copy.deepcopy(model)
    opt = lk.ScaledGD(model, lr=0.1)
    opt_t = lk.ScaledGD(twin, lr=0.1)
    for g in opt_t.param_groups:
        g["lr"] = torch.tensor(float(g["lr"]))
    data = batches(2)
    train(model, opt, data)
    train(twin, opt_t, data)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_other_params_keep_fp32_adamw_state(dtype):
    torch.manual_seed(0)
    model = TinyLoRAMLP(dtype=dtype)
    opt = lk.ScaledGD(model, lr=1e-2, other_lr=1e-2, other_weight_decay=0.1)
    # Reference: torch AdamW with fp32 state, stepping an fp32 copy of the low-precision head that is
    # rounded back to the head's dtype after each step.
    shadow = [p.detach().float().clone().requires_grad_(True) for p in model.head.parameters()]
    ref = torch.optim.AdamW(shadow, lr=1e-2, weight_decay=0.1)
    for batch in batches(3, dtype=dtype):
        opt.zero_grad()
        loss_of(model, batch).backward()
        for s, p in zip(shadow, model.head.parameters()):
            s.grad = p.grad.float()
        opt.step()
        ref.step()
        with torch.no_grad():
            for s, p in zip(shadow, model.head.parameters()):
                s.copy_(s.to(dtype))
    for s, p in zip(shadow, model.head.parameters()):
        assert p.dtype == dtype
        assert opt.state[p]["exp_avg"].dtype == opt.state[p]["exp_avg_sq"].dtype == torch.float32
        torch.testing.assert_close(opt.state[p]["exp_avg"], ref.state[s]["exp_avg"])
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], ref.state[s]["exp_avg_sq"])
        torch.testing.assert_close(p.float(), s.detach(), rtol=0, atol=0)
    # The LoRA state follows the same policy.
    for k, v in opt.state[model.l1.lora_A.weight].items():
        assert v.dtype in (torch.float32, torch.int64), k
    # And through a checkpoint, including one whose AdamW state was saved in the parameter's dtype.
    saved = copy.deepcopy(opt.state_dict())
    for entries in saved["state"].values():
        if isinstance(entries, dict) and "exp_avg" in entries:
            entries["exp_avg"] = entries["exp_avg"].to(dtype)
            entries["exp_avg_sq"] = entries["exp_avg_sq"].to(dtype)
    opt.load_state_dict(saved)
    train(model, opt, batches(1, seed=3, dtype=dtype))
    for p in model.head.parameters():
        assert opt.state[p]["exp_avg"].dtype == torch.float32


def test_fp64_other_params_keep_fp64_adamw_state():
    torch.manual_seed(0)
    model = TinyLoRAMLP(dtype=torch.float64)
    opt = lk.ScaledGD(model, lr=1e-2)
    train(model, opt, batches(1, dtype=torch.float64))
    assert opt.state[model.head.weight]["exp_avg"].dtype == torch.float64


def test_a_forced_backend_is_checked_on_the_models_devices(monkeypatch):
    """The constructors ask about the devices of the model's parameters (a forced "triton" means a GPU
    for a CUDA model, the interpreter only on the CPU), for every op the configuration dispatches."""
    from lorsum_kernels import backends

    asked = set()
    monkeypatch.setattr(backends, "_triton_missing_reason", lambda device, op: asked.add((device.type, op)))
    model = TinyLoRAMLP().to("meta")
    cases = [(lk.LoRSum, {"pair_products", "lorsum_update_out"}), (lk.ScaledLoRSum, {"kfac_metric_update"}),
             (lk.ScaledAdamW, {"spd_solve"}), (lk.ScaledGD, {"spd_solve"}), (lk.AdaPreLoRA, {"row_col_energies"})]
    for cls, ops in cases:
        asked.clear()
        opt = cls(model, backend="triton")
        assert {device for device, _ in asked} == {"meta"}, cls
        assert ops <= {op for _, op in asked}, cls
        if hasattr(opt, "remove_hooks"):
            opt.remove_hooks()
    with pytest.raises(ValueError, match="unknown backend"):
        lk.LoRSum(model, backend="cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["lorsum", "scaled_lorsum", "adaprelora", "scaled_adamw"])
def test_write_paths_agree(name, dtype, monkeypatch):
    """The bucket-wide foreach write (accelerators) and the per-layer write (CPU) write the same bits,
    skipped layers (and their state and counters) untouched by both; bf16 parameters with fp32 state (two
    dtypes, selected apart) too."""
    from lorsum_kernels.optim import writing

    results = []
    for foreach in (False, True):
        monkeypatch.setattr(writing, "_foreach_write", lambda device, foreach=foreach: foreach)
        torch.manual_seed(0)
        model = TinyLoRAMLP().to(dtype)
        opt = lk.create_optimizer(model, name, lr=0.05)
        layers = opt._layers[1:]  # l2 and l3: one shape
        g = torch.Generator().manual_seed(3)
        A_new = torch.stack([layer.A.detach() for layer in layers]) + torch.randn(2, *layers[0].A.shape, generator=g)
        B_new = torch.stack([layer.B.detach() for layer in layers]) + torch.randn(2, *layers[0].B.shape, generator=g)
        state = {k: torch.stack([opt.state[layer.A][k] for layer in layers]) + 1.0
                 for k in opt.state[layers[0].A] if k not in ("step", "skipped_steps")}
        with torch.no_grad():
            skipped = opt._write_bucket(layers, A_new, B_new, state, torch.tensor([False, True]))
        assert bool(skipped)
        results.append([t.clone() for layer in layers
                        for t in (layer.A, layer.B, opt.state[layer.A]["skipped_steps"], *opt.state[layer.A].values())])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    first, second = results[1][: len(results[1]) // 2], results[1][len(results[1]) // 2:]
    assert int(first[2]) == 1 and int(second[2]) == 0  # skipped_steps: the first layer was skipped
    # the second layer took its new A
    torch.testing.assert_close(second[0], A_new[1].to(dtype), rtol=0, atol=0)
