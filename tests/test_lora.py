"""LoRA discovery (``find_lora_layers``), ``LoRALinear``, and the merged-weight gradient identity.

spec/lorsum.md §1 (W = W0 + s·B·A, G = SᵀX), §7.1 and §11 P10 (the scale s = α/r, α/√r for rsLoRA, must be
honoured); spec/conventions.md §2 (PEFT naming: ``module.lora_A[adapter].weight``,
``module.scaling[adapter]``).
The PEFT models are tiny transformers built from a config with random weights: no hub access.
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import lorsum_kernels as lk  # noqa: E402
from lorsum_kernels import LoRALinear, find_lora_layers  # noqa: E402
from lorsum_kernels.capture import ActivationCapture  # noqa: E402

from .conftest import TinyLoRAMLP, rel_err  # noqa: E402

BATCH, SEQ, VOCAB = 2, 7, 64

# transformers' own deprecation, raised from inside peft.get_peft_model
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


# --------------------------------------------------------------------------------------------------
# helpers


def _peft():
    return pytest.importorskip("peft")


def _tiny_llama(seed: int = 0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(cfg)
    return model


def _peft_llama(r=4, alpha=12, targets=("q_proj", "v_proj"), adapter_name="default", seed=0, **lora_kw):
    """Tiny Llama (hidden 32, 2 layers; q_proj 32→32, v_proj 32→16) with PEFT LoRA on ``targets``."""
    peft = _peft()
    lora_kw.setdefault("lora_dropout", 0.0)  # the factor identity below is exact only without dropout
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), **lora_kw)
    model = peft.get_peft_model(_tiny_llama(seed), config, adapter_name=adapter_name)
    model.train()
    return model


def _attn(model, i: int, proj: str) -> nn.Module:
    return getattr(model.base_model.model.model.layers[i].self_attn, proj)


def _tokens(seed=1, batch=BATCH, seq=SEQ):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


def _llama_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


class OrderedPair(nn.Module):
    """A hand-written LoRA layer that registers lora_B BEFORE lora_A (parameter order B, A)."""

    def __init__(self, n=10, m=7, r=3, scaling=0.7):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(m, n) / math.sqrt(n), requires_grad=False)
        self.lora_B = nn.Linear(r, m, bias=False)
        self.lora_A = nn.Linear(n, r, bias=False)
        self.scaling = scaling

    def forward(self, x):
        return x @ self.weight.T + self.lora_B(self.lora_A(x)) * self.scaling


class DictPair(nn.Module):
    """PEFT-like ModuleDict layout, lora_B registered first and the adapters inserted in opposite orders."""

    def __init__(self, n=9, m=6):
        super().__init__()
        self.lora_B = nn.ModuleDict({"a": nn.Linear(2, m, bias=False), "b": nn.Linear(3, m, bias=False)})
        self.lora_A = nn.ModuleDict({"b": nn.Linear(n, 3, bias=False), "a": nn.Linear(n, 2, bias=False)})
        self.scaling = {"a": 0.5, "b": 4.0}


class PlainPair(nn.Module):
    """Plain module with lora_A / lora_B Linear children and an optional ``scaling`` attribute."""

    def __init__(self, n=8, m=5, r=2, scaling=None):
        super().__init__()
        self.lora_A = nn.Linear(n, r, bias=False)
        self.lora_B = nn.Linear(r, m, bias=False)
        if scaling is not None:
            self.scaling = scaling


class ConvPair(nn.Module):
    """Conv LoRA children under the same attribute names: not a Linear pair."""

    def __init__(self):
        super().__init__()
        self.lora_A = nn.Conv2d(3, 2, 3, bias=False)
        self.lora_B = nn.Conv2d(2, 4, 1, bias=False)
        self.scaling = 2.0


# --------------------------------------------------------------------------------------------------
# PEFT discovery


@pytest.mark.parametrize("adapter", ["default", "task1"])
def test_peft_finds_exactly_the_adapted_projections(adapter):
    r, alpha = 4, 12
    model = _peft_llama(r=r, alpha=alpha, adapter_name=adapter)
    layers = find_lora_layers(model)

    expected = [_attn(model, i, p) for i in range(2) for p in ("q_proj", "v_proj")]
    assert [id(layer.module) for layer in layers] == [id(m) for m in expected]  # module order, no duplicates
    for layer, module in zip(layers, expected):
        assert layer.A is module.lora_A[adapter].weight
        assert layer.B is module.lora_B[adapter].weight
        n, m = module.base_layer.in_features, module.base_layer.out_features
        assert tuple(layer.A.shape) == (r, n) and tuple(layer.B.shape) == (m, r)
        assert (layer.rank, layer.in_features, layer.out_features) == (r, n, m)
        assert layer.scale == pytest.approx(alpha / r, rel=1e-12)
        assert layer.name.endswith(f"[{adapter}]")
    # v_proj is 32 -> 16 (2 kv heads): A and B are not mixed up between differently shaped layers.
    assert tuple(layers[1].B.shape) == (16, r)
    # No k_proj / o_proj / MLP module and no base weight is mistaken for a factor.
    found = {id(p) for layer in layers for p in (layer.A, layer.B)}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert found == trainable


def test_peft_rslora_scale_is_alpha_over_sqrt_r():
    r, alpha = 4, 6
    model = _peft_llama(r=r, alpha=alpha, use_rslora=True)
    layers = find_lora_layers(model)
    assert len(layers) == 4
    for layer in layers:
        assert layer.scale == pytest.approx(alpha / math.sqrt(r), rel=1e-12)  # 3.0, not α/r = 1.5
        assert layer.scale == pytest.approx(layer.module.scaling["default"], rel=1e-12)


def test_peft_two_adapters_only_the_trainable_one_is_found():
    peft = _peft()
    model = _peft_llama(r=4, alpha=8)  # "default" on q_proj, v_proj; scale 2
    model.add_adapter("task2", peft.LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "k_proj"]))

    model.set_adapter("task2")
    layers = find_lora_layers(model)
    expected = [_attn(model, i, p) for i in range(2) for p in ("q_proj", "k_proj")]
    assert [id(layer.module) for layer in layers] == [id(m) for m in expected]
    for layer, module in zip(layers, expected):
        assert layer.A is module.lora_A["task2"].weight and layer.B is module.lora_B["task2"].weight
        assert layer.scale == pytest.approx(3.0)
        assert tuple(layer.A.shape) == (2, 32)
    # the "default" factors still exist, frozen: they must not be returned
    frozen = _attn(model, 0, "v_proj").lora_A["default"].weight
    assert not frozen.requires_grad
    assert all(layer.A is not frozen for layer in layers)

    model.set_adapter("default")
    layers = find_lora_layers(model)
    assert [id(layer.module) for layer in layers] == [
        id(_attn(model, i, p)) for i in range(2) for p in ("q_proj", "v_proj")
    ]
    assert all(layer.A is layer.module.lora_A["default"].weight for layer in layers)
    assert all(layer.scale == pytest.approx(2.0) for layer in layers)


def test_pairing_does_not_depend_on_parameter_order():
    module = OrderedPair()
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert trainable[0] is module.lora_B.weight  # the layout really is B-first
    (layer,) = find_lora_layers(nn.Sequential(module))
    assert layer.A is module.lora_A.weight and layer.B is module.lora_B.weight
    assert layer.module is module
    assert layer.scale == pytest.approx(0.7)

    dict_module = DictPair()
    layers = find_lora_layers(dict_module)
    by_name = {layer.name: layer for layer in layers}
    assert set(by_name) == {"[a]", "[b]"}
    for key, rank, scale in (("a", 2, 0.5), ("b", 3, 4.0)):
        layer = by_name[f"[{key}]"]
        assert layer.A is dict_module.lora_A[key].weight and layer.B is dict_module.lora_B[key].weight
        assert layer.rank == rank
        assert layer.scale == pytest.approx(scale)


def test_plain_module_with_linear_children_and_scaling_attribute():
    model = nn.ModuleDict({"with": PlainPair(scaling=2.5), "without": PlainPair(), "tensor": PlainPair(
        scaling=torch.tensor(0.25))})
    layers = {layer.name: layer for layer in find_lora_layers(model)}
    assert set(layers) == {"with", "without", "tensor"}
    assert layers["with"].scale == pytest.approx(2.5)
    assert layers["without"].scale == 1.0
    assert layers["tensor"].scale == pytest.approx(0.25) and isinstance(layers["tensor"].scale, float)
    for name, layer in layers.items():
        assert layer.A is model[name].lora_A.weight and layer.B is model[name].lora_B.weight


def test_frozen_plain_pair_is_skipped():
    module = PlainPair(scaling=2.0)
    module.requires_grad_(False)
    assert find_lora_layers(nn.Sequential(module)) == []


def test_conv_lora_children_are_not_a_linear_pair():
    assert find_lora_layers(nn.Sequential(ConvPair())) == []
    model = nn.ModuleDict({"conv": ConvPair(), "lin": PlainPair(scaling=2.0)})
    layers = find_lora_layers(model)
    assert [layer.name for layer in layers] == ["lin"]


def test_peft_conv_lora_is_skipped_linear_found():
    peft = _peft()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.fc = nn.Linear(16, 16)

        def forward(self, x):
            return self.fc(self.conv(x).flatten(1)[:, :16])

    torch.manual_seed(0)
    model = peft.get_peft_model(Net(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["conv", "fc"]))
    conv = model.base_model.model.conv
    assert isinstance(conv.lora_A["default"], nn.Conv2d) and conv.lora_A["default"].weight.requires_grad
    layers = find_lora_layers(model)
    assert [layer.module for layer in layers] == [model.base_model.model.fc]
    assert layers[0].scale == pytest.approx(2.0)


def test_peft_dora_raises_not_implemented():
    model = _peft_llama(r=4, alpha=8, use_dora=True)
    with pytest.raises(NotImplementedError, match="DoRA"):
        find_lora_layers(model)
    with pytest.raises(NotImplementedError):
        lk.LoRSum(model, backend="torch")


@pytest.mark.parametrize("variant", ["kasa", "alora"])
def test_peft_variants_that_change_the_update_are_rejected(variant):
    """PEFT LoRA *variants* other than DoRA also change ΔW away from s·B·A (KaSA: s·B·diag(d)·A; aLoRA: the
    adapter only acts on tokens after the invocation sequence), so A.grad ≠ s·BᵀSᵀX and the optimizer would
    silently step the wrong objective. Like DoRA they must be refused (``module.lora_variant[adapter]``)."""
    peft = _peft()
    if variant == "kasa":
        if not hasattr(peft, "KasaConfig"):
            pytest.skip("this peft has no KaSA")
        kw = dict(kasa_config=peft.KasaConfig())
    else:
        kw = dict(alora_invocation_tokens=[3, 4], task_type="CAUSAL_LM")
    model = _peft_llama(r=4, alpha=8, **kw)
    module = _attn(model, 0, "q_proj")
    assert "default" in getattr(module, "lora_variant", {})  # it really is a variant adapter
    with pytest.raises(NotImplementedError):
        find_lora_layers(model)


def test_peft_lora_on_a_parameter_is_refused_by_the_capture_methods_and_steps_from_grad():
    """PEFT's ``target_parameters`` (``ParamWrapper``) adds s·B·A to a parameter and runs no LoRA path on an
    input: the methods that step from each layer's captured X and S raise at construction (before, their
    first step said "has gradients but no captured inputs"), LoRA-One's init too; those that step from
    ``.grad`` train it."""
    peft = _peft()
    if "target_parameters" not in getattr(peft.LoraConfig, "__dataclass_fields__", {}):
        pytest.skip("this peft has no target_parameters")
    model = _peft_llama(targets=(), target_parameters=["mlp.up_proj.weight"])
    layers = find_lora_layers(model)
    assert layers and all(layer.merged_in_forward for layer in layers)
    assert not any(layer.merged_in_forward for layer in find_lora_layers(_peft_llama()))
    for cls in (lk.LoRSum, lk.ScaledLoRSum, lk.AdaPreLoRA, lk.SVDLoRA):
        with pytest.raises(NotImplementedError, match="target_parameters"):
            cls(model)
    with pytest.raises(NotImplementedError, match="target_parameters"):
        lk.lora_one_init(model, [{"input_ids": _tokens()}], loss_fn=lambda m, b: m(**b).logits.square().mean())
    for make in (lambda m: lk.ScaledAdamW(m), lambda m: lk.ScaledGD(m, lr=1e-2),
                 lambda m: lk.AdaPreLoRA(m, statistics="surrogate")):
        model = _peft_llama(targets=(), target_parameters=["mlp.up_proj.weight"])
        opt = make(model)
        before = [layer.A.detach().clone() for layer in find_lora_layers(model)]
        for _ in range(2):
            model(input_ids=_tokens()).logits.square().mean().backward()
            opt.step()
            opt.zero_grad()
        assert all(not torch.equal(b, layer.A) for b, layer in zip(before, find_lora_layers(model)))


def test_peft_lora_on_multihead_attention_is_refused_by_the_capture_methods():
    """PEFT's LoRA on ``nn.MultiheadAttention`` merges s·B·A into in_proj and out_proj for each forward (their
    Linear forward never runs): like a LoRA on a parameter, no X and S to capture. A Linear LoRA beside it is
    an ordinary layer; a plain module of that class name with LoRA children is one too."""
    peft = _peft()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
            self.lin = nn.Linear(16, 16)

        def forward(self, x):
            return self.lin(self.mha(x, x, x)[0])

    torch.manual_seed(0)
    model = peft.get_peft_model(Net(), peft.LoraConfig(r=2, target_modules=["mha", "lin"]))
    merged = {layer.name: layer.merged_in_forward for layer in find_lora_layers(model)}
    assert merged == {"base_model.model.mha[default]": True, "base_model.model.lin[default]": False,
                      "base_model.model.mha.base_layer.out_proj[default]": True}, merged
    with pytest.raises(NotImplementedError, match="MultiheadAttention"):
        lk.LoRSum(model)
    opt = lk.ScaledAdamW(model)
    model(torch.randn(2, 5, 16)).square().mean().backward()
    opt.step()

    class MultiheadAttention(nn.Module):  # not PEFT's
        def __init__(self):
            super().__init__()
            self.lora_A, self.lora_B = nn.Linear(4, 2, bias=False), nn.Linear(2, 4, bias=False)

    assert not find_lora_layers(MultiheadAttention())[0].merged_in_forward


# --------------------------------------------------------------------------------------------------
# LoRALinear


def test_loralinear_forward_equals_base_at_init():
    torch.manual_seed(0)
    base = nn.Linear(12, 9)
    layer = LoRALinear(base, r=3, alpha=7.0)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    assert torch.count_nonzero(layer.lora_A.weight) > 0  # A random, so the init is a real LoRA start
    x = torch.randn(4, 5, 12)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)


@pytest.mark.parametrize("r,alpha,expected", [(3, 7.0, 7.0 / 3), (4, None, 1.0), (2, 16, 8.0)])
def test_loralinear_scaling_is_alpha_over_r(r, alpha, expected):
    torch.manual_seed(0)
    base = nn.Linear(10, 8)
    layer = LoRALinear(base, r, alpha)
    assert layer.scaling == pytest.approx(expected, rel=1e-12)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(6, 10)
    expected_out = base(x) + expected * (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
    torch.testing.assert_close(layer(x), expected_out, rtol=1e-5, atol=1e-6)
    (found,) = find_lora_layers(nn.Sequential(layer))
    assert found.scale == pytest.approx(expected, rel=1e-12)
    assert found.A is layer.lora_A.weight and found.B is layer.lora_B.weight
    assert tuple(found.A.shape) == (r, 10) and tuple(found.B.shape) == (8, r)


@pytest.mark.parametrize("r", [0, -1, 7, 100])
def test_loralinear_rank_validation(r):
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(nn.Linear(10, 6), r)  # min(in, out) = 6


def test_loralinear_full_rank_is_allowed_and_non_linear_base_rejected():
    layer = LoRALinear(nn.Linear(10, 6), 6)
    assert layer.lora_A.weight.shape == (6, 10)
    with pytest.raises(TypeError):
        LoRALinear(nn.Conv1d(4, 4, 1), 2)


def test_loralinear_base_is_frozen_and_factors_follow_its_dtype():
    base = nn.Linear(10, 6, dtype=torch.float64)
    layer = LoRALinear(base, 2, 4.0)
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert layer.lora_A.weight.requires_grad and layer.lora_B.weight.requires_grad
    assert layer.lora_A.weight.dtype == layer.lora_B.weight.dtype == torch.float64
    nn.init.normal_(layer.lora_B.weight)
    layer(torch.randn(3, 10, dtype=torch.float64)).square().sum().backward()
    assert base.weight.grad is None and base.bias.grad is None
    assert layer.lora_A.weight.grad is not None and layer.lora_B.weight.grad is not None
    trainable = [n for n, p in layer.named_parameters() if p.requires_grad]
    assert sorted(trainable) == ["lora_A.weight", "lora_B.weight"]


# --------------------------------------------------------------------------------------------------
# merged-weight gradient: G = SᵀX, A.grad = s·BᵀG, B.grad = s·G·Aᵀ (spec §1, §11 P10)


def _base_weight(module: nn.Module) -> nn.Parameter:
    if hasattr(module, "get_base_layer"):
        return module.get_base_layer().weight
    if isinstance(getattr(module, "base", None), nn.Linear):
        return module.base.weight
    return module.weight


class _TwoOrdered(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = OrderedPair(n=10, m=7, r=3, scaling=0.7)
        self.b = OrderedPair(n=7, m=7, r=2, scaling=2.5)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _build(kind):
    """(model, loss_fn, T) with every B non-zero and the base weights of the LoRA layers trainable."""
    if kind == "loralinear":
        torch.manual_seed(0)
        model = TinyLoRAMLP(r=3, alpha=6.0)  # s = 2
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(2, 7, 12, generator=g), torch.randint(0, 5, (2, 7), generator=g)
        loss_fn = lambda: nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())  # noqa: E731
        T = 14
    elif kind == "custom":
        torch.manual_seed(0)
        model = _TwoOrdered()
        x = torch.randn(3, 5, 10)
        loss_fn = lambda: model(x).sin().sum()  # noqa: E731
        T = 15
    else:
        kw = {"peft": {}, "peft_rslora": {"use_rslora": True}, "peft_task1": {"adapter_name": "task1"}}[kind]
        model = _peft_llama(r=4, alpha=12, **kw)
        ids = _tokens()
        loss_fn = lambda: _llama_loss(model, ids)  # noqa: E731
        T = BATCH * SEQ
    layers = find_lora_layers(model)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in layers:
            layer.B.copy_(torch.randn(layer.B.shape, generator=g, dtype=layer.B.dtype) * 0.3)
            _base_weight(layer.module).requires_grad_(True)
    model.train()
    return model, layers, loss_fn, T


@pytest.mark.parametrize("kind", ["peft", "peft_rslora", "peft_task1", "loralinear", "custom"])
def test_merged_weight_gradient_identity(kind):
    model, layers, loss_fn, T = _build(kind)
    assert layers
    assert all(abs(layer.scale - 1.0) > 0.2 for layer in layers)  # lora_alpha ≠ r: s is really exercised
    cap = ActivationCapture(layers)
    loss_fn().backward()
    for layer in layers:
        X, S = cap.get(layer.module)
        assert X.shape == (T, layer.in_features) and S.shape == (T, layer.out_features)
        G = S.T @ X
        s = layer.scale
        # G is the gradient of the merged weight W0 + s·B·A, i.e. of W0 itself.
        assert rel_err(G, _base_weight(layer.module).grad) < 1e-5
        assert rel_err(layer.A.grad, s * layer.B.detach().T @ G) < 1e-5, layer.name
        assert rel_err(layer.B.grad, s * G @ layer.A.detach().T) < 1e-5, layer.name
        # and the scale matters: the unscaled identity (official code, P10) is clearly wrong
        assert rel_err(layer.A.grad, layer.B.detach().T @ G) > 0.1
    cap.remove()


def test_merged_weight_gradient_two_active_adapters_share_one_module():
    peft = _peft()
    model = _peft_llama(r=4, alpha=12)
    model.add_adapter("task2", peft.LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj"]))
    model.base_model.set_adapter(["default", "task2"])  # both active and trainable
    layers = find_lora_layers(model)
    q0 = _attn(model, 0, "q_proj")
    assert {layer.name.split("[")[1] for layer in layers if layer.module is q0} == {"default]", "task2]"}
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in layers:
            layer.B.copy_(torch.randn(layer.B.shape, generator=g) * 0.3)
    cap = ActivationCapture(layers)
    _llama_loss(model, _tokens()).backward()
    for layer in layers:
        X, S = cap.get(layer.module)
        assert X.shape[0] == BATCH * SEQ  # one record per module, not one per adapter
        G = S.T @ X
        assert rel_err(layer.A.grad, layer.scale * layer.B.detach().T @ G) < 1e-5, layer.name
        assert rel_err(layer.B.grad, layer.scale * G @ layer.A.detach().T) < 1e-5, layer.name


def test_lora_dropout_x_is_what_the_lora_path_saw_and_g_gives_the_factor_gradients():
    """With LoRA dropout the LoRA branch sees a dropped-out x (issue #11 item 5): X is that input of lora_A,
    so G = SᵀX gives the factors' gradients exactly; the module's own input would not."""
    model = _peft_llama(r=4, alpha=12, lora_dropout=0.5)
    layers = find_lora_layers(model)
    inputs, lora_inputs = {}, {}
    for layer in layers:
        layer.module.register_forward_pre_hook(lambda m, a, _d=inputs: _d.__setitem__(id(m), a[0].detach()))
        layer.A_module.register_forward_pre_hook(
            lambda m, a, _d=lora_inputs, _k=id(layer): _d.__setitem__(_k, a[0].detach()))
    with torch.no_grad():
        for layer in layers:
            layer.B.normal_(0, 0.3)
    cap = ActivationCapture(layers)
    torch.manual_seed(3)
    _llama_loss(model, _tokens()).backward()
    for layer in layers:
        X, S = cap.get(layer)
        torch.testing.assert_close(X, lora_inputs[id(layer)].reshape(X.shape), rtol=0, atol=0)
        assert not torch.equal(X, inputs[id(layer.module)].reshape(X.shape))
        G = S.T @ X
        assert rel_err(layer.A.grad, layer.scale * layer.B.detach().T @ G) < 1e-5, layer.name
        assert rel_err(layer.B.grad, layer.scale * G @ layer.A.detach().T) < 1e-5, layer.name
