"""adafactor_ema_scales (AdaPreLoRA's Adafactor statistics step: EMA, correction, scales) against
reference.adafactor_ema_scales, i.e. ``functional.adaprelora``'s adafactor_ema, adafactor_debias and
adafactor_scales in turn.

Contract: for L layers' states row_stat (L, m), col_stat (L, n), energies rows, cols and the step t (one per
layer, or one): the new states R, C in the states' dtype and the scales p, q in ``dtype``, within the
reference's rounding (ΣR̂ summed in another order, t^(−d) and β2^t within an ulp of torch.pow), for the
schedule and a fixed β2 alike; new contiguous tensors of the reference's shapes and dtypes on the inputs'
device; NaN where the reference has it, a layer's NaN kept to that layer; the floor applied; the inputs left
as they were; a clear error for bad input. Triton only (elsewhere the reference runs).
"""

from __future__ import annotations

import pytest
import torch

import lorsum_kernels as lk
from lorsum_kernels import ops, reference
from lorsum_kernels.functional.adaprelora import SCALE_FLOOR

from ..conftest import train_tiny
from ..problems import TRITON, assert_same_training, gen, over_backends, per_backend, rand, spy_on_launcher

OP = "adafactor_ema_scales"
F32, F64 = torch.float32, torch.float64


def _problem(L, m, n, *, state=F32, energy=F32, t_dtype=F32, dtype=F32, beta2=None, per_layer_t=True, seed=0,
             device="cpu"):
    g = gen(seed)
    row_stat, col_stat = rand(L, m, g=g, low=0.0), rand(L, n, g=g, low=0.0)
    if L > 1:  # a first step: zero states
        row_stat[1], col_stat[1] = 0.0, 0.0
    rows, cols = rand(L, m, g=g, low=0.0, width=3.0), rand(L, n, g=g, low=0.0, width=3.0)
    t = torch.tensor([float(1 + (5 * l) % 7) for l in range(L)]) if per_layer_t else torch.tensor(3.0)
    return [row_stat.to(device, state), col_stat.to(device, state), rows.to(device, energy),
            cols.to(device, energy), t.to(device, t_dtype), beta2, 0.8, 1e-30, dtype, SCALE_FLOOR]


def _rtol(args) -> float:
    # fp32 anywhere: a few ulps (the sum's order, an ulp of pow through the EMA and the square root)
    return 1e-13 if all(x.dtype == F64 for x in args[:5]) and args[8] == F64 else 4e-6


def _assert_matches(out, args):
    expected = reference.adafactor_ema_scales(*args)
    assert len(out) == 4
    for k, (o, e) in enumerate(zip(out, expected)):
        assert o.shape == e.shape and o.dtype == e.dtype and o.device == e.device and o.is_contiguous(), k
        assert torch.equal(o.isnan(), e.isnan()), k
        torch.testing.assert_close(o, e, rtol=_rtol(args), atol=0, equal_nan=True, msg=f"output {k}")
    return expected


# (L, m, n): odd sizes, one-entry sides, a side longer than a block (1024)
_SHAPES = [(4, 37, 23), (1, 1, 70), (3, 1500, 5), (2, 9, 1)]
_DTYPES = [dict(), dict(state=F64, energy=F64, t_dtype=F64, dtype=F64), dict(energy=F64),
           dict(t_dtype=F64, dtype=F64)]
GRIDS = {TRITON: [(shape, i, beta2) for shape in _SHAPES for i in range(len(_DTYPES))
                  for beta2 in (None, 0.999)]}


@per_backend(OP, "case", GRIDS, ids=lambda v: f"L{v[0][0]}-{v[0][1]}x{v[0][2]}-dtypes{v[1]}-beta2={v[2]}")
def test_matches_reference(be, case):
    (L, m, n), which, beta2 = case
    args = _problem(L, m, n, **_DTYPES[which], beta2=beta2, device=be.device)
    before = [x.clone() if isinstance(x, torch.Tensor) else x for x in args]
    out = be.run(OP, *args)
    _assert_matches(out, args)
    for x, y in zip(args, before):  # the inputs are not modified
        assert not isinstance(x, torch.Tensor) or torch.equal(x, y)
    assert (out[2] >= SCALE_FLOOR).all() and (out[3] >= SCALE_FLOOR).all()


@over_backends(OP, TRITON)
@pytest.mark.parametrize("beta2", [None, 0.9])
def test_one_step_number_for_all_layers(be, beta2):
    _assert_matches(be.run(OP, *_problem(3, 37, 23, beta2=beta2, per_layer_t=False, device=be.device)),
                    _problem(3, 37, 23, beta2=beta2, per_layer_t=False, device=be.device))


@over_backends(OP, TRITON)
def test_the_floor_binds_on_zero_statistics(be):
    """Zero states and energies without ε1: ΣR = 0 is clamped at the dtype's smallest normal (no 0/0) and
    both scales sit on the floor."""
    args = _problem(2, 5, 7, device=be.device)
    for k in range(4):
        args[k].zero_()
    args[7] = 0.0  # ε1
    out = be.run(OP, *args)
    _assert_matches(out, args)
    floor = torch.tensor(SCALE_FLOOR, dtype=torch.float32)
    assert (out[2] == floor).all() and (out[3] == floor).all()


@over_backends(OP, TRITON)
def test_a_non_finite_layer_stays_in_its_layer(be):
    args = _problem(4, 37, 23, seed=1, device=be.device)
    args[2][1, 3] = float("nan")
    args[3][2, 0] = float("inf")
    out = be.run(OP, *args)
    _assert_matches(out, args)
    for l in (0, 3):
        assert all(bool(x[l].isfinite().all()) for x in out), l
    assert out[2][1].isnan().all() and out[1][2, 0].isinf()


@over_backends(OP, TRITON)
def test_no_layers(be):
    args = _problem(1, 5, 4, device=be.device)
    args[:4] = [x[:0] for x in args[:4]]
    out = be.run(OP, *args)
    assert [tuple(x.shape) for x in out] == [(0, 5), (0, 4), (0, 5), (0, 4)]


@over_backends(OP, TRITON)
@pytest.mark.parametrize("break_it,error,message", [
    (lambda a: a.__setitem__(1, a[1][:2]), ValueError, r"row_stat must be \(\.\.\., m\) and col_stat"),
    (lambda a: a.__setitem__(2, a[2][:, :-1]), ValueError, r"rows must be \(3, 7\)"),
    (lambda a: a.__setitem__(0, a[0].half()), TypeError, r"row_stat must be one of float32, float64"),
    (lambda a: a.__setitem__(1, a[1].double()), TypeError, r"row_stat and col_stat must share one dtype"),
    (lambda a: a.__setitem__(3, a[3].double()), TypeError, r"rows and cols must share one dtype"),
    (lambda a: a.__setitem__(8, torch.bfloat16), TypeError, r"dtype must be float32 or float64"),
    (lambda a: a.__setitem__(4, a[4][:2]), ValueError, r"t must hold one value, or one per layer \(3\)"),
])
def test_input_checks(be, break_it, error, message):
    args = _problem(3, 7, 5, device=be.device)
    break_it(args)
    with pytest.raises(error, match=f"{OP}: {message}"):
        be.run(OP, *args)


@over_backends(OP, TRITON)
@pytest.mark.parametrize("options", [dict(), dict(betas=(0.9, 0.99), momentum="adam")],
                         ids=["default", "adam"])
def test_adaprelora_on_this_backend_takes_its_statistics_step_from_it(be, options, monkeypatch):
    """AdaPreLoRA (surrogate statistics) on this backend trains as on the reference, each bucket's statistics
    step done by this op (the schedule, and a fixed β2 with its correction)."""
    from lorsum_kernels import triton_kernels

    calls = spy_on_launcher(monkeypatch, OP, triton_kernels.adafactor_ema_scales)
    steps = 3
    run = lambda backend: train_tiny(lambda model: lk.AdaPreLoRA(model, lr=1e-2, statistics="surrogate",
                                                                 backend=backend, **options), steps,
                                     device=be.device)
    ours = run(be.name)
    # TinyLoRAMLP's three LoRA layers, two shapes: one call a shape and step
    assert sorted(tuple(args[0].shape) for args, _ in calls) == sorted([(1, 72), (2, 72)] * steps)
    assert_same_training(ours, run("torch"))


def test_the_torch_backend_is_the_reference():
    args = _problem(2, 9, 5, beta2=0.99)
    for o, e in zip(ops.adafactor_ema_scales(*args, backend="torch"), reference.adafactor_ema_scales(*args)):
        assert torch.equal(o, e)
