"""finish_normalized_stacked (normalize_step's statistics and shrink of a bucket, out of place)
against reference.finish_normalized_stacked, i.e. ``optim.step_normalization.finish``.

Contract: for L stacked layers, old factors A (L, r, n), B (L, m, r), new ones alike (fp32 or fp64), √s,
the lr each step ran at and the statistics v, t: the factors moved by α = min(1, η·scale'/layer_lr) of
their step (α = 1: the new values exactly) and the statistics' new values, within the reference's rounding
(the order of the bound's final sums); new contiguous tensors of the reference's shapes and dtypes on the
inputs' device; NaN where the reference has it, one layer's NaN confined to that layer; the inputs left
as they were; a clear error for bad input. Triton only (on the CPU the optimizer finishes in place,
``finish_normalized_step``).
"""

from __future__ import annotations

import pytest
import torch

import lorsum_kernels as lk
from lorsum_kernels import ops, reference

from ..conftest import train_tiny
from ..problems import TRITON, assert_same_training, gen, over_backends, per_backend, randn, spy_on_launcher

OP = "finish_normalized_stacked"
F32, F64 = torch.float32, torch.float64


def _problem(L, r, n, m, dtype, state_dtype, *, seed=0, device="cpu"):
    """Arguments for L layers: first steps (v = 0), cut steps (α < 1) and whole ones (α = 1), per-layer
    lrs and √s, a layer whose step is zero."""
    g = gen(seed)
    A = randn(L, r, n, g=g)
    B = randn(L, m, r, g=g, scale=0.1)
    A_new = A + 1e-3 * randn(L, r, n, g=g)
    B_new = B + 1e-3 * randn(L, m, r, g=g)
    if L > 2:
        A_new[2], B_new[2] = A[2], B[2]  # a zero step: u = 0
    root = torch.rand(L, generator=g, dtype=torch.float64) + 0.5
    cycle = lambda values: torch.tensor([values[i % len(values)] for i in range(L)], dtype=torch.float64)
    v = cycle([0.0, 1e-2, 0.0, 1e-9, 3.0, 2e-4])
    t = cycle([0.0, 5.0, 0.0, 2.0, 7.0, 1.0])
    layer_lr = cycle([1e-3, 2e-3, 1e-3, 5e-4, 3e-3, 1e-4])
    factors = [x.to(device, dtype) for x in (A, B, A_new, B_new)]
    return [*factors, root.to(device, dtype), layer_lr.to(device, state_dtype), v.to(device, state_dtype),
            t.to(device, state_dtype), 1e-3, 0.999]


def _assert_matches(out, args):
    expected = reference.finish_normalized_stacked(*args)
    assert len(out) == 5
    for k, (o, e) in enumerate(zip(out, expected)):
        assert o.shape == e.shape and o.dtype == e.dtype and o.device == e.device and o.is_contiguous(), k
        assert torch.equal(o.isnan(), e.isnan()), k
        if k == 3:  # the step count
            assert torch.equal(o, e)
            continue
        tol = _rtol(k, args)
        torch.testing.assert_close(o, e, rtol=tol, atol=tol * float(e.nan_to_num(0, 0, 0).abs().max()),
                                   equal_nan=True, msg=f"output {k}")
    return expected


def _rtol(k: int, args: list) -> float:
    """Output k's tolerance: the bound's sums run in another order than the reference's, which reaches the
    statistics through √ and the debiasing (a few ulps of their dtype) and the factors through α, times a
    step that is small against them."""
    factor_dtype, state_dtype = args[0].dtype, args[6].dtype
    if k >= 2:
        return 4e-6 if state_dtype == F32 else 1e-12
    if factor_dtype == F32:
        return 1e-6
    return 1e-8 if state_dtype == F32 else 1e-12


# (L, r, n, m): odd sizes, r = 1, a layer wider than the move's chunk, one-column factors
_SHAPES = [(6, 3, 37, 23), (1, 1, 70, 1), (4, 17, 33, 40), (3, 5, 1, 9), (2, 16, 129, 65)]
GRIDS = {TRITON: [(shape, dtypes) for shape in _SHAPES for dtypes in [(F32, F32), (F64, F64), (F64, F32)]]}


def _id(v):
    (L, r, n, m), (d, sd) = v
    return f"L{L}-r{r}-{n}x{m}-{str(d)[6:]}-{str(sd)[6:]}"


@per_backend(OP, "case", GRIDS, ids=_id)
def test_matches_reference(be, case):
    (L, r, n, m), (dtype, state_dtype) = case
    args = _problem(L, r, n, m, dtype, state_dtype, device=be.device)
    before = [x.clone() if isinstance(x, torch.Tensor) else x for x in args]
    out = be.run(OP, *args)
    expected = _assert_matches(out, args)
    for x, y in zip(args, before):  # the inputs are not modified
        assert not isinstance(x, torch.Tensor) or torch.equal(x, y)
    A, A_new = args[0], args[2]
    moved = [not torch.equal(out[0][l], A_new[l]) for l in range(L)]
    for l in range(L):
        if not moved[l]:  # α = 1 (or a zero step): the new values exactly
            assert torch.equal(out[0][l], A_new[l]) and torch.equal(out[1][l], args[3][l])
    if L >= 6:  # the problem has both kinds of layer, and first and zero steps
        assert any(moved) and not all(moved), moved
        assert expected[4][2] == 0 and out[4][2] == 0  # zero step, no statistics: measured again
        assert (out[4][[0, 1, 3, 4, 5]] > 0).all()


@over_backends(OP, TRITON)
def test_a_non_finite_layer_stays_in_its_layer(be):
    args = _problem(6, 3, 37, 23, F32, F32, seed=1, device=be.device)
    args[2][1, 0, 5] = float("nan")
    args[3][4, 2, 0] = float("inf")
    out = be.run(OP, *args)
    _assert_matches(out, args)
    for l in (0, 2, 3, 5):
        assert all(bool(x[l].isfinite().all()) for x in out), l
    assert not bool(out[0][1].isfinite().all()) and not bool(out[2][4].isfinite())


@over_backends(OP, TRITON)
def test_a_step_within_the_factors_rounding_keeps_v_and_t(be):
    """Steps of 1e-12 of the factors (below ``_numerics.STEP_NOISE_FLOOR``·ε·‖A‖‖B‖) measure nothing: v and
    t exactly as before, as the reference; the problem's 1e-3 steps (the other tests) are measured."""
    args = _problem(6, 3, 37, 23, F32, F32, device=be.device)
    g = gen(7)
    args[2] = args[0] + 1e-12 * randn(*args[0].shape, g=g).to(be.device, F32)
    args[3] = args[1] + 1e-12 * randn(*args[1].shape, g=g).to(be.device, F32)
    out = be.run(OP, *args)
    _assert_matches(out, args)
    assert torch.equal(out[2], args[6]) and torch.equal(out[3], args[7])


@over_backends(OP, TRITON)
def test_a_zero_lr_keeps_the_factors_and_statistics(be):
    """η = 0 (a warm-up from 0): the step measures nothing (u = ‖ΔW‖/0 would be inf or NaN in v): the old
    factors, v and t exactly, the scale recomputed from them (0 where v = 0), as the reference; ``ops`` runs
    the reference there, whatever the backend."""
    args = _problem(6, 3, 37, 23, F32, F32, device=be.device)
    args[5] = torch.zeros_like(args[5])
    args[8] = 0.0
    out = be.run(OP, *args)
    expected = reference.finish_normalized_stacked(*args)
    for o, e, old in zip(out, expected, (args[0], args[1], args[6], args[7])):
        assert torch.equal(o, old) and torch.equal(e, old)
    assert torch.equal(out[4], expected[4]) and bool(out[4].isfinite().all())
    v, t = args[6], args[7]
    torch.testing.assert_close(out[4], torch.where(v > 0, (v / (1 - 0.999 ** t)).sqrt().reciprocal(), 0))


@over_backends(OP, TRITON)
def test_empty_bucket(be):
    args = _problem(0, 3, 5, 4, F32, F32, device=be.device)
    out = be.run(OP, *args)
    assert [tuple(x.shape) for x in out] == [(0, 3, 5), (0, 4, 3), (0,), (0,), (0,)]


@over_backends(OP, TRITON)
@pytest.mark.parametrize("break_it,error,message", [
    (lambda a: a.__setitem__(0, a[0][0]), ValueError, r"A must be \(L, r, n\)"),
    (lambda a: a.__setitem__(1, a[1][:, :, :2]), ValueError, r"B must be \(L, m, r\) = \(3, m, 3\)"),
    (lambda a: a.__setitem__(2, a[2][:, :, :-1]), ValueError, r"A_new must be \(3, 3, 7\)"),
    (lambda a: a.__setitem__(3, a[3].double()), TypeError, r"the factors must share one dtype"),
    (lambda a: a.__setitem__(0, a[0].half()), TypeError, r"A must be one of float32, float64"),
    (lambda a: a.__setitem__(5, a[5][:2]), ValueError, r"layer_lr must hold one value per layer \(3\)"),
    (lambda a: a.__setitem__(7, a[7].double()), TypeError, r"v and t must share one dtype"),
])
def test_input_checks(be, break_it, error, message):
    args = _problem(3, 3, 7, 5, F32, F32, device=be.device)
    break_it(args)
    with pytest.raises(error, match=f"{OP}: {message}"):
        be.run(OP, *args)


def test_dispatch_runs_the_reference_without_triton():
    """The torch backend is the reference itself (the op's only other implementation)."""
    args = _problem(2, 3, 7, 5, F32, F32)
    out = ops.finish_normalized_stacked(*args, backend="torch")
    for o, e in zip(out, reference.finish_normalized_stacked(*args)):
        assert torch.equal(o, e)


@over_backends(OP, TRITON)
@pytest.mark.parametrize("capture", ["auto", "cache"])
def test_an_optimizer_on_this_backend_finishes_its_steps_with_it(be, capture, monkeypatch):
    """LoRSum (normalize_step, its default) on this backend trains as on the reference, its finish done by
    this op once per shape and step (streamed one layer at a time or cached)."""
    from lorsum_kernels import triton_kernels

    calls = spy_on_launcher(monkeypatch, OP, triton_kernels.finish_normalized_stacked)
    steps = 3
    run = lambda backend: train_tiny(lambda model: lk.LoRSum(model, lr=0.05, capture=capture,
                                                             backend=backend), steps, device=be.device)
    ours = run(be.name)
    # TinyLoRAMLP's three LoRA layers, two shapes: each step finishes each shape's layers together, in one
    # call (the first step too: its measured lr is finished here as the later ones are).
    assert [tuple(args[0].shape) for args, _ in calls] == [(1, 5, 40), (2, 5, 72)] * steps
    assert_same_training(ours, run("torch"))
