"""LoRSum / ScaledLoRSum / SVDLoRA as torch optimizers: semantics, checkpoints, dtypes, bad input."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import lorsum_kernels as lk
from lorsum_kernels.functional import low_rank_sum, svdlora_step
from lorsum_kernels.optim.guards import finite_data, finite_rows, finite_rows_of
from lorsum_kernels._native import has_native_op
from lorsum_kernels.optim import base, guards

from .conftest import TinyLoRAMLP, rel_err

OPTIMIZERS = {
    "lorsum": dict(lr=0.3, iters=1),
    "lorsum_momentum": dict(lr=0.3, iters=2, momentum=0.9, dampening=0.1),
    "lorsum_k0": dict(lr=0.3, iters=0, momentum=0.5),
    "lorsum_normalized": dict(lr=1e-2, iters=1, momentum=0.5, normalize_step=True, max_update_norm=None),
    "scaled_kfac": dict(lr=0.3, metric="kfac"),
    "scaled_shampoo": dict(lr=0.3, metric="shampoo", betas=(0.0, 0.9)),
    "scaled_warmup": dict(lr=0.3, metric="kfac", beta2_warmup=True),
    "scaled_normalized": dict(lr=1e-2, metric="kfac", normalize_step=True),
    "svdlora": dict(lr=0.3),
}


def make(name, model, **extra):
    kw = {**OPTIMIZERS[name], **extra}
    cls = {"lorsum": lk.LoRSum, "scaled": lk.ScaledLoRSum, "svdlora": lk.SVDLoRA}[name.split("_")[0]]
    return cls(model, **kw)


def loss_of(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())


def train(model, opt, batches):
    for batch in batches:
        opt.zero_grad()
        loss_of(model, batch).backward()
        opt.step()


def batches(n, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, 7, 12, generator=g).to(dtype), torch.randint(0, 5, (2, 7), generator=g))
            for _ in range(n)]


def merged_grads(model, batch):
    """G = dL/dW of every LoRA layer, read independently from a copy whose base weights are trainable."""
    twin = copy.deepcopy(model)
    for layer in (twin.l1, twin.l2, twin.l3):
        layer.base.weight.requires_grad_(True)
    loss_of(twin, batch).backward()
    return [layer.base.weight.grad.clone() for layer in (twin.l1, twin.l2, twin.l3)]


# ---------------------------------------------------------------------------------------------------
# the step is the functional method on the merged weight


@pytest.mark.parametrize("alpha", [3.0, 6.0, 0.75])
@pytest.mark.parametrize("iters", [0, 1, 3])
def test_lorsum_step_equals_functional_on_merged_weight(alpha, iters):
    torch.manual_seed(0)
    model = TinyLoRAMLP(alpha=alpha)
    batch = batches(1)[0]
    grads = merged_grads(model, batch)
    layers = [model.l1, model.l2, model.l3]
    before = [(l.lora_A.weight.detach().clone(), l.lora_B.weight.detach().clone(), l.scaling) for l in layers]
    opt = lk.LoRSum(model, lr=0.2, lmbd=0.05, iters=iters, normalize_step=False)
    loss_of(model, batch).backward()
    opt.step()
    for layer, (A0, B0, s), G in zip(layers, before, grads):
        root = s**0.5
        A_exp, B_exp = low_rank_sum([(root * A0, root * B0), (torch.eye(G.shape[1]), G)], [1.0, -0.2],
                                    lmbd=0.2 * 0.05, iters=iters)
        assert rel_err(layer.lora_A.weight, A_exp / root) < 1e-5
        assert rel_err(layer.lora_B.weight, B_exp / root) < 1e-5


@pytest.mark.parametrize("alpha", [1.5, 3.0, 12.0])
def test_scale_is_honoured_merged_weight_moves_like_svdlora(alpha):
    """Spec §11 P10: whatever α/r, s·B·A moves to Π_r(s·B·A − ηG), SVDLoRA's step with the same lr."""
    torch.manual_seed(0)
    model = TinyLoRAMLP(alpha=alpha)  # r = 3, so s = alpha / 3
    batch = batches(1)[0]
    G = merged_grads(model, batch)[1]
    l2 = model.l2
    s = l2.scaling
    A0, B0 = l2.lora_A.weight.detach().clone(), l2.lora_B.weight.detach().clone()
    A_ref, B_ref = svdlora_step(A0 * s, B0, G, 0.5)
    opt = lk.LoRSum(model, lr=0.5, lmbd=1e-9, iters=12, normalize_step=False)
    loss_of(model, batch).backward()
    opt.step()
    W_new = s * l2.lora_B.weight.detach() @ l2.lora_A.weight.detach()
    assert rel_err(W_new, B_ref @ A_ref) < 1e-4
    # The published code ignores s: it moves B·A to Π_r(B·A − ηG), so s·B·A lands elsewhere when s ≠ 1.
    A_off, B_off = svdlora_step(A0, B0, G, 0.5)
    if s != 1.0:
        assert rel_err(s * B_off @ A_off, B_ref @ A_ref) > 1e-2


def test_k0_is_not_a_noop_and_equals_jacobi():
    """Spec §11 P1: iters=0 must move the factors (the official plain code returns them unchanged)."""
    torch.manual_seed(0)
    model = TinyLoRAMLP()
    batch = batches(1)[0]
    A0 = model.l1.lora_A.weight.detach().clone()
    opt = lk.LoRSum(model, lr=0.2, iters=0)
    loss_of(model, batch).backward()
    opt.step()
    assert rel_err(model.l1.lora_A.weight, A0) > 1e-4


def test_svdlora_optimizer_is_projected_gd():
    torch.manual_seed(0)
    model = TinyLoRAMLP(alpha=6.0)
    batch = batches(1)[0]
    G = merged_grads(model, batch)[0]
    l1 = model.l1
    s = l1.scaling
    A_ref, B_ref = svdlora_step(l1.lora_A.weight.detach() * s, l1.lora_B.weight.detach(), G, 0.1)
    opt = lk.SVDLoRA(model, lr=0.1, max_update_norm=None)  # the method's own step (clipping: test_update_clip)
    loss_of(model, batch).backward()
    opt.step()
    assert rel_err(s * l1.lora_B.weight.detach() @ l1.lora_A.weight.detach(), B_ref @ A_ref) < 1e-5


def test_gradient_accumulation_equals_one_big_batch():
    """T16 at the optimizer level: two micro-batches with a summed loss step exactly like their union."""
    torch.manual_seed(0)
    model_a = TinyLoRAMLP()
    model_b = copy.deepcopy(model_a)
    (x1, y1), (x2, y2) = batches(2)
    opt_a, opt_b = lk.LoRSum(model_a, lr=0.1, iters=1), lk.LoRSum(model_b, lr=0.1, iters=1)

    def summed(model, x, y):
        return nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum")

    summed(model_a, x1, y1).backward()
    summed(model_a, x2, y2).backward()
    opt_a.step()
    summed(model_b, torch.cat([x1, x2]), torch.cat([y1, y2])).backward()
    opt_b.step()
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert rel_err(pa, pb) < 1e-5


# ---------------------------------------------------------------------------------------------------
# torch.optim behaviour


def test_param_groups_have_their_own_lr():
    torch.manual_seed(0)
    model = TinyLoRAMLP()
    twin = copy.deepcopy(model)
    A1, head = model.l1.lora_A.weight.detach().clone(), model.head.weight.detach().clone()
    groups = [
        {"params": [model.l1.lora_A.weight, model.l1.lora_B.weight], "lr": 0.0, "lmbd": 0.0},
        {"params": [model.l2.lora_A.weight, model.l2.lora_B.weight, model.l3.lora_A.weight,
                    model.l3.lora_B.weight]},
        {"params": list(model.head.parameters()), "lr": 0.0},
    ]
    opt = lk.LoRSum(model, lr=0.2, param_groups=groups)
    assert [g["kind"] for g in opt.param_groups] == ["lora", "lora", "other"]
    assert opt.param_groups[1]["lr"] == 0.2 and opt.param_groups[2]["betas"] == (0.9, 0.999)
    ref = lk.LoRSum(twin, lr=0.2)
    batch = batches(1)[0]
    for o, m in ((opt, model), (ref, twin)):
        loss_of(m, batch).backward()
        o.step()
    assert rel_err(model.l1.lora_A.weight, A1) < 1e-6  # lr 0 (and λ 0): the layer stays
    assert torch.equal(model.head.weight, head)
    assert rel_err(model.l2.lora_B.weight, twin.l2.lora_B.weight) < 1e-6  # default lr: as without groups
    assert rel_err(twin.l1.lora_A.weight, A1) > 1e-4


def test_param_group_errors():
    torch.manual_seed(0)
    model = TinyLoRAMLP()
    with pytest.raises(ValueError, match="same parameter group"):
        lk.LoRSum(model, param_groups=[{"params": [model.l1.lora_A.weight]},
                                       {"params": [model.l1.lora_B.weight]}])
    with pytest.raises(ValueError, match="mixes LoRA factors"):
        lk.LoRSum(model, param_groups=[{"params": [model.l1.lora_A.weight, model.l1.lora_B.weight,
                                                   model.head.weight]}])


def test_lr_scheduler_is_read_every_step():
    torch.manual_seed(0)
    model = TinyLoRAMLP()
    twin = copy.deepcopy(model)
    data = batches(3)
    opt = lk.LoRSum(model, lr=0.4, iters=1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5**t)
    for batch in data:
        opt.zero_grad()
        loss_of(model, batch).backward()
        opt.step()
        sched.step()
    ref = lk.LoRSum(twin, lr=0.4, iters=1)
    for t, batch in enumerate(data):  # the same run with the lrs set by hand
        ref.param_groups[0]["lr"], ref.param_groups[1]["lr"] = 0.4 * 0.5**t, 1e-4 * 0.5**t
        ref.zero_grad()
        loss_of(twin, batch).backward()
        ref.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.4 * 0.5**3)
    for pa, pb in zip(model.parameters(), twin.parameters()):
        assert rel_err(pa, pb) < 1e-5


def test_closure_is_evaluated_with_grad():
    torch.manual_seed(0)
    model = TinyLoRAMLP()
    batch = batches(1)[0]
    opt = lk.LoRSum(model, lr=0.1)

    def closure():
        opt.zero_grad()
        loss = loss_of(model, batch)
        loss.backward()
        return loss

    A0 = model.l1.lora_A.weight.detach().clone()
    with torch.no_grad():
        expected = loss_of(model, batch)
    loss = opt.step(closure)
    assert loss.grad_fn is not None  # evaluated with grad enabled although step() runs under no_grad
    assert torch.allclose(loss.detach(), expected)
    assert rel_err(model.l1.lora_A.weight, A0) > 1e-5


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_dict_round_trip_continues_bit_identically(name):
    torch.manual_seed(0)
    model = TinyLoRAMLP()
    data = batches(7)
    opt = make(name, model)
    train(model, opt, data[:3])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    train(model, opt, data[3:])

    buf.seek(0)
    saved = torch.load(buf, map_location="cpu")
    torch.manual_seed(123)  # a different init: everything must come from the checkpoint
    resumed = TinyLoRAMLP()
    resumed.load_state_dict(saved["model"])
    opt2 = make(name, resumed, seed=99)
    opt2.load_state_dict(saved["opt"])
    train(resumed, opt2, data[3:])
    for pa, pb in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(pa, pb)
    sa, sb = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for key in sa:
        if isinstance(sa[key], torch.Tensor):
            assert torch.equal(sa[key], sb[key])
            continue
        for k in sa[key]:
            assert torch.equal(sa[key][k], sb[key][k]), (key, k)


@pytest.mark.parametrize("name", ["lorsum_momentum", "scaled_kfac"])
def test_bf16_parameters_keep_fp32_state_through_load(name):
    torch.manual_seed(0)
    model = TinyLoRAMLP(dtype=torch.bfloat16)
    data = batches(3, dtype=torch.bfloat16)
    opt = make(name, model)
    train(model, opt, data[:2])
    assert model.l1.lora_A.weight.dtype == torch.bfloat16
    fp32_keys = [k for k, v in opt.state[model.l1.lora_A.weight].items() if v.is_floating_point()]
    assert fp32_keys and all(opt.state[model.l1.lora_A.weight][k].dtype == torch.float32 for k in fp32_keys)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt2 = make(name, model)
    opt2.load_state_dict(torch.load(buf, map_location="cpu"))
    for k in fp32_keys:
        assert opt2.state[model.l1.lora_A.weight][k].dtype == torch.float32
        assert torch.equal(opt2.state[model.l1.lora_A.weight][k], opt.state[model.l1.lora_A.weight][k])
    train(model, opt2, data[2:])
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", ["lorsum_momentum", "scaled_kfac", "scaled_shampoo"])
def test_fp32_matches_fp64_over_steps(name):
    torch.manual_seed(0)
    model32 = TinyLoRAMLP()
    model64 = copy.deepcopy(model32).double()
    opt32, opt64 = make(name, model32), make(name, model64)
    assert opt64.state[model64.l1.lora_A.weight]["step"].dtype == torch.int64
    float_state = [v for v in opt64.state[model64.l1.lora_A.weight].values() if v.is_floating_point()]
    assert all(v.dtype == torch.float64 for v in float_state)
    data = batches(3)
    train(model32, opt32, data)
    train(model64, opt64, [(x.double(), y) for x, y in data])
    for p32, p64 in zip(model32.parameters(), model64.parameters()):
        assert rel_err(p32, p64) < 1e-4


def test_scaled_lorsum_beta2_warmup_metric_follows_the_data():
    """Spec §6.1: with the warm-up, β2_t = min(β2, 1 − 1/(t+1)); the first batch replaces the initial 1."""
    torch.manual_seed(0)
    model = TinyLoRAMLP()
    inputs = {}
    hook = model.l2.register_forward_hook(
        lambda module, args, out: inputs.__setitem__("x", args[0].detach().reshape(-1, args[0].shape[-1])))
    opt = lk.ScaledLoRSum(model, lr=0.3, betas=(0.9, 0.9), beta2_warmup=True, normalize_step=False)
    state = opt.state[model.l2.lora_A.weight]
    expected = None
    for t, batch in enumerate(batches(4)):
        opt.zero_grad()
        loss_of(model, batch).backward()
        opt.step()
        stat = inputs["x"].double().pow(2).mean(0)  # diagonal K-FAC input statistic
        beta2 = min(0.9, 1 - 1 / (t + 1))
        expected = stat if t == 0 else beta2 * expected + (1 - beta2) * stat
        assert rel_err(state["metric_in"], expected) < 1e-5, t
        assert state["metric_updates"].item() == t + 1
    hook.remove()
    plain = lk.ScaledLoRSum(model, beta2_warmup=False)  # the official code's EMA: no count kept
    assert "metric_updates" not in plain.state[model.l2.lora_A.weight]
    with pytest.raises(TypeError, match="beta2_warmup"):
        lk.ScaledLoRSum(model, beta2_warmup=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_warmup_beta2_on_the_host_is_the_tensor_ops_value_bit_for_bit(dtype):
    """The streamed step's β2_t for one layer, computed on the host: what the (L, 1) tensor ops give, exactly,
    for every count up to 5000 and a few β2 (the fused K-FAC ops take it as a number either way)."""
    from lorsum_kernels.optim.lorsum import warmup_beta2_on_host

    for beta2 in (0.99, 0.999, 0.9, 0.5, 1e-3):
        for t in list(range(5001)) + [2**24 - 1, 2**24 + 3]:
            count = torch.tensor(float(t), dtype=dtype)
            tensor_ops = float((1 - 1 / (count + 1)).clamp(max=beta2))
            assert warmup_beta2_on_host(count, beta2) == tensor_ops, (beta2, t)
    assert warmup_beta2_on_host(torch.zeros(2), 0.99) is None
    assert warmup_beta2_on_host(torch.zeros((), dtype=torch.bfloat16), 0.99) is None


# ---------------------------------------------------------------------------------------------------
# non-finite steps are skipped and counted


def _poison_first_layer_grad(model):
    """A forward hook registered before the optimizer's: it turns l1's output gradient into NaN."""

    def hook(module, args, output):
        output.register_hook(lambda g: g * float("nan"))

    return model.l1.register_forward_hook(hook)


@pytest.mark.parametrize("name", ["lorsum_momentum", "scaled_kfac", "svdlora"])
def test_non_finite_layer_is_skipped_and_counted(name):
    torch.manual_seed(0)
    model = TinyLoRAMLP()
    handle = _poison_first_layer_grad(model)
    opt = make(name, model)
    snapshot = {k: v.clone() for k, v in opt.state[model.l1.lora_A.weight].items()}
    A1, A2 = model.l1.lora_A.weight.detach().clone(), model.l2.lora_A.weight.detach().clone()
    loss_of(model, batches(1)[0]).backward()
    opt.step()
    assert torch.equal(model.l1.lora_A.weight, A1)
    for k, v in opt.state[model.l1.lora_A.weight].items():
        if k == "skipped_steps":
            assert v.item() == 1
        else:
            assert torch.equal(v, snapshot[k]), k
    assert not torch.equal(model.l2.lora_A.weight, A2)
    assert opt.state[model.l2.lora_A.weight]["step"].item() == 1
    assert opt.state["skipped_steps"].item() == 1
    handle.remove()
    opt.zero_grad()
    loss_of(model, batches(1, seed=5)[0]).backward()
    opt.step()
    assert not torch.equal(model.l1.lora_A.weight, A1)
    assert opt.state["skipped_steps"].item() == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 7, 5), (1, 1), (4, 0), (2, 1, 1031)])
def test_finite_rows_matches_isfinite(dtype, shape):
    g = torch.Generator().manual_seed(0)
    t = torch.randn(shape, generator=g).to(dtype)
    flat = t.view(shape[0], -1)
    bad = [float("nan"), float("inf"), -float("inf")]
    for row in range(0, shape[0], 2):  # every other row gets one non-finite value, at a random place
        if flat.shape[1]:
            flat[row, torch.randint(flat.shape[1], (1,), generator=g)] = bad[row % 3]
    expected = t.reshape(shape[0], -1).isfinite().all(1)
    assert torch.equal(finite_rows(t, shape[0]), expected)
    assert torch.equal(finite_rows(t.transpose(0, -1), 1), expected.all().view(1))  # a non-contiguous view


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), None])
def test_finite_rows_of_matches_isfinite(dtype, bad):
    """The step's check of its results: per layer (leading row), finite in every tensor; the sum shortcut
    agrees with the exact check, including a non-finite value in one tensor of one layer only, and finite
    values whose sum overflows."""
    g = torch.Generator().manual_seed(2)
    L = 3
    tensors = [torch.randn(L, 4, 9, generator=g).to(dtype), torch.randn(L, 11, 4, generator=g).to(dtype),
               torch.randn(L, 0, generator=g).to(dtype), torch.arange(L)]  # an empty and an integer state
    if bad is not None:
        tensors[1][1, torch.randint(11, (1,), generator=g), 2] = bad
    expected = torch.stack([t.reshape(L, -1).isfinite().all(1) for t in tensors]).all(0)
    assert torch.equal(finite_rows_of(tensors, L), expected)
    assert expected.all().item() == (bad is None)
    big = [torch.full((L, 64, 33), torch.finfo(dtype).max / 4, dtype=dtype)]
    assert not big[0].sum().isfinite() and finite_rows_of(big, L).all().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), None])
def test_finite_data_matches_isfinite(dtype, bad):
    g = torch.Generator().manual_seed(1)
    t = torch.randn(37, 1031, generator=g).to(dtype)
    if bad is not None:
        t[torch.randint(37, (1,), generator=g), torch.randint(1031, (1,), generator=g)] = bad
    assert finite_data(t).item() == t.isfinite().all().item()
    assert finite_data(t.mT).item() == t.isfinite().all().item()  # a non-contiguous view
    assert finite_data(t[:0]).item()  # no tokens
    # Finite elements whose sum overflows (fp16 at 65504; any dtype near its largest value): still finite.
    big = torch.full((64, 33), torch.finfo(dtype).max / 4, dtype=dtype)
    assert not big.sum().isfinite() and finite_data(big).item()


@pytest.mark.parametrize("one_reduction", [True, False], ids=["accelerator", "cpu"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), None])
def test_the_exact_finite_checks_match_isfinite(bad, one_reduction, monkeypatch):
    """The checks a GPU runs (max |x| of every slice by one _foreach_norm, then x − x == 0) and the CPU's
    exact ones (each tensor's extremes), both run here on CPU tensors of mixed dtypes, one empty and one of
    integers: per leading slice and and-ed over tensors, and per tensor."""
    monkeypatch.setattr(guards, "_one_reduction_for_all", lambda device: one_reduction)
    g = torch.Generator().manual_seed(2)
    tensors = [torch.randn(3, 5, 7, generator=g), torch.randn(3, 11, generator=g).to(torch.bfloat16),
               torch.randn(3, 4, generator=g, dtype=torch.float64), torch.empty(3, 0),
               torch.arange(6).view(3, 2)]
    if bad is not None:
        tensors[1][1, 4] = bad
    expected_rows = torch.stack([t.isfinite().flatten(1).all(1) for t in tensors]).all(0)
    assert torch.equal(guards._finite_extremes(tensors, 3), expected_rows)
    assert torch.equal(finite_rows(tensors[1], 3), tensors[1].isfinite().all(1))
    expected_each = torch.stack([t.isfinite().all() for t in tensors])
    assert torch.equal(guards.finite_each(tensors), expected_each)
    # Finite values near the largest of their dtype (x − x is 0, no overflow): finite.
    big = torch.full((2, 9), torch.finfo(torch.float16).max, dtype=torch.float16)
    assert guards.finite_each([big, -big]).all() and guards._finite_extremes([big], 2).all()


class SharedInputLoRA(nn.Module):
    """Two LoRA layers reading the same input tensor (as q, k and v do), a third after them."""

    def __init__(self):
        super().__init__()
        self.q = lk.LoRALinear(nn.Linear(12, 10), 3)
        self.k = lk.LoRALinear(nn.Linear(12, 10), 3)
        self.out = lk.LoRALinear(nn.Linear(10, 5), 3)
        for layer in (self.q, self.k, self.out):
            nn.init.normal_(layer.lora_B.weight, std=0.1)

    def forward(self, x):
        return self.out(torch.tanh(self.q(x)) * torch.tanh(self.k(x)))


def _finite_method_step(self, group, A, B, X, S, state, grads, reduce, backend):
    return A + 0.01, B + 0.01, state  # finite whatever it reads: only the input check can skip


def _replace_captured_x(opt, module, x):
    records = opt._capture._tap(module).records
    records[0] = (x, records[0][1], x._version)


POISONS = ["X_q", "X_shared", "S_q", "S_k", "none"]


def _step_with_poisoned_capture(model: SharedInputLoRA, opt, poison: str, device="cpu") -> None:
    """One backward, a non-finite value put into the captured data named by ``poison``, one step; then
    exactly the layers that read it (both q and k for their shared X) were skipped and counted."""
    model(torch.randn(2, 4, 12).to(device)).pow(2).sum().backward()
    (xq, sq), (xk, sk) = opt._capture.get(model.q), opt._capture.get(model.k)
    assert xq.data_ptr() == xk.data_ptr()
    bad_x = xq.clone()
    bad_x[1, 3] = float("inf")
    if poison == "X_q":
        _replace_captured_x(opt, model.q, bad_x)
    elif poison == "X_shared":
        _replace_captured_x(opt, model.q, bad_x)
        _replace_captured_x(opt, model.k, bad_x)
    elif poison == "S_q":
        sq[0, 0] = float("nan")
    elif poison == "S_k":
        sk[2, 1] = -float("inf")
    before = {name: getattr(model, name).lora_A.weight.detach().clone() for name in ("q", "k", "out")}
    opt.step()
    skipped = {"X_q": {"q"}, "X_shared": {"q", "k"}, "S_q": {"q"}, "S_k": {"k"}, "none": set()}[poison]
    for name, A0 in before.items():
        A = getattr(model, name).lora_A.weight
        assert torch.equal(A, A0) == (name in skipped), name
        assert opt.state[A]["skipped_steps"].item() == int(name in skipped)
    assert opt.state["skipped_steps"].item() == int(bool(skipped))  # steps that skipped anything


@pytest.mark.parametrize("poison", POISONS)
def test_captured_inputs_are_checked_once_per_tensor_and_per_layer(poison, monkeypatch):
    """A non-finite value in captured data skips exactly the layers that read it, even when the method's
    outputs stay finite; an X shared by q and k (one check for both) skips both. On the torch backend, whose
    results are not assumed to carry the data's NaN (the native one's are: next test)."""
    torch.manual_seed(0)
    model = SharedInputLoRA()
    opt = lk.LoRSum(model, lr=0.1, backend="torch")
    monkeypatch.setattr(lk.LoRSum, "_method_step", _finite_method_step)
    _step_with_poisoned_capture(model, opt, poison)


@pytest.mark.parametrize("device", [
    pytest.param("cpu", marks=pytest.mark.skipif(not has_native_op("lorsum_update_in", "cpu"),
                                                 reason="the native CPU ops are not built")),
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not torch.cuda.is_available() or not has_native_op("lorsum_update_in", "cuda"),
        reason="needs a CUDA GPU and the native CUDA ops")]),
])
@pytest.mark.parametrize("poison", POISONS)
@pytest.mark.parametrize("make", [
    lambda m: lk.LoRSum(m, lr=0.1),
    lambda m: lk.LoRSum(m, lr=0.1, iters=0),
    lambda m: lk.LoRSum(m, lr=0.1, momentum=0.9),
    lambda m: lk.ScaledLoRSum(m),
    lambda m: lk.ScaledLoRSum(m, metric="shampoo", betas=(0.0, 0.99)),
], ids=["lorsum", "k0", "momentum", "scaled", "shampoo"])
def test_native_results_carry_bad_captured_data(make, poison, device, monkeypatch):
    """On the native CPU and CUDA ops the separate pass over X and S is skipped (it would cost as much as a
    token product) and the results' check catches bad data instead: the same layers skip as in the test
    above, with the real method step, and the data are never checked on their own."""
    torch.manual_seed(0)
    model = SharedInputLoRA().to(device)
    opt = make(model)
    checked = []
    monkeypatch.setattr(base, "finite_once",
                        lambda ts, cache: checked.extend(ts) or guards.finite_once(ts, cache))
    _step_with_poisoned_capture(model, opt, poison, device)
    assert checked == []


def test_non_finite_other_params_are_skipped():
    torch.manual_seed(0)
    model = TinyLoRAMLP()
    opt = lk.LoRSum(model, lr=0.1)
    head = model.head.weight.detach().clone()
    x, y = batches(1)[0]
    loss_of(model, (x, y)).backward()
    model.head.weight.grad[0, 0] = float("inf")
    opt.step()
    assert torch.equal(model.head.weight, head)
    assert opt.state[model.head.weight]["step"].item() == 0
    assert opt.state["skipped_steps"].item() == 1


# ---------------------------------------------------------------------------------------------------
# bad input: clear errors before anything changes


class _WideRank(nn.Module):
    def __init__(self):
        super().__init__()
        self.lora_A = nn.Linear(4, 6, bias=False)  # rank 6 > min(4, 5)
        self.lora_B = nn.Linear(6, 5, bias=False)

    def forward(self, x):
        return self.lora_B(self.lora_A(x))


def test_bad_input_errors():
    torch.manual_seed(0)
    model = TinyLoRAMLP()
    with pytest.raises(ValueError, match="no trainable LoRA layers"):
        lk.LoRSum(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(TypeError, match="takes the model"):
        lk.LoRSum(model.parameters())
    with pytest.raises(ValueError, match="rank 6 is larger than min"):
        lk.LoRSum(_WideRank())
    with pytest.raises(ValueError, match="backend"):
        lk.LoRSum(model, backend="cuda-magic")
    with pytest.raises(ValueError, match="momentum_rank"):
        lk.LoRSum(model, momentum=0.9, momentum_rank=100)
    with pytest.raises(ValueError, match="iters"):
        lk.LoRSum(model, iters=-1)
    with pytest.raises(ValueError, match="metric"):
        lk.ScaledLoRSum(model, metric="full")
    with pytest.raises(ValueError, match="lr"):
        lk.LoRSum(model, lr=-1.0)
    with pytest.raises(ValueError, match="unknown optimizer"):
        lk.create_optimizer(model, "sgd_but_better")


def test_load_state_dict_shape_mismatch_changes_nothing():
    torch.manual_seed(0)
    small = TinyLoRAMLP(r=3)
    big = TinyLoRAMLP(r=4)
    opt_small = lk.LoRSum(small, momentum=0.9)
    opt_big = lk.LoRSum(big, momentum=0.9)
    before = copy.deepcopy(opt_small.state_dict())
    with pytest.raises(ValueError, match="shape"):
        opt_small.load_state_dict(opt_big.state_dict())
    after = opt_small.state_dict()
    for key, entries in before["state"].items():
        if isinstance(entries, torch.Tensor):
            assert torch.equal(entries, after["state"][key])
            continue
        for k, v in entries.items():
            assert torch.equal(v, after["state"][key][k])


def test_create_optimizer_names():
    torch.manual_seed(0)
    model = TinyLoRAMLP()
    assert isinstance(lk.create_optimizer(model, "lorsum", lr=0.1), lk.LoRSum)
    assert isinstance(lk.create_optimizer(model, "scaled_lorsum", lr=0.1), lk.ScaledLoRSum)
    adamw = lk.create_optimizer(model, "adamw", lr=1e-3)
    assert isinstance(adamw, torch.optim.AdamW)
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in adamw.param_groups) == n_trainable


def test_records_of_a_step_that_never_ran_are_dropped():
    """An AMP-style skipped step (backward, no step, model.zero_grad()) must not leak its X/S into the next."""
    torch.manual_seed(0)
    model = TinyLoRAMLP()
    twin = copy.deepcopy(model)
    stale, fresh = batches(2)
    opt, ref = lk.LoRSum(model, lr=0.2), lk.LoRSum(twin, lr=0.2)
    loss_of(model, stale).backward()
    model.zero_grad()  # the optimizer's own zero_grad is never called, as in the HF Trainer
    loss_of(model, fresh).backward()
    opt.step()
    loss_of(twin, fresh).backward()
    ref.step()
    for pa, pb in zip(model.parameters(), twin.parameters()):
        assert torch.equal(pa, pb)


def test_unused_layer_after_zero_grad_without_none_is_skipped():
    torch.manual_seed(0)
    model = TinyLoRAMLP()
    opt = lk.LoRSum(model, lr=0.2)
    loss_of(model, batches(1)[0]).backward()
    opt.step()
    opt.zero_grad(set_to_none=False)  # l3 keeps a zero gradient tensor
    A3 = model.l3.lora_A.weight.detach().clone()
    x, y = batches(1, seed=3)[0]
    h = torch.tanh(model.l2(torch.tanh(model.l1(x))))  # l3 unused this step
    nn.functional.cross_entropy(model.head(h).flatten(0, 1), y.flatten()).backward()
    opt.step()
    assert torch.equal(model.l3.lora_A.weight, A3)
