"""Native AdaPreLoRA factor solve (csrc/cpu/adaprelora_solve.cpp) against reference.adaprelora_solve.

Odd shapes and batch shapes, fp32 / fp64 / bf16, both CPU code paths (AVX-512 and generic), several chunks
per side, non-contiguous and broadcast inputs, a zero Gram (B = 0, A = 0) and the fallback ridge, a
rank-deficient B, NaN, thread-count independence, opcheck, bad input, and AdaPreLoRA (functional and
optimizer) stepped with backend="native" against "torch".

Tolerances (DESIGN.md "Numerical policy"): fp32 results within 1e-5 relative Frobenius error of the fp64
reference on the same input values; bf16 results within twice the error plain PyTorch makes in bf16;
NaN never passes (conftest.rel_err is inf for any non-finite value).
"""

from __future__ import annotations

import pytest
import torch

from lorsum_kernels import _native, ops, reference
from lorsum_kernels.backends import triton_available

from .conftest import LAYER_SHAPE_IDS, LAYER_SHAPES, TinyLoRAMLP, rel_err, train_tiny

pytestmark = pytest.mark.skipif(
    not _native.has_native_op("adaprelora_solve", "cpu"),
    reason=f"native adaprelora_solve not built: {_native.native_error}",
)

SHAPES, IDS = LAYER_SHAPES, LAYER_SHAPE_IDS

RIDGE = 1e-6


def _problem(batch, m, n, r, *, dtype=torch.float64, seed=0, momentum=False):
    """A, B, g_A, g_B, p, q as AdaPreLoRA poses them: g_A = BᵀG and g_B = GAᵀ for one G, or (momentum)
    gradients that come from no single G."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*batch, *shape, generator=g, dtype=torch.float64) * scale

    A, B = randn(r, n, scale=n**-0.5), randn(m, r, scale=m**-0.5 * 3)
    if momentum:
        g_A, g_B = randn(r, n), randn(m, r)
    else:
        G = randn(m, n)
        g_A, g_B = B.mT @ G, G @ A.mT
    p = torch.rand(*batch, m, generator=g, dtype=torch.float64) * 1.5 + 0.5
    q = torch.rand(*batch, n, generator=g, dtype=torch.float64) * 1.5 + 0.5
    return [t.to(dtype) for t in (A, B, g_A, g_B, p, q)]


def _native(args, ridge=RIDGE):
    rho = ridge if isinstance(ridge, torch.Tensor) else torch.tensor(ridge, dtype=torch.float64)
    return torch.ops.lorsum.adaprelora_solve(*args, rho)


def _reference(args, ridge=RIDGE, dtype=torch.float64):
    return reference.adaprelora_solve(*[t.to(dtype) for t in args], ridge=ridge)


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


@pytest.mark.parametrize("momentum", [False, True], ids=["one-G", "momentum"])
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_fp32_and_fp64(shape, momentum, cpu_path):
    batch, m, n, r = shape
    p64 = _problem(*shape, momentum=momentum)
    out64 = _native(p64)
    assert [t.dtype for t in out64] == [torch.float64] * 2
    assert _errs(out64, _reference(p64)) < 1e-11
    p32 = [t.float() for t in p64]
    out = _native(p32)
    assert [t.shape for t in out] == [batch + (r, n), batch + (m, r)]
    assert [t.dtype for t in out] == [torch.float32] * 2
    assert _errs(out, _reference(p32)) < 1e-5  # fp64 reference on the fp32 values


def _torch_bf16(args, monkeypatch):
    """Plain PyTorch in bf16: the reference with every tensor in bf16, except the r×r Cholesky factor and
    solves, which torch does not implement in bf16 on the CPU (they run in fp32 and are rounded back)."""
    chol, solve = reference.ridged_cholesky, torch.cholesky_solve
    monkeypatch.setattr(reference, "ridged_cholesky", lambda gram, rho: chol(gram.float(), rho).to(gram.dtype))
    monkeypatch.setattr(torch, "cholesky_solve", lambda b, f: solve(b.float(), f.float()).to(b.dtype))
    try:
        return reference.adaprelora_solve(*args, ridge=RIDGE)
    finally:
        monkeypatch.setattr(reference, "ridged_cholesky", chol)
        monkeypatch.setattr(torch, "cholesky_solve", solve)


@pytest.mark.parametrize("shape", SHAPES[:7], ids=IDS[:7])
def test_bf16(shape, monkeypatch):
    # Everything bf16, the results too: within twice the error plain PyTorch makes in bf16.
    p16 = _problem(*shape, dtype=torch.bfloat16)
    out = _native(p16)
    assert [t.dtype for t in out] == [torch.bfloat16] * 2
    exact = _reference(p16)
    torch_out = _torch_bf16(p16, monkeypatch)
    for a, t, e in zip(out, torch_out, exact):
        assert rel_err(a, e) <= 2 * rel_err(t, e)
    # bf16 statistics with fp32 factors and gradients: fp32 results at fp32 accuracy on those values.
    mixed = [t.float() for t in _problem(*shape)[:4]] + [t.to(torch.bfloat16) for t in _problem(*shape)[4:]]
    out = _native(mixed)
    assert [t.dtype for t in out] == [torch.float32] * 2
    assert _errs(out, _reference(mixed)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=str)
def test_mixed_and_half_inputs(dtype):
    # fp16 inputs accumulate in fp32 and return fp16; an fp64 input makes the arithmetic and results fp64.
    args = _problem((3,), 123, 256, 16)
    cast = [args[0].to(dtype)] + [t.float() for t in args[1:]]
    out = _native(cast)
    want = torch.float64 if dtype == torch.float64 else torch.float32
    assert [t.dtype for t in out] == [want] * 2
    assert _errs(out, _reference(cast)) < (1e-11 if dtype == torch.float64 else 1e-5)
    half = _native([t.half() for t in args])
    assert [t.dtype for t in half] == [torch.float16] * 2
    assert _errs(half, _reference([t.half() for t in args])) < 2e-3


# ---- layouts, broadcasting, edge cases -------------------------------------------------------------


def test_non_contiguous_inputs_give_identical_results():
    A, B, g_A, g_B, p, q = _problem((3,), 123, 256, 16, dtype=torch.float32)
    wide_q = torch.rand(3, 2 * 256)
    wide_q[:, ::2] = q
    views = [
        A.mT.contiguous().mT,  # column-major
        B.transpose(0, 1).contiguous().transpose(0, 1),  # permuted batch
        g_A.mT.contiguous().mT,
        g_B.mT.contiguous().mT,
        p.mT.contiguous().mT,  # batch-fast storage
        wide_q[:, ::2],  # strided columns
    ]
    assert not any(v.is_contiguous() for v in views)
    plain = _native([A, B, g_A, g_B, p, q])
    for a, b in zip(_native(views), plain):
        assert torch.equal(a, b)
    # One layer's inputs expanded over the batch (stride 0): every layer's result is that layer's.
    expanded = [t[:1].expand(4, *t.shape[1:]) for t in (A, B, g_A, g_B, p, q)]
    single = _native([t[0] for t in (A, B, g_A, g_B, p, q)])
    for a, b in zip(_native(expanded), single):
        assert torch.equal(a, b.expand_as(a))


def test_ops_dispatch_broadcasts_and_takes_any_ridge():
    # ops.adaprelora_solve broadcasts the batch dimensions (here p, q shared by the layers) as the reference
    # does, and takes the ridge as a number, a 0-d tensor or one value per layer.
    A, B, g_A, g_B, p, q = _problem((3,), 123, 256, 3, dtype=torch.float32)
    args = (A, B, g_A, g_B, p[0], q[0])
    for ridge in [RIDGE, torch.tensor(1e-3), torch.tensor([0.0, 1e-6, 1e-2])]:
        nat = ops.adaprelora_solve(*args, ridge=ridge, backend="native")
        exact = reference.adaprelora_solve(*[t.double() for t in args], ridge=ridge)
        assert _errs(nat, exact) < 1e-5
    # 2-D inputs.
    one = [t[0] for t in (A, B, g_A, g_B, p, q)]
    nat = ops.adaprelora_solve(*one, ridge=RIDGE, backend="native")
    assert nat[0].shape == A.shape[1:] and _errs(nat, _reference(one)) < 1e-5


def test_empty_shapes():
    for batch, m, n, r in [((0,), 5, 7, 3), ((2,), 5, 7, 0), ((2,), 0, 7, 0)]:
        A, B = torch.randn(*batch, r, n), torch.randn(*batch, m, r)
        p, q = torch.rand(*batch, m) + 0.5, torch.rand(*batch, n) + 0.5
        dA, dB = _native([A, B, A.clone(), B.clone(), p, q])
        assert dA.shape == A.shape and dB.shape == B.shape and dA.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("ridge", [0.0, RIDGE], ids=["ridge0", "ridge1e-6"])
def test_zero_grams_match_the_reference_fallback(dtype, ridge, cpu_path):
    A, B, _, g_B, p, q = _problem((2,), 123, 5, 3, dtype=dtype)
    # Standard LoRA init, B = 0: M_B = 0 and g_A = BᵀG = 0, so dA = 0 and dB·A is T projected on row(A).
    zero_B = [A, torch.zeros_like(B), torch.zeros_like(A), g_B, p, q]
    dA, dB = _native(zero_B, ridge)
    assert torch.equal(dA, torch.zeros_like(dA))
    assert rel_err(dB, _reference(zero_B, ridge)[1]) < (1e-11 if dtype == torch.float64 else 1e-5)
    # A = B = 0 with gradients (momenta) left over: both Grams zero, factored at the floored scale (with
    # the fallback ridge when ridge = 0). Huge, but finite and the reference's. The floor is the dtype's
    # sqrt(smallest normal), so the reference runs in the same dtype here.
    g = torch.Generator().manual_seed(3)
    g_A = (torch.randn(A.shape, generator=g, dtype=torch.float64) * 1e-6).to(dtype)
    zero_both = [torch.zeros_like(A), torch.zeros_like(B), g_A, g_B, p, q]
    out = _native(zero_both, ridge)
    exact = _reference(zero_both, ridge, dtype=dtype)
    assert all(t.isfinite().all() for t in out)
    assert _errs(out, exact) < (1e-11 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_fallback_ridge_per_layer(dtype, cpu_path, monkeypatch):
    # A zero column of B makes M_B exactly singular: with ridge 0 the first factorisation meets a zero pivot
    # and the fallback ridge is used, on that layer only; the other layers have their own ridges. The fp64
    # reference gets the fallback ridge of the dtype under test, so that it makes the same choice.
    monkeypatch.setitem(reference.FALLBACK_RIDGE, torch.float64, reference.FALLBACK_RIDGE[dtype])
    args = _problem((3,), 123, 256, 3, dtype=dtype)
    B = args[1].clone()
    B[0, :, 1] = 0
    args[1] = B
    args[2] = args[2].clone()
    args[2][0, 1] = 0  # g_A = BᵀG has that row zero too
    ridge = torch.tensor([0.0, 0.0, 1e-2], dtype=torch.float64)
    out = _native(args, ridge)
    assert all(t.isfinite().all() for t in out)
    assert _errs(out, reference.adaprelora_solve(*[t.double() for t in args], ridge=ridge)) < (
        1e-11 if dtype == torch.float64 else 1e-5
    )


def test_rank_deficient_B():
    # B of rank r − 1 (two equal columns): M_B is singular but for rounding; the relative ridge decides its
    # null direction, the same way in both implementations.
    for dtype in [torch.float64, torch.float32]:
        args = _problem((2,), 256, 123, 16)
        B = args[1].clone()
        B[..., 5] = B[..., 2]
        G = torch.randn(2, 256, 123, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        args[1], args[2] = B, B.mT @ G
        args = [t.to(dtype) for t in args]
        out = _native(args, 1e-4)
        assert all(t.isfinite().all() for t in out)
        exact = _reference(args, 1e-4)
        if dtype == torch.float64:
            assert _errs(out, exact) < 1e-9
        else:
            # Conditioning 1e4: fp32 loses about that factor; no worse than the fp32 reference.
            torch_err = _errs(_reference(args, 1e-4, dtype=torch.float32), exact)
            assert _errs(out, exact) <= max(2 * torch_err, 1e-5)


@pytest.mark.parametrize("where", ["A", "g_B", "q"])
def test_nan_poisons_its_layer_only(where, cpu_path):
    args = _problem((3,), 123, 256, 3, dtype=torch.float32)
    k = {"A": 0, "g_B": 3, "q": 5}[where]
    args[k] = args[k].clone()
    args[k][1].view(-1)[7] = float("nan")
    dA, dB = _native(args)
    assert not (dA[1].isfinite().all() and dB[1].isfinite().all())
    for layer in (0, 2):
        assert dA[layer].isfinite().all() and dB[layer].isfinite().all()


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


# ---- bad input, opcheck, compile ------------------------------------------------------------------


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: a.update(B=a["B"][..., :2]), r"A .* and B .* must be \(\.\.\., m, r\) with the same r"),
        (lambda a: a.update(B=a["B"][:2], g_B=a["g_B"][:2]), r"B has batch shape \[2\] but A has \[3\]"),
        (lambda a: a.update(g_A=a["g_A"][..., :-1]), r"g_A must have the shape of A \[3, 3, 7\], got"),
        (lambda a: a.update(g_B=a["g_B"].mT), r"g_B must have the shape of B"),
        (lambda a: a.update(p=a["p"][..., :-1]), r"p must be \(\.\.\., m\) = \[3\] \+ \(5,\), got shape"),
        (lambda a: a.update(q=a["q"][0]), r"q must be \(\.\.\., n\) = \[3\] \+ \(7,\), got shape \[7\]"),
        (lambda a: a.update(ridge=torch.ones(2)), r"ridge must be a 0-d tensor or one value per layer \(L,\)"),
        (lambda a: a.update(A=a["A"].int()), r"A must be float32, float64, bfloat16 or float16"),
        (lambda a: a.update(A=a["A"][0, 0]), r"A must have at least 2 dimensions"),
        (lambda a: a.update(ridge=torch.tensor(1)), r"ridge must be a floating CPU tensor"),
    ],
)
def test_rejects_bad_input(mutate, match):
    A, B, g_A, g_B, p, q = _problem((3,), 5, 7, 3, dtype=torch.float32)
    args = dict(A=A, B=B, g_A=g_A, g_B=g_B, p=p, q=q, ridge=torch.tensor(RIDGE, dtype=torch.float64))
    mutate(args)
    with pytest.raises(RuntimeError, match=rf"adaprelora_solve: {match}"):
        torch.ops.lorsum.adaprelora_solve(**args)


def _opcheck_cases():
    rho = torch.tensor(RIDGE, dtype=torch.float64)
    f32 = _problem((2,), 5, 7, 3, dtype=torch.float32)
    return [
        tuple(f32) + (rho,),
        tuple(_problem((), 9, 5, 2)) + (torch.tensor(0.0),),
        tuple(_problem((2, 2), 6, 4, 1, dtype=torch.bfloat16)) + (rho,),
        (f32[0].mT.contiguous().mT, *f32[1:], torch.tensor([1e-3, 1e-2])),
    ]


@pytest.mark.parametrize("case", range(4), ids=["fp32", "fp64-2d", "bf16-4d", "strided-per-layer-ridge"])
def test_opcheck(case):
    torch.library.opcheck(torch.ops.lorsum.adaprelora_solve.default, _opcheck_cases()[case])


def test_fake_tensor_and_compile():
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = _problem((3,), 5, 7, 3, dtype=torch.bfloat16)
    rho = torch.tensor(RIDGE, dtype=torch.float64)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        dA, dB = torch.ops.lorsum.adaprelora_solve(*[mode.from_tensor(t) for t in args], rho)
    assert dA.shape == (3, 3, 7) and dB.shape == (3, 5, 3) and dA.dtype == dB.dtype == torch.bfloat16

    f32 = [t.float() for t in args]
    compiled = torch.compile(lambda *a: torch.ops.lorsum.adaprelora_solve(*a, rho), backend="eager",
                             fullgraph=True)
    assert _errs(compiled(*f32), _reference(f32)) < 1e-5


# ---- AdaPreLoRA, native against torch ----------------------------------------------------------------


def test_functional_step_native_equals_torch():
    from lorsum_kernels.functional import adaprelora_direction, adaprelora_step

    A, B, g_A, g_B, p, q = _problem((3,), 123, 256, 16, dtype=torch.float32)
    for kw in [dict(scale=2.0, ridge=RIDGE), dict(scale=torch.tensor([1.0, 0.5, 2.0]), ridge=0.0)]:
        nat = adaprelora_direction(A, B, g_A, g_B, p, q, backend="native", **kw)
        ref = adaprelora_direction(A, B, g_A, g_B, p, q, backend="torch", **kw)
        assert _errs(nat, ref) < 1e-5

    def run(backend):
        # Exact statistics from captured X, S (G = SᵀX), input momentum, weight decay.
        a, b = A.clone(), B.clone()
        state = {"t": torch.zeros(3), "row_stat": torch.zeros(3, 123), "col_stat": torch.zeros(3, 256),
                 "exp_avg_A": torch.zeros_like(a), "exp_avg_B": torch.zeros_like(b)}
        g = torch.Generator().manual_seed(5)
        for _ in range(4):
            X, S = torch.randn(3, 37, 256, generator=g), torch.randn(3, 37, 123, generator=g)
            G = S.mT @ X
            a, b, state = adaprelora_step(a, b, b.mT @ G, G @ a.mT, state, X=X, S=S, lr=1e-2, backend=backend,
                                          weight_decay=0.01)
        return a, b

    assert _errs(run("native"), run("torch")) < 1e-5


def _train(backend, steps=6, **kw):
    # backend="native" forces every hot path: the solve, and the exact (row_col_energies) or surrogate
    # (tangent_energies) statistics.
    import lorsum_kernels as lk

    return train_tiny(lambda model: lk.AdaPreLoRA(model, lr=1e-2, backend=backend, **kw), steps)


@pytest.mark.parametrize(
    "kw",
    [dict(statistics="exact", momentum="input"), dict(statistics="surrogate", momentum=None),
     dict(statistics="exact", momentum="adam", weight_decay=0.01)],
    ids=["exact-input", "surrogate-sgd", "exact-adam-wd"],
)
def test_optimizer_native_equals_torch(kw, monkeypatch):
    from lorsum_kernels.backends import resolve_backend

    monkeypatch.delenv("LORSUM_BACKEND", raising=False)
    assert resolve_backend("auto", "cpu", "adaprelora_solve") == "native"
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


def test_forced_backend_lacking_an_op_raises_before_hooking(monkeypatch):
    # Every op of both configurations has a native CPU kernel, so forcing "native" constructs either. A
    # forced backend that lacks one of the configuration's ops must fail at construction, naming the op,
    # and leave the model unhooked: Triton on a CPU device runs only in its interpreter.
    from lorsum_kernels import AdaPreLoRA

    model = TinyLoRAMLP()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="backend 'triton' is not available for op 'adaprelora_solve'"):
        AdaPreLoRA(model, backend="triton", statistics="exact")  # the configuration that hooks the layers
    assert all(not layer._forward_hooks and not layer._backward_hooks for layer in model.lora_layers())
    if triton_available():  # in the interpreter every op of the surrogate configuration has a Triton kernel
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        AdaPreLoRA(model, backend="triton", statistics="surrogate")
        assert all(not layer._forward_hooks for layer in model.lora_layers())  # surrogate: nothing hooked
    AdaPreLoRA(model, backend="native", statistics="exact")
    AdaPreLoRA(TinyLoRAMLP(), backend="native", statistics="surrogate")
