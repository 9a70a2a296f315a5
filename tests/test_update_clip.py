"""``max_update_norm`` (optim/update_clip.py): the step clipped by the global norm of its merged-weight
updates over the lr, in every capture mode; on by default for the gradient-step methods (ScaledGD,
SVDLoRA), so that a sharp problem does not make their loss rise where AdamW's falls. LoRSum's and
ScaledLoRSum's default steps are normalised per layer (RMS lr per entry, invariant to the loss's scale as
AdamW's is) and do not clip; their plain steps (``GRADIENT_SCALED``: LoRSum's gradient step, ScaledLoRSum
with the official code's δ = 0.1) are gradient steps, and the clip tests run them so.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorsum_kernels as lk
from lorsum_kernels.optim.update_clip import merged_update_bound, moved_by

from .conftest import TinyLoRAMLP, merged, train_tiny

D = torch.float64


@pytest.mark.parametrize("L,m,n,r", [(1, 5, 7, 1), (3, 23, 13, 3), (2, 64, 9, 8)])
def test_bound_is_the_sum_of_the_first_and_second_order_norms(L, m, n, r):
    g = torch.Generator().manual_seed(L * m + n)
    A, B = torch.randn(L, r, n, generator=g, dtype=D), torch.randn(L, m, r, generator=g, dtype=D)
    A2, B2 = A + torch.randn(L, r, n, generator=g, dtype=D), B + torch.randn(L, m, r, generator=g, dtype=D)
    dA, dB = A2 - A, B2 - B
    expected = (dB @ A + B @ dA).flatten(1).norm(dim=1) + (dB @ dA).flatten(1).norm(dim=1)
    bound = merged_update_bound(A, B, A2, B2)
    torch.testing.assert_close(bound, expected, rtol=1e-12, atol=1e-12)
    assert (bound >= (B2 @ A2 - B @ A).flatten(1).norm(dim=1) * (1 - 1e-12)).all()
    # Moving both factors by α moves the merged weight by at most α times the bound.
    alpha = torch.tensor(0.3, dtype=D)
    moved = moved_by(B, B2, alpha) @ moved_by(A, A2, alpha) - B @ A
    assert (moved.flatten(1).norm(dim=1) <= alpha * bound * (1 + 1e-12)).all()
    assert torch.equal(moved_by(A, A2, torch.tensor(1.0, dtype=D)), A2)  # α = 1: the step, bit for bit
    # Per layer (normalize_step's shrink): torch.lerp at α where α < 1, the step itself at 1 (bit for bit).
    per_layer = torch.tensor([0.3, 1.0, 0.7][:L], dtype=torch.float32).view(-1, 1, 1)
    A32, A232 = A.float(), A2.float()
    formula = torch.where(per_layer < 1, torch.lerp(A32, A232, per_layer), A232)
    assert torch.equal(moved_by(A32, A232, per_layer), formula)
    whole = per_layer.reshape(-1) == 1
    assert torch.equal(moved_by(A32, A232, per_layer)[whole], A232[whole])
    assert torch.equal(A32, A.float()) and torch.equal(A232, A2.float())  # the inputs are left as they were
    # The differences given (a caller that has them): the same numbers.
    assert torch.equal(merged_update_bound(A, B, A2, B2, (A2 - A, B2 - B)), bound)


# ScaledLoRSum with the official code's class defaults: the output side of the metric is δ, the step scales
# with the gradient.
# LoRSum's plain step: its default, normalised step (optim/step_normalization.py) is bounded by the lr itself.
GRADIENT_SCALED = {"scaled_lorsum": dict(damping=0.1, betas=(0.9, 0.999), beta2_warmup=False,
                                         normalize_step=False),
                   "lorsum": dict(normalize_step=False)}


def _sharp_run(name, steps=6, scale=1e5, capture=None, **kw):
    """Seeded steps of a small regression whose loss is multiplied by ``scale``: a sharp problem, whose
    gradient is ``scale`` times larger than the loss it descends. Returns the unscaled losses, the merged
    weight of every layer before the first step and after each, and the optimizer."""
    torch.manual_seed(0)
    model = TinyLoRAMLP(d_in=16, d_hidden=48, d_out=4, r=4, alpha=8.0, dtype=D)
    if capture is not None:
        kw["capture"] = capture
    opt = lk.create_optimizer(model, name, **kw)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 16, generator=g, dtype=D), torch.randn(64, 4, generator=g, dtype=D)
    losses = []
    merged = [[(layer.scaling * layer.lora_B.weight @ layer.lora_A.weight).detach().clone()
               for layer in model.lora_layers()]]  # before the first step, then after each
    for _ in range(steps):
        loss = scale * nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item() / scale)
        merged.append([(layer.scaling * layer.lora_B.weight @ layer.lora_A.weight).detach().clone()
                       for layer in model.lora_layers()])
    return losses, merged, opt


@pytest.mark.parametrize("name", ["lorsum", "scaled_lorsum", "scaled_gd", "svdlora"])
def test_update_norm_is_bounded(name):
    lr, cap, kw = 0.5, 0.7, GRADIENT_SCALED.get(name, {})
    _, merged, opt = _sharp_run(name, steps=3, lr=lr, max_update_norm=cap, **kw)
    for before, after in zip(merged, merged[1:]):
        norm = torch.stack([(a - b).norm() for a, b in zip(after, before)]).norm() / lr
        assert norm <= cap * (1 + 1e-9), norm
    assert float(opt.update_norm) > cap  # the cap bound: the unclipped step was larger
    _, free, opt = _sharp_run(name, steps=1, lr=lr, max_update_norm=None, **kw)
    norm = torch.stack([(a - b).norm() for a, b in zip(free[1], free[0])]).norm() / lr
    assert norm > 10 * cap and opt.update_norm is None


@pytest.mark.parametrize("name", ["scaled_gd", "svdlora"])
def test_the_clip_copies_no_host_numbers_after_its_first_step(name, monkeypatch):
    """The clip's √s and lr tensors are built once and reused: a tensor built from host numbers on a GPU is
    a host-to-device copy, which capturing the step in a CUDA graph refuses (tools/cuda_graph_check.py)."""
    import sys

    from lorsum_kernels.optim import base

    built = []
    real = torch.tensor

    def spy(*args, **kwargs):
        if sys._getframe(1).f_code.co_name in ("_update_clip", "_scale_root", "_host_values"):
            built.append(sys._getframe(1).f_code.co_name)
        return real(*args, **kwargs)

    monkeypatch.setattr(base.torch, "tensor", spy)
    _, clipped, opt = _sharp_run(name, steps=1, lr=0.5, max_update_norm=0.7)
    first = list(built)
    assert "_host_values" in first and "_update_clip" not in first
    built.clear()
    _, again, _ = _sharp_run(name, steps=3, lr=0.5, max_update_norm=0.7)
    for a, b in zip(clipped[1], again[1]):
        assert torch.equal(a, b)
    assert built == first  # the first step's, and none in the two after it


def test_svdlora_clipped_step_does_not_depend_on_the_svds_signs():
    """SVDLoRA re-factors the merged weight by an SVD each step, whose singular vectors' signs are arbitrary
    (they differ between fp32 and fp64, or a CPU and a GPU). The clip compares the new factors with the old
    and moves them by α of that difference: unless the new factors are first rotated to the old ones' basis
    (functional.align_factors), the clipped weights depend on those signs (this test then fails; found on a
    GPU by test_optim_cuda, where the CPU's and the GPU's results were 3.5% apart)."""
    opts = []

    def make(model):
        opts.append(lk.SVDLoRA(model, lr=0.1))  # max_update_norm=1.0, the default
        return opts[-1]

    p32, _ = train_tiny(make, 1)
    assert float(opts[-1].update_norm) > 1.0  # the clip binds on the first step (unbalanced initial factors)
    p32, _ = train_tiny(make, 4)
    p64, _ = train_tiny(make, 4, dtype=torch.float64)
    m32, m64 = merged(p32), merged(p64)
    for key in m64:
        assert (m32[key].double() - m64[key]).norm() <= 1e-5 * m64[key].norm(), key


@pytest.mark.parametrize("name", ["lorsum", "scaled_lorsum", "svdlora"])
def test_streamed_and_cached_clip_alike(name):
    kw = dict(GRADIENT_SCALED.get(name, {}), max_update_norm=1.0)
    _, streamed, opt = _sharp_run(name, steps=3, lr=0.5, capture="stream", **kw)
    assert float(opt.update_norm) > 1.0  # the clip binds
    _, cached, _ = _sharp_run(name, steps=3, lr=0.5, capture="cache", **kw)
    for a, b in zip(streamed[-1], cached[-1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["adamw", "lorsum", "scaled_lorsum", "adaprelora", "scaled_adamw", "scaled_gd",
                                  "svdlora"])
def test_every_method_at_its_defaults_descends_a_sharp_problem(name):
    # AdamW (and AdaPreLoRA, Scaled AdamW, ScaledLoRSum at δ = 1e-5, LoRSum's normalised step) are invariant
    # to the loss scale; the gradient-step methods are not, and descend only because max_update_norm bounds
    # their step by the lr (the loss rose to 3.5x without it for ScaledGD).
    losses, _, _ = _sharp_run(name, steps=6)
    assert all(b <= a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0]


def test_bad_max_update_norm_raises_before_anything():
    model = TinyLoRAMLP()
    before = [p.detach().clone() for p in model.parameters()]
    for bad in (0.0, -1.0, float("nan"), "1"):
        with pytest.raises((ValueError, TypeError), match="max_update_norm"):
            lk.LoRSum(model, max_update_norm=bad)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
