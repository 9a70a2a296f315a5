"""finish_normalized_step (the normalised step's finish and write, in place) against
reference.finish_normalized_step, which applies ``optim.step_normalization.finish`` layer by layer.

Contract: per layer, with A (r, n) and B (m, r) fp32 parameters and their new values (times √s when
``balanced``): where ``allowed`` holds and the new factors and the layer's ``checked`` tensors are finite, the
factors move by α = min(1, η·scale_new/layer_lr) of their step and the statistics v, t, scale take their new
values, within fp32 rounding of the reference (α = 1: the new values exactly); elsewhere nothing changes, bit
for bit. Returns the layers written. Native CPU only (no CUDA or Triton kernel: accelerators take the
optimizer's batched composite): both CPU code paths, thread-count independence, opcheck, input checks.
"""

from __future__ import annotations

import pytest
import torch

from lorsum_kernels import ops, reference

from ..problems import NATIVE_CPU, assert_independent_of_thread_count, gen, over_backends, randn

OP = "finish_normalized_step"

# (r, n, m) per layer: odd sizes, r below, at and above the 16-wide vectors, one-row factors
SHAPES = [(3, 37, 23), (16, 576, 192), (5, 1, 9), (17, 33, 40), (1, 70, 1), (16, 65, 129)]


def _problem(seed: int, balanced: bool, step: float = 1e-3, checked_per_layer: int = 2) -> list:
    """The op's arguments for SHAPES: statistics that give a first step (v = 0), cut steps (α < 1) and whole
    ones (α = 1), a per-layer lr, a per-layer √s."""
    g = gen(seed)
    L = len(SHAPES)
    A = [randn(r, n, g=g, dtype=torch.float32) for r, n, m in SHAPES]
    B = [randn(m, r, g=g, dtype=torch.float32, scale=0.1) for r, n, m in SHAPES]
    root = torch.rand(L, generator=g) + 0.5
    A_new = [a + step * randn(*a.shape, g=g, dtype=torch.float32) for a in A]
    B_new = [b + step * randn(*b.shape, g=g, dtype=torch.float32) for b in B]
    if balanced:  # as the one-layer paths hand them over: √s·A (1, r, n), √s·B (1, m, r)
        A_new = [(a * root[i]).unsqueeze(0) for i, a in enumerate(A_new)]
        B_new = [(b * root[i]).unsqueeze(0) for i, b in enumerate(B_new)]
    v = [torch.tensor(x) for x in [0.0, 1e-2, 1e-9, 3.0, 2e-4, 5e-5]]
    t = [torch.tensor(x) for x in [0.0, 5.0, 2.0, 7.0, 1.0, 40.0]]
    scale = [torch.tensor(x) for x in [0.0, 0.7, 2.0, 0.1, 1.0, 3.0]]
    checked = [randn(3, n, g=g, dtype=torch.float32) if k == 0 else torch.tensor(float(k))
               for r, n, m in SHAPES for k in range(checked_per_layer)]
    layer_lr = torch.tensor([1e-3, 2e-3, 5e-4, 1e-3, 3e-3, 1e-4])
    allowed = torch.ones(L, dtype=torch.bool)
    return [A, B, A_new, B_new, checked, v, t, scale, root, layer_lr, allowed, balanced, 1e-3, 0.999]


def _copy(args: list) -> list:
    return [[x.clone() for x in a] if isinstance(a, list) else a.clone() if isinstance(a, torch.Tensor) else a
            for a in args]


WRITTEN = (0, 1, 5, 6, 7)  # the arguments the op writes: A, B, v, t, scale


def _assert_matches_reference(out, args, expected, expected_args) -> None:
    assert torch.equal(out, expected)
    for k in WRITTEN:
        for l, (x, y) in enumerate(zip(args[k], expected_args[k])):
            if not expected[l]:
                assert torch.equal(x, y), (k, l)  # not written: exactly as it was
            elif k == 6:
                assert torch.equal(x, y)  # the step count
            else:  # fp32 arithmetic in another order (the Grams): the bound, hence α and the statistics
                rtol = 2e-6 if k in (5, 7) else 1e-6
                torch.testing.assert_close(x, y, rtol=rtol, atol=1e-7 * float(y.abs().max()),
                                           msg=f"argument {k}, layer {l}")


@over_backends(OP, NATIVE_CPU)
@pytest.mark.parametrize("balanced", [False, True])
def test_matches_reference(be, balanced, cpu_path):
    args = _problem(0, balanced)
    before = _copy(args)
    expected_args = _copy(args)
    expected = reference.finish_normalized_step(*expected_args)
    out = be.run(OP, *args)
    assert expected.all()
    _assert_matches_reference(out, args, expected, expected_args)
    # both kinds of layer are in the problem: cut steps (α < 1) and whole ones (α = 1)
    cut = [not torch.equal(a.reshape(-1), (n.reshape(-1) / (args[8][l] if balanced else 1)))
           for l, (a, n) in enumerate(zip(args[0], before[2]))]
    assert any(cut) and not all(cut), cut
    for l in range(len(SHAPES)):
        if not cut[l]:  # α = 1: the new factors exactly (divided by √s as collect divides them)
            divisor = args[8][l] if balanced else torch.tensor(1.0)
            assert torch.equal(args[0][l], (before[2][l] / divisor).reshape(args[0][l].shape))


@over_backends(OP, NATIVE_CPU)
def test_a_layer_with_a_non_finite_result_or_not_allowed_is_left_as_it_was(be, cpu_path):
    args = _problem(1, balanced=True)
    args[2][1].view(-1)[7] = float("nan")  # a new factor
    args[3][2].view(-1)[0] = float("inf")
    args[4][3 * 2 + 0][1, 2] = float("-inf")  # layer 3's first checked tensor
    args[4][4 * 2 + 1].fill_(float("nan"))  # layer 4's second (0-d)
    args[10][5] = False  # skipped
    before = _copy(args)
    expected_args = _copy(args)
    expected = reference.finish_normalized_step(*expected_args)
    out = be.run(OP, *args)
    assert out.tolist() == [True, False, False, False, False, False]
    _assert_matches_reference(out, args, expected, expected_args)
    for k in WRITTEN:
        for l in range(1, len(SHAPES)):
            assert torch.equal(args[k][l], before[k][l])


@over_backends(OP, NATIVE_CPU)
def test_a_zero_lr_keeps_the_factors_and_statistics(be, cpu_path):
    """η = 0 (a warm-up from 0): every layer's lr is 0, its step measures nothing (u = ‖ΔW‖/0). The layers
    that may be written keep their factors, v and t; the scale is recomputed from them, 1/√v̂ (0 where v =
    0); the op says they were written (nothing was skipped). Runs as the reference (``ops`` routes η = 0
    there): before, the statistics became inf or NaN and the layer never moved again."""
    args = _problem(3, balanced=True)
    args[9] = torch.zeros_like(args[9])  # layer_lr = η·scale = 0
    args[12] = 0.0
    args[10][4] = False
    before = _copy(args)
    out = be.run(OP, *args)
    assert out.tolist() == [True, True, True, True, False, True]
    for k in (0, 1, 5, 6):
        for x, y in zip(args[k], before[k]):
            assert torch.equal(x, y), k
    for l, (v, t, scale) in enumerate(zip(args[5], args[6], args[7])):
        if l == 4:
            assert torch.equal(scale, before[7][4])
            continue
        expected = (v / (1 - 0.999 ** t)).sqrt().reciprocal() if float(v) > 0 else torch.zeros(())
        torch.testing.assert_close(scale, expected, rtol=1e-6, atol=0)


@over_backends(OP, NATIVE_CPU)
def test_a_step_within_the_factors_rounding_keeps_v_and_t(be, cpu_path):
    """Steps of 1e-12 of the factors (below ``_numerics.STEP_NOISE_FLOOR``·ε·‖A‖‖B‖) measure nothing: v and t
    stay, the layers are written, as the reference does; 1e-3 steps (the other problems) are measured."""
    args = _problem(4, balanced=False, step=1e-12)
    before = _copy(args)
    expected_args = _copy(args)
    expected = reference.finish_normalized_step(*expected_args)
    out = be.run(OP, *args)
    assert out.all() and expected.all()
    _assert_matches_reference(out, args, expected, expected_args)
    for k in (5, 6):  # v and t
        for x, y in zip(args[k], before[k]):
            assert torch.equal(x, y), k


@over_backends(OP, NATIVE_CPU)
def test_no_checked_tensors_and_no_layers(be, cpu_path):
    args = _problem(2, balanced=False, checked_per_layer=0)
    expected_args = _copy(args)
    expected = reference.finish_normalized_step(*expected_args)
    _assert_matches_reference(be.run(OP, *args), args, expected, expected_args)
    empty = torch.empty(0)
    none = torch.ones(0, dtype=torch.bool)
    out = be.run(OP, [], [], [], [], [], [], [], [], empty, empty, none, False, 1e-3, 0.9)
    assert out.shape == (0,) and out.dtype == torch.bool


@over_backends(OP, NATIVE_CPU)
def test_written_tensors_are_seen_as_modified_in_place(be):
    """The kernel writes through data pointers: the version counters advance as an in-place op's do, so a
    graph that saved a parameter before the write raises in backward instead of using the new values."""
    args = _problem(6, balanced=False)
    versions = [x._version for k in WRITTEN for x in args[k]]
    weight = args[0][0].requires_grad_()
    graph = (weight * weight).sum()  # saves the parameter
    with torch.no_grad():  # as an optimizer's step runs
        assert be.run(OP, *args).all()
    assert all(x._version > before for x, before in zip((x for k in WRITTEN for x in args[k]), versions))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        graph.backward()


@over_backends(OP, NATIVE_CPU)
def test_independent_of_thread_count(be):
    def run():
        args = _problem(3, balanced=True)
        out = be.run(OP, *args)
        return [out, *args[0], *args[1], *args[5], *args[7]]
    assert_independent_of_thread_count(run)


@over_backends(OP, NATIVE_CPU)
def test_opcheck(be):
    torch.library.opcheck(torch.ops.lorsum.finish_normalized_step.default, _problem(4, balanced=True))


@over_backends(OP, NATIVE_CPU)
@pytest.mark.parametrize("break_it,message", [
    (lambda a: a[0].__setitem__(1, a[0][1].double()), r"A\[1\] must be a contiguous float32"),
    (lambda a: a[0].__setitem__(0, a[0][0].t().contiguous().t()), r"A\[0\] must be a contiguous float32"),
    (lambda a: a[3].__setitem__(2, a[3][2][:-1]), r"B_new\[2\] must be \(9, 5\)"),
    (lambda a: a[1].pop(), r"B has 5 tensors and A has 6"),
    (lambda a: a[4].pop(), r"checked has 11 tensors, not a multiple of the 6 layers"),
    (lambda a: a[5].__setitem__(0, torch.zeros(2)), r"v\[0\] must be a one-element float32"),
    (lambda a: a.__setitem__(9, a[9].double()), r"layer_lr must be a \(6,\) Float CPU tensor"),
    (lambda a: a.__setitem__(10, a[10][:3]), r"allowed must be a \(6,\) Bool CPU tensor"),
])
def test_input_checks(be, break_it, message):
    args = _problem(5, balanced=True)
    break_it(args)
    before = _copy(args)
    with pytest.raises(RuntimeError, match=f"finish_normalized_step: {message}"):
        be.run(OP, *args)
    for k in WRITTEN:  # nothing was written
        assert all(torch.equal(x, y) for x, y in zip(args[k], before[k]))
