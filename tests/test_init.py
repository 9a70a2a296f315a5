"""LoRA-One / LoRA-GA initialisation: spec/lora_one.md §7 properties, the implicit power method, PEFT
interop, the linear task of spec/lorsum.md §10, memory (no m×n tensor), state restoration, bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

import lorsum_kernels as lk
from lorsum_kernels import init as init_module
from lorsum_kernels.functional import (
    lora_ga_factors,
    lora_one_factors,
    randomized_svd,
    svdlora_step,
    truncated_svd,
)

from .conftest import TinyLoRAMLP, rel_err

# ---------------------------------------------------------------------------------------------------
# helpers


def mlp_loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())


def mlp_batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, 7, 12, generator=g), torch.randint(0, 5, (2, 7), generator=g)) for _ in range(n)]


def base_weight(module):
    return module.get_base_layer().weight if hasattr(module, "get_base_layer") else module.base.weight


def reference_gradients(model, batches, loss_fn):
    """G of every LoRA layer, independently: the mean over batches of dL_b/dW0, on a copy whose LoRA B
    factors are zero (the gradient at the base weight) and whose base weights are trainable."""
    twin = copy.deepcopy(model)
    layers = lk.find_lora_layers(twin)
    with torch.no_grad():
        for layer in layers:
            layer.B.zero_()
    weights = [base_weight(layer.module) for layer in layers]
    for w in weights:
        w.requires_grad_(True)
        w.grad = None
    for batch in batches:
        loss_fn(twin, batch).backward()
    return {layer.name: w.grad.double() / len(batches) for layer, w in zip(layers, weights)}


def merged_delta(layer):
    """s·B·A of a layer, in fp64."""
    return layer.scale * (layer.B.double() @ layer.A.double())


def best_rank(G, r):
    U, s, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    return (U[:, :r] * s[:r]) @ Vh[:r], s


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert torch.equal(v, after[k]), f"{k} changed"


class LinearTask(nn.Module):
    """One LoRALinear layer fed the identity: the model's output is the merged weight transposed."""

    def __init__(self, d_in, d_out, r, alpha=None, W0=None):
        super().__init__()
        base = nn.Linear(d_in, d_out, bias=False)
        with torch.no_grad():
            base.weight.copy_(torch.zeros(d_out, d_in) if W0 is None else W0)
        self.lin = lk.LoRALinear(base, r, alpha)

    def forward(self, x):
        return self.lin(x)


def sum_mse(model, batch):
    x, y = batch
    return (model(x) - y).square().sum()


def half_sum_mse(model, batch):
    return 0.5 * sum_mse(model, batch)


def gapped(m, n, top, tail=0.05, seed=0):
    """An m×n matrix with singular values ``top`` then a flat tail: a clear spectral gap."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    k = min(m, n)
    sig = torch.full((k,), tail, dtype=torch.float64)
    sig[: len(top)] = torch.tensor(top, dtype=torch.float64)
    sig[len(top):] *= torch.linspace(1.0, 0.5, k - len(top), dtype=torch.float64)
    return (U[:, :k] * sig) @ V[:, :k].T


# ---------------------------------------------------------------------------------------------------
# pure functions


@pytest.mark.parametrize("scale_kind", ["rslora", "plain"])
def test_lora_one_factor_identities(scale_kind):
    """spec §7.1 on an explicit G (m=40, n=30, r=4, α=16, γ=128)."""
    torch.manual_seed(0)
    m, n, r, alpha, gamma = 40, 30, 4, 16.0, 128.0
    s = alpha / math.sqrt(r) if scale_kind == "rslora" else alpha / r
    G = torch.randn(m, n, dtype=torch.float64)
    U, sig, Vh = truncated_svd(G, r)
    A0, B0 = lora_one_factors(U, sig, Vh, gamma=gamma)
    Gr, full = best_rank(G, r)
    assert rel_err(s * B0 @ A0, -(s / (gamma * full[0])) * Gr) < 1e-12
    balance = torch.diag(sig / sig[0]) / gamma
    assert rel_err(B0.T @ B0, balance) < 1e-12 and rel_err(A0 @ A0.T, balance) < 1e-12
    assert torch.linalg.matrix_norm(s * B0 @ A0, 2).item() == pytest.approx(s / gamma, rel=1e-12)
    if scale_kind == "rslora":
        assert s / gamma == pytest.approx(0.0625)  # the spec's number for α=16, γ=128, r=4
    assert torch.linalg.matrix_norm(A0, 2).item() == pytest.approx(gamma**-0.5, rel=1e-12)
    assert torch.linalg.matrix_norm(B0, 2).item() == pytest.approx(gamma**-0.5, rel=1e-12)
    # The SVD's sign convention cancels in the product.
    flip = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64)
    A1, B1 = lora_one_factors(U * flip, sig, flip[:, None] * Vh, gamma=gamma)
    assert rel_err(B1 @ A1, B0 @ A0) < 1e-14
    # Descent: ⟨G, ΔW⟩ = −(s/(γσ_1)) Σ σ_i² < 0 (the official code's SVD of −G).
    first_order = -(s / (gamma * sig[0])) * (sig**2).sum()
    assert (G * (s * B0 @ A0)).sum().item() == pytest.approx(first_order.item(), rel=1e-10)
    # The older "Spectral-Init" scale: s·B0·A0 = −(s/γ)[G]_r.
    A2, B2 = lora_one_factors(U, sig, Vh, gamma=gamma, normalize=False)
    assert rel_err(s * B2 @ A2, -(s / gamma) * Gr) < 1e-12
    # fp32 math for fp32 inputs, and a zero G gives zero factors, never NaN.
    A3, B3 = lora_one_factors(U.float() * 0, sig.float() * 0, Vh.float(), gamma=gamma)
    assert A3.dtype == torch.float32 and torch.equal(A3, torch.zeros_like(A3)) and torch.isfinite(B3).all()


def test_lora_ga_factor_identities():
    """spec §7.3: one plain GD step from LoRA-GA's init is −η s² (√m/γ)[G]_{2r} + η² s³ G A0ᵀ B0ᵀ G."""
    torch.manual_seed(1)
    m, n, r, s, gamma, eta = 40, 30, 4, 2.0, 16.0, 1e-2
    G = torch.randn(m, n, dtype=torch.float64)
    U, sig, Vh = truncated_svd(G, 2 * r)
    A0, B0 = lora_ga_factors(U, sig, Vh, r, gamma=gamma)
    assert A0.shape == (r, n) and B0.shape == (m, r)
    grad_A, grad_B = s * B0.T @ G, s * G @ A0.T
    A1, B1 = A0 - eta * grad_A, B0 - eta * grad_B
    G2r, _ = best_rank(G, 2 * r)
    expected = -eta * s**2 * (math.sqrt(m) / gamma) * G2r + eta**2 * s**3 * G @ A0.T @ B0.T @ G
    assert rel_err(s * (B1 @ A1 - B0 @ A0), expected) < 1e-12


def test_randomized_svd_matches_exact_with_a_gap():
    G = gapped(70, 50, [10, 8, 6, 5], seed=3)
    for dtype in (torch.float64, torch.float32):
        U, sig, Vh = randomized_svd(G.to(dtype), 4, generator=torch.Generator().manual_seed(5))
        Ue, se, Vhe = truncated_svd(G, 4)
        assert U.dtype == dtype
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        assert rel_err((U * sig) @ Vh, (Ue * se) @ Vhe) < tol
        assert rel_err(sig, se) < tol


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_power_method_products_match_dense(dtype, backend):
    """The sink's products G·V and Gᵀ·U (``ops.pair_products`` on the token pair) against the dense G."""
    g = torch.Generator().manual_seed(2)
    layer = lk.LoRALinear(nn.Linear(7, 5), 3, 6.0)
    target = init_module._Target(lk.find_lora_layers(nn.Sequential(layer))[0], torch.float32, 4)
    X, S = torch.randn(9, 7, generator=g).to(dtype), torch.randn(9, 5, generator=g).to(dtype)  # T=9, n=7, m=5
    V, U = torch.randn(7, 4, generator=g), torch.randn(5, 4, generator=g)
    G = S.double().mT @ X.double()
    tol = 1e-5  # G is formed from the same (rounded) inputs: only the fp32 accumulation differs
    for side, operand, expected in (("right", V, G @ V.double()), ("left", U, G.mT @ U.double())):
        target.start(side, operand)
        target.accumulate(X, S, backend)
        target.accumulate(X, S, backend)  # accumulates over batches
        assert target.acc.dtype == torch.float32 and rel_err(target.acc, 2 * expected) < tol, side


# ---------------------------------------------------------------------------------------------------
# model level: the estimate and the written factors


@pytest.mark.parametrize("method", ["svd", "power"])
def test_lora_one_init_matches_explicit_gradient(method):
    """The factors realise −(s/(γσ_1))[G]_r for G = mean over batches of the per-batch gradient (§7.1,
    §7.6), taken at W0 although the model's B factors start non-zero; W0 and the head are untouched."""
    torch.manual_seed(0)
    model = TinyLoRAMLP()
    batches = mlp_batches(3)
    G_ref = reference_gradients(model, batches, mlp_loss)
    heads = copy.deepcopy(model.head.state_dict())
    bases = [layer.base.weight.clone() for layer in (model.l1, model.l2, model.l3)]
    gamma = 32.0
    # oversample ≥ min(m, n): a complete sketch, so the power path is exact here whatever the spectrum
    # (the gap tests below cover the inexact regime).
    sigmas = lk.lora_one_init(model, batches, gamma=gamma, loss_fn=mlp_loss, method=method, oversample=20,
                              power_iters=1)
    for layer in lk.find_lora_layers(model):
        G = G_ref[layer.name]
        Gr, full = best_rank(G, layer.rank)
        assert rel_err(sigmas[layer.name], full[: layer.rank]) < 1e-5
        assert rel_err(merged_delta(layer), -(layer.scale / (gamma * full[0])) * Gr) < 1e-5
    for w, b in zip((model.l1, model.l2, model.l3), bases):
        assert torch.equal(w.base.weight, b)
    for k, v in model.head.state_dict().items():
        assert torch.equal(v, heads[k])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_parameter_dtypes(dtype):
    """bf16 factors: fp32 math, results written in bf16; fp64 factors keep fp64 math."""
    torch.manual_seed(0)
    ref = TinyLoRAMLP()
    model = TinyLoRAMLP(dtype=dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in ref.state_dict().items()})
    batches = mlp_batches(2)
    cast = [(x.to(dtype), y) for x, y in batches]
    kw = dict(gamma=16.0, oversample=20, power_iters=1)
    lk.lora_one_init(ref, batches, loss_fn=mlp_loss, **kw)
    sig = lk.lora_one_init(model, cast, loss_fn=mlp_loss, **kw)
    for layer, layer_ref in zip(lk.find_lora_layers(model), lk.find_lora_layers(ref)):
        assert layer.A.dtype == dtype and layer.B.dtype == dtype
        assert sig[layer.name].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        tol = 1e-5 if dtype == torch.float64 else 5e-2  # bf16 forward/backward vs fp32
        assert rel_err(merged_delta(layer), merged_delta(layer_ref)) < tol


def test_mean_or_sum_loss_gives_the_same_init():
    """spec §8: η ∝ 1/σ_1 cancels the scale of G, so a 10× loss gives the same factors."""
    batches = mlp_batches(2)
    torch.manual_seed(0)
    a = TinyLoRAMLP()
    b = copy.deepcopy(a)
    sa = lk.lora_one_init(a, batches, gamma=16.0, loss_fn=mlp_loss, method="svd")
    sb = lk.lora_one_init(b, batches, gamma=16.0, loss_fn=lambda m, x: 10 * mlp_loss(m, x), method="svd")
    for la, lb in zip(lk.find_lora_layers(a), lk.find_lora_layers(b)):
        assert rel_err(merged_delta(lb), merged_delta(la)) < 1e-5
        assert rel_err(sb[lb.name], 10 * sa[la.name]) < 1e-5


@pytest.mark.parametrize("method", ["svd", "power"])
def test_toy_recovery(method):
    """spec §7.2: L = ½‖W − W*‖², rank(W* − W0) = r, γ = s/σ_1(G) ⇒ loss after init 0."""
    torch.manual_seed(3)
    m, n, r = 24, 18, 3
    W0 = torch.randn(m, n)
    Wstar = W0 + gapped(m, n, [3.0, 2.0, 1.5], tail=0.0, seed=4).float()
    model = LinearTask(n, m, r, alpha=2.0 * r, W0=W0)
    batch = (torch.eye(n), Wstar.T.clone())
    sigma1 = torch.linalg.svdvals((W0 - Wstar).double())[0].item()
    s = model.lin.scaling
    with torch.no_grad():
        before = half_sum_mse(model, batch).item()
    lk.lora_one_init(model, [batch], gamma=s / sigma1, loss_fn=half_sum_mse, method=method)
    with torch.no_grad():
        after = half_sum_mse(model, batch).item()
    assert after < 1e-9 * before
    # For a general γ the residual is (1 − s/(γσ_1)) times the top-r part.
    model2 = LinearTask(n, m, r, alpha=2.0 * r, W0=W0)
    lk.lora_one_init(model2, [batch], gamma=4 * s / sigma1, loss_fn=half_sum_mse, method=method)
    with torch.no_grad():
        residual = model2(torch.eye(n)).T - Wstar
    assert rel_err(residual, 0.75 * (W0 - Wstar)) < 1e-5


def test_linear_task_matches_one_svd_step():
    """Done-when: the deterministic linear task of spec/lorsum.md §10 at full size (W* 200×600 Gaussian,
    X = I, Linear(200→600) with W0 = 0, r = 8, sum-MSE). LoRA-One's init alone realises the SVD step
    Π_r(−η G) with η = s/(γσ_1(G)), so its excess loss is that of one rank-r SVD step."""
    torch.manual_seed(0)
    d_in, d_out, r, lr = 200, 600, 8, 0.5
    Wstar = torch.randn(d_in, d_out)
    batch = (torch.eye(d_in), torch.eye(d_in) @ Wstar)
    s_all = torch.linalg.svdvals(Wstar.double())
    optimum = (s_all[r:] ** 2).sum().item()  # ‖W* − Π_8 W*‖²: the best rank-8 loss
    top_energy = (s_all[:r] ** 2).sum().item()
    G = -2.0 * Wstar.T  # gradient of the sum-MSE at W = 0 (m×n = 600×200)
    sigma1 = 2.0 * s_all[0].item()

    def excess(model):
        with torch.no_grad():
            return sum_mse(model, batch).item() - optimum

    def svd_step_excess(eta):
        A, B = svdlora_step(torch.zeros(r, d_in), torch.zeros(d_out, r), G, eta)
        return ((B @ A).T.double() - Wstar.double()).square().sum().item() - optimum

    for eta in (lr, 0.1):  # lr 0.5 is the task's lr (one step reaches the optimum); 0.1 a partial step
        model = LinearTask(d_in, d_out, r)
        gamma = model.lin.scaling / (eta * sigma1)
        lk.lora_one_init(model, [batch], gamma=gamma, loss_fn=sum_mse, method="svd")
        target = svd_step_excess(eta)
        assert abs(excess(model) - target) < 1e-6 * top_energy, (eta, excess(model), target)
        # The implicit power path, default settings: this spectrum has no gap (σ_8/σ_9 ≈ 1.004), so the
        # subspace is not exact, but the init still removes > 99% of the top-8 energy the step removes.
        model = LinearTask(d_in, d_out, r)
        lk.lora_one_init(model, [batch], gamma=gamma, loss_fn=sum_mse)
        assert abs(excess(model) - target) < 1e-2 * top_energy, (eta, excess(model), target)
    assert svd_step_excess(lr) < 1e-6 * top_energy  # η = 0.5 jumps to the optimum (spec §10)


def test_linear_task_with_a_gap_power_path_is_exact():
    """The same task with a planted spectral gap: the power path reaches the SVD step's excess loss."""
    d_in, d_out, r, eta = 100, 300, 8, 0.5
    Wstar = gapped(d_in, d_out, [40 - 2 * i for i in range(r)], tail=3.0, seed=7).float()
    batch = (torch.eye(d_in), Wstar.clone())
    s_all = torch.linalg.svdvals(Wstar.double())
    optimum = (s_all[r:] ** 2).sum().item()
    model = LinearTask(d_in, d_out, r)
    lk.lora_one_init(model, [batch], gamma=model.lin.scaling / (eta * 2 * s_all[0].item()), loss_fn=sum_mse)
    with torch.no_grad():
        excess = sum_mse(model, batch).item() - optimum
    assert abs(excess) < 1e-6 * (s_all[:r] ** 2).sum().item()


def test_power_path_matches_full_svd_path_on_a_gap():
    """Model level: with a spectral gap the implicit subspace equals the full-SVD path's."""
    m, n, r = 48, 36, 4
    W0 = torch.zeros(m, n)
    Wstar = gapped(m, n, [9.0, 7.0, 6.0, 5.0], tail=0.5, seed=11).float()
    batch = (torch.eye(n), Wstar.T.clone())
    models = {k: LinearTask(n, m, r, alpha=8.0, W0=W0) for k in ("svd", "power")}
    models["power"].load_state_dict(models["svd"].state_dict())
    kw = dict(gamma=8.0, loss_fn=half_sum_mse, oversample=4, power_iters=6)
    sig = {k: lk.lora_one_init(mod, [batch], method=k, **kw) for k, mod in models.items()}
    layer_s, layer_p = (lk.find_lora_layers(models[k])[0] for k in ("svd", "power"))
    assert rel_err(merged_delta(layer_p), merged_delta(layer_s)) < 1e-5
    assert rel_err(sig["power"][layer_p.name], sig["svd"][layer_s.name]) < 1e-6
    # Principal angles between the column spaces of B: cosines 1.
    Qp, _ = torch.linalg.qr(layer_p.B.double())
    Qs, _ = torch.linalg.qr(layer_s.B.double())
    assert torch.linalg.svdvals(Qp.T @ Qs).min().item() > 1 - 1e-6


def test_deterministic_given_a_seed():
    torch.manual_seed(0)
    model = TinyLoRAMLP()
    batches = mlp_batches(2)
    a, b, c = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    kw = dict(gamma=16.0, loss_fn=mlp_loss, oversample=2, power_iters=1)  # inexact: the seed matters
    torch.manual_seed(123)
    lk.lora_one_init(a, batches, seed=7, **kw)
    torch.manual_seed(456)  # the global RNG state does not matter
    lk.lora_one_init(b, batches, seed=7, **kw)
    lk.lora_one_init(c, batches, seed=8, **kw)
    assert_unchanged(b, snapshot(a))
    assert not all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters()))


def test_train_mode_uses_the_same_dropout_masks_in_every_pass():
    """With dropout on, each pass must see the same G, or the power method mixes different matrices."""

    class DropMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1 = lk.LoRALinear(nn.Linear(12, 16), 2)
            self.drop = nn.Dropout(0.3)
            self.l2 = lk.LoRALinear(nn.Linear(16, 5), 2)

        def forward(self, x):
            return self.l2(self.drop(torch.tanh(self.l1(x))))

    torch.manual_seed(0)
    model = DropMLP()
    batches = mlp_batches(2)
    # r + oversample ≥ min(m, n): the sketch spans everything, so the power path is the exact SVD of
    # the G of its *last* pass; it matches the one-pass svd path only if every pass saw the same masks.
    runs = {}
    for method in ("svd", "power"):
        mod = copy.deepcopy(model)
        lk.lora_one_init(mod, batches, gamma=8.0, loss_fn=mlp_loss, method=method, train_mode=True,
                         power_iters=2)
        runs[method] = mod
    for ls, lp in zip(lk.find_lora_layers(runs["svd"]), lk.find_lora_layers(runs["power"])):
        assert rel_err(merged_delta(lp), merged_delta(ls)) < 1e-5
    # Dropout did act: eval mode gives another init.
    ev = copy.deepcopy(model)
    lk.lora_one_init(ev, batches, gamma=8.0, loss_fn=mlp_loss, method="svd")
    first = [lk.find_lora_layers(mod)[0] for mod in (ev, runs["svd"])]
    assert rel_err(merged_delta(first[0]), merged_delta(first[1])) > 1e-3


@pytest.mark.parametrize("method", ["svd", "power"])
def test_train_mode_with_lora_dropout_takes_the_gradient_of_the_base_weight(method):
    """With LoRA dropout on, G is still the gradient of W0, made of the module's input before dropout (the
    base model's gradient, as the official code takes it), not of the dropped-out input the LoRA path sees.
    With B held at zero the output does not depend on the masks, so the reference G needs no seeding."""
    torch.manual_seed(0)
    model = TinyLoRAMLP()
    for layer in model.lora_layers():
        layer.dropout = nn.Dropout(0.5)
    batches = mlp_batches(2)
    G_ref = reference_gradients(model.train(), batches, mlp_loss)
    gamma = 16.0
    sigmas = lk.lora_one_init(model, batches, gamma=gamma, loss_fn=mlp_loss, method=method, train_mode=True,
                              oversample=20, power_iters=1)  # a complete sketch: exact, as above
    for layer in lk.find_lora_layers(model):
        Gr, full = best_rank(G_ref[layer.name], layer.rank)
        assert rel_err(sigmas[layer.name], full[: layer.rank]) < 1e-5, layer.name
        assert rel_err(merged_delta(layer), -(layer.scale / (gamma * full[0])) * Gr) < 1e-5, layer.name


class CheckpointedMLP(nn.Module):
    """TinyLoRAMLP with its three LoRA layers in one activation-checkpointed block."""

    def __init__(self, inner, use_reentrant):
        super().__init__()
        self.inner, self.use_reentrant = inner, use_reentrant

    def _block(self, x):
        h = torch.tanh(self.inner.l1(x))
        h = torch.tanh(self.inner.l2(h))
        return torch.tanh(self.inner.l3(h))

    def forward(self, x):
        if self.use_reentrant:  # the reentrant variant builds a graph only for an input that needs a gradient
            x = x.detach().requires_grad_(True)
        return self.inner.head(checkpoint(self._block, x, use_reentrant=self.use_reentrant))


@pytest.mark.parametrize("method", ["svd", "power"])
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_counts_each_row_once(use_reentrant, method):
    """The checkpointed block runs twice per batch (forward and recomputation); G counts its rows once. The
    factors alone could not tell (σ_1 normalises a doubled G away): the singular values do."""
    torch.manual_seed(0)
    inner = TinyLoRAMLP()
    batches = mlp_batches(2)
    G_ref = reference_gradients(inner, batches, mlp_loss)
    model = CheckpointedMLP(inner, use_reentrant)
    gamma = 16.0
    sigmas = lk.lora_one_init(model, batches, gamma=gamma, loss_fn=mlp_loss, method=method, oversample=20,
                              power_iters=1)
    for layer in lk.find_lora_layers(model):
        Gr, full = best_rank(G_ref[layer.name.removeprefix("inner.")], layer.rank)
        assert rel_err(sigmas[layer.name], full[: layer.rank]) < 1e-5, layer.name
        assert rel_err(merged_delta(layer), -(layer.scale / (gamma * full[0])) * Gr) < 1e-5, layer.name


# ---------------------------------------------------------------------------------------------------
# memory: no m×n tensor


class LargestAllocation(TorchDispatchMode):
    """Sees every aten op (forward, backward, the init's own math) and records the largest freshly
    allocated output. Outputs that share storage with an input (views such as Wᵀ, in-place results)
    allocate nothing and are skipped."""

    def __init__(self):
        super().__init__()
        self.largest = (0, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = torch.utils._pytree.tree_leaves((args, kwargs))
        storages = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.untyped_storage().data_ptr() in storages:
                continue
            if t.numel() > self.largest[0]:
                self.largest = (t.numel(), f"{func} -> {tuple(t.shape)}")
        return out


def test_power_path_never_allocates_an_m_by_n_tensor():
    """The implicit path allocates nothing of m·n/4 numbers or more, in any shape, at any point of the
    call (per-batch X, S are T×n, T×m with T = 8 ≪ m, n). The full-SVD path, which does form each G,
    trips the same detector, so the detector is not blind."""
    m, n, r = 160, 120, 4

    class Wide(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1 = lk.LoRALinear(nn.Linear(n, m), r)
            self.l2 = lk.LoRALinear(nn.Linear(m, n), r)
            self.head = nn.Linear(n, 3)  # trainable, but its gradient is never computed

        def forward(self, x):
            return self.head(self.l2(torch.relu(self.l1(x))))

    torch.manual_seed(0)
    model = Wide()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, n, generator=g), torch.randint(0, 3, (8,), generator=g))]

    def loss_fn(mod, batch):
        return nn.functional.cross_entropy(mod(batch[0]), batch[1])

    limit = m * n // 4
    implicit, explicit = copy.deepcopy(model), copy.deepcopy(model)  # copies allocate: outside the probe
    with LargestAllocation() as probe:
        lk.lora_one_init(implicit, batches, loss_fn=loss_fn, gamma=8.0, oversample=8, power_iters=2)
    assert probe.largest[0] < limit, probe.largest
    # In fact nothing larger than one r'-wide sketch (max(m, n)·(r + oversample) numbers) is allocated.
    assert probe.largest[0] <= max(m, n) * (r + 8), probe.largest
    with LargestAllocation() as control:
        lk.lora_one_init(explicit, batches, loss_fn=loss_fn, gamma=8.0, method="svd")
    assert control.largest[0] >= m * n, control.largest


# ---------------------------------------------------------------------------------------------------
# the model's state: restored, and untouched on failure


def test_modes_grads_requires_grad_rng_and_hooks_restored():
    torch.manual_seed(0)
    model = TinyLoRAMLP()
    model.train()
    model.l2.eval()  # mixed modes come back exactly
    sentinels = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.grad = torch.full_like(p, 3.0)
            sentinels[name] = p.grad
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    modes = {name: mod.training for name, mod in model.named_modules()}
    rng = torch.get_rng_state()
    lk.lora_one_init(model, mlp_batches(2), gamma=16.0, loss_fn=mlp_loss, power_iters=1)
    assert torch.equal(torch.get_rng_state(), rng)
    assert {name: mod.training for name, mod in model.named_modules()} == modes
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    for name, p in model.named_parameters():
        if name in sentinels:
            assert p.grad is sentinels[name] and torch.equal(p.grad, torch.full_like(p, 3.0))
        else:
            assert p.grad is None
    assert all(not mod._forward_hooks for mod in model.modules())


@pytest.mark.parametrize("failure", ["raises", "nan"])
def test_failure_mid_way_leaves_the_model_unchanged(failure):
    torch.manual_seed(0)
    model = TinyLoRAMLP()
    before = snapshot(model)
    modes = [mod.training for mod in model.modules()]
    calls = []

    def loss_fn(mod, batch):
        calls.append(1)
        loss = mlp_loss(mod, batch)
        if len(calls) == 5:  # in the third pass, after the B factors were zeroed for the estimate
            if failure == "raises":
                raise KeyError("boom")
            return loss * float("nan")
        return loss

    with pytest.raises(KeyError if failure == "raises" else FloatingPointError):
        lk.lora_one_init(model, mlp_batches(2), gamma=16.0, loss_fn=loss_fn)
    assert_unchanged(model, before)
    assert [mod.training for mod in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for n, p in model.named_parameters() if "base" not in n)
    assert all(not mod._forward_hooks for mod in model.modules())


def test_zero_gradient_layer_raises_or_is_skipped():
    class Partial(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = lk.LoRALinear(nn.Linear(12, 5), 2)
            self.unused = lk.LoRALinear(nn.Linear(12, 5), 2)

        def forward(self, x):
            return self.used(x)

    torch.manual_seed(0)
    model = Partial()
    before = snapshot(model)
    with pytest.raises(ValueError, match="unused"):
        lk.lora_one_init(model, mlp_batches(1), gamma=4.0, loss_fn=mlp_loss)
    assert_unchanged(model, before)
    lk.lora_one_init(model, mlp_batches(1), gamma=4.0, loss_fn=mlp_loss, on_zero_gradient="skip")
    assert torch.equal(model.unused.lora_A.weight, before["unused.lora_A.weight"])
    assert torch.equal(model.unused.lora_B.weight, before["unused.lora_B.weight"])
    assert not torch.equal(model.used.lora_B.weight, before["used.lora_B.weight"])


def _rank_too_large_model():
    model = nn.Sequential(lk.LoRALinear(nn.Linear(6, 4), 2))
    model[0].lora_A = nn.Linear(6, 5, bias=False)  # r = 5 > min(m, n) = 4
    model[0].lora_B = nn.Linear(5, 4, bias=False)
    return model


def _small():
    return nn.Sequential(lk.LoRALinear(nn.Linear(6, 4), 2))


BAD_INPUTS = {
    "no LoRA layers": (lambda: nn.Linear(6, 4), dict(), ValueError, "no trainable LoRA layers"),
    "empty batches": (_small, dict(batches=[]), ValueError, "empty"),
    "rank > min(m, n)": (_rank_too_large_model, dict(), ValueError, "larger than min"),
    "LoRA-GA 2r > min(m, n)": (lambda: nn.Sequential(lk.LoRALinear(nn.Linear(6, 4), 3)), dict(ga=True),
                               ValueError, "2·rank"),
    "gamma <= 0": (_small, dict(gamma=0.0), ValueError, "gamma"),
    "non-dict batches, no loss_fn": (_small, dict(loss_fn=None), TypeError, "loss_fn"),
    "one batch, not a list": (_small, dict(batches={"x": torch.zeros(1)}), TypeError, "iterable of batches"),
    "unknown method": (_small, dict(method="qr"), ValueError, "method"),
    "negative power_iters": (_small, dict(power_iters=-1), ValueError, "power_iters"),
    "layers of another model": (_small, dict(layers="other"), ValueError, "LoRALayer"),
    "a layer listed twice": (_small, dict(layers="twice"), ValueError, "twice"),
    "unknown backend": (_small, dict(backend="cublas"), ValueError, "unknown backend"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_before_anything_runs(case):
    make, kw, exc, match = BAD_INPUTS[case]
    torch.manual_seed(0)
    model = make()
    before = snapshot(model)
    calls = []

    def loss_fn(mod, batch):
        calls.append(1)
        return mod(batch[0]).square().sum()

    kw = dict(kw)
    fn = lk.lora_ga_init if kw.pop("ga", False) else lk.lora_one_init
    if kw.get("layers") == "other":
        kw["layers"] = lk.find_lora_layers(_small())
    elif kw.get("layers") == "twice":
        kw["layers"] = lk.find_lora_layers(model) * 2
    args = dict(batches=[(torch.randn(3, 6),)], loss_fn=loss_fn)
    args.update(kw)
    with pytest.raises(exc, match=match):
        fn(model, args.pop("batches"), **args)
    assert not calls  # raised before the first forward
    assert_unchanged(model, before)


# ---------------------------------------------------------------------------------------------------
# LoRA-GA through the same machinery


@pytest.mark.parametrize("method", ["svd", "power"])
def test_lora_ga_init_keeps_the_function_and_aligns_the_first_step(method):
    """spec §7.3 at model level: W0' + s·B0·A0 = W0, and the first GD step is the rank-2r gradient step."""
    torch.manual_seed(0)
    m, n, r, gamma, eta = 20, 16, 3, 16.0, 1e-3
    model = LinearTask(n, m, r, alpha=6.0, W0=torch.randn(m, n))  # B = 0: the standard LoRA init
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(10, n, generator=g), torch.randn(10, m, generator=g)) for _ in range(2)]
    G = reference_gradients(model, batches, half_sum_mse)["lin"]
    W0 = model.lin.base.weight.detach().double().clone()
    lk.lora_ga_init(model, batches, gamma=gamma, loss_fn=half_sum_mse, method=method)
    layer = lk.find_lora_layers(model)[0]
    s = layer.scale
    assert rel_err(model.lin.base.weight.double() + merged_delta(layer), W0) < 1e-6
    # One plain GD step on the factors, with the gradient at the (unchanged) function.
    model.zero_grad()
    sum(half_sum_mse(model, b) for b in batches).div(len(batches)).backward()
    A0, B0 = layer.A.detach().double().clone(), layer.B.detach().double().clone()
    A1, B1 = A0 - eta * layer.A.grad.double(), B0 - eta * layer.B.grad.double()
    G2r, _ = best_rank(G, 2 * r)
    expected = -eta * s**2 * (math.sqrt(m) / gamma) * G2r + eta**2 * s**3 * G @ A0.T @ B0.T @ G
    assert rel_err(s * (B1 @ A1 - B0 @ A0), expected) < 1e-4


# ---------------------------------------------------------------------------------------------------
# PEFT


def _tiny_llama(use_rslora, targets=("q_proj", "k_proj", "v_proj", "o_proj")):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), lora_dropout=0.1,
                           use_rslora=use_rslora)
    return peft.get_peft_model(base, lora)


def _token_batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 64, (2, 12), generator=g)
        # A learnable rule (next token = token + 1), so the loss can fall from the random-init level.
        ids[:, 1:] = (ids[:, :1] + torch.arange(1, 12)) % 64
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


@pytest.mark.parametrize("use_rslora", [True, False])
def test_peft_llama_lora_one_then_training_lowers_the_loss(use_rslora):
    model = _tiny_llama(use_rslora)
    batches = _token_batches(3)
    layers = lk.find_lora_layers(model)
    assert len(layers) == 8
    s_expected = 8 / math.sqrt(4) if use_rslora else 8 / 4
    assert all(layer.scale == s_expected for layer in layers)
    base_before = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    model.train()

    def mean_loss():
        with torch.no_grad():
            model.eval()
            loss = sum(model(**b).loss for b in batches).item() / len(batches)
            model.train()
            return loss

    G_ref = reference_gradients(model, batches, lambda mod, b: mod(**b).loss) if use_rslora else None
    loss0 = mean_loss()
    gamma = 16.0
    sigmas = lk.lora_one_init(model, batches, gamma=gamma, seed=3, power_iters=4)  # loss: model(**b).loss
    assert all(mod.training for mod in model.modules())  # the caller's (train) mode is back
    loss_init = mean_loss()
    assert loss_init < loss0  # the init is itself a descent step
    for name, p in model.named_parameters():  # W0 (and everything frozen) bit-identical (§7.1)
        if name in base_before:
            assert torch.equal(p, base_before[name]), name
    for layer in layers:
        assert torch.linalg.matrix_norm(merged_delta(layer), 2).item() == pytest.approx(
            layer.scale / gamma, rel=1e-4
        )
        if G_ref is not None:
            assert rel_err(sigmas[layer.name], torch.linalg.svdvals(G_ref[layer.name])[: layer.rank]) < 1e-3
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(5):
        opt.zero_grad()
        batches_step = batches[step % len(batches)]
        model(**batches_step).loss.backward()
        opt.step()
    assert mean_loss() < loss_init


def test_peft_merged_adapter_and_wrong_layers_rejected():
    model = _tiny_llama(True, targets=("q_proj",))
    before = snapshot(model)
    model.merge_adapter()
    merged = snapshot(model)
    with pytest.raises(ValueError, match="merged"):
        lk.lora_one_init(model, _token_batches(1))
    assert_unchanged(model, merged)
    model.unmerge_adapter()
    with pytest.raises(ValueError, match="LoRALayer"):
        lk.lora_one_init(model, _token_batches(1), layers=lk.find_lora_layers(TinyLoRAMLP()))
    for k, v in before.items():
        assert rel_err(model.state_dict()[k], v) < 1e-6
