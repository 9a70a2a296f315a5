"""ActivationCapture: what it keeps alive, what it drops, and where users poke at it.

Issue #11 items 4–6 and 9 (stale backwards, LoRA dropout, copied models, torch.compile) and issue #15
item 4 (nothing per token outlives its layer's backward; activation checkpointing frees X as usual).
Lifetimes are checked with weak references to the layers' actual input tensors, never with timings.
"""

from __future__ import annotations

import copy
import io
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.multiprocessing.reductions import StorageWeakRef  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

import lorsum_kernels as lk  # noqa: E402
from lorsum_kernels import LoRALinear, find_lora_layers  # noqa: E402
from lorsum_kernels.capture import ActivationCapture  # noqa: E402

from .conftest import TinyLoRAMLP, rel_err  # noqa: E402


def _model(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    model = TinyLoRAMLP()
    if dropout:
        for layer in model.lora_layers():
            layer.dropout = nn.Dropout(dropout)
    return model.train()


def _batch(batch, seq, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, seq, 12, generator=g), torch.randint(0, 5, (batch, seq), generator=g)


def _loss(model, x, y):
    return F.cross_entropy(model(x).flatten(0, -2), y.flatten())


def _assert_factor_gradients_from_captures(cap, layers):
    """Each layer's captured G = SᵀX gives autograd's factor gradients: s·BᵀG and s·G·Aᵀ."""
    for layer in layers:
        X, S = cap.get(layer)
        G = S.T @ X
        assert rel_err(layer.A.grad, layer.scale * layer.B.detach().T @ G) < 1e-5, layer.name
        assert rel_err(layer.B.grad, layer.scale * G @ layer.A.detach().T) < 1e-5, layer.name


class _StorageRef:
    """Weak reference to a tensor's storage: views and detached copies (what the capture keeps) share it."""

    def __init__(self, t):
        self._ref = StorageWeakRef(t.untyped_storage())

    def __call__(self):
        return None if self._ref.expired() else True


def _track_lora_inputs(model):
    """Weak references to the storage of every tensor the LoRA layers' lora_A receive (the X recorded)."""
    refs = []
    for layer in model.lora_layers():
        layer.lora_A.register_forward_pre_hook(lambda m, args: refs.append(_StorageRef(args[0])))
    return refs


# --------------------------------------------------------------------------------------------------
# stale backwards (issue #11 item 4)


@pytest.mark.parametrize("reset", ["zero_grad_keep", "zero_grad_none", "grad_none_by_hand", "grad_zero_by_hand"])
def test_a_discarded_backward_never_reaches_the_step(reset):
    model = _model()
    layers = find_lora_layers(model)
    cap = ActivationCapture(layers)
    x1, y1 = _batch(2, 4, 1)
    _loss(model, x1, y1).backward()
    if reset == "zero_grad_keep":
        model.zero_grad(set_to_none=False)
    elif reset == "zero_grad_none":
        model.zero_grad()
    else:
        for p in model.parameters():
            if reset == "grad_none_by_hand":
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()
    x2, y2 = _batch(2, 4, 2)
    _loss(model, x2, y2).backward()
    for layer in layers:
        X, S = cap.get(layer)
        assert X.shape[0] == 8, f"{layer.name}: {X.shape[0]} rows, the discarded backward's are still there"
        G = S.T @ X
        assert rel_err(layer.A.grad, layer.scale * layer.B.detach().T @ G) < 1e-5


def test_accumulation_without_reset_keeps_both_backwards():
    model = _model()
    cap = ActivationCapture(find_lora_layers(model))
    for k in range(2):
        x, y = _batch(2, 4, k)
        _loss(model, x, y).backward()
    assert cap.rows(model.l1) == 16 and cap.pairs(model.l1) == 2


def test_optimizer_steps_on_the_fresh_backward_only_after_model_zero_grad():
    """The user's loop zeroes the model (not the optimizer) between a discarded backward and the real one:
    the step equals a step on the real batch alone."""
    x1, y1 = _batch(2, 4, 1)
    x2, y2 = _batch(2, 4, 2)
    results = []
    for discard_first in (True, False):
        model = _model()
        opt = lk.LoRSum(model, lr=0.1, backend="torch")
        if discard_first:
            _loss(model, x1, y1).backward()
            model.zero_grad(set_to_none=False)
        _loss(model, x2, y2).backward()
        opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# LoRA dropout (issue #11 item 5)


def test_x_is_what_the_lora_path_saw_under_dropout():
    model = _model(dropout=0.5)
    layers = find_lora_layers(model)
    cap = ActivationCapture(layers)
    x, y = _batch(3, 5, 1)
    _loss(model, x, y).backward()
    assert not torch.equal(cap.get(model.l1)[0], x.reshape(15, 12))  # dropped out, not the module input
    _assert_factor_gradients_from_captures(cap, layers)


def test_x_from_module_is_the_module_input_and_gives_the_base_weight_gradient_under_dropout():
    """x_from="module" takes X before LoRA dropout: G = SᵀX is then the gradient of the base weight W0."""
    model = _model(dropout=0.5)
    layers = find_lora_layers(model)
    for layer in layers:
        layer.module.base.weight.requires_grad_(True)
    cap = ActivationCapture(layers, x_from="module")
    x, y = _batch(3, 5, 1)
    _loss(model, x, y).backward()
    torch.testing.assert_close(cap.get(model.l1)[0], x.reshape(15, 12), rtol=0, atol=0)
    for layer in layers:
        X, S = cap.get(layer)
        assert rel_err(S.T @ X, layer.module.base.weight.grad) < 1e-6, layer.name


def test_peft_lora_dropout_gives_the_factor_gradients():
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = peft.get_peft_model(transformers.LlamaForCausalLM(cfg), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.3))
    model.train()
    layers = find_lora_layers(model)
    with torch.no_grad():
        for layer in layers:
            layer.B.normal_(0, 0.3)
    cap = ActivationCapture(layers)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    _assert_factor_gradients_from_captures(cap, layers)


# --------------------------------------------------------------------------------------------------
# lifetimes (issue #15 item 4)


def test_nothing_per_token_outlives_the_layer_backward_with_the_loss_alive():
    """Streaming (a sink takes every pair): after backward, with ``loss`` (and so the graph) still alive as
    in the usual loop, no layer input is referenced any more."""
    model = _model()
    refs = _track_lora_inputs(model)
    cap = ActivationCapture(find_lora_layers(model))
    taken = []
    cap.sink = lambda layer, X, S: taken.append((layer.name, X.shape, S.shape)) is None
    x, y = _batch(2, 4, 1)
    loss = _loss(model, x, y)
    del x
    loss.backward()
    assert len(taken) == 3 and len(refs) == 3
    assert [r() is None for r in refs] == [True] * 3, "a layer input outlived its backward"


def test_cached_records_are_the_only_reference_and_clear_frees_them():
    model = _model()
    refs = _track_lora_inputs(model)
    cap = ActivationCapture(find_lora_layers(model))
    x, y = _batch(2, 4, 1)
    loss = _loss(model, x, y)
    del x
    loss.backward()
    assert any(r() is not None for r in refs)  # the records hold them until the step
    cap.clear()
    assert [r() is None for r in refs] == [True] * 3


class _Checkpointed(nn.Module):
    def __init__(self, inner, use_reentrant):
        super().__init__()
        self.inner, self.use_reentrant = inner, use_reentrant

    def lora_layers(self):
        return self.inner.lora_layers()

    def _block(self, x):
        h = torch.tanh(self.inner.l1(x))
        h = torch.tanh(self.inner.l2(h))
        return torch.tanh(self.inner.l3(h))

    def forward(self, x):
        if self.use_reentrant:
            x = x.detach().requires_grad_(True)
        return self.inner.head(checkpoint(self._block, x, use_reentrant=self.use_reentrant))


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpointing_frees_the_inputs_between_forward_and_backward(use_reentrant):
    """The capture keeps no layer input alive across the forward: activation checkpointing frees l2's and
    l3's inputs (intermediates of the checkpointed block) until the recomputation, as without the capture."""
    model = _Checkpointed(_model(), use_reentrant)
    refs = _track_lora_inputs(model)
    cap = ActivationCapture(find_lora_layers(model))
    cap.sink = lambda layer, X, S: True
    x, y = _batch(2, 4, 1)
    loss = _loss(model, x, y)
    inner = refs[1:3]  # l1's input is the block's input, which the caller holds
    assert [r() is None for r in inner] == [True, True], "the capture kept a checkpointed input alive"
    loss.backward()
    assert cap.pairs(model.inner.l2) == 1 and cap.pairs(model.inner.l3) == 1


# --------------------------------------------------------------------------------------------------
# copies of a hooked model (issue #11 item 6)


def test_deepcopy_and_pickle_of_a_hooked_model_train_and_leave_the_original_captured():
    model = _model()
    opt = lk.LoRSum(model, lr=0.1, backend="torch")
    clone = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x, y = _batch(2, 4, 1)
    for other in (clone, loaded):
        _loss(other, x, y).backward()
        assert other.l1.lora_A.weight.grad is not None
    assert not opt._capture.has_data(model.l1)  # the copies' backwards reached nothing of the original
    _loss(model, x, y).backward()
    assert opt._capture.rows(model.l1) == 8
    opt.step()


def test_step_after_remove_hooks_raises():
    model = _model()
    opt = lk.LoRSum(model, lr=0.1, backend="torch")
    opt.remove_hooks()
    x, y = _batch(2, 4, 1)
    _loss(model, x, y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="remove_hooks"):
        opt.step()
    for a, p in zip(before, model.parameters()):
        assert torch.equal(a, p)


# --------------------------------------------------------------------------------------------------
# torch.compile (issue #11 item 9)


@pytest.mark.parametrize("x_from", ["lora_A", "module"])
def test_compiled_hooked_model_has_no_graph_break_and_captures_the_true_gradient(x_from):
    model = _model()
    layers = find_lora_layers(model)
    cap = ActivationCapture(layers, x_from=x_from)
    x, y = _batch(2, 4, 1)
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    F.cross_entropy(compiled(x).flatten(0, -2), y.flatten()).backward()
    for layer in layers:
        X, S = cap.get(layer)
        assert X.shape[0] == 8
        G = S.T @ X
        assert rel_err(layer.A.grad, layer.scale * layer.B.detach().T @ G) < 1e-5, layer.name


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_inductor_compiled_model_captures_the_true_gradient(dropout):
    """With torch.compile's default backend (Inductor), whose compiled backward reuses a buffer's memory once
    its last op has run: the capture's tap op hands over X and S during that backward, so it keeps copies.
    Keeping the tensors themselves (as aot_eager allows) recorded whatever Inductor wrote into them next:
    LoRSum's factors 0.36 away from the eager run after four steps. Here G = SᵀX, and the step, is the
    true gradient's, LoRA dropout (recomputed in backward) included."""
    model = _model(dropout=dropout)
    layers = find_lora_layers(model)
    cap = ActivationCapture(layers)
    x, y = _batch(2, 4, 1)
    torch.manual_seed(5)  # the dropout masks
    _loss(torch.compile(model), x, y).backward()
    torch._dynamo.reset()
    _assert_factor_gradients_from_captures(cap, layers)


def test_a_model_compiled_before_the_optimizer_says_how_to_recompile():
    """torch.compile does not guard on module hooks: a model compiled and run before the optimizer hooked
    its layers (or one of the same class: the compiled code is shared) keeps running a graph without the
    capture. The step says so, and names the way out, before changing anything; after
    ``torch.compiler.reset()`` the same optimizer trains."""
    torch.compiler.reset()
    model = _model()
    compiled = torch.compile(model, backend="aot_eager")
    x, y = _batch(2, 4, 1)
    _loss(compiled, x, y).backward()  # compiled without hooks
    model.zero_grad()
    opt = lk.LoRSum(model, lr=1e-2)
    _loss(compiled, x, y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"torch.compiler.reset\(\)"):
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    opt.zero_grad()
    torch.compiler.reset()
    _loss(compiled, x, y).backward()
    opt.step()
    assert not torch.equal(before[2], model.l1.lora_A.weight)  # the step ran
    torch.compiler.reset()


@pytest.mark.parametrize("capture", ["auto", "cache"])
def test_inductor_compiled_model_trains_as_the_eager_one(capture):
    """LoRSum on a model compiled with Inductor takes the eager model's steps: the first cached, the next
    streamed through the CPU's queue of layer steps (capture="auto"), or all cached."""
    trained = []
    for compiled in (False, True):
        model = _model()
        opt = lk.LoRSum(model, lr=1e-2, capture=capture)
        run = torch.compile(model) if compiled else model
        for seed in range(3):
            _loss(run, *_batch(2, 4, seed)).backward()
            opt.step()
            opt.zero_grad()
        trained.append([p.detach().clone() for p in model.parameters()])
    torch._dynamo.reset()
    for a, b in zip(*trained):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
