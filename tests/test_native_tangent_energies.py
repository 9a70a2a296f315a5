"""Native surrogate statistics (csrc/cpu/tangent_energies.cpp) against reference.tangent_energies.

Odd shapes and batch shapes, fp32 / fp64 / bf16 / fp16 and mixed dtypes, both CPU code paths (AVX-512 and
generic), several chunks per side, ranks that differ between B and F, non-contiguous and expanded inputs,
zeros (exact zero out) and cancellation (clamped, never negative), NaN propagation as in the reference,
thread-count independence, opcheck, FakeTensor and compile, bad input, the flop count, and AdaPreLoRA with
the surrogate statistics stepped with backend="native" against "torch".

Tolerances (DESIGN.md "Numerical policy"): fp32 results within 1e-5 relative Frobenius error of the fp64
reference on the same input values; bf16 results within twice the error plain PyTorch makes in bf16;
NaN never passes (conftest.rel_err is inf for any non-finite value).
"""

from __future__ import annotations

import pytest
import torch

from lorsum_kernels import _native, ops, reference

from .conftest import LAYER_SHAPE_IDS, LAYER_SHAPES, rel_err, train_tiny

pytestmark = pytest.mark.skipif(
    not _native.has_native_op("tangent_energies", "cpu"),
    reason=f"native tangent_energies not built: {_native.native_error}",
)

SHAPES, IDS = LAYER_SHAPES, LAYER_SHAPE_IDS


def _problem(batch, m, n, r, *, dtype=torch.float64, seed=0, surrogate=True):
    """(B, E, F, A): AdaPreLoRA's surrogate (E = BᵀG, F = GAᵀ for one G), or independent factors."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*batch, *shape, generator=g, dtype=torch.float64) * scale

    A, B = randn(r, n, scale=n**-0.5), randn(m, r, scale=m**-0.5 * 3)
    if surrogate:
        G = randn(m, n)
        E, F = B.mT @ G, G @ A.mT
    else:
        E, F = randn(r, n), randn(m, r)
    return [t.to(dtype) for t in (B, E, F, A)]


def _native(args):
    return torch.ops.lorsum.tangent_energies(*args)


def _reference(args, dtype=torch.float64):
    return reference.tangent_energies(*[t.to(dtype) for t in args])


def _errs(out, expected):
    return max(rel_err(a, e) for a, e in zip(out, expected))


@pytest.fixture(params=["avx512", "generic"])
def cpu_path(request, monkeypatch):
    """Both CPU code paths: the AVX-512 micro-kernels (where the CPU has them) and the generic ones."""
    if request.param == "generic":
        monkeypatch.setenv("LORSUM_CPU_KERNELS", "generic")
    else:
        monkeypatch.delenv("LORSUM_CPU_KERNELS", raising=False)
    return request.param


# ---- accuracy --------------------------------------------------------------------------------------


@pytest.mark.parametrize("surrogate", [True, False], ids=["surrogate", "independent"])
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_fp32_and_fp64(shape, surrogate, cpu_path):
    batch, m, n, _ = shape
    p64 = _problem(*shape, surrogate=surrogate)
    out64 = _native(p64)
    assert [t.dtype for t in out64] == [torch.float64] * 2
    assert _errs(out64, _reference(p64)) < 1e-12
    p32 = [t.float() for t in p64]
    out = _native(p32)
    assert [t.shape for t in out] == [batch + (m,), batch + (n,)]
    assert [t.dtype for t in out] == [torch.float32] * 2
    assert _errs(out, _reference(p32)) < 1e-5  # fp64 reference on the fp32 values


@pytest.mark.parametrize("shape", SHAPES[:7], ids=IDS[:7])
def test_bf16(shape, cpu_path):
    # Everything bf16, the results too (as the reference returns them): within twice the error plain
    # PyTorch makes in bf16 against the exact energies of the same bf16 values.
    p16 = _problem(*shape, dtype=torch.bfloat16)
    out = _native(p16)
    assert [t.dtype for t in out] == [torch.bfloat16] * 2
    torch_out = reference.tangent_energies(*p16)
    assert [t.dtype for t in torch_out] == [torch.bfloat16] * 2
    exact = _reference(p16)
    for a, t, e in zip(out, torch_out, exact):
        assert rel_err(a, e) <= 2 * rel_err(t, e)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_mixed_and_half_inputs(dtype):
    # One input in another dtype: results in the promoted dtype, arithmetic in fp64 if any input is fp64,
    # else fp32 (so fp32 accuracy on the given values).
    args = _problem((3,), 123, 256, 16)
    for k in range(4):
        cast = [t.to(dtype) if j == k else t.float() for j, t in enumerate(args)]
        out = _native(cast)
        want = torch.float64 if dtype == torch.float64 else torch.float32
        assert [t.dtype for t in out] == [want] * 2
        assert _errs(out, _reference(cast)) < (1e-12 if dtype == torch.float64 else 1e-5)
    half = [t.half() for t in args]
    out = _native(half)
    assert [t.dtype for t in out] == [torch.float16] * 2
    assert _errs(out, _reference(half)) < 2e-3  # fp16 rounding of the results


@pytest.mark.parametrize("ranks", [(2, 5), (0, 3), (7, 0)], ids=lambda rk: f"rB{rk[0]}_rF{rk[1]}")
def test_ranks_of_the_two_products_may_differ(ranks, cpu_path):
    # Z = [B F] and W = [E; A] only need B·E and F·A to be m×n: the reference accepts r_B ≠ r_F, and so
    # does the kernel (an empty product included).
    r_B, r_F = ranks
    g = torch.Generator().manual_seed(7)
    B, E = torch.randn(2, 123, r_B, generator=g), torch.randn(2, r_B, 37, generator=g)
    F, A = torch.randn(2, 123, r_F, generator=g), torch.randn(2, r_F, 37, generator=g)
    assert _errs(_native([B, E, F, A]), _reference([B, E, F, A])) < 1e-5


# ---- layouts, broadcasting, edge cases -------------------------------------------------------------


def test_non_contiguous_inputs_give_identical_results(cpu_path):
    B, E, F, A = _problem((3,), 123, 256, 16, dtype=torch.float32)
    wide = torch.randn(3, 16, 2 * 256)
    wide[..., ::2] = A
    views = [
        B.mT.contiguous().mT,  # column-major: rows of V = Zᵀ contiguous
        E.transpose(0, 1).contiguous().transpose(0, 1),  # permuted batch
        F.mT.contiguous().mT,
        wide[..., ::2],  # strided columns (neither stride 1)
    ]
    assert not any(v.is_contiguous() for v in views)
    plain = _native([B, E, F, A])
    for a, b in zip(_native(views), plain):
        assert torch.equal(a, b)
    # One layer's inputs expanded over the batch (stride 0): every layer's result is that layer's.
    expanded = [t[:1].expand(4, *t.shape[1:]) for t in (B, E, F, A)]
    single = _native([t[0] for t in (B, E, F, A)])
    for a, b in zip(_native(expanded), single):
        assert torch.equal(a, b.expand_as(a))


def test_ops_dispatch_broadcasts_as_the_reference():
    # The reference broadcasts Z = [B F] against W = [E; A]; ops.tangent_energies expands to one batch shape
    # for the native schema.
    B, E, F, A = _problem((3,), 123, 256, 3, dtype=torch.float32)
    for args in [(B, E[0], F, A[0]), (B[0], E, F[0], A)]:
        nat = ops.tangent_energies(*args, backend="native")
        exact = reference.tangent_energies(*[t.double() for t in args])
        assert [t.shape for t in nat] == [t.shape for t in exact] and _errs(nat, exact) < 1e-5
    one = [t[0] for t in (B, E, F, A)]
    nat = ops.tangent_energies(*one, backend="native")
    assert nat[0].shape == (123,) and _errs(nat, _reference(one)) < 1e-5


def test_empty_shapes():
    for batch, m, n, r in [((0,), 5, 7, 3), ((2,), 5, 7, 0), ((2,), 0, 7, 3), ((2,), 5, 0, 3), ((2,), 0, 0, 3)]:
        args = [torch.randn(*batch, m, r), torch.randn(*batch, r, n), torch.randn(*batch, m, r),
                torch.randn(*batch, r, n)]
        out, exp = _native(args), reference.tangent_energies(*args)
        for a, e in zip(out, exp):
            assert a.shape == e.shape and a.dtype == torch.float32 and torch.equal(a, e)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_zeros_give_exact_zeros_and_cancellation_is_clamped(dtype, cpu_path):
    B, E, F, A = _problem((2,), 123, 256, 16, dtype=dtype)
    zero = torch.zeros(2, 123)
    for args in [[torch.zeros_like(t) for t in (B, E, F, A)], [torch.zeros_like(B), E, torch.zeros_like(F), A]]:
        rows, cols = _native(args)
        assert torch.equal(rows, zero.to(dtype)) and torch.equal(cols, torch.zeros(2, 256, dtype=dtype))
    # Standard LoRA init, B = 0 and E = BᵀG = 0: the energies of F·A alone.
    init = [torch.zeros_like(B), torch.zeros_like(E), F, A]
    assert _errs(_native(init), _reference(init)) < (1e-12 if dtype == torch.float64 else 1e-5)
    # B·E + (−B)·E = 0 with nonzero factors: the quadratic forms cancel to rounding error, which the clamp
    # keeps from going negative (the reference clamps the same way).
    Z, W = torch.cat([B, -B], -1), torch.cat([E, E], -2)
    rows, cols = _native([B, E, -B, E])
    for t, scale in [(rows, Z.square().sum(-1).amax() * W.square().sum()),
                     (cols, W.square().sum(-2).amax() * Z.square().sum())]:
        assert t.isfinite().all() and (t >= 0).all() and t.amax() <= 1e-4 * scale


@pytest.mark.parametrize("where", ["B", "E", "F", "A"])
def test_nan_propagates_as_in_the_reference(where, cpu_path):
    # A NaN in one entry poisons the energies the reference's products carry it to (a row of Z: its own row
    # energy and every column energy through ZᵀZ; a column of W: its own column and every row), in that
    # layer only.
    args = _problem((3,), 123, 256, 3, dtype=torch.float32)
    k = "BEFA".index(where)
    args[k] = args[k].clone()
    args[k][1].view(-1)[7] = float("nan")
    out, exp = _native(args), _reference(args)
    for a, e in zip(out, exp):
        assert e.isnan().any() and torch.equal(a.isnan(), e.isnan())
        assert a[[0, 2]].isfinite().all()


def test_independent_of_thread_count():
    args = _problem((3,), 1100, 600, 16, dtype=torch.float32)
    threads = torch.get_num_threads()
    outs = []
    for n in sorted({1, max(threads, 2)}):
        torch.set_num_threads(n)
        try:
            outs.append(_native(args))
        finally:
            torch.set_num_threads(threads)
    for a, b in zip(*outs):
        assert torch.equal(a, b)


# ---- bad input, opcheck, compile, cost -------------------------------------------------------------


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
def test_rejects_bad_input(mutate, match):
    B, E, F, A = _problem((3,), 5, 7, 3, dtype=torch.float32)
    args = dict(B=B, E=E, F=F, A=A)
    mutate(args)
    with pytest.raises(RuntimeError, match=rf"tangent_energies: {match}"):
        torch.ops.lorsum.tangent_energies(**args)


def _opcheck_cases():
    f32 = _problem((2,), 5, 7, 3, dtype=torch.float32)
    g = torch.Generator().manual_seed(9)
    return [
        tuple(f32),
        tuple(_problem((), 9, 5, 2)),
        tuple(_problem((2, 2), 6, 4, 1, dtype=torch.bfloat16)),
        (f32[0].mT.contiguous().mT, f32[1], f32[2], f32[3].mT.contiguous().mT),
        (torch.randn(2, 6, 2, generator=g), torch.randn(2, 2, 5, generator=g), torch.randn(2, 6, 4, generator=g),
         torch.randn(2, 4, 5, generator=g)),
    ]


@pytest.mark.parametrize("case", range(5), ids=["fp32", "fp64-2d", "bf16-4d", "strided", "rB2-rF4"])
def test_opcheck(case):
    torch.library.opcheck(torch.ops.lorsum.tangent_energies.default, _opcheck_cases()[case])


def test_fake_tensor_and_compile():
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = _problem((3,), 5, 7, 3, dtype=torch.bfloat16)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        rows, cols = torch.ops.lorsum.tangent_energies(*[mode.from_tensor(t) for t in args])
    assert rows.shape == (3, 5) and cols.shape == (3, 7) and rows.dtype == cols.dtype == torch.bfloat16

    f32 = [t.float() for t in args]
    compiled = torch.compile(lambda *a: ops.tangent_energies(*a, backend="native"), backend="eager", fullgraph=True)
    assert _errs(compiled(*f32), _reference(f32)) < 1e-5


def test_flop_count_is_the_kernels():
    # FlopCounterMode counts the native op by its formula: R(R+1) multiply-adds per column of either side
    # (half the reference's four products), O((m+n)r²) like every backend.
    from torch.utils.flop_counter import FlopCounterMode

    args = _problem((3,), 123, 256, 5, dtype=torch.float32)
    with FlopCounterMode(display=False) as native:
        ops.tangent_energies(*args, backend="native")
    with FlopCounterMode(display=False) as torch_counter:
        ops.tangent_energies(*args, backend="torch")
    R = 10
    assert native.get_total_flops() == 3 * 2 * R * (R + 1) * (123 + 256)
    assert torch_counter.get_total_flops() == 3 * 4 * R * R * (123 + 256)


# ---- AdaPreLoRA with the surrogate statistics, native against torch ---------------------------------


def test_surrogate_statistics_native_equals_torch():
    from lorsum_kernels.functional.adaprelora import surrogate_statistics

    B, E, F, A = _problem((3,), 123, 256, 16, dtype=torch.float32)
    for scale in [1.0, 2.5, torch.tensor([1.0, 0.5, 2.0])]:
        s = scale if isinstance(scale, float) else scale.view(3, 1, 1)
        nat = surrogate_statistics(A, B, s * E, s * F, scale=scale, backend="native")
        ref = surrogate_statistics(A, B, s * E, s * F, scale=scale, backend="torch")
        assert _errs(nat, ref) < 1e-5


def _train(backend, steps=6, **kw):
    import lorsum_kernels as lk

    return train_tiny(
        lambda model: lk.AdaPreLoRA(model, lr=1e-2, backend=backend, statistics="surrogate", **kw), steps)


@pytest.mark.parametrize(
    "kw", [dict(momentum=None), dict(momentum="input"), dict(momentum="adam", weight_decay=0.01)],
    ids=["sgd", "input", "adam-wd"],
)
def test_adaprelora_surrogate_native_equals_torch(kw, monkeypatch):
    # backend="native" forces every hot path of the surrogate configuration (the solve and these
    # statistics), so the optimizer now constructs with it; six steps match the torch backend.
    monkeypatch.delenv("LORSUM_BACKEND", raising=False)
    p_nat, s_nat = _train("native", **kw)
    p_ref, s_ref = _train("torch", **kw)
    assert p_nat.keys() == p_ref.keys() and s_nat.keys() == s_ref.keys()
    for key in p_ref:
        assert rel_err(p_nat[key], p_ref[key]) < 1e-5, key
    for key in s_ref:
        if s_ref[key].is_floating_point():
            assert rel_err(s_nat[key], s_ref[key]) < 1e-5, key
        else:
            assert torch.equal(s_nat[key], s_ref[key]), key
