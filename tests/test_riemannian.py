"""ScaledGD and Scaled AdamW (Riemannian-preconditioned LoRA): functional properties of
spec/lora_one.md §7 (4, 5), the optimizers, and the comparison with PEFT's create_riemannian_optimizer."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorsum_kernels as lk
from lorsum_kernels.functional import adamw_update, scaled_adamw_step, scaled_gd_direction, scaled_gd_step

from .conftest import TinyLoRAMLP

D = torch.float64
SHAPES = [(12, 9, 3), (5, 123, 3), (40, 30, 4)]


def rel_err(actual, expected) -> float:
    a, e = actual.double(), expected.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - e).norm() / e.norm().clamp_min(1e-300)).item()


def problem(m, n, r, *, batch=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*batch, r, n, generator=g, dtype=D), torch.randn(*batch, m, r, generator=g, dtype=D),
            torch.randn(*batch, m, n, generator=g, dtype=D))


def adam_state(m, n, r, dtype=D):
    z = dict(dtype=dtype)
    return {"t": torch.zeros((), **z),
            "exp_avg_A": torch.zeros(r, n, **z), "exp_avg_sq_A": torch.zeros(r, n, **z),
            "exp_avg_B": torch.zeros(m, r, **z), "exp_avg_sq_B": torch.zeros(m, r, **z)}


# --------------------------------------------------------------------------------------------------
# functional


@pytest.mark.parametrize("m,n,r", SHAPES)
def test_direction_against_fp64_inverse(m, n, r):
    A, B, G = problem(m, n, r, batch=(2,))
    g_A, g_B = B.mT @ G, G @ A.mT
    reg = 0.3
    eye = torch.eye(r, dtype=D)
    ref_A = torch.linalg.inv(B.mT @ B + reg * eye) @ g_A
    ref_B = g_B @ torch.linalg.inv(A @ A.mT + reg * eye)
    dA, dB = scaled_gd_direction(A.float(), B.float(), g_A.float(), g_B.float(), reg=reg)
    assert dA.dtype == torch.float32
    assert rel_err(dA, ref_A) < 1e-5 and rel_err(dB, ref_B) < 1e-5
    dA64, _ = scaled_gd_direction(A, B, g_A, g_B, reg=reg)
    # fp64 math; the only deviation is spd_solve's fp64 relative ridge (1e-14), times the conditioning.
    assert dA64.dtype == D and rel_err(dA64, ref_A) < 1e-10


@pytest.mark.parametrize("m,n,r", SHAPES)
def test_scaled_gd_exact_product_step_and_gauge_invariance(m, n, r):
    # spec/lora_one.md §7.4 (i), (ii): with δ = 0 and raw factors (scale s, ĝ = s·g),
    # s(B'A' − BA) = −lr s²(P_B G + G P_A) + lr² s³ G A⁺ B⁺ G, and (BM, M⁻¹A) gives the same product.
    A, B, G = problem(m, n, r, seed=1)
    s, lr = 2.0, 0.1
    A1, B1 = scaled_gd_step(A, B, s * B.mT @ G, s * G @ A.mT, lr=lr, reg=0.0)
    A_pinv, B_pinv = torch.linalg.pinv(A), torch.linalg.pinv(B)
    P_B, P_A = B @ B_pinv, A_pinv @ A
    expected = -lr * s**2 * (P_B @ G + G @ P_A) + lr**2 * s**3 * G @ A_pinv @ B_pinv @ G
    assert rel_err(s * (B1 @ A1 - B @ A), expected) < 1e-6
    M = torch.randn(r, r, generator=torch.Generator().manual_seed(2), dtype=D) + 2 * torch.eye(r, dtype=D)
    A2, B2 = torch.linalg.solve(M, A), B @ M
    A3, B3 = scaled_gd_step(A2, B2, s * B2.mT @ G, s * G @ A2.mT, lr=lr, reg=0.0)
    assert rel_err(B3 @ A3, B1 @ A1) < 1e-6


def test_scaled_gd_converges_independently_of_conditioning():
    # spec/lora_one.md §7.4 (iii): L = ½‖BA − D*‖², rank-r D* of condition number κ, spectral init plus
    # noise, lr 0.5, 300 iterations: ScaledGD reaches ~1e-16 for every κ; plain GD degrades with κ.
    m, n, r = 40, 30, 4
    g = torch.Generator().manual_seed(3)
    U = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=D))[0]
    V = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=D))[0]
    plain_errors = []
    for kappa in (1.0, 10.0, 100.0):
        sig = torch.logspace(0, -torch.log10(torch.tensor(kappa)).item(), r, dtype=D)
        target = U @ torch.diag(sig) @ V.T
        Us, ss, Vs = torch.linalg.svd(target)
        B0 = Us[:, :r] * ss[:r].sqrt() + 1e-2 * torch.randn(m, r, generator=g, dtype=D)
        A0 = ss[:r].sqrt().unsqueeze(1) * Vs[:r] + 1e-2 * torch.randn(r, n, generator=g, dtype=D)
        A, B = A0, B0
        for _ in range(300):
            G = B @ A - target
            A, B = scaled_gd_step(A, B, B.mT @ G, G @ A.mT, lr=0.5, reg=0.0)
        assert rel_err(B @ A, target) < 1e-10, kappa
        A, B = A0, B0
        for _ in range(300):
            G = B @ A - target
            lr = 0.5 / (B.norm() ** 2 + A.norm() ** 2 + 1)
            A, B = A - lr * B.mT @ G, B - lr * G @ A.mT
        plain_errors.append(rel_err(B @ A, target))
    assert plain_errors[0] < plain_errors[1] < plain_errors[2] and plain_errors[2] > 1e-4


def test_scaled_adamw_first_steps():
    m, n, r = 12, 9, 3
    A, B, G = problem(m, n, r, seed=4)
    lr = 1e-3
    # §7.5 (iii): the first step moves each coordinate by lr (bias-corrected) or lr(1−β1)/√(1−β2) (not).
    for correct_bias, size in [(True, lr), (False, lr * 0.1 / 0.001**0.5)]:
        A1, B1, st = scaled_adamw_step(A, B, B.mT @ G, G @ A.mT, adam_state(m, n, r), lr=lr,
                                       correct_bias=correct_bias)
        # m̂/(√v̂ + ε) = g/(|g| + ε): ±1 up to ε/|g|.
        torch.testing.assert_close((A1 - A).abs(), torch.full_like(A, size), rtol=1e-4, atol=0)
        torch.testing.assert_close((B1 - B).abs(), torch.full_like(B, size), rtol=1e-4, atol=0)
        assert st["t"] == 1
    # §7.5 (ii): B = 0: A does not move on step 1 although (0 + δI)⁻¹ = I/δ.
    Z = torch.zeros(m, r, dtype=D)
    A1, B1, _ = scaled_adamw_step(A, Z, Z.mT @ G, G @ A.mT, adam_state(m, n, r), lr=lr)
    assert torch.equal(A1, A) and not torch.equal(B1, Z)
    A1, _ = scaled_gd_step(A, Z, Z.mT @ G, G @ A.mT, lr=lr)
    assert torch.equal(A1, A)


def test_scaled_adamw_orthonormal_B_is_adamw_on_the_raw_gradient():
    # §7.5 (i): B with orthonormal columns and δ = 0: the A update is AdamW's on the raw gradient.
    m, n, r = 12, 9, 3
    A, B, G = problem(m, n, r, seed=5)
    B = torch.linalg.qr(B)[0]
    state = adam_state(m, n, r)
    A1, _, _ = scaled_adamw_step(A, B, B.mT @ G, G @ A.mT, state, lr=1e-2, weight_decay=0.1, reg=0.0)
    W = A.clone().requires_grad_(True)
    opt = torch.optim.AdamW([W], lr=1e-2, weight_decay=0.1)
    W.grad = B.mT @ G
    opt.step()
    assert rel_err(A1 - A, W.detach() - A) < 1e-6


def test_gauss_seidel_uses_the_new_A_and_jacobi_the_old():
    # §7.5 (iv): compare with AdamW steps written out by hand for both orders.
    m, n, r = 12, 9, 3
    A, B, G = problem(m, n, r, seed=6)
    g_A, g_B = B.mT @ G, G @ A.mT
    reg, lr, eye = 1e-3, 0.05, torch.eye(r, dtype=D)
    adam = dict(lr=lr, beta1=0.9, beta2=0.999, eps=1e-8)
    one = torch.tensor(1.0, dtype=D)
    A_new, *_ = adamw_update(A, torch.linalg.solve(B.mT @ B + reg * eye, g_A), torch.zeros_like(A),
                             torch.zeros_like(A), one, **adam)
    results = {}
    for order, A_ref in [("gauss_seidel", A_new), ("jacobi", A)]:
        gt_B = g_B @ torch.linalg.inv(A_ref @ A_ref.mT + reg * eye)
        expect_B, *_ = adamw_update(B, gt_B, torch.zeros_like(B), torch.zeros_like(B), one, **adam)
        # Two steps, so that the preconditioner's effect survives Adam's first-step sign normalisation.
        st = adam_state(m, n, r)
        A1, B1, st = scaled_adamw_step(A, B, g_A, g_B, st, lr=lr, reg=reg, update_order=order)
        assert rel_err(B1, expect_B) < 1e-6 and rel_err(A1, A_new) < 1e-9
        results[order] = scaled_adamw_step(A1, B1, B1.mT @ G, G @ A1.mT, st, lr=lr, reg=reg,
                                           update_order=order)
    assert rel_err(results["gauss_seidel"][1], results["jacobi"][1]) > 1e-6


def test_bad_functional_input():
    A, B, G = problem(12, 9, 3)
    with pytest.raises(ValueError, match="update_order"):
        scaled_gd_step(A, B, B.mT @ G, G @ A.mT, lr=0.1, update_order="random")
    with pytest.raises(ValueError, match="shapes"):
        scaled_gd_direction(A, B, G, G @ A.mT)


# --------------------------------------------------------------------------------------------------
# optimizers


def Net(r=3, alpha=6.0, dtype=torch.float32, seed=0):  # noqa: N802 - used like the class it was
    """conftest's three-layer LoRA MLP with 13 input features, seeded."""
    torch.manual_seed(seed)
    return TinyLoRAMLP(d_in=13, r=r, alpha=alpha, dtype=dtype)


def batches(k=4, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(3, 7, 13, generator=g).to(dtype), torch.randint(0, 5, (3, 7), generator=g))
            for _ in range(k)]


def loss_fn(model, x, y):
    return nn.functional.cross_entropy(model(x).reshape(-1, 5).float(), y.reshape(-1))


def train(model, opt, data):
    for x, y in data:
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()


OPTIMIZERS = [
    (lk.ScaledGD, dict(lr=0.1, weight_decay=0.01)),
    (lk.ScaledGD, dict(lr=0.1, update_order="gauss_seidel", reg=1e-3)),
    (lk.ScaledAdamW, dict(lr=1e-2, weight_decay=0.01)),
    (lk.ScaledAdamW, dict(lr=1e-2, update_order="jacobi", correct_bias=False)),
]
IDS = ["gd", "gd-gs", "adamw", "adamw-jacobi"]


def _set_balanced(model, template):
    with torch.no_grad():
        for dst, src in zip(model.lora_layers(), template.lora_layers()):
            ratio = (src.scaling / dst.scaling) ** 0.5
            dst.lora_A.weight.copy_(src.lora_A.weight * ratio)
            dst.lora_B.weight.copy_(src.lora_B.weight * ratio)
            dst.base.load_state_dict(src.base.state_dict())
        model.head.load_state_dict(template.head.state_dict())


def _merged(model):
    return [layer.scaling * layer.lora_B.weight @ layer.lora_A.weight for layer in model.lora_layers()]


@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=IDS)
def test_step_is_defined_on_the_merged_weight(cls, kw):
    ref_model, other = Net(alpha=1.5), Net(alpha=24.0, seed=1)  # s = 0.5 and 8
    _set_balanced(other, ref_model)
    for m in (ref_model, other):
        train(m, cls(m, **kw), batches(3))
    for a, b in zip(_merged(ref_model), _merged(other)):
        assert rel_err(b, a) < 1e-5
    assert rel_err(_merged(ref_model)[0], _merged(Net(alpha=1.5))[0]) > 1e-3


def test_scaled_gd_first_step_matches_fp64_formula():
    model = Net(alpha=6.0)  # s = 2
    x, y = batches(1)[0]
    loss_fn(model, x, y).backward()
    layer = model.l1
    s, A, B = layer.scaling, layer.lora_A.weight.detach().double(), layer.lora_B.weight.detach().double()
    g_A, g_B = layer.lora_A.weight.grad.double(), layer.lora_B.weight.grad.double()
    opt = lk.ScaledGD(model, lr=0.1, reg=1e-2)
    opt.step()
    # Balanced: Ā = √s A, ∇_Ā = A.grad/√s; δ acts on the balanced Gram.
    Ab, Bb, eye = s**0.5 * A, s**0.5 * B, torch.eye(3, dtype=D)
    new_Ab = Ab - 0.1 * torch.linalg.solve(Bb.mT @ Bb + 1e-2 * eye, g_A / s**0.5)
    new_Bb = Bb - 0.1 * g_B / s**0.5 @ torch.linalg.inv(Ab @ Ab.mT + 1e-2 * eye)
    assert rel_err(layer.lora_A.weight, new_Ab / s**0.5) < 1e-5
    assert rel_err(layer.lora_B.weight, new_Bb / s**0.5) < 1e-5


@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=IDS)
def test_state_dict_round_trip_continues_bit_identically(cls, kw):
    data = batches(4)
    model = Net()
    opt = cls(model, **kw)
    train(model, opt, data[:2])
    saved_opt, saved_model = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    train(model, opt, data[2:])
    resumed = Net(seed=5)
    resumed.load_state_dict(saved_model)
    opt2 = cls(resumed, **kw)
    opt2.load_state_dict(saved_opt)
    train(resumed, opt2, data[2:])
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_bf16_parameters_keep_fp32_state_through_load_state_dict():
    model = Net(dtype=torch.bfloat16)
    opt = lk.ScaledAdamW(model, lr=1e-2)
    train(model, opt, batches(2, dtype=torch.bfloat16))
    opt2 = lk.ScaledAdamW(model, lr=1e-2)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for layer in model.lora_layers():
        st = opt2.state[layer.lora_A.weight]
        for key in ("t", "exp_avg_A", "exp_avg_sq_A", "exp_avg_B", "exp_avg_sq_B"):
            assert st[key].dtype == torch.float32, key
        assert torch.equal(st["exp_avg_B"], opt.state[layer.lora_A.weight]["exp_avg_B"])
    train(model, opt2, batches(1, seed=3, dtype=torch.bfloat16))
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=IDS)
def test_nonfinite_gradient_skips_only_that_layer(cls, kw):
    model = Net()
    opt = cls(model, **kw)
    train(model, opt, batches(1))
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in opt.state[model.l2.lora_A.weight].items()}
    x, y = batches(1, seed=7)[0]
    opt.zero_grad()
    loss_fn(model, x, y).backward()
    model.l2.lora_A.weight.grad[1, 2] = float("nan")
    opt.step()
    for name, p in model.named_parameters():
        if name.startswith("l2."):
            assert torch.equal(p, params[name]), name
        elif "lora" in name:
            assert not torch.equal(p, params[name]), name
    for k, v in opt.state[model.l2.lora_A.weight].items():
        if k not in ("step", "skipped_steps"):
            assert torch.equal(v, state[k]), k
    assert int(opt.state[model.l2.lora_A.weight]["skipped_steps"]) == 1
    assert int(opt.state["skipped_steps"]) == 1


def test_nonfinite_gradient_skips_even_when_the_kernel_does_not_propagate_it(monkeypatch):
    # A kernel may turn a non-finite input into finite output (a clamp, a where); the optimizer's own
    # check on the inputs still skips the layer.
    import lorsum_kernels.optim.riemannian as optim_riemannian

    def finite_step(*args, **kwargs):
        return tuple(torch.nan_to_num(t) for t in scaled_gd_step(*args, **kwargs))

    monkeypatch.setattr(optim_riemannian, "scaled_gd_step", finite_step)
    model = Net()
    opt = lk.ScaledGD(model, lr=0.1)
    x, y = batches(1)[0]
    loss_fn(model, x, y).backward()
    model.l1.lora_B.weight.grad[0, 0] = float("inf")
    before = model.l1.lora_A.weight.detach().clone()
    opt.step()
    assert torch.equal(model.l1.lora_A.weight, before)
    assert int(opt.state["skipped_steps"]) == 1


def test_constructor_rejects_bad_arguments():
    model = Net()
    for cls, kw in [
        (lk.ScaledGD, dict(reg=-1.0)), (lk.ScaledGD, dict(update_order="random")),
        (lk.ScaledGD, dict(lr=-1.0)),
        (lk.ScaledGD, dict(backend="nope")), (lk.ScaledAdamW, dict(betas=(0.9, 1.0))),
        (lk.ScaledAdamW, dict(eps=-1.0)), (lk.ScaledAdamW, dict(weight_decay=-1.0)),
    ]:
        with pytest.raises(ValueError):
            cls(model, **kw)
    with pytest.raises(ValueError, match="no trainable LoRA layers"):
        lk.ScaledAdamW(nn.Linear(4, 4))
    assert isinstance(lk.create_optimizer(model, "scaled_gd"), lk.ScaledGD)
    assert isinstance(lk.create_optimizer(model, "scaled_adamw"), lk.ScaledAdamW)
    with pytest.raises(ValueError, match="shape"):
        lk.ScaledAdamW(Net(r=3)).load_state_dict(lk.ScaledAdamW(Net(r=2)).state_dict())


# --------------------------------------------------------------------------------------------------
# against PEFT's create_riemannian_optimizer (docs/riemannian_vs_peft.md)


def _peft_model(alpha, seed=0, dtype=torch.float32):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(cfg)
    lora = peft.LoraConfig(r=4, lora_alpha=alpha, lora_dropout=0.0,
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = peft.get_peft_model(model, lora).to(dtype)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # non-zero B, so that both preconditioners act from the first step
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=dtype))
    return model


def _peft_batches(k=5):
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 48, (2, 12), generator=g) for _ in range(k)]


def _run_lm(model, opt, data):
    for ids in data:
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()


def _lora_params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_matches_peft_where_the_definitions_agree(kind):
    from peft.optimizers import create_riemannian_optimizer

    # s = 1 (α = r), Jacobi order, the same δ, bias-corrected Adam, decoupled decay. In fp64, so that
    # the comparison measures the definitions, not fp32 rounding of p against its small update (about
    # 1e-4 of the update after a few steps); what remains is our Cholesky (fp64 relative ridge 1e-14)
    # against PEFT's pinv: about 1e-13.
    ours, theirs = _peft_model(alpha=4, dtype=D), _peft_model(alpha=4, dtype=D)
    start = _lora_params(ours)
    if kind == "adamw":
        kw = dict(lr=2e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
        opt_ours = lk.ScaledAdamW(ours, reg=1e-2, update_order="jacobi", **kw)
        opt_theirs = create_riemannian_optimizer(theirs, torch.optim.AdamW, reg=1e-2, **kw)
    else:
        opt_ours = lk.ScaledGD(ours, lr=0.05, reg=1e-2, weight_decay=0.01)
        opt_theirs = create_riemannian_optimizer(theirs, torch.optim.SGD, lr=0.05, reg=1e-2,
                                                 weight_decay=0.01)
    data = _peft_batches()
    _run_lm(ours, opt_ours, data)
    _run_lm(theirs, opt_theirs, data)
    a, b = _lora_params(ours), _lora_params(theirs)
    for name in a:
        assert rel_err(a[name] - start[name], b[name] - start[name]) < 1e-10, name
    # With Gauss–Seidel order (our ScaledAdamW default, the official AdamWr) the runs differ.
    if kind == "adamw":
        gs = _peft_model(alpha=4, dtype=D)
        _run_lm(gs, lk.ScaledAdamW(gs, reg=1e-2, **kw), data)
        c = _lora_params(gs)
        assert max(rel_err(c[n] - start[n], b[n] - start[n]) for n in c if "lora_B" in n) > 1e-3


def test_peft_step_depends_on_alpha_ours_does_not():
    from peft.optimizers import create_riemannian_optimizer

    # Same balanced (merged) factors, α = 4 vs 16 (s = 1 vs 4): our merged trajectories agree, PEFT's,
    # which preconditions the raw factors, do not.
    def merged(model):
        out = []
        for module in model.modules():
            if isinstance(getattr(module, "lora_A", None), nn.ModuleDict) and module.lora_A:
                s = module.scaling["default"]
                out.append(s * module.lora_B["default"].weight @ module.lora_A["default"].weight)
        return out

    def rescale(model, factor):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.mul_(factor)

    data = _peft_batches(3)
    results = {}
    for who in ("ours", "peft"):
        runs = []
        for alpha in (4, 16):
            model = _peft_model(alpha=alpha)
            rescale(model, (4 / alpha) ** 0.5)  # √s·A, √s·B equal across α
            if who == "ours":
                opt = lk.ScaledAdamW(model, lr=2e-3, reg=1e-2, update_order="jacobi")
            else:
                opt = create_riemannian_optimizer(model, torch.optim.AdamW, lr=2e-3, reg=1e-2,
                                                  weight_decay=0.0)
            _run_lm(model, opt, data)
            runs.append(merged(model))
        results[who] = max(rel_err(b, a) for a, b in zip(*runs))
    assert results["ours"] < 1e-5
    assert results["peft"] > 1e-2


def test_decayed_without_weight_decay_is_the_factor_itself():
    """Decoupled weight decay ``x·(1 − lr·wd)``: with wd the number 0, x itself (x·1 is x bit for bit, so
    skipping the product, a launch on a GPU, changes nothing); otherwise the product, with a per-layer lr
    too."""
    from lorsum_kernels._numerics import decayed

    x = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0))
    x[0, 0, 0] = -0.0
    assert decayed(x, 0.1, 0.0) is x and torch.equal(x * (1 - 0.1 * 0.0), x)
    assert decayed(x, torch.tensor([0.1, 0.2, 0.3]), 0.0) is x
    torch.testing.assert_close(decayed(x, 0.1, 0.01), x * (1 - 0.1 * 0.01), rtol=0, atol=0)
    lr = torch.tensor([0.1, 0.2, 0.3])
    torch.testing.assert_close(decayed(x, lr, 0.5), x * (1 - lr.view(3, 1, 1) * 0.5), rtol=0, atol=0)
