"""kfac_lorsum_update_in (ScaledLoRSum's first A-step with the K-FAC metric step folded in) against
reference.kfac_lorsum_update_in.

Contract: for the half-step arguments of lorsum_update_in (with no metrics) and the metric state v_in
(..., n), v_out (..., m): kfac_metric_update of the first pair (X, Sᵀ) with (β2, δ, p, scale_in, scale_out),
then lorsum_update_in in the new effective metrics. Returns (Â, v_in, v_out, M_in, M_out): Â in A0's dtype,
the state and metrics in the state's dtype, shaped as the state. Within the reference's rounding (fp32
statistics summed in another order: within 1e-5 of the fp64 reference on the same values; fp64 throughout to
fp64 rounding); bf16 token data read as they are; no tokens give zero statistics; a NaN in one layer's X or
S poisons that layer only; deterministic and independent of the thread count. The native CPU kernel sums the
statistics in the A-step's own passes (AVX-512, fp32 state) or runs the two ops in turn (fp64, the generic
path); every other backend runs the two ops in turn (ops.kfac_lorsum_update_in). Native: both CPU code paths,
the input checks, opcheck, FakeTensor; torch: the reference itself; CUDA and Triton: the two ops there.
"""

from __future__ import annotations

import pytest
import torch

from lorsum_kernels import ops, reference

from ..problems import (NATIVE_CPU, NATIVE_CUDA, TRITON, assert_deterministic, assert_independent_of_thread_count, cast_problem, cpu64,
                        gen, lorsum_problem, over_backends, rand, rel_err)

OP = "kfac_lorsum_update_in"
F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16
# (L, T, m, n, r): odd sizes on both sides of the kernels' 16-, 48- and 64-column blocks, one and several
# layers, one token, T past one 64-row block of the S pass (T = 512), r past one vector of 16.
SHAPES = [(1, 37, 5, 123, 3), (3, 37, 123, 5, 1), (1, 512, 123, 256, 16), (3, 1, 256, 123, 3),
          (2, 70, 67, 129, 16), (1, 45, 300, 290, 20)]  # the last: row_dots' broadcast form over two spans
SHAPE_IDS = [f"L{L}_T{T}_m{m}_n{n}_r{r}" for L, T, m, n, r in SHAPES]
KFAC = (0.95, 1e-3, -0.5)  # β2, δ, p: an inverse square root, as ScaledLoRSum's default power


def _problem(shape, dtype, *, big_dtype=None, state_dtype=F32, per_layer=False, seed=0):
    L, T, m, n, r = shape
    p = cast_problem(lorsum_problem(L, T, m, n, r, per_layer=per_layer, seed=seed), dtype, big_dtype=big_dtype)
    g = gen(seed + 7)
    p["v_in"] = rand(L, n, g=g, dtype=state_dtype, low=0.0)
    p["v_out"] = rand(L, m, g=g, dtype=state_dtype, low=0.0)
    p["kfac"] = (*KFAC, 1.0 / max(T, 1), float(T))
    return p


def _run(p, backend):
    return ops.kfac_lorsum_update_in(p["B0"], (p["A0"], p["B0"]), p["pairs"], p["coeffs"], p["lmbd"], p["v_in"],
                                     p["v_out"], *p["kfac"], backend=backend)


def _reference(p):
    return reference.kfac_lorsum_update_in(p["B0"], (p["A0"], p["B0"]), p["pairs"], p["coeffs"], p["lmbd"], p["v_in"],
                                           p["v_out"], *p["kfac"])


def _exact(p):
    """The fp64 reference on the same values."""
    q = cast_problem(p, F64)
    q.update(v_in=cpu64(p["v_in"]), v_out=cpu64(p["v_out"]))
    return _reference(q)


def _assert_results(out, p, tol):
    A0, v_in, v_out = p["A0"], p["v_in"], p["v_out"]
    assert len(out) == 5
    assert out[0].shape == A0.shape and out[0].dtype == A0.dtype
    for o, v in zip(out[1:], (v_in, v_out, v_in, v_out)):
        assert o.shape == v.shape and o.dtype == v.dtype and o.is_contiguous()
    for o, e in zip(out, _exact(p)):
        assert rel_err(o, e) < tol


# ---- native CPU: accuracy ----------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [F32, BF16], ids=["fp32_data", "bf16_data"])
@pytest.mark.parametrize("state", [F32, F64], ids=["fp32_state", "fp64_state"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@over_backends(OP, NATIVE_CPU)
def test_native_matches_reference(be, shape, state, data, cpu_path):
    p = _problem(shape, F32, big_dtype=data, state_dtype=state, per_layer=True)
    out = _run(p, "native")
    _assert_results(out, p, 1e-5)
    # The reference on the same inputs (its statistics summed in another order), and the two ops in turn.
    for o, e in zip(out, _reference(p)):
        assert rel_err(o, e) < 1e-5
    X, S_t = p["pairs"][0]
    metric = ops.kfac_metric_update(X, S_t.mT, p["v_in"], p["v_out"], *p["kfac"], backend="native")
    A = ops.lorsum_update_in(p["B0"], (p["A0"], p["B0"]), p["pairs"], p["coeffs"], p["lmbd"], metric[2:],
                             backend="native")
    for o, e in zip(out, (A, *metric)):
        assert rel_err(o, e) < 1e-5


@pytest.mark.parametrize("shape", SHAPES[:3], ids=SHAPE_IDS[:3])
@over_backends(OP, NATIVE_CPU)
def test_native_fp64(be, shape):
    p = _problem(shape, F64, state_dtype=F64)
    for o, e in zip(_run(p, "native"), _reference(p)):
        assert o.dtype == F64 and rel_err(o, e) < 1e-11


@over_backends(OP, NATIVE_CPU)
def test_native_is_the_first_scaled_a_step_for_any_reduction_and_power(be):
    # The sum-reduced loss's scales (1/T on both sides) and powers other than -1/2 reach the metric as given.
    p = _problem((2, 70, 67, 129, 16), F32)
    for beta, damping, power, scale_out in [(0.0, 1e-5, -0.5, 1 / 70), (0.999, 0.1, 1.0, 70.0), (0.5, 1e-2, -1.0, 1.0)]:
        p["kfac"] = (beta, damping, power, 1 / 70, scale_out)
        _assert_results(_run(p, "native"), p, 1e-5)


@over_backends(OP, NATIVE_CPU)
def test_native_zero_tokens_and_no_pairs(be, cpu_path):
    # No tokens: zero statistics (v decays by β2), and the A-step sees the anchor term alone.
    p = _problem((2, 0, 7, 9, 2), F32)
    out = _run(p, "native")
    torch.testing.assert_close(out[1], p["v_in"] * KFAC[0], rtol=1e-6, atol=0)
    _assert_results(out, p, 1e-5)
    p["pairs"], p["coeffs"] = [], [1.0]
    with pytest.raises(RuntimeError, match="kfac_lorsum_update_in: needs the gradient pair"):
        _run(p, "native")
    with pytest.raises(ValueError, match="kfac_lorsum_update_in needs the gradient pair"):
        _run(p, "torch")


@pytest.mark.parametrize("where", ["X", "S"])
@over_backends(OP, NATIVE_CPU)
def test_native_nan_poisons_its_layer_only(be, where, cpu_path):
    p = _problem((3, 37, 23, 41, 3), F32)
    X, S_t = p["pairs"][0]
    (X if where == "X" else S_t)[1, 5, 3] = float("nan")
    out = _run(p, "native")
    assert out[0][1].isnan().any() and out[1 if where == "X" else 2][1].isnan().any()
    for o, e in zip(out, _reference(p)):
        assert torch.equal(o.isnan(), e.isnan())
        assert o[0].isfinite().all() and o[2].isfinite().all()


@over_backends(OP, NATIVE_CPU)
def test_native_deterministic_and_independent_of_thread_count(be):
    p = _problem((2, 700, 67, 129, 16), F32)
    assert_deterministic(lambda: _run(p, "native"))
    assert_independent_of_thread_count(lambda: _run(p, "native"))


@over_backends(OP, NATIVE_CPU)
def test_native_views(be):
    # A sliced X (row stride past n) and S read through a transposed view: the same numbers as contiguous copies.
    p = _problem((2, 37, 23, 41, 3), F32)
    X, S_t = p["pairs"][0]
    wide = torch.randn(2, 37, 50)
    wide[..., :41] = X
    p_view = dict(p, pairs=[(wide[..., :41], S_t), *p["pairs"][1:]])
    p_copy = dict(p, pairs=[(X.contiguous(), S_t.contiguous()), *p["pairs"][1:]])
    for a, b in zip(_run(p_view, "native"), _run(p_copy, "native")):
        assert torch.equal(a, b)


# ---- native CPU: input checks, opcheck, fake tensors ---------------------------------------------------------


def _native_args(p):
    return dict(B_hat=p["B0"], A0=p["A0"], B0=p["B0"], f_in=[q[0] for q in p["pairs"]],
                f_out=[q[1] for q in p["pairs"]], coeffs=torch.tensor(p["coeffs"], dtype=torch.float64),
                lmbd=torch.tensor(1e-2, dtype=torch.float64), v_in=p["v_in"], v_out=p["v_out"], beta=KFAC[0],
                damping=KFAC[1], power=KFAC[2], scale_in=p["kfac"][3], scale_out=p["kfac"][4])


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: a.update(v_in=a["v_in"][:, :-1]), r"v_in must be \(\.\.\., n\)"),
        (lambda a: a.update(v_out=a["v_out"][:2]), r"v_out must be \(\.\.\., m\)"),
        (lambda a: a.update(v_in=a["v_in"].bfloat16()), r"the metric state must be float32 or float64"),
        (lambda a: a.update(v_out=a["v_out"].int()), r"v_out must be float32, float64, bfloat16 or float16"),
        (lambda a: a.update(B0=a["B0"][..., :2]), r"A0 .* and B0 .*: their ranks r differ"),
        (lambda a: a.update(f_in=a["f_in"][:1]), r"got 1 f_in factors but 2 f_out factors"),
    ],
)
@over_backends(OP, NATIVE_CPU)
def test_native_rejects_bad_input(be, mutate, match):
    args = _native_args(_problem((3, 37, 23, 5, 3), F32))
    mutate(args)
    with pytest.raises(RuntimeError, match=rf"kfac_lorsum_update_in: {match}"):
        torch.ops.lorsum.kfac_lorsum_update_in(**args)


@pytest.mark.parametrize("state", [F32, F64], ids=["fp32_state", "fp64_state"])
@over_backends(OP, NATIVE_CPU)
def test_native_opcheck(be, state):
    p = _problem((2, 9, 7, 5, 3), F32, state_dtype=state)
    torch.library.opcheck(torch.ops.lorsum.kfac_lorsum_update_in.default, (), _native_args(p))


@over_backends(OP, NATIVE_CPU)
def test_native_fake_tensor(be):
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = _native_args(_problem((2, 9, 7, 5, 3), F32))
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = {k: (mode.from_tensor(v) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
        out = torch.ops.lorsum.kfac_lorsum_update_in(**fake)
    assert [tuple(o.shape) for o in out] == [(2, 3, 5), (2, 5), (2, 7), (2, 5), (2, 7)]


# ---- every backend: the two ops in turn ----------------------------------------------------------------------


def test_torch_backend_is_the_reference():
    p = _problem((2, 37, 23, 41, 3), F64, state_dtype=F64)
    for a, b in zip(_run(p, "torch"), _reference(p)):
        assert torch.equal(a, b)


@over_backends("lorsum_update_in", TRITON)
def test_triton_runs_the_two_ops_in_turn(be):
    # No fused Triton kernel: the metric op and the half-step, each on Triton, and the reference's numbers.
    p = _problem((2, 37, 23, 41, 3), F32)
    p = {k: (v.to(be.device) if isinstance(v, torch.Tensor) else v) for k, v in p.items()}
    p["pairs"] = [tuple(t.to(be.device) for t in pair) for pair in p["pairs"]]
    out = _run(p, "triton")
    for o, e in zip(out, _reference(p)):
        assert o.device == be.device and rel_err(o, e) < 1e-5


@over_backends("lorsum_update_in", NATIVE_CUDA)
def test_cuda_runs_the_two_native_ops_in_turn(be):
    # No fused CUDA kernel: kfac_metric_update and lorsum_update_in, each the CUDA kernel, in turn.
    p_cpu = _problem((2, 37, 23, 41, 3), F32, big_dtype=BF16)
    exact = _exact(p_cpu)
    p = {k: (v.to(be.device) if isinstance(v, torch.Tensor) else v) for k, v in p_cpu.items()}
    p["pairs"] = [tuple(t.to(be.device) for t in pair) for pair in p_cpu["pairs"]]
    out = _run(p, "native")
    for o, e in zip(out, exact):
        assert o.device == be.device and rel_err(o.cpu(), e) < 1e-5


@pytest.mark.parametrize("state", [F32, F64], ids=["fp32_state", "fp64_state"])
@pytest.mark.parametrize("iters", [0, 1, 3])
@over_backends("lorsum_update_in")
def test_rounds_are_the_fused_step_then_the_half_steps(be, iters, state):
    # ops.kfac_lorsum_rounds (ScaledLoRSum's layer step) builds the native ops' arguments once: the same calls,
    # bit for bit, as kfac_lorsum_update_in and then lorsum_rounds from its result in its metrics (cast to the
    # factors' dtype), with per-layer coefficients and bf16 token data.
    p_cpu = _problem((3, 37, 23, 41, 5), F32, big_dtype=BF16, state_dtype=state, per_layer=True)
    p = {k: be.to(v) if isinstance(v, torch.Tensor) else v for k, v in p_cpu.items()}
    p["pairs"] = [(be.to(a), be.to(b)) for a, b in p["pairs"]]
    p["coeffs"] = [be.to(c) if isinstance(c, torch.Tensor) else c for c in p["coeffs"]]
    anchor = (p["A0"], p["B0"])
    A_first, v_in, v_out, m_in, m_out = _run(p, be.name)
    metrics = (m_in.to(F32), m_out.to(F32))
    expected = (*ops.lorsum_rounds(anchor, p["pairs"], p["coeffs"], p["lmbd"], iters, metrics, backend=be.name,
                                   first_A=A_first), v_in, v_out)
    out = ops.kfac_lorsum_rounds(anchor, p["pairs"], p["coeffs"], p["lmbd"], iters, p["v_in"], p["v_out"],
                                 *p["kfac"], backend=be.name)
    assert len(out) == 4 and all(torch.equal(a, b) for a, b in zip(out, expected))
    exact = _exact(p_cpu)  # and the first A-step is the fused op's (for iters = 0, the Jacobi round's A)
    assert rel_err((out[0] if iters == 0 else A_first).cpu(), exact[0]) < 1e-5
