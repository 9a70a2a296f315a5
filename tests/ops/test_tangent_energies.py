"""tangent_energies (AdaPreLoRA's surrogate statistics) on every backend against reference.tangent_energies.

Contract: for Z = [B F] (..., m, R) and W = [E; A] (..., R, n) (R = r_B + r_F; r_B ≠ r_F and an empty
product allowed), the row and column energies of Z·W, rows (..., m) and cols (..., n), from O((m + n)·R²)
work; batch dimensions broadcast as in the reference; results in the promoted input dtype (arithmetic in
fp64 if any input is fp64, else fp32): within 1e-5 (fp64: 1e-12) of the fp64 reference on the same values,
bf16 within twice the error of plain PyTorch in bf16, fp16 within its rounding; run-to-run deterministic;
non-contiguous and expanded inputs read as their copies; zeros give exact zeros and cancellation is clamped
(never negative); a NaN reaches the energies the reference's products carry it to, in its layer only; empty
shapes give the reference's zeros. Native: both CPU code paths, thread-count independence, the input
checks, opcheck, FakeTensor and compile, the flop count, and AdaPreLoRA with the surrogate statistics stepped
with backend="native" against "torch"; Triton: its input checks and dispatch (AdaPreLoRA on Triton:
test_adaprelora_solve.py).
"""

from __future__ import annotations

import pytest
import torch

from lorsum_kernels import backends, ops, reference

from ..conftest import LAYER_SHAPES, train_tiny
from ..problems import (NATIVE_CPU, NATIVE_CUDA, TRITON, assert_deterministic, assert_independent_of_thread_count,
                        assert_layout_independent,
                        assert_same_training, max_rel_err, on, over_backends, per_backend, rel_err,
                        spy_on_launcher, tangent_problem, use_cpu_path, with_cpu_paths)

OP = "tangent_energies"
F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16


def _exact(args, dtype=F64, device="cpu"):
    return reference.tangent_energies(*[on(device, dtype)(t) for t in args])


def _tid(shape):
    b, m, n, rb, rf = shape
    return f"b{'x'.join(map(str, b)) or '0'}_m{m}_n{n}_rB{rb}_rF{rf}"


# (batch, m, n, r_B, r_F). Native: the layer grid (every r ∈ {1, 3, 16}, m, n ∈ {5, 123, 256}, batch ∈
# {(), (3,), (2, 2)}, several chunks per side); CUDA: R = r_B + r_F = 128 (its kernel's largest), ranks that
# differ and R = 160 (the ATen composition); Triton: several 64-column blocks per side (the interpreter's
# widest), R = 80 (two 64-row tiles of the Gram) and ranks that differ.
_NATIVE = [(b, m, n, r, r) for b, m, n, r in LAYER_SHAPES]
_CUDA = [((), 5, 123, 3, 3), ((3,), 123, 5, 1, 1), ((2, 2), 256, 256, 16, 16), ((3,), 256, 123, 3, 3),
         ((2,), 1100, 600, 40, 40), ((), 700, 1537, 64, 64), ((2,), 123, 77, 2, 5), ((2,), 300, 200, 80, 80)]
_TRITON = [((), 5, 123, 3, 3), ((3,), 123, 5, 1, 1), ((2, 2), 37, 29, 16, 16), ((2,), 150, 70, 40, 40),
           ((2,), 33, 77, 2, 5)]
ACCURACY = {
    NATIVE_CPU: with_cpu_paths(NATIVE_CPU, [(s, sur, d) for s in _NATIVE for sur in (True, False) for d in (F32, F64)]),
    NATIVE_CUDA: with_cpu_paths(NATIVE_CUDA, [(s, True, d) for s in _CUDA for d in (F32, F64)]),
    TRITON: with_cpu_paths(TRITON, [(s, True, d) for s in _TRITON for d in (F32, F64)]),
}
BF16_SHAPES = {
    NATIVE_CPU: with_cpu_paths(NATIVE_CPU, [(s,) for s in _NATIVE[:7]]),
    NATIVE_CUDA: with_cpu_paths(NATIVE_CUDA, [(s,) for s in _CUDA[:4]]),
    TRITON: with_cpu_paths(TRITON, [(((2,), 37, 29, 3, 3),)]),
}


# ---- accuracy and dtypes: every backend --------------------------------------------------------------------


@per_backend(OP, "shape,surrogate,dtype,path", ACCURACY,
             ids=lambda v: f"{_tid(v[0])}-{'surrogate' if v[1] else 'independent'}-{v[2]}-{v[3]}")
def test_matches_reference(be, shape, surrogate, dtype, path, monkeypatch):
    use_cpu_path(monkeypatch, path)
    batch, m, n = shape[:3]
    args = tangent_problem(*shape, dtype=dtype, surrogate=surrogate, device=be.device)
    out = be.run(OP, *args)
    for o, length in zip(out, (m, n)):
        assert o.shape == batch + (length,) and o.dtype == dtype and o.device == be.device and o.is_contiguous()
    assert max_rel_err(out, _exact(args)) < (1e-12 if dtype == F64 else 1e-5)  # fp64 reference, same values
    assert_deterministic(lambda: be.run(OP, *args))


@per_backend(OP, "shape,path", BF16_SHAPES, ids=lambda v: f"{_tid(v[0])}-{v[1]}")
def test_bf16_and_fp16(be, shape, path, monkeypatch):
    use_cpu_path(monkeypatch, path)
    # Everything bf16, the results too (as the reference returns them): within twice the error plain
    # PyTorch makes in bf16 (on the device) against the exact energies of the same bf16 values.
    args = tangent_problem(*shape, device=be.device)
    bf16 = [t.bfloat16() for t in args]
    out = be.run(OP, *bf16)
    assert [t.dtype for t in out] == [BF16] * 2
    torch_bf16 = reference.tangent_energies(*bf16)
    assert [t.dtype for t in torch_bf16] == [BF16] * 2
    for a, t, e in zip(out, torch_bf16, _exact(bf16)):
        assert rel_err(a, e) <= 2 * rel_err(t, e)
    # One bf16 input among fp32 ones: fp32 results at fp32 accuracy on the given values.
    mixed = [bf16[0]] + [t.float() for t in args[1:]]
    out = be.run(OP, *mixed)
    assert [t.dtype for t in out] == [F32] * 2 and max_rel_err(out, _exact(mixed)) < 1e-5
    # fp16 throughout: fp16 results within its rounding.
    fp16 = [t.half() for t in args]
    out = be.run(OP, *fp16)
    assert [t.dtype for t in out] == [F16] * 2 and max_rel_err(out, _exact(fp16)) < 2e-3


@over_backends(OP)
@pytest.mark.parametrize("dtype", [F16, BF16, F64], ids=str)
def test_mixed_dtypes_promote(be, dtype):
    # One input in another dtype: results in the promoted dtype, arithmetic in fp64 if any input is fp64,
    # else fp32 (so fp32 accuracy on the given values).
    args = tangent_problem((3,), 123, 256, 16, device=be.device) if not be.interpreted else \
        tangent_problem((2,), 37, 29, 3, device=be.device)
    want = F64 if dtype == F64 else F32
    for k in range(4):
        cast = [t.to(dtype) if j == k else t.float() for j, t in enumerate(args)]
        out = be.run(OP, *cast)
        assert [t.dtype for t in out] == [want] * 2
        assert max_rel_err(out, _exact(cast)) < (1e-12 if dtype == F64 else 1e-5)
    half = [t.half() for t in args]
    out = be.run(OP, *half)
    assert [t.dtype for t in out] == [F16] * 2 and max_rel_err(out, _exact(half)) < 2e-3  # fp16 rounding


@per_backend(OP, "ranks,path", {be: with_cpu_paths(be, [((2, 5),), ((0, 3),), ((7, 0),), ((0, 0),)]) for be in
                                (NATIVE_CPU, NATIVE_CUDA, TRITON)},
             ids=lambda v: f"rB{v[0][0]}_rF{v[0][1]}-{v[1]}")
def test_ranks_of_the_two_products_may_differ(be, ranks, path, monkeypatch):
    # Z = [B F] and W = [E; A] only need B·E and F·A to be m×n: r_B ≠ r_F, an empty product included; no
    # product at all gives zeros.
    use_cpu_path(monkeypatch, path)
    args = tangent_problem((2,), 123, 37, *ranks, dtype=F32, seed=7, device=be.device)
    out = be.run(OP, *args)
    assert max_rel_err(out, _exact(args)) < 1e-5
    if ranks == (0, 0):
        for a in out:
            assert torch.equal(a, torch.zeros_like(a))


# ---- layouts, broadcasting, edge cases: every backend ------------------------------------------------------


@over_backends(OP)
def test_non_contiguous_and_expanded_inputs(be, cpu_path):
    B, E, F, A = tangent_problem((3,), 123, 256, 16, dtype=F32, device=be.device) if not be.interpreted else \
        tangent_problem((3,), 37, 70, 3, dtype=F32, device=be.device)
    wide = torch.zeros(*A.shape[:-1], 2 * A.shape[-1], device=be.device)
    wide[..., ::2] = A
    views = [
        B.mT.contiguous().mT,  # column-major: rows of V = Zᵀ contiguous
        E.transpose(0, 1).contiguous().transpose(0, 1),  # permuted batch
        F.mT.contiguous().mT,
        wide[..., ::2],  # strided columns (neither stride 1)
    ]
    assert not any(v.is_contiguous() for v in views)
    out = be.run(OP, *views)
    assert max_rel_err(out, _exact(views)) < 1e-5
    for a, b in zip(out, be.run(OP, B, E, F, A)):
        assert_layout_independent(be, a, b)
    # One layer's inputs expanded over the batch (stride 0): every layer's result is that layer's.
    expanded = [t[:1].expand(4, *t.shape[1:]) for t in (B, E, F, A)]
    single = be.run(OP, *[t[0] for t in (B, E, F, A)])
    for a, b in zip(be.run(OP, *expanded), single):
        assert_layout_independent(be, a, b.expand_as(a))


@over_backends(OP)
def test_batch_dimensions_broadcast_as_in_the_reference(be):
    # The reference broadcasts Z = [B F] against W = [E; A]; ops.tangent_energies takes the same batches.
    B, E, F, A = tangent_problem((3,), 37, 29, 3, dtype=F32, device=be.device)
    # B and F with batch (2, 1) against E and A with (3,): a (2, 3) batch whose expanded strides do not merge.
    two = [t[:2].unsqueeze(1) for t in (B, F)]
    for args in [(B, E[0], F, A[0]), (B[0], E, F[0], A), (two[0], E, two[1], A)]:
        out = be.run(OP, *args)
        exact = _exact(args)
        assert [t.shape for t in out] == [t.shape for t in exact] and max_rel_err(out, exact) < 1e-5
    one = [t[0] for t in (B, E, F, A)]
    out = be.run(OP, *one)
    assert out[0].shape == (37,) and out[1].shape == (29,) and max_rel_err(out, _exact(one)) < 1e-5


@over_backends(OP)
@pytest.mark.parametrize("batch,m,n,r", [((0,), 5, 7, 3), ((2,), 5, 7, 0), ((2,), 0, 7, 3), ((2,), 5, 0, 3),
                                         ((2,), 0, 0, 3)], ids=str)
def test_empty_shapes(be, batch, m, n, r):
    args = tangent_problem(batch, m, n, r, dtype=F32, device=be.device)
    for a, e in zip(be.run(OP, *args), reference.tangent_energies(*args)):
        assert a.shape == e.shape and a.dtype == F32 and torch.equal(a, e)


@over_backends(OP)
@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_zeros_give_exact_zeros_and_cancellation_is_clamped(be, dtype, cpu_path):
    B, E, F, A = tangent_problem((2,), 123, 256, 16, dtype=dtype, device=be.device) if not be.interpreted else \
        tangent_problem((2,), 37, 70, 16, dtype=dtype, device=be.device)
    for args in [[torch.zeros_like(t) for t in (B, E, F, A)], [torch.zeros_like(B), E, torch.zeros_like(F), A]]:
        for a in be.run(OP, *args):
            assert a.dtype == dtype and torch.equal(a, torch.zeros_like(a))
    # Standard LoRA init, B = 0 and E = BᵀG = 0: the energies of F·A alone.
    init = [torch.zeros_like(B), torch.zeros_like(E), F, A]
    assert max_rel_err(be.run(OP, *init), _exact(init)) < (1e-12 if dtype == F64 else 1e-5)
    # B·E + (−B)·E = 0 with nonzero factors: the quadratic forms cancel to rounding error, which the clamp
    # keeps from going negative (the reference clamps the same way).
    Z, W = torch.cat([B, -B], -1), torch.cat([E, E], -2)
    rows, cols = be.run(OP, B, E, -B, E)
    for t, scale in [(rows, Z.square().sum(-1).amax() * W.square().sum()),
                     (cols, W.square().sum(-2).amax() * Z.square().sum())]:
        assert t.isfinite().all() and (t >= 0).all() and t.amax() <= 1e-4 * scale


@over_backends(OP)
@pytest.mark.parametrize("where", ["B", "E", "F", "A"])
def test_nan_propagates_as_in_the_reference(be, where, cpu_path):
    # A NaN in one entry poisons the energies the reference's products carry it to (a row of Z: its own row
    # energy and every column energy through ZᵀZ; a column of W: its own column and every row), in that
    # layer only.
    args = tangent_problem((3,), 123, 256, 3, dtype=F32, device=be.device) if not be.interpreted else \
        tangent_problem((3,), 37, 70, 3, dtype=F32, device=be.device)
    k = "BEFA".index(where)
    args[k] = args[k].clone()
    args[k][1].view(-1)[7] = float("nan")
    for a, e in zip(be.run(OP, *args), _exact(args)):
        assert e.isnan().any() and torch.equal(a.isnan().cpu(), e.isnan())
        assert a[[0, 2]].isfinite().all()


# ---- CUDA: opcheck -----------------------------------------------------------------------------------------


@over_backends(OP, NATIVE_CUDA)
def test_cuda_opcheck(be):
    # Schema, fake (meta) implementation, autograd registration and AOT dispatch on CUDA tensors.
    B, E, F, A = tangent_problem((2,), 7, 5, 3, dtype=F32, seed=18, device=be.device)
    torch.library.opcheck(torch.ops.lorsum.tangent_energies, (B, E.mT.contiguous().mT, F, A))


# ---- native CPU: threads, input checks, the op's registration, cost ----------------------------------------


@over_backends(OP, NATIVE_CPU)
def test_independent_of_thread_count(be):
    args = tangent_problem((3,), 1100, 600, 16, dtype=F32)
    assert_independent_of_thread_count(lambda: be.run(OP, *args))


@over_backends(OP, NATIVE_CPU)
@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: a.update(E=a["E"][..., :2, :]),
         r"B \[3, 5, 3\] is \(\.\.\., m, r\) and E \[3, 2, 7\] must be \(\.\.\., r, n\) with the same r"),
        (lambda a: a.update(F=a["F"][..., :4, :]), r"F \[3, 4, 3\] must be \(\.\.\., m, r_F\) with the m of B"),
        (lambda a: a.update(A=a["A"][..., :-1]),
         r"A must be \(\.\.\., r_F, n\) = \(\.\.\., 3, 7\) .* got shape \[3, 3, 6\]"),
        (lambda a: a.update(A=a["A"][..., :2, :]), r"A must be \(\.\.\., r_F, n\) = \(\.\.\., 3, 7\)"),
        (lambda a: a.update(E=a["E"][:2]), r"E has batch shape \[2\] but B has \[3\]"),
        (lambda a: a.update(A=a["A"][0]), r"A has batch shape \[\] but B has \[3\]"),
        (lambda a: a.update(B=a["B"].int()), r"B must be float32, float64, bfloat16 or float16"),
        (lambda a: a.update(F=a["F"][0, 0]), r"F must have at least 2 dimensions"),
    ],
)
def test_native_rejects_bad_input(be, mutate, match):
    B, E, F, A = tangent_problem((3,), 5, 7, 3, dtype=F32)
    args = dict(B=B, E=E, F=F, A=A)
    mutate(args)
    with pytest.raises(RuntimeError, match=rf"tangent_energies: {match}"):
        torch.ops.lorsum.tangent_energies(**args)


def _opcheck_cases():
    f32 = tangent_problem((2,), 5, 7, 3, dtype=F32)
    g = torch.Generator().manual_seed(9)
    return [
        tuple(f32),
        tuple(tangent_problem((), 9, 5, 2)),
        tuple(tangent_problem((2, 2), 6, 4, 1, dtype=BF16)),
        (f32[0].mT.contiguous().mT, f32[1], f32[2], f32[3].mT.contiguous().mT),
        (torch.randn(2, 6, 2, generator=g), torch.randn(2, 2, 5, generator=g), torch.randn(2, 6, 4, generator=g),
         torch.randn(2, 4, 5, generator=g)),
    ]


@over_backends(OP, NATIVE_CPU)
@pytest.mark.parametrize("case", range(5), ids=["fp32", "fp64-2d", "bf16-4d", "strided", "rB2-rF4"])
def test_opcheck(be, case):
    torch.library.opcheck(torch.ops.lorsum.tangent_energies.default, _opcheck_cases()[case])


@over_backends(OP, NATIVE_CPU)
def test_fake_tensor_and_compile(be):
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = tangent_problem((3,), 5, 7, 3, dtype=BF16)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        rows, cols = torch.ops.lorsum.tangent_energies(*[mode.from_tensor(t) for t in args])
    assert rows.shape == (3, 5) and cols.shape == (3, 7) and rows.dtype == cols.dtype == BF16

    f32 = [t.float() for t in args]
    compiled = torch.compile(lambda *a: ops.tangent_energies(*a, backend="native"), backend="eager", fullgraph=True)
    assert max_rel_err(compiled(*f32), _exact(f32)) < 1e-5


@over_backends(OP, NATIVE_CPU)
def test_flop_count_is_the_kernels(be):
    # FlopCounterMode counts the native op by its formula: R(R+1) multiply-adds per column of either side
    # (half the reference's four products), O((m+n)r²) like every backend.
    from torch.utils.flop_counter import FlopCounterMode

    args = tangent_problem((3,), 123, 256, 5, dtype=F32)
    with FlopCounterMode(display=False) as native:
        be.run(OP, *args)
    with FlopCounterMode(display=False) as torch_counter:
        ops.tangent_energies(*args, backend="torch")
    R = 10
    assert native.get_total_flops() == 3 * 2 * R * (R + 1) * (123 + 256)
    assert torch_counter.get_total_flops() == 3 * 4 * R * R * (123 + 256)


# ---- AdaPreLoRA with the surrogate statistics, native against torch ----------------------------------------


@over_backends(OP, NATIVE_CPU)
def test_surrogate_statistics_native_equals_torch(be):
    from lorsum_kernels.functional.adaprelora import surrogate_statistics

    B, E, F, A = tangent_problem((3,), 123, 256, 16, dtype=F32)
    for scale in [1.0, 2.5, torch.tensor([1.0, 0.5, 2.0])]:
        s = scale if isinstance(scale, float) else scale.view(3, 1, 1)
        nat = surrogate_statistics(A, B, s * E, s * F, scale=scale, backend=be.name)
        ref = surrogate_statistics(A, B, s * E, s * F, scale=scale, backend="torch")
        assert max_rel_err(nat, ref) < 1e-5


@over_backends(OP, NATIVE_CPU)
@pytest.mark.parametrize(
    "kw", [dict(momentum=None), dict(momentum="input"), dict(momentum="adam", weight_decay=0.01)],
    ids=["sgd", "input", "adam-wd"],
)
def test_adaprelora_surrogate_native_equals_torch(be, kw):
    # backend="native" forces every hot path of the surrogate configuration (the solve and these
    # statistics), so the optimizer constructs with it; six steps match the torch backend.
    import lorsum_kernels as lk

    def train(backend):
        return train_tiny(
            lambda model: lk.AdaPreLoRA(model, lr=1e-2, backend=backend, statistics="surrogate", **kw), 6)

    assert_same_training(train(be.name), train("torch"))


# ---- Triton: input checks, registry and dispatch -----------------------------------------------------------


def _launcher():
    from lorsum_kernels.triton_kernels import tangent

    return tangent.tangent_energies


@over_backends(OP, TRITON)
@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda a: a.update(E=a["E"][..., :2, :]), ValueError,
         r"B \(3, 5, 3\) is \(\.\.\., m, r\) and E \(3, 2, 7\) must be \(\.\.\., r, n\) with the same r"),
        (lambda a: a.update(F=a["F"][..., :4, :]), ValueError, r"F \(3, 4, 3\) must be \(\.\.\., m, r_F\)"),
        (lambda a: a.update(A=a["A"][..., :-1]), ValueError,
         r"A must be \(\.\.\., r_F, n\) = \(\.\.\., 3, 7\) .* got shape \(3, 3, 6\)"),
        (lambda a: a.update(A=a["A"][..., :2, :]), ValueError, r"A must be \(\.\.\., r_F, n\)"),
        (lambda a: a.update(E=a["E"][:2]), ValueError,
         r"the batch dimensions of B, E, F and A do not broadcast"),
        (lambda a: a.update(B=a["B"].int()), TypeError, r"B must be one of float32, float64"),
        (lambda a: a.update(F=a["F"][0, 0]), ValueError, r"F must have at least 2 dimensions"),
    ],
)
def test_triton_rejects_bad_input(be, mutate, error, match):
    B, E, F, A = tangent_problem((3,), 5, 7, 3, dtype=F32, device=be.device)
    args = dict(B=B, E=E, F=F, A=A)
    mutate(args)
    with pytest.raises(error, match=rf"tangent_energies: {match}"):
        _launcher()(**args)


@over_backends(OP, TRITON)
def test_registered_and_dispatched(be, monkeypatch):
    assert OP in backends.TRITON_OPS
    B, E, F, A = tangent_problem((2,), 5, 7, 3, dtype=F32, device=be.device)
    real = _launcher()
    calls = spy_on_launcher(monkeypatch, OP, real)
    out = ops.tangent_energies(B, E[0], F, A[0], backend="triton")  # broadcast batches reach it unexpanded
    assert len(calls) == 1 and calls[0][0][1].shape == E[0].shape
    for a, b in zip(out, real(B, E[0], F, A[0])):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    monkeypatch.setenv("LORSUM_BACKEND", "triton")
    ops.tangent_energies(B, E, F, A)
    assert len(calls) == 2
