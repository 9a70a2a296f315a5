"""ActivationCapture: the (X, S) pairs each LoRA layer hands the optimizer.

spec/lorsum.md §1 (X is the pre-dropout input, S = ∂L/∂Y, G = SᵀX), §7.2–7.3 (the official hooks), §11 P2
(gradient accumulation must give exactly Σ_k S_kᵀX_k), P3 (checkpointing must not double the rows), P14 (a
forward without backward must not desync X and S), P15 (in-place ops on outputs), §13 T16 and T17.
The "true" gradient of the merged weight W0 + s·B·A is read independently from autograd, by making the frozen
base weight W0 trainable: ∂L/∂W0 = ∂L/∂W_merged.
"""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

import lorsum_kernels as lk  # noqa: E402
from lorsum_kernels import LoRALinear, find_lora_layers  # noqa: E402
from lorsum_kernels.capture import ActivationCapture  # noqa: E402

from .conftest import TinyLoRAMLP, rel_err  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*:FutureWarning")


# --------------------------------------------------------------------------------------------------
# helpers


def _model(seed: int = 0, trainable_base: bool = True) -> TinyLoRAMLP:
    """TinyLoRAMLP (l1 12→20, l2/l3 20→20, r=3, α=6 so s=2, B ≠ 0); W0 trainable to read the true G."""
    torch.manual_seed(seed)
    model = TinyLoRAMLP()
    if trainable_base:
        for layer in (model.l1, model.l2, model.l3):
            layer.base.weight.requires_grad_(True)
    return model.train()


def _batch(batch: int, seq: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, seq, 12, generator=g), torch.randint(0, 5, (batch, seq), generator=g)


def _ce(logits, y, reduction="mean"):
    return F.cross_entropy(logits.flatten(0, -2), y.flatten(), reduction=reduction)


def _setup(model):
    layers = find_lora_layers(model)
    assert len(layers) == 3
    return layers, ActivationCapture(layers)


def _check_true_gradient(layers, cap, rows: int, tol: float = 1e-6) -> None:
    """Row counts, and SᵀX against autograd's ∂L/∂W0 and the factor gradients."""
    for layer in layers:
        data = cap.get(layer.module)
        assert data is not None, layer.name
        X, S = data
        assert X.shape == (rows, layer.in_features), layer.name
        assert S.shape == (rows, layer.out_features), layer.name
        assert cap.rows(layer.module) == rows
        G = S.T @ X
        assert rel_err(G, layer.module.base.weight.grad) < tol, layer.name
        s = layer.scale
        assert rel_err(layer.A.grad, s * layer.B.detach().T @ G) < 1e-5, layer.name
        assert rel_err(layer.B.grad, s * G @ layer.A.detach().T) < 1e-5, layer.name


def _count_forwards(modules) -> dict:
    calls = {id(m): 0 for m in modules}

    def hook(module, args, output):
        calls[id(module)] += 1

    for m in modules:
        m.register_forward_hook(hook)
    return calls


# --------------------------------------------------------------------------------------------------
# what is recorded


@pytest.mark.parametrize("lead", [(15,), (3, 5), (1, 3, 5)], ids=str)
def test_x_and_s_rows_match_the_tokens_and_hold_input_and_output_gradient(lead):
    model = _model(trainable_base=False)
    layers, cap = _setup(model)
    seen = {}

    def keep(module, args, output):
        output.retain_grad()
        seen[id(module)] = (args[0].detach(), output)

    for layer in layers:
        layer.module.register_forward_hook(keep)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(*lead, 12, generator=g), torch.randint(0, 5, lead, generator=g)
    _ce(model(x), y).backward()
    T = 15
    for layer in layers:
        X, S = cap.get(layer.module)
        assert X.shape == (T, layer.in_features) and S.shape == (T, layer.out_features)
        assert cap.rows(layer.module) == T and cap.has_data(layer.module)
        inp, out = seen[id(layer.module)]
        torch.testing.assert_close(X, inp.reshape(T, -1), rtol=0, atol=0)
        torch.testing.assert_close(S, out.grad.reshape(T, -1), rtol=0, atol=0)
    torch.testing.assert_close(cap.get(model.l1)[0], x.reshape(T, 12), rtol=0, atol=0)


def test_eval_mode_forward_records_nothing():
    model = _model(trainable_base=False)
    layers, cap = _setup(model)
    model.eval()
    x, y = _batch(2, 7, 1)
    _ce(model(x), y).backward()
    assert model.l1.lora_A.weight.grad is not None  # gradients did flow: only the mode excluded it
    for layer in layers:
        assert cap.get(layer.module) is None and not cap.has_data(layer.module)
        assert cap.rows(layer.module) == 0


def test_eval_mode_forward_records_when_not_training_only():
    """A driver that runs its own passes in eval mode (LoRA-One's init) opts in with training_only=False."""
    model = _model()
    layers = find_lora_layers(model)
    cap = ActivationCapture(layers, training_only=False)
    model.eval()
    x, y = _batch(2, 7, 1)
    _ce(model(x), y).backward()
    _check_true_gradient(layers, cap, rows=14)


def test_unknown_x_from_raises():
    with pytest.raises(ValueError, match="x_from"):
        ActivationCapture(find_lora_layers(_model()), x_from="base")


@pytest.mark.parametrize("ctx", [torch.no_grad, torch.inference_mode])
def test_no_grad_forward_records_nothing(ctx):
    model = _model(trainable_base=False)
    layers, cap = _setup(model)
    with ctx():
        model(_batch(2, 7, 1)[0])
    for layer in layers:
        assert cap.get(layer.module) is None and cap.rows(layer.module) == 0


def test_train_forward_without_backward_records_nothing_and_does_not_desync():
    """P14: a train-mode forward with no backward (generation, a probe) leaves no X behind."""
    model = _model()
    layers, cap = _setup(model)
    stray = model(_batch(3, 4, 9)[0])  # 12 rows that never get a gradient
    for layer in layers:
        assert cap.get(layer.module) is None
    del stray
    x, y = _batch(2, 7, 1)
    _ce(model(x), y).backward()
    _check_true_gradient(layers, cap, rows=14)
    torch.testing.assert_close(cap.get(model.l1)[0], x.reshape(14, 12), rtol=0, atol=0)


def test_clear_leaves_nothing_and_recording_resumes():
    model = _model(trainable_base=False)
    layers, cap = _setup(model)
    x, y = _batch(2, 7, 1)
    _ce(model(x), y).backward()
    assert all(cap.has_data(layer.module) for layer in layers)
    cap.clear()
    for layer in layers:
        assert cap.get(layer.module) is None and not cap.has_data(layer.module)
        assert cap.rows(layer.module) == 0
    x2, y2 = _batch(1, 5, 2)
    _ce(model(x2), y2).backward()
    assert all(cap.rows(layer.module) == 5 for layer in layers)  # fresh rows only, nothing stale


def test_remove_detaches_the_hooks_and_drops_everything():
    model = _model(trainable_base=False)
    before = {id(m): len(m._forward_hooks) for m in model.modules()}
    layers, cap = _setup(model)
    x, y = _batch(2, 7, 1)
    _ce(model(x), y).backward()
    cap.remove()
    for layer in layers:
        assert cap.get(layer.module) is None and cap.rows(layer.module) == 0
    assert {id(m): len(m._forward_hooks) for m in model.modules()} == before
    _ce(model(x), y).backward()  # later forwards and backwards record nothing
    for layer in layers:
        assert cap.get(layer.module) is None and not cap.has_data(layer.module)


# --------------------------------------------------------------------------------------------------
# gradient accumulation (T16, P2)


def _official_accumulate(S_parts):
    """spec §7.3, the official rule with a mean loss: on each new micro-batch, multiply the cached S by its
    row count, concatenate, and divide the whole by the new row count."""
    S = S_parts[0]
    for new in S_parts[1:]:
        S = torch.cat([S * S.shape[0], new]) / (S.shape[0] + new.shape[0])
    return S


@pytest.mark.parametrize("sizes", [((2, 7), (2, 7)), ((2, 7), (3, 4)), ((1, 9), (4, 3), (2, 5))], ids=str)
@pytest.mark.parametrize("loss_scaling", ["mean_over_k", "sum_over_all_tokens"])
def test_gradient_accumulation_gives_the_true_accumulated_gradient(sizes, loss_scaling):
    model = _model()
    layers, cap = _setup(model)
    K, N = len(sizes), sum(b * t for b, t in sizes)
    parts = {id(layer.module): [] for layer in layers}
    done = 0
    for k, (b, t) in enumerate(sizes):
        x, y = _batch(b, t, seed=10 + k)
        logits = model(x)
        if loss_scaling == "mean_over_k":  # HF Trainer without num_items_in_batch: mean loss / K
            loss = _ce(logits, y) / K
        else:  # HF Trainer with num_items_in_batch: token sum / all tokens of the step
            loss = _ce(logits, y, reduction="sum") / N
        loss.backward()
        for layer in layers:
            X, S = cap.get(layer.module)
            assert X.shape[0] == S.shape[0] == done + b * t
            parts[id(layer.module)].append(S[done:].clone())
        done += b * t
    _check_true_gradient(layers, cap, rows=N, tol=1e-6)

    # Regression proof (P2): the official rescaling of S is far from the true gradient on the same data.
    for layer in layers:
        X, _ = cap.get(layer.module)
        G_official = _official_accumulate(parts[id(layer.module)]).T @ X
        assert rel_err(G_official, layer.module.base.weight.grad) > 0.3, layer.name


# --------------------------------------------------------------------------------------------------
# activation checkpointing (T17, P3)


class _Checkpointed(nn.Module):
    def __init__(self, inner: TinyLoRAMLP, use_reentrant: bool):
        super().__init__()
        self.inner, self.use_reentrant = inner, use_reentrant

    def _block(self, x):
        m = self.inner
        h = torch.tanh(m.l1(x))
        h = torch.tanh(m.l2(h))
        return torch.tanh(m.l3(h))

    def forward(self, x):
        if self.use_reentrant:
            # The reentrant variant only builds a graph when an input requires grad: the same trick as
            # transformers' enable_input_require_grads().
            x = x.detach().requires_grad_(True)
        h = checkpoint(self._block, x, use_reentrant=self.use_reentrant)
        return self.inner.head(h)


@pytest.mark.parametrize("micro_batches", [1, 2])
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpointing_records_each_row_once_and_the_true_gradient(use_reentrant, micro_batches):
    inner = _model()
    model = _Checkpointed(inner, use_reentrant)
    layers, cap = _setup(model)
    calls = _count_forwards([inner.l1, inner.l2, inner.l3])
    for k in range(micro_batches):
        x, y = _batch(2, 7, seed=30 + k)
        (_ce(model(x), y) / micro_batches).backward()
    # each LoRA layer really ran twice per micro-batch (forward + recomputation) ...
    assert set(calls.values()) == {2 * micro_batches}
    # ... and its rows were recorded once: T, not 2T
    _check_true_gradient(layers, cap, rows=14 * micro_batches, tol=1e-6)


def _peft_llama(seed=0):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    return peft.get_peft_model(transformers.LlamaForCausalLM(cfg), config)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_peft_transformer_gradient_checkpointing(use_reentrant):
    model = _peft_llama()
    if not getattr(model.base_model.model, "supports_gradient_checkpointing", False):
        pytest.skip("this transformers model does not support gradient checkpointing")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    if use_reentrant:
        model.enable_input_require_grads()
    model.train()
    layers = find_lora_layers(model)
    assert len(layers) == 4
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in layers:
            layer.B.copy_(torch.randn(layer.B.shape, generator=g) * 0.3)
            layer.module.base_layer.weight.requires_grad_(True)
    cap = ActivationCapture(layers)
    calls = _count_forwards([layer.module for layer in layers])
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        ids = torch.randint(0, 64, (2, 7), generator=gen)
        (model(input_ids=ids, labels=ids, use_cache=False).loss / 2).backward()
    assert set(calls.values()) == {4}, "gradient checkpointing did not recompute the layers"
    for layer in layers:
        X, S = cap.get(layer.module)
        assert X.shape == (28, layer.in_features) and S.shape == (28, layer.out_features)
        G = S.T @ X
        assert rel_err(G, layer.module.base_layer.weight.grad) < 1e-6, layer.name
        assert rel_err(layer.A.grad, layer.scale * layer.B.detach().T @ G) < 1e-5, layer.name
        assert rel_err(layer.B.grad, layer.scale * G @ layer.A.detach().T) < 1e-5, layer.name


# --------------------------------------------------------------------------------------------------
# weight sharing, in-place changes


def test_module_called_twice_records_both_calls_and_the_total_gradient():
    model = _model()
    layers, cap = _setup(model)
    x, y = _batch(2, 7, 1)
    h = torch.tanh(model.l1(x))
    h = torch.tanh(model.l2(h))
    h = torch.tanh(model.l2(h))  # l2 shared; l3 unused
    _ce(model.head(h), y).backward()
    assert cap.rows(model.l1) == 14 and cap.rows(model.l2) == 28
    assert cap.get(model.l3) is None and model.l3.lora_A.weight.grad is None
    for layer, rows in ((layers[0], 14), (layers[1], 28)):
        X, S = cap.get(layer.module)
        assert X.shape[0] == S.shape[0] == rows
        G = S.T @ X
        assert rel_err(G, layer.module.base.weight.grad) < 1e-6
        assert rel_err(layer.A.grad, layer.scale * layer.B.detach().T @ G) < 1e-5
        assert rel_err(layer.B.grad, layer.scale * G @ layer.A.detach().T) < 1e-5


def test_inplace_change_of_the_input_before_backward_raises():
    """X is saved as autograd saves activations, so autograd's own version check catches the change."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(12, 8), 3, 6.0)
    nn.init.normal_(layer.lora_B.weight)
    cap = ActivationCapture(find_lora_layers(nn.Sequential(layer)))
    x = torch.randn(2, 5, 12)
    out = layer(x)
    x.mul_(2.0)
    with pytest.raises(RuntimeError, match="inplace"):
        out.square().sum().backward()
    assert cap.get(layer) is None


def test_inplace_change_of_the_input_with_dropout_keeps_the_lora_path_gradient():
    """With LoRA dropout the LoRA path reads the dropped-out copy, which the change does not reach: the
    captured X is that copy, and G = SᵀX still gives the factors' gradients exactly."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(12, 8), 3, 6.0, dropout=0.5)
    nn.init.normal_(layer.lora_B.weight)
    (lora,) = find_lora_layers(nn.Sequential(layer))
    cap = ActivationCapture([lora])
    x = torch.randn(2, 5, 12)
    out = layer(x)
    x.mul_(2.0)
    out.square().sum().backward()
    X, S = cap.get(layer)
    G = S.T @ X
    assert rel_err(lora.A.grad, lora.scale * lora.B.detach().T @ G) < 1e-5
    assert rel_err(lora.B.grad, lora.scale * G @ lora.A.detach().T) < 1e-5


def test_input_buffer_reused_after_backward_is_never_silently_wrong():
    """A static input buffer refilled in place for the next micro-batch (CUDA-graph style loops) after the
    previous backward: autograd is fine with it, so the capture, which still holds a view of that buffer,
    must either raise when the data is read or give the true gradient, never a silently wrong G."""
    model = _model()
    layers, cap = _setup(model)
    buffer = torch.empty(2, 7, 12)
    for k in range(2):
        x, y = _batch(2, 7, seed=40 + k)
        buffer.copy_(x)
        (_ce(model(buffer), y) / 2).backward()
    for layer in layers:
        try:
            X, S = cap.get(layer.module)
        except RuntimeError:
            continue
        assert rel_err(S.T @ X, layer.module.base.weight.grad) < 1e-6, layer.name


def test_inplace_change_of_the_module_output_keeps_s_correct():
    """P15: S must be the gradient of the module's own output even when that output is modified in place."""
    model = _model()
    layers, cap = _setup(model)
    x, y = _batch(2, 7, 1)
    h = model.l1(x)
    h.mul_(3.0)
    h = torch.tanh(h)
    h2 = model.l2(h)
    h2.add_(0.5)
    h = torch.tanh(model.l3(torch.tanh(h2)))
    _ce(model.head(h), y).backward()
    _check_true_gradient(layers, cap, rows=14)


# --------------------------------------------------------------------------------------------------
# the optimizer's integration points (optim/base.py: zero_grad, step, _plan)


def _optimizer(model):
    return lk.LoRSum(model, lr=0.1, momentum=0.9, backend="torch")


def _held(opt, model):
    return [opt._capture.get(layer.module) for layer in find_lora_layers(model)]


def test_optimizer_zero_grad_clears_the_captured_data():
    model = _model(trainable_base=False)
    opt = _optimizer(model)
    x, y = _batch(2, 7, 1)
    _ce(model(x), y).backward()
    assert all(d is not None and d[0].shape[0] == 14 for d in _held(opt, model))
    opt.zero_grad()
    assert _held(opt, model) == [None, None, None]
    _ce(model(x), y).backward()
    assert all(d[0].shape[0] == 14 for d in _held(opt, model))  # fresh rows only


def test_optimizer_step_holds_nothing_afterwards():
    model = _model(trainable_base=False)
    opt = _optimizer(model)
    for k in range(2):
        x, y = _batch(2, 7, seed=k)
        (_ce(model(x), y) / 2).backward()
    assert all(d[0].shape[0] == 28 for d in _held(opt, model))
    opt.step()
    assert _held(opt, model) == [None, None, None]
    opt.zero_grad()
    x, y = _batch(1, 3, seed=7)
    _ce(model(x), y).backward()
    assert all(d[0].shape[0] == 3 for d in _held(opt, model))


def _snapshot(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_snapshot(v) for v in obj)
    return copy.deepcopy(obj)


def _grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b)):
            _assert_same(u, v, f"{path}[{i}]")
    else:
        assert a == b, path


@pytest.mark.parametrize("missing", ["all_layers_eval", "last_layer_eval"])
def test_step_with_gradients_but_no_captured_data_raises_before_any_change(missing):
    model = _model(trainable_base=False)
    opt = _optimizer(model)
    x, y = _batch(2, 7, 1)
    _ce(model(x), y).backward()
    opt.step()  # a normal step first, so momentum and the head's AdamW state exist
    opt.zero_grad()

    if missing == "all_layers_eval":
        model.eval()
    else:
        model.l3.eval()  # l1 and l2 are captured (and would be stepped first), l3 is not
    _ce(model(x), y).backward()
    assert model.l3.lora_A.weight.grad is not None
    params = _snapshot(dict(model.named_parameters()))
    grads = _snapshot(_grads(model))
    state = _snapshot(opt.state_dict())

    with pytest.raises(RuntimeError, match="captured"):
        opt.step()

    _assert_same(params, _snapshot(dict(model.named_parameters())), "params")
    _assert_same(grads, _snapshot(_grads(model)), "grads")
    _assert_same(state, _snapshot(opt.state_dict()), "state_dict")
