"""kfac_metric_update on every backend against reference.kfac_metric_update.

Contract: one fused K-FAC diagonal-metric step for X (..., T, n), S (..., T, m) and the metric states v_in
(..., n), v_out (..., m) (fp32 or fp64): v ← β·v + (1 − β)·scale·Σ_t x² on each side, and the effective
metrics (v + δ)^p; four contiguous results in the state's dtype on its device, equal to the functional
layer's statistics, EMA and effective_metric; within the reference's rounding (a few ulps of fp32 sums,
scaled by |p|; fp64 throughout agrees to fp64 rounding), whatever the power (integer powers of a negative
base real, others NaN, p = 0 one), the scalars never rounded to fp32, NaN where the reference has it,
non-contiguous inputs read as their copies, the inputs left unmodified. Native: opcheck and the input
checks; Triton: the two-launch token-split path, its input checks and dispatch.
"""

from __future__ import annotations

import math

import pytest
import torch

from lorsum_kernels import ops, reference
from lorsum_kernels.functional import effective_metric, ema, kfac_statistics

from ..problems import (NATIVE_CPU, NATIVE_CUDA, TRITON, activations, assert_layout_independent, cpu64, gen,
                        over_backends, per_backend, rand, randn, rel_err, spy_on_launcher)

OP = "kfac_metric_update"
F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16


def _problem(batch, T, n, m, x_dtype, v_dtype, *, s_scale=1.0, seed=0, device="cpu"):
    X, S = activations(batch, T, n, m, dtype=x_dtype, s_scale=s_scale, seed=seed, device=device)
    g = gen(seed + 100)
    v_in = rand(*X.shape[:-2], n, g=g, dtype=v_dtype, low=0.0, device=device)
    v_out = rand(*S.shape[:-2], m, g=g, dtype=v_dtype, low=0.0, device=device)
    return X, S, v_in, v_out


def _rtol(x_dtype, v_dtype, power):
    # fp32 sums differ from the reference's in the order of additions (a few ulps); the power scales
    # relative errors by |p|. All-fp64 inputs agree to fp64 rounding.
    if x_dtype == v_dtype == torch.float64:
        return 1e-13
    return 4e-6 * max(1.0, abs(power))


def _assert_matches(out, args, rtol):
    """out is kfac_metric_update(*args): the reference's shapes, dtypes and NaNs on its device, contiguous,
    each result within ``rtol`` of it elementwise."""
    ref = reference.kfac_metric_update(*args)
    assert len(out) == 4
    for o, e in zip(out, ref):
        assert o.shape == e.shape and o.dtype == e.dtype and o.device == e.device and o.is_contiguous()
        assert torch.equal(o.isnan(), e.isnan())
        torch.testing.assert_close(o, e, rtol=rtol, atol=0, equal_nan=True)


# (batch, T, n, m), (X dtype, state dtype), damping, power. Native: the layer grid's odd sizes, three data
# dtypes by two state dtypes; CUDA: one odd shape per dtype; Triton: small shapes (T = 1 and T = 0 included).
_NATIVE = [((1,), 37, 123, 5), ((3,), 1, 5, 123), ((1,), 512, 123, 256), ((3,), 37, 256, 256)]
_TRITON = [((), 37, 5, 33), ((2,), 1, 33, 5), ((2, 1), 37, 33, 33), ((2,), 0, 5, 3)]
GRIDS = {
    NATIVE_CPU: [(shape, (xd, vd), 0.1, 0.5) for shape in _NATIVE for xd in (F32, F64, BF16) for vd in (F32, F64)],
    NATIVE_CUDA: [(((3,), 37, 123, 5), (xd, F64 if xd == F64 else F32), 1e-3, -0.5) for xd in (F32, BF16, F64)],
    TRITON: [(shape, dtypes, 1e-3, -0.5) for shape in _TRITON
             for dtypes in [(F32, F32), (F64, F64), (F32, F64), (BF16, F32)]],
}


def _id(v):
    (batch, T, n, m), (xd, vd), damping, power = v
    name = lambda d: str(d).removeprefix("torch.")  # noqa: E731
    return f"b{'x'.join(map(str, batch)) or '0'}_T{T}_n{n}_m{m}-{name(xd)}-state_{name(vd)}-p{power}"


# ---- accuracy and the functional layer: every backend ------------------------------------------------------


@per_backend(OP, "shape,dtypes,damping,power", GRIDS, ids=_id)
def test_matches_reference(be, shape, dtypes, damping, power):
    batch, T, n, m = shape
    X, S, v_in, v_out = _problem(batch, T, n, m, *dtypes, s_scale=0.1, device=be.device)
    args = (X, S, v_in, v_out, 0.95, damping, power, 1.0 / max(T, 1), float(T))
    out = be.run(OP, *args)
    _assert_matches(out, args, _rtol(*dtypes, power))
    all64 = dtypes == (F64, F64)
    for a, b in zip(out, reference.kfac_metric_update(*args)):
        assert a.dtype == dtypes[1] and rel_err(a, b) < (1e-12 if all64 else 2e-6)
    # Against the fp64 reference on the same input values.
    exact = reference.kfac_metric_update(*[cpu64(t) for t in args[:4]], *args[4:])
    for a, e in zip(out, exact):
        assert rel_err(a, e) < (1e-12 if dtypes[1] == F64 and dtypes[0] == F64 else 1e-6)
    # It is the functional layer's K-FAC metric step (statistics, EMA, damping, power) in one op.
    stat_in, stat_out = kfac_statistics(X, S, backend="torch")
    new_in = ema(v_in, stat_in, 0.95)
    assert rel_err(out[0], new_in) < 1e-5
    assert rel_err(out[2], effective_metric(new_in, damping, power)) < 1e-5
    assert rel_err(out[3], effective_metric(ema(v_out, stat_out, 0.95), damping, power)) < 1e-5


@over_backends(OP)
@pytest.mark.parametrize("power", [0.0, 1.0, 0.5, -0.25, -1.0, 2.0, 3.0])
@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_powers(be, power, dtype):
    X, S, v_in, v_out = _problem((2,), 37, 5, 33, dtype, dtype, seed=1, device=be.device)
    args = (X, S, v_in, v_out, 0.9, 1e-2, power, 1 / 37, 37.0)
    _assert_matches(be.run(OP, *args), args, _rtol(dtype, dtype, power))


@over_backends(OP, NATIVE_CPU)
@pytest.mark.parametrize("power", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_special_powers_are_exact(be, power, dtype):
    """p = 0, 1/2 and 1 as torch's pow special-cases them (1, the square root, x), exactly, from the op's own
    new v' and δ in v's dtype: the square root correctly rounded (IEEE's; torch's own vectorised one may be
    an ulp off, within the reference tolerance), not powf, which costs ~10x as much."""
    X, S, v_in, v_out = _problem((2,), 37, 5, 33, dtype, dtype, seed=3, device=be.device)
    new_in, new_out, m_in, m_out = be.run(OP, X, S, v_in, v_out, 0.9, 1e-2, power, 1 / 37, 37.0)
    for new, metric in ((new_in, m_in), (new_out, m_out)):
        x = new + torch.tensor(1e-2, dtype=dtype)
        exact_sqrt = torch.tensor([math.sqrt(v) for v in x.flatten().tolist()], dtype=torch.float64)
        expected = {0.0: torch.ones_like(x), 0.5: exact_sqrt.to(dtype).view_as(x), 1.0: x}[power]
        assert torch.equal(metric, expected)


@over_backends(OP)
@pytest.mark.parametrize("power", [-1.0, 3.0, 0.5, 0.0])
def test_negative_base_follows_pow(be, power):
    # A negative damping makes v + δ negative: pow is real for integer powers (odd ones keep the sign),
    # NaN otherwise, and 1 for p = 0.
    X, S, v_in, v_out = _problem((), 37, 5, 33, F64, F64, seed=2, device=be.device)
    args = (X, S, v_in, v_out, 0.5, -1e6, power, 1.0, 1.0)
    out = be.run(OP, *args)
    assert (out[0] - 1e6 < 0).all()
    _assert_matches(out, args, 1e-13)


@over_backends(OP)
def test_fp64_scalars_are_not_rounded_to_fp32(be):
    # Triton passes Python floats as fp32; 0.1 and 1/3 would then be off by ~1e-8 relative.
    X, S, v_in, v_out = _problem((), 37, 5, 33, F64, F64, seed=4, device=be.device)
    args = (X, S, v_in, v_out, 0.1, 1 / 3, -1 / 3, 1 / 37, 1 / 7)
    _assert_matches(be.run(OP, *args), args, 1e-14)


# ---- layouts, NaN, inputs: every backend -------------------------------------------------------------------


@over_backends(OP)
def test_non_contiguous_inputs(be):
    g = torch.Generator().manual_seed(5)
    X = torch.randn(2, 33, 37, generator=g).to(be.device).mT  # (2, 37, 33), tokens contiguous
    S = torch.randn(2, 37, 10, generator=g).to(be.device)[..., ::2]
    v_in = torch.rand(2, 66, generator=g).to(be.device)[:, ::2]
    v_out = torch.rand(5, 2, generator=g).to(be.device).mT
    args = (X, S, v_in, v_out, 0.9, 1e-3, -0.5, 1 / 37, 37.0)
    out = be.run(OP, *args)
    _assert_matches(out, args, _rtol(F32, F32, -0.5))
    contiguous = be.run(OP, *(t.contiguous() for t in args[:4]), *args[4:])
    for a, b in zip(out, contiguous):
        assert_layout_independent(be, a, b)


@over_backends(OP)
def test_nan_and_non_contiguous_tokens(be):
    X, S = activations(2, 50, 30, 20, dtype=F32, s_scale=0.1, device=be.device)
    v_in, v_out = torch.ones(30, 2, device=be.device).mT, torch.ones(2, 20, device=be.device)  # a transposed state
    S[0, 4, 4] = float("nan")  # a row that the [:, ::2] view keeps
    args = (X[:, ::2], S[:, ::2], v_in, v_out, 0.9, 1e-3, 1.0, 0.04, 25.0)
    out = be.run(OP, *args)
    assert torch.isnan(out[1][0, 4]) and torch.isnan(out[3][0, 4])
    assert torch.isfinite(out[1][1]).all()
    for a, b in zip(out, reference.kfac_metric_update(*args)):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=0, equal_nan=True)


@over_backends(OP)
@pytest.mark.parametrize("power", [-0.5, 0.0])
def test_nan_propagates_like_reference(be, power):
    X, S, v_in, v_out = _problem((2,), 37, 5, 33, F32, F32, seed=7, device=be.device)
    X[1, 4, 2] = float("nan")
    v_out[0, 7] = float("nan")
    args = (X, S, v_in, v_out, 0.9, 1e-3, power, 1 / 37, 37.0)
    out = be.run(OP, *args)
    assert out[0].isnan().sum() == 1 and out[1].isnan().sum() == 1
    _assert_matches(out, args, _rtol(F32, F32, power))


@over_backends(OP)
def test_inputs_are_not_modified(be):
    X, S, v_in, v_out = _problem((), 37, 5, 33, F32, F32, seed=6, device=be.device)
    saved = [t.clone() for t in (X, S, v_in, v_out)]
    be.run(OP, X, S, v_in, v_out, 0.9, 1e-3, -0.5, 1.0, 1.0)
    for a, b in zip((X, S, v_in, v_out), saved):
        assert torch.equal(a, b)


# ---- native CPU: input checks, opcheck ---------------------------------------------------------------------


@over_backends(OP, NATIVE_CPU)
def test_native_rejects_bad_input(be):
    X, S = torch.ones(2, 5, 3), torch.ones(2, 5, 4)
    with pytest.raises(RuntimeError, match=r"kfac_metric_update: v_out must be \(\.\.\., m\)"):
        torch.ops.lorsum.kfac_metric_update(X, S, torch.ones(2, 3), torch.ones(2, 3), 0.9, 0.1, 1.0, 1.0, 1.0)
    with pytest.raises(RuntimeError, match=r"kfac_metric_update: the metric state must be float32 or float64"):
        torch.ops.lorsum.kfac_metric_update(X, S, torch.ones(2, 3).bfloat16(), torch.ones(2, 4), 0.9, 0.1, 1.0,
                                            1.0, 1.0)


@over_backends(OP, NATIVE_CPU)
@pytest.mark.parametrize(
    "make",
    [
        lambda: (*activations(2, 9, 5, 7, dtype=F32, s_scale=0.1), torch.rand(2, 5), torch.rand(2, 7), 0.9, 0.1,
                 0.5, 0.1, 9.0),
        lambda: (*activations(1, 9, 5, 7, dtype=BF16, s_scale=0.1), torch.rand(1, 5).double(),
                 torch.rand(1, 7).double(), 0.9, 0.0, 1.0, 1.0, 1.0),
    ],
    ids=["fp32", "bf16-state64"],
)
def test_opcheck(be, make):
    torch.library.opcheck(torch.ops.lorsum.kfac_metric_update.default, make())


# ---- CUDA: opcheck -----------------------------------------------------------------------------------------


@over_backends(OP, NATIVE_CUDA)
def test_cuda_opcheck(be):
    # Schema, fake (meta) implementation, autograd registration and AOT dispatch on CUDA tensors.
    X, S, v_in, v_out = _problem((2,), 37, 5, 7, F32, F32, seed=18, device=be.device)
    torch.library.opcheck(torch.ops.lorsum.kfac_metric_update,
                          (X, S, v_in + 0.5, v_out + 0.5, 0.9, 1e-3, -0.5, 1.0, 1.0))


# ---- Triton: the token-split path, input checks, dispatch --------------------------------------------------


def _kfac():
    from lorsum_kernels.triton_kernels import kfac

    return kfac


@over_backends(OP, TRITON)
@pytest.mark.parametrize("splits", [2, 3])
@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_token_splits_match_reference(be, splits, dtype):
    # The two-launch path the GPU takes for few, tall inputs: partial sums, then the fused epilogue.
    X, S, v_in, v_out = _problem((2,), 300, 33, 5, dtype, dtype, seed=3, device=be.device)
    args = (X, S, v_in, v_out, 0.9, 1e-3, -0.5, 1 / 300, 300.0)
    _assert_matches(_kfac()._kfac_metric_update(*args, t_splits=splits), args, _rtol(dtype, dtype, -0.5))


@over_backends(OP, TRITON)
def test_triton_rejects_mismatched_shapes_and_dtypes(be):
    X, S, v_in, v_out = _problem((2,), 7, 5, 3, F32, F32, device=be.device)
    kfac = _kfac()
    with pytest.raises(ValueError, match=r"v_in must be \(\.\.\., n\) = \(2, 5\)"):
        kfac.kfac_metric_update(X, S, v_in[0], v_out, 0.9, 1e-3, -0.5, 1.0, 1.0)
    with pytest.raises(ValueError, match=r"same batch shape and T"):
        kfac.kfac_metric_update(X, S[:, :3], v_in, v_out, 0.9, 1e-3, -0.5, 1.0, 1.0)
    with pytest.raises(TypeError, match=r"v_out must be one of float32, float64"):
        kfac.kfac_metric_update(X, S, v_in, v_out.bfloat16(), 0.9, 1e-3, -0.5, 1.0, 1.0)


@over_backends(OP, TRITON)
def test_dispatch_reaches_the_triton_launcher(be, monkeypatch):
    X, S, v_in, v_out = _problem((2,), 7, 5, 3, F32, F32, device=be.device)
    real = _kfac().kfac_metric_update
    calls = spy_on_launcher(monkeypatch, OP, real)
    out = ops.kfac_metric_update(X, S, v_in, v_out, 0.9, 1e-3, -0.5, 1.0, 2.0, backend="triton")
    assert len(calls) == 1
    for a, b in zip(out, real(X, S, v_in, v_out, 0.9, 1e-3, -0.5, 1.0, 2.0)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---- β as a device tensor (ScaledLoRSum's β2 warm-up on a GPU) ------------------------------------------


@over_backends(OP, TRITON)
@pytest.mark.parametrize("splits", [1, 2])
@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
@pytest.mark.parametrize("per_layer", [True, False], ids=["per-layer", "one"])
def test_a_tensor_beta_is_read_per_batch_element(be, dtype, splits, per_layer):
    """β from a tensor of the state's dtype, one per batch element or one for all: the reference's EMA with
    β broadcast along the rows, in both the fused and the token-split launches."""
    X, S, v_in, v_out = _problem((3,), 37, 33, 5, dtype, dtype, seed=5, device=be.device)
    beta = torch.tensor([0.0, 0.5, 0.999] if per_layer else [0.9], dtype=dtype, device=be.device)
    scalars = (1e-3, -0.5, 1 / 37, 37.0)
    out = _kfac()._kfac_metric_update(X, S, v_in, v_out, beta, *scalars, t_splits=splits)
    rows = beta.view(-1, 1) if per_layer else beta.reshape(())
    _assert_matches(out, (X, S, v_in, v_out, rows, *scalars), _rtol(dtype, dtype, -0.5))


@over_backends(OP, TRITON)
def test_a_tensor_beta_rejects_a_wrong_size_or_dtype(be):
    X, S, v_in, v_out = _problem((3,), 7, 5, 3, F32, F32, device=be.device)
    kfac = _kfac()
    with pytest.raises(ValueError, match=r"one value, or one per batch element \(3\), got \(2,\)"):
        kfac.kfac_metric_update(X, S, v_in, v_out, torch.full((2,), 0.9), 1e-3, -0.5, 1.0, 1.0)
    with pytest.raises(TypeError, match=r"a tensor beta must have v's dtype \(torch.float32\)"):
        kfac.kfac_metric_update(X, S, v_in, v_out, torch.full((3,), 0.9, dtype=F64), 1e-3, -0.5, 1.0, 1.0)


def test_where_a_tensor_beta_runs_fused(monkeypatch):
    """``kfac_metric_on_triton``: never on the CPU under auto (nor under a forced native or torch); where
    the op would run natively on a GPU, on Triton if it runs there; under a forced triton wherever that
    runs. Elsewhere ops.kfac_metric_update with a tensor β is the reference, β broadcast along the rows."""
    from lorsum_kernels import backends

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert not ops.kfac_metric_on_triton("auto", cpu) and not ops.kfac_metric_on_triton("torch", cpu)
    monkeypatch.setattr(backends, "resolve_backend", lambda backend, device, op: (
        "native" if backend in (None, "auto", "native") else backend))
    assert ops.kfac_metric_on_triton("auto", gpu) == backends.triton_available()
    assert not ops.kfac_metric_on_triton("native", gpu) and not ops.kfac_metric_on_triton("torch", gpu)
    monkeypatch.setenv("LORSUM_BACKEND", "native")
    assert not ops.kfac_metric_on_triton(None, gpu)
    monkeypatch.undo()
    X, S, v_in, v_out = _problem((3,), 7, 5, 3, F32, F32)
    beta = torch.tensor([0.1, 0.5, 0.9])
    out = ops.kfac_metric_update(X, S, v_in, v_out, beta, 1e-3, -0.5, 1.0, 1.0)
    expected = reference.kfac_metric_update(X, S, v_in, v_out, beta.view(-1, 1), 1e-3, -0.5, 1.0, 1.0)
    for a, b in zip(out, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@over_backends(OP, TRITON)
@pytest.mark.parametrize("momentum", [False, True])
def test_scaled_psi_step_with_a_per_layer_beta2_takes_the_fused_metric_step(be, momentum, monkeypatch):
    """scaled_psi_lora_step in the β2 warm-up (β2 one per layer, not read on the host) on a backend that
    runs the fused op with a tensor β: one metric step call, the same step as the composite's (torch)."""
    from lorsum_kernels.functional.lorsum_step import scaled_psi_lora_step

    g = gen(7)
    L, T, n, m, r = 3, 37, 33, 5, 3
    X, S = activations((L,), T, n, m, dtype=F32, seed=7, device=be.device)
    A, B = randn(L, r, n, g=g).to(be.device, F32), (0.1 * randn(L, m, r, g=g)).to(be.device, F32)
    state = (rand(L, n, g=g, low=0.0).to(be.device, F32), rand(L, m, g=g, low=0.0).to(be.device, F32))
    buffer = None
    if momentum:
        buffer = (randn(L, r, n, g=g).to(be.device, F32), randn(L, m, r, g=g).to(be.device, F32))
    beta2 = torch.tensor([[0.5], [0.75], [0.999]], device=be.device)
    monkeypatch.setattr(ops, "kfac_metric_on_triton", lambda backend, device: backend == be.name)
    calls = spy_on_launcher(monkeypatch, OP, _kfac().kfac_metric_update)
    kw = dict(lr=0.05, lmbd=1e-2, min_lmbd=1e-5, iters=1, betas=(0.9 if momentum else 0.0, beta2),
              damping=1e-3, metric="kfac", metric_power=0.5, loss_reduction="mean")
    ours = scaled_psi_lora_step(A, B, X, S, state, buffer, backend=be.name, **kw)
    assert len(calls) == 1 and isinstance(calls[0][0][4], torch.Tensor)
    theirs = scaled_psi_lora_step(A, B, X, S, state, buffer, backend="torch", **kw)
    for a, b in zip([*ours[:2], *ours[2]], [*theirs[:2], *theirs[2]]):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6)
