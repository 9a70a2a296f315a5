"""adaprelora_solve (AdaPreLoRA's factor solve) on every backend against reference.adaprelora_solve.

Contract: for A (..., r, n), B (..., m, r), their gradients g_A, g_B, the diagonal statistics p (..., m),
q (..., n) and a ridge (a number, a 0-d tensor or one value per layer), the factor directions (dA, dB) of
the diagonally preconditioned projection, each r×r system factored with the ridge relative to its scale and,
where that factorisation fails, the fallback ridge, per layer; batch dimensions broadcast as in the
reference; results in the promoted dtype (fp64 arithmetic if any input is fp64, else fp32): within 1e-5
(fp64: 1e-11) of the fp64 reference on the same values, bf16 within twice the error of plain PyTorch in
bf16; run-to-run deterministic; a zero Gram (B = 0, or A = B = 0) gives the reference's finite result; a NaN
poisons its own layer only. Native: both CPU code paths, non-contiguous and expanded inputs, a rank-deficient
B, thread-count independence, the input checks, opcheck, FakeTensor and compile, and AdaPreLoRA (functional
and optimizer) stepped with backend="native" against "torch"; CUDA: bf16, views and the ridge's forms on
the device; Triton: its per-layer ridge, a failed factorisation giving NaN, the caller-ridge solve it is built
on (triton_kernels.spd.ridged_spd_solve), its input checks, dispatch, and AdaPreLoRA stepped on Triton.
Each Triton call runs four r×r solve launches, each factoring its matrix op by op in the interpreter (about
0.3 s a matrix at r = 16), so its shapes stay small.
"""

from __future__ import annotations

import pytest
import torch

from lorsum_kernels import backends, ops, reference
from lorsum_kernels.backends import triton_available

from ..conftest import LAYER_SHAPE_IDS, LAYER_SHAPES, TinyLoRAMLP, train_tiny
from ..problems import (NATIVE_CPU, NATIVE_CUDA, TRITON, adaprelora_problem, assert_deterministic,
                        assert_independent_of_thread_count, assert_same_training, max_rel_err, on,
                        over_backends, per_backend, rel_err, spy_on_launcher, use_cpu_path, with_cpu_paths)

OP = "adaprelora_solve"
F32, F64 = torch.float32, torch.float64
RIDGE = 1e-6
# A failed factorisation takes the square root of a non-positive pivot, and divides by it, on purpose
# (numpy warns about it in Triton's interpreter).
FAILED_PIVOT = pytest.mark.filterwarnings("ignore:invalid value encountered in (sqrt|divide):RuntimeWarning")


def _native(args, ridge=RIDGE):
    rho = ridge if isinstance(ridge, torch.Tensor) else torch.tensor(ridge, dtype=torch.float64)
    return torch.ops.lorsum.adaprelora_solve(*args, rho)


def _reference(args, ridge=RIDGE, dtype=F64, device="cpu"):
    ridge = ridge.to(device) if isinstance(ridge, torch.Tensor) else ridge
    return reference.adaprelora_solve(*[on(device, dtype)(t) for t in args], ridge=ridge)


def _torch_bf16(args, monkeypatch):
    """Plain PyTorch in bf16 on the inputs' device: the reference with every tensor in bf16, except the r×r
    Cholesky factor and solves, which torch does not implement in bf16 (they run in fp32, rounded back)."""
    with monkeypatch.context() as m:
        chol, solve = reference.ridged_cholesky, torch.cholesky_solve
        m.setattr(reference, "ridged_cholesky", lambda gram, ridge: chol(gram.float(), ridge).to(gram.dtype))
        m.setattr(torch, "cholesky_solve", lambda b, f: solve(b.float(), f.float()).to(b.dtype))
        return reference.adaprelora_solve(*args, ridge=RIDGE)


def _triton(*args, ridge=RIDGE):
    from lorsum_kernels.triton_kernels import adaprelora

    return adaprelora.adaprelora_solve(*args, ridge=ridge)


def _strided_views(A, B, g_A, g_B, p, q):
    """Non-contiguous views of the inputs with their values: column-major, permuted batch, batch-fast storage,
    strided columns."""
    wide_q = torch.rand(*q.shape[:-1], 2 * q.shape[-1], device=q.device, dtype=q.dtype)
    wide_q[..., ::2] = q
    views = [A.mT.contiguous().mT, B.transpose(0, 1).contiguous().transpose(0, 1), g_A.mT.contiguous().mT,
             g_B.mT.contiguous().mT, p.mT.contiguous().mT, wide_q[..., ::2]]
    assert not any(v.is_contiguous() for v in views)
    return views


def _sid(shape):
    b, m, n, r = shape
    return f"b{'x'.join(map(str, b)) or '0'}_m{m}_n{n}_r{r}"


# (batch, m, n, r), momentum, dtype. Native: the layer grid, with g_A, g_B from one G or (momentum) from none;
# CUDA: several 512-column chunks per side, r = 64 (its kernel's largest) and r = 80 (the ATen composition for
# r > 64); Triton: every r ∈ {1, 3, 16}, m, n ∈ {5, 33}, batch ∈ {(), (3,), (2, 2)}.
_CUDA = [((), 5, 123, 3), ((3,), 123, 5, 1), ((2, 2), 256, 256, 16), ((3,), 256, 123, 3), ((2,), 1100, 600, 40),
         ((), 700, 1537, 64), ((2,), 300, 200, 80)]
_TRITON = [((), 5, 33, 3), ((3,), 33, 5, 1), ((2, 2), 5, 5, 3), ((), 33, 33, 16)]
ACCURACY = {
    NATIVE_CPU: with_cpu_paths(NATIVE_CPU, [(s, mom, d) for s in LAYER_SHAPES for mom in (False, True)
                                            for d in (F32, F64)]),
    NATIVE_CUDA: with_cpu_paths(NATIVE_CUDA, [(s, False, d) for s in _CUDA for d in (F32, F64)]),
    TRITON: with_cpu_paths(TRITON, [(s, s[3] == 1, d) for s in _TRITON for d in (F32, F64)]),
}


# ---- accuracy: every backend -------------------------------------------------------------------------------


@per_backend(OP, "shape,momentum,dtype,path", ACCURACY,
             ids=lambda v: f"{_sid(v[0])}-{'momentum' if v[1] else 'one-G'}-{v[2]}-{v[3]}")
def test_matches_reference(be, shape, momentum, dtype, path, monkeypatch):
    use_cpu_path(monkeypatch, path)
    batch, m, n, r = shape
    args = adaprelora_problem(*shape, dtype=dtype, momentum=momentum, device=be.device)
    out = be.run(OP, *args, ridge=RIDGE)
    assert [t.shape for t in out] == [batch + (r, n), batch + (m, r)]
    assert [t.dtype for t in out] == [dtype] * 2 and all(t.device == be.device for t in out)
    assert max_rel_err(out, _reference(args)) < (1e-11 if dtype == F64 else 1e-5)  # fp64 on the same values
    assert_deterministic(lambda: be.run(OP, *args, ridge=RIDGE))


@over_backends(OP)
@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
@pytest.mark.parametrize("ridge", [0.0, RIDGE], ids=["ridge0", "ridge1e-6"])
@FAILED_PIVOT
def test_zero_grams_match_the_reference_fallback(be, dtype, ridge, cpu_path):
    m = 33 if be.interpreted else 123
    A, B, _, g_B, p, q = adaprelora_problem((2,), m, 5, 3, dtype=dtype, seed=3, device=be.device)
    tol = 1e-11 if dtype == F64 else 1e-5
    # Standard LoRA init, B = 0: M_B = 0 and g_A = BᵀG = 0, so dA = 0 and dB·A is T projected on row(A).
    zero_B = [A, torch.zeros_like(B), torch.zeros_like(A), g_B, p, q]
    dA, dB = be.run(OP, *zero_B, ridge=ridge)
    assert torch.equal(dA, torch.zeros_like(dA))
    assert rel_err(dB, _reference(zero_B, ridge)[1]) < tol
    # A = B = 0 with gradients (momenta) left over: both Grams zero, factored at the floored scale (with
    # the fallback ridge when ridge = 0). Huge, but finite and the reference's. The floor is the dtype's
    # sqrt(smallest normal), so the reference runs in the same dtype here.
    g_A = (adaprelora_problem((2,), m, 5, 3, seed=4)[2] * 1e-6).to(dtype).to(be.device)
    zero_both = [torch.zeros_like(A), torch.zeros_like(B), g_A, g_B, p, q]
    out = be.run(OP, *zero_both, ridge=ridge)
    assert all(t.isfinite().all() for t in out)
    assert max_rel_err(out, _reference(zero_both, ridge, dtype=dtype)) < tol


@over_backends(OP)
@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
@FAILED_PIVOT
def test_fallback_ridge_per_layer(be, dtype, cpu_path, monkeypatch):
    # A zero column of B makes M_B exactly singular: with ridge 0 the first factorisation of layer 0 meets a
    # zero pivot and takes the fallback ridge, on that layer only; the other layers keep their own ridges.
    # The fp64 reference gets the fallback ridge of the dtype under test, so that it makes the same choice.
    monkeypatch.setitem(reference.FALLBACK_RIDGE, torch.float64, reference.FALLBACK_RIDGE[dtype])
    shape = ((3,), 33, 5, 3) if be.interpreted else ((3,), 123, 256, 3)
    args = adaprelora_problem(*shape, dtype=dtype, seed=5, device=be.device)
    args[1][0, :, 1] = 0
    args[2][0, 1] = 0  # g_A = BᵀG has that row zero too
    ridge = torch.tensor([0.0, 0.0, 1e-2], dtype=torch.float64)
    out = be.run(OP, *args, ridge=ridge)
    assert all(t.isfinite().all() for t in out)
    assert max_rel_err(out, _reference(args, ridge)) < (1e-11 if dtype == F64 else 1e-5)


@over_backends(OP)
@pytest.mark.parametrize("ridge", [RIDGE, 0.0, torch.tensor(1e-3), torch.tensor([0.0, 1e-6, 1e-2])],
                         ids=["number", "zero", "0-d", "per-layer"])
def test_ridge_forms_and_broadcast_batch(be, ridge):
    # p and q shared by the layers (broadcast as the reference does); the ridge a number, a 0-d tensor or
    # one value per layer, each layer factored with its own; and 2-D inputs.
    shape = ((3,), 33, 5, 3) if be.interpreted else ((3,), 123, 256, 3)
    A, B, g_A, g_B, p, q = adaprelora_problem(*shape, dtype=F32, seed=1, device=be.device)
    args = (A, B, g_A, g_B, p[0], q[0])
    assert max_rel_err(be.run(OP, *args, ridge=ridge), _reference(args, ridge)) < 1e-5
    one = [t[0] for t in (A, B, g_A, g_B, p, q)]
    out = be.run(OP, *one, ridge=RIDGE)
    assert out[0].shape == A.shape[1:] and max_rel_err(out, _reference(one)) < 1e-5


@over_backends(OP)
def test_ridge_changes_the_result_per_layer(be):
    # A ridge large enough to matter: each layer must match the reference with its own value.
    args = adaprelora_problem((2,), 5, 33, 3, seed=2, device=be.device)
    ridge = torch.tensor([0.0, 0.5], dtype=torch.float64)
    out = be.run(OP, *args, ridge=ridge)
    assert max_rel_err(out, _reference(args, ridge)) < 1e-11
    assert max_rel_err([t[1] for t in out], [t[1] for t in _reference(args, 0.0)]) > 1e-3


@over_backends(OP)
@pytest.mark.parametrize("batch,m,n,r", [((0,), 5, 7, 3), ((2,), 5, 7, 0), ((2,), 0, 7, 0), ((2,), 0, 0, 2)],
                         ids=str)
def test_empty_shapes(be, batch, m, n, r):
    A, B = torch.randn(*batch, r, n, device=be.device), torch.randn(*batch, m, r, device=be.device)
    p, q = torch.rand(*batch, m, device=be.device) + 0.5, torch.rand(*batch, n, device=be.device) + 0.5
    dA, dB = be.run(OP, A, B, A.clone(), B.clone(), p, q, ridge=RIDGE)
    assert dA.shape == A.shape and dB.shape == B.shape and dA.dtype == dB.dtype == F32


# ---- native CPU: dtypes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", LAYER_SHAPES[:7], ids=LAYER_SHAPE_IDS[:7])
@over_backends(OP, NATIVE_CPU)
def test_bf16(be, shape, monkeypatch):
    # Everything bf16, the results too: within twice the error plain PyTorch makes in bf16.
    p16 = adaprelora_problem(*shape, dtype=torch.bfloat16)
    out = _native(p16)
    assert [t.dtype for t in out] == [torch.bfloat16] * 2
    exact = _reference(p16)
    torch_out = _torch_bf16(p16, monkeypatch)
    for a, t, e in zip(out, torch_out, exact):
        assert rel_err(a, e) <= 2 * rel_err(t, e)
    # bf16 statistics with fp32 factors and gradients: fp32 results at fp32 accuracy on those values.
    mixed = [t.float() for t in adaprelora_problem(*shape)[:4]] + [t.to(torch.bfloat16) for t in adaprelora_problem(*shape)[4:]]
    out = _native(mixed)
    assert [t.dtype for t in out] == [torch.float32] * 2
    assert max_rel_err(out, _reference(mixed)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=str)
@over_backends(OP, NATIVE_CPU)
def test_mixed_and_half_inputs(be, dtype):
    # fp16 inputs accumulate in fp32 and return fp16; an fp64 input makes the arithmetic and results fp64.
    args = adaprelora_problem((3,), 123, 256, 16)
    cast = [args[0].to(dtype)] + [t.float() for t in args[1:]]
    out = _native(cast)
    want = torch.float64 if dtype == torch.float64 else torch.float32
    assert [t.dtype for t in out] == [want] * 2
    assert max_rel_err(out, _reference(cast)) < (1e-11 if dtype == torch.float64 else 1e-5)
    half = _native([t.half() for t in args])
    assert [t.dtype for t in half] == [torch.float16] * 2
    assert max_rel_err(half, _reference([t.half() for t in args])) < 2e-3


# ---- native CPU: layouts, rank deficiency, NaN, threads ----------------------------------------------------


@over_backends(OP, NATIVE_CPU)
def test_non_contiguous_inputs_give_identical_results(be):
    A, B, g_A, g_B, p, q = adaprelora_problem((3,), 123, 256, 16, dtype=torch.float32)
    views = _strided_views(A, B, g_A, g_B, p, q)
    plain = _native([A, B, g_A, g_B, p, q])
    for a, b in zip(_native(views), plain):
        assert torch.equal(a, b)
    # One layer's inputs expanded over the batch (stride 0): every layer's result is that layer's.
    expanded = [t[:1].expand(4, *t.shape[1:]) for t in (A, B, g_A, g_B, p, q)]
    single = _native([t[0] for t in (A, B, g_A, g_B, p, q)])
    for a, b in zip(_native(expanded), single):
        assert torch.equal(a, b.expand_as(a))


@over_backends(OP, NATIVE_CPU)
def test_rank_deficient_B(be):
    # B of rank r − 1 (two equal columns): M_B is singular but for rounding; the relative ridge decides its
    # null direction, the same way in both implementations.
    for dtype in [torch.float64, torch.float32]:
        args = adaprelora_problem((2,), 256, 123, 16)
        B = args[1].clone()
        B[..., 5] = B[..., 2]
        G = torch.randn(2, 256, 123, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        args[1], args[2] = B, B.mT @ G
        args = [t.to(dtype) for t in args]
        out = _native(args, 1e-4)
        assert all(t.isfinite().all() for t in out)
        exact = _reference(args, 1e-4)
        if dtype == torch.float64:
            assert max_rel_err(out, exact) < 1e-9
        else:
            # Conditioning 1e4: fp32 loses about that factor; no worse than the fp32 reference.
            torch_err = max_rel_err(_reference(args, 1e-4, dtype=torch.float32), exact)
            assert max_rel_err(out, exact) <= max(2 * torch_err, 1e-5)


@pytest.mark.parametrize("where", ["A", "g_B", "q"])
@over_backends(OP, NATIVE_CPU)
def test_nan_poisons_its_layer_only(be, where, cpu_path):
    args = adaprelora_problem((3,), 123, 256, 3, dtype=torch.float32)
    k = {"A": 0, "g_B": 3, "q": 5}[where]
    args[k] = args[k].clone()
    args[k][1].view(-1)[7] = float("nan")
    dA, dB = _native(args)
    assert not (dA[1].isfinite().all() and dB[1].isfinite().all())
    for layer in (0, 2):
        assert dA[layer].isfinite().all() and dB[layer].isfinite().all()


@over_backends(OP, NATIVE_CPU)
def test_independent_of_thread_count(be):
    args = adaprelora_problem((3,), 1100, 600, 16, dtype=torch.float32)
    assert_independent_of_thread_count(lambda: _native(args))


# ---- native CPU: input checks, opcheck, compile ------------------------------------------------------------


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
@over_backends(OP, NATIVE_CPU)
def test_native_rejects_bad_input(be, mutate, match):
    A, B, g_A, g_B, p, q = adaprelora_problem((3,), 5, 7, 3, dtype=torch.float32)
    args = dict(A=A, B=B, g_A=g_A, g_B=g_B, p=p, q=q, ridge=torch.tensor(RIDGE, dtype=torch.float64))
    mutate(args)
    with pytest.raises(RuntimeError, match=rf"adaprelora_solve: {match}"):
        torch.ops.lorsum.adaprelora_solve(**args)


def _opcheck_cases():
    rho = torch.tensor(RIDGE, dtype=torch.float64)
    f32 = adaprelora_problem((2,), 5, 7, 3, dtype=torch.float32)
    return [
        tuple(f32) + (rho,),
        tuple(adaprelora_problem((), 9, 5, 2)) + (torch.tensor(0.0),),
        tuple(adaprelora_problem((2, 2), 6, 4, 1, dtype=torch.bfloat16)) + (rho,),
        (f32[0].mT.contiguous().mT, *f32[1:], torch.tensor([1e-3, 1e-2])),
    ]


@pytest.mark.parametrize("case", range(4), ids=["fp32", "fp64-2d", "bf16-4d", "strided-per-layer-ridge"])
@over_backends(OP, NATIVE_CPU)
def test_opcheck(be, case):
    torch.library.opcheck(torch.ops.lorsum.adaprelora_solve.default, _opcheck_cases()[case])


@over_backends(OP, NATIVE_CPU)
def test_fake_tensor_and_compile(be):
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = adaprelora_problem((3,), 5, 7, 3, dtype=torch.bfloat16)
    rho = torch.tensor(RIDGE, dtype=torch.float64)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        dA, dB = torch.ops.lorsum.adaprelora_solve(*[mode.from_tensor(t) for t in args], rho)
    assert dA.shape == (3, 3, 7) and dB.shape == (3, 5, 3) and dA.dtype == dB.dtype == torch.bfloat16

    f32 = [t.float() for t in args]
    compiled = torch.compile(lambda *a: torch.ops.lorsum.adaprelora_solve(*a, rho), backend="eager",
                             fullgraph=True)
    assert max_rel_err(compiled(*f32), _reference(f32)) < 1e-5




# ---- CUDA: bf16, views and the ridge on the device, zero Grams, NaN ----------------------------------------


@pytest.mark.parametrize("shape", _CUDA[:4], ids=_sid)
@over_backends(OP, NATIVE_CUDA)
def test_cuda_bf16(be, shape, monkeypatch):
    # Everything bf16, the results too: within twice the error plain PyTorch makes in bf16 on the device (its
    # r×r factor and solves in fp32, rounded back: torch has no bf16 Cholesky).
    args = adaprelora_problem(*shape, dtype=torch.bfloat16, device=be.device)
    out = _native(args)
    assert [t.dtype for t in out] == [torch.bfloat16] * 2
    torch_bf16 = _torch_bf16(args, monkeypatch)
    exact = _reference(args)
    for a, t, e in zip(out, torch_bf16, exact):
        assert rel_err(a, e) <= 2 * rel_err(t, e)
    # bf16 statistics with fp32 factors and gradients: fp32 results at fp32 accuracy.
    mixed = [t.float() for t in args[:4]] + args[4:]
    out = _native(mixed)
    assert [t.dtype for t in out] == [torch.float32] * 2 and max_rel_err(out, _reference(mixed)) < 1e-5


@over_backends(OP, NATIVE_CUDA)
def test_cuda_views_and_ridges(be):
    A, B, g_A, g_B, p, q = adaprelora_problem((3,), 123, 256, 16, dtype=F32, device=be.device)
    views = [A.mT.contiguous().mT, B.transpose(0, 1).contiguous().transpose(0, 1), g_A.mT.contiguous().mT,
             g_B.mT.contiguous().mT, p.mT.contiguous().mT, torch.stack([q, q], -1)[..., 0]]
    assert not any(v.is_contiguous() for v in views)
    plain = _native([A, B, g_A, g_B, p, q])
    for a, b in zip(_native(views), plain):
        assert torch.equal(a, b)
    # The ridge as a CPU number, a device scalar, or one value per layer on the CPU or the device.
    per_layer = torch.tensor([0.0, 1e-6, 1e-2], dtype=torch.float64)
    args = [A, B, g_A, g_B, p, q]
    assert torch.equal(_native(args, torch.tensor(1e-6, dtype=torch.float64, device=be.device))[0], plain[0])
    for ridge in [per_layer, per_layer.to(be.device)]:
        assert max_rel_err(_native(args, ridge), _reference(args, per_layer)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@over_backends(OP, NATIVE_CUDA)
def test_cuda_zero_grams_fallback_and_nan(be, dtype, monkeypatch):
    A, B, _, g_B, p, q = adaprelora_problem((2,), 123, 5, 3, dtype=dtype, device=be.device)
    tol = 1e-11 if dtype == F64 else 1e-5
    # B = 0 (the standard init): g_A = 0, so dA = 0 exactly and dB is finite and the reference's.
    zero_B = [A, torch.zeros_like(B), torch.zeros_like(A), g_B, p, q]
    dA, dB = _native(zero_B, 0.0)
    assert torch.equal(dA, torch.zeros_like(dA)) and rel_err(dB, _reference(zero_B, 0.0)[1]) < tol
    # A = B = 0 with gradients left over: both Grams zero, factored at the dtype's floored scale with the
    # fallback ridge; huge but finite, and the reference's in the same dtype.
    zero_both = [torch.zeros_like(A), torch.zeros_like(B), torch.full_like(A, 1e-6), g_B, p, q]
    out = _native(zero_both, 0.0)
    assert all(t.isfinite().all() for t in out)
    assert max_rel_err(out, _reference(zero_both, 0.0, dtype=dtype)) < tol
    # A zero column of B with ridge 0: a zero pivot, the fallback ridge on that layer only (the fp64
    # reference given the fallback ridge of the dtype under test).
    monkeypatch.setitem(reference.FALLBACK_RIDGE, torch.float64, reference.FALLBACK_RIDGE[dtype])
    args = adaprelora_problem((2,), 123, 256, 3, dtype=dtype, device=be.device)
    args[1][0, :, 1] = 0
    args[2][0, 1] = 0
    assert max_rel_err(_native(args, 0.0), _reference(args, 0.0)) < tol
    # A NaN poisons its own layer only.
    args = adaprelora_problem((3,), 123, 256, 3, dtype=dtype, device=be.device)
    args[0][1, 2, 7] = float("nan")
    dA, dB = _native(args)
    assert not (dA[1].isfinite().all() and dB[1].isfinite().all())
    assert dA[[0, 2]].isfinite().all() and dB[[0, 2]].isfinite().all()


@over_backends(OP, NATIVE_CUDA)
def test_cuda_opcheck(be):
    # Schema, fake (meta) implementation, autograd registration and AOT dispatch on CUDA tensors.
    A, B, g_A, g_B, p, q = adaprelora_problem((2,), 7, 5, 3, dtype=F32, seed=18, device=be.device)
    rho = torch.tensor(1e-2, dtype=torch.float64, device=be.device)
    torch.library.opcheck(torch.ops.lorsum.adaprelora_solve, (A, B, g_A.mT.contiguous().mT, g_B, p, q, rho))


# ---- Triton: failed factorisations, layouts, dtypes, the ridged solve, input checks, dispatch --------------


@FAILED_PIVOT
@over_backends(OP, TRITON)
def test_nan_where_both_factorisations_fail(be):
    # A negative p (outside the contract) makes M_B negative definite: no ridge rescues it. That layer comes
    # out NaN, as from the native kernels (the reference goes on with LAPACK's partial factor); the
    # other layers are untouched.
    args = adaprelora_problem((3,), 33, 5, 3, dtype=torch.float32, seed=6, device=be.device)
    args[4][1] = -args[4][1]
    dA, dB = _triton(*args)
    assert dA[1].isnan().all() and dB[1].isnan().all()
    exact = _reference(args)
    for layer in (0, 2):
        assert max_rel_err((dA[layer], dB[layer]), (exact[0][layer], exact[1][layer])) < 1e-5


@FAILED_PIVOT
@pytest.mark.parametrize("where", ["A", "B", "g_A", "g_B", "p", "q"])
@over_backends(OP, TRITON)
def test_nan_matches_the_reference_in_its_layer(be, where):
    args = adaprelora_problem((3,), 5, 33, 3, dtype=torch.float32, seed=7, device=be.device)
    k = ["A", "B", "g_A", "g_B", "p", "q"].index(where)
    args[k][1].view(-1)[2] = float("nan")
    dA, dB = _triton(*args)
    expected = reference.adaprelora_solve(*args, ridge=RIDGE)
    assert not (dA[1].isfinite().all() and dB[1].isfinite().all())
    # NaN wherever the reference has one in that layer (the reference's partial factor may leave more
    # finite entries than ours, never fewer).
    assert (dA[1].isnan() | ~expected[0][1].isnan()).all() and (dB[1].isnan() | ~expected[1][1].isnan()).all()
    exact = _reference(args)
    for layer in (0, 2):
        assert max_rel_err((dA[layer], dB[layer]), (exact[0][layer], exact[1][layer])) < 1e-5


@over_backends(OP, TRITON)
def test_non_contiguous_and_expanded_inputs(be):
    A, B, g_A, g_B, p, q = adaprelora_problem((3,), 33, 5, 3, dtype=torch.float32, seed=8, device=be.device)
    views = _strided_views(A, B, g_A, g_B, p, q)
    plain = _triton(A, B, g_A, g_B, p, q)
    for a, b in zip(_triton(*views), plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # One layer's inputs expanded over the batch (stride 0): every layer's result is that layer's, as
    # when the same inputs are materialized. Compared at the same batch shape: a launch over another
    # batch shape may round differently (the interpreter's numpy reductions did on one CPU: 2e-5 relative).
    expanded = [t[:1].expand(2, *t.shape[1:]) for t in (A, B, g_A, g_B, p, q)]
    materialized = _triton(*[t.contiguous() for t in expanded])
    for a, b in zip(_triton(*expanded), materialized):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(a[1], a[0], rtol=0, atol=0)


@over_backends(OP, TRITON)
def test_mixed_and_half_dtypes(be):
    args = adaprelora_problem((2,), 33, 5, 3, seed=9, device=be.device)
    # bf16 statistics with fp32 factors and gradients: fp32 results at fp32 accuracy on those values.
    mixed = [t.float() for t in args[:4]] + [t.bfloat16() for t in args[4:]]
    out = _triton(*mixed)
    assert [t.dtype for t in out] == [torch.float32] * 2 and max_rel_err(out, _reference(mixed)) < 1e-5
    # One fp64 input: fp64 arithmetic and results.
    wide = [args[0]] + [t.float() for t in args[1:]]
    out = _triton(*wide)
    assert [t.dtype for t in out] == [torch.float64] * 2 and max_rel_err(out, _reference(wide)) < 1e-11
    # All bf16: solved in fp32, returned in bf16 (rounding only).
    half = [t.bfloat16() for t in args]
    out = _triton(*half)
    assert [t.dtype for t in out] == [torch.bfloat16] * 2 and max_rel_err(out, _reference(half)) < 1e-2


@over_backends(OP, TRITON)
def test_rank_above_the_register_tile_uses_torch(be, monkeypatch):
    from lorsum_kernels.triton_kernels import spd

    monkeypatch.setattr(spd, "MAX_R", 2)
    args = adaprelora_problem((2,), 5, 33, 3, seed=10, device=be.device)
    ridge = torch.tensor([1e-6, 1e-2], dtype=torch.float64)
    assert max_rel_err(_triton(*args, ridge=ridge), _reference(args, ridge)) < 1e-12


@FAILED_PIVOT
@over_backends(OP, TRITON)
def test_ridged_spd_solve_per_matrix(be):
    from lorsum_kernels.triton_kernels import spd

    g = torch.Generator().manual_seed(11)
    F = torch.randn(3, 3, 9, generator=g, dtype=torch.float64)
    gram = (F @ F.mT).to(be.device)
    gram[0, :, 1] = gram[0, 1, :] = 0  # singular: ridge 0 takes the fallback on this matrix only
    rhs = torch.randn(3, 5, 3, generator=g, dtype=torch.float64).to(be.device)
    ridge = torch.tensor([0.0, 0.0, 0.3], dtype=torch.float64)
    out = spd.ridged_spd_solve(gram, rhs, ridge, left=False)
    chol = reference.ridged_cholesky(gram, ridge.to(be.device))
    torch.testing.assert_close(out, torch.cholesky_solve(rhs.mT, chol).mT, rtol=1e-10, atol=1e-12)
    # A number, and None (the dtype's relative ridge: spd_solve).
    torch.testing.assert_close(spd.ridged_spd_solve(gram[1:], rhs[1:], 0.3, left=False),
                               torch.cholesky_solve(rhs[1:].mT, reference.ridged_cholesky(gram[1:], 0.3)).mT,
                               rtol=1e-10, atol=1e-12)
    assert torch.equal(spd.ridged_spd_solve(gram, rhs, None, left=False), spd.spd_solve(gram, rhs, left=False))
    with pytest.raises(ValueError, match=r"and the ridge \(2,\) do not broadcast"):
        spd.ridged_spd_solve(gram, rhs, ridge[:2], left=False)


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda a: a.update(B=a["B"][..., :2]), ValueError, r"must be \(\.\.\., m, r\) with the same r"),
        (lambda a: a.update(g_A=a["g_A"][..., :-1]), ValueError, r"g_A must end in \(3, 7\)"),
        (lambda a: a.update(g_B=a["g_B"].mT), ValueError, r"g_B must end in \(5, 3\)"),
        (lambda a: a.update(p=a["p"][..., :-1]), ValueError, r"p must end in \(5,\)"),
        (lambda a: a.update(q=a["q"][:2]), ValueError, r"do not broadcast"),
        (lambda a: a.update(ridge=torch.ones(2)), ValueError, r"do not broadcast"),
        (lambda a: a.update(ridge=torch.tensor(1)), TypeError, r"ridge tensor must be floating"),
        (lambda a: a.update(A=a["A"].int()), TypeError, r"A must be one of"),
        (lambda a: a.update(A=a["A"][0, 0]), ValueError, r"A must have at least 2 dimensions"),
    ],
)
@over_backends(OP, TRITON)
def test_triton_rejects_bad_input(be, mutate, error, match):
    A, B, g_A, g_B, p, q = adaprelora_problem((3,), 5, 7, 3, dtype=torch.float32, device=be.device)
    args = {"A": A, "B": B, "g_A": g_A, "g_B": g_B, "p": p, "q": q, "ridge": RIDGE}
    mutate(args)
    with pytest.raises(error, match=rf"adaprelora_solve: .*{match}"):
        _triton(*[args[k] for k in ("A", "B", "g_A", "g_B", "p", "q")], ridge=args["ridge"])


@over_backends(OP, TRITON)
def test_registered_and_dispatched(be, monkeypatch):
    from lorsum_kernels.triton_kernels import adaprelora

    assert OP in backends.TRITON_OPS
    args = adaprelora_problem((2,), 5, 7, 3, dtype=torch.float32, device=be.device)
    ridge = torch.tensor([1e-6, 1e-3])
    real = adaprelora.adaprelora_solve
    calls = spy_on_launcher(monkeypatch, OP, real)
    out = ops.adaprelora_solve(*args, ridge=ridge, backend="triton")
    assert len(calls) == 1 and calls[0][1]["ridge"] is ridge
    for a, b in zip(out, real(*args, ridge=ridge)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("statistics", ["exact", "surrogate"])
@over_backends(OP, TRITON)
def test_optimizer_triton_equals_torch(be, statistics):
    # AdaPreLoRA with both of its ops forced to Triton (the solve and row_col_energies or
    # tangent_energies), three steps with input momentum, against the torch backend.
    import lorsum_kernels as lk

    def train(backend):
        torch.manual_seed(0)
        model = TinyLoRAMLP(d_in=12, d_hidden=20, d_out=5, r=3, alpha=6.0).to(be.device)
        opt = lk.AdaPreLoRA(model, lr=1e-2, backend=backend, statistics=statistics, momentum="input")
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            x = torch.randn(2, 7, 12, generator=g).to(be.device)
            y = torch.randint(0, 5, (2, 7), generator=g).to(be.device)
            loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    tri, ref = train("triton"), train("torch")
    for key in ref:
        assert rel_err(tri[key], ref[key]) < 1e-5, key


# ---- native CPU: AdaPreLoRA, native against torch ----------------------------------------------------------


@over_backends(OP, NATIVE_CPU)
def test_functional_step_native_equals_torch(be):
    from lorsum_kernels.functional import adaprelora_direction, adaprelora_step

    A, B, g_A, g_B, p, q = adaprelora_problem((3,), 123, 256, 16, dtype=torch.float32)
    for kw in [dict(scale=2.0, ridge=RIDGE), dict(scale=torch.tensor([1.0, 0.5, 2.0]), ridge=0.0)]:
        nat = adaprelora_direction(A, B, g_A, g_B, p, q, backend="native", **kw)
        ref = adaprelora_direction(A, B, g_A, g_B, p, q, backend="torch", **kw)
        assert max_rel_err(nat, ref) < 1e-5

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

    assert max_rel_err(run("native"), run("torch")) < 1e-5


@pytest.mark.parametrize(
    "kw",
    [dict(statistics="exact", momentum="input"), dict(statistics="surrogate", momentum=None),
     dict(statistics="exact", momentum="adam", weight_decay=0.01)],
    ids=["exact-input", "surrogate-sgd", "exact-adam-wd"],
)
@over_backends(OP, NATIVE_CPU)
def test_optimizer_native_equals_torch(be, kw, monkeypatch):
    from lorsum_kernels.backends import resolve_backend

    monkeypatch.delenv("LORSUM_BACKEND", raising=False)
    assert resolve_backend("auto", "cpu", "adaprelora_solve") == "native"
    import lorsum_kernels as lk

    def train(backend):
        # backend="native" forces every hot path: the solve, and the exact (row_col_energies) or surrogate
        # (tangent_energies) statistics.
        return train_tiny(lambda model: lk.AdaPreLoRA(model, lr=1e-2, backend=backend, **kw), 6)

    assert_same_training(train(be.name), train("torch"))


@over_backends(OP, NATIVE_CPU)
def test_forced_backend_lacking_an_op_raises_before_hooking(be, monkeypatch):
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
