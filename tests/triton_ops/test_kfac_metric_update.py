"""Triton kfac_metric_update (lorsum_kernels.triton_kernels.kfac) against reference.kfac_metric_update.

Compiled on a GPU, or in Triton's interpreter (conftest.py).
"""

from __future__ import annotations

import pytest
import torch

from lorsum_kernels import ops, reference

from .conftest import DEVICE

pytestmark = pytest.mark.triton


def _kfac():
    from lorsum_kernels.triton_kernels import kfac

    return kfac


def _problem(batch, T, n, m, x_dtype, v_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(batch + (T, n), generator=g, dtype=torch.float64).to(x_dtype).to(DEVICE)
    S = torch.randn(batch + (T, m), generator=g, dtype=torch.float64).to(x_dtype).to(DEVICE)
    v_in = torch.rand(batch + (n,), generator=g, dtype=torch.float64).to(v_dtype).to(DEVICE)
    v_out = torch.rand(batch + (m,), generator=g, dtype=torch.float64).to(v_dtype).to(DEVICE)
    return X, S, v_in, v_out


def _rtol(x_dtype, v_dtype, power):
    # fp32 sums differ from the reference's in the order of additions (a few ulps); the power scales
    # relative errors by |p|. All-fp64 inputs agree to fp64 rounding.
    if x_dtype == v_dtype == torch.float64:
        return 1e-13
    return 4e-6 * max(1.0, abs(power))


def _assert_matches(out, ref, rtol):
    assert len(out) == 4
    for o, e in zip(out, ref):
        assert o.shape == e.shape and o.dtype == e.dtype and o.device == e.device and o.is_contiguous()
        assert torch.equal(o.isnan(), e.isnan())
        torch.testing.assert_close(o, e, rtol=rtol, atol=0, equal_nan=True)


@pytest.mark.parametrize("x_dtype,v_dtype", [(torch.float32, torch.float32), (torch.float64, torch.float64),
                                             (torch.float32, torch.float64), (torch.bfloat16, torch.float32)],
                         ids=["fp32", "fp64", "fp32-state64", "bf16-state32"])
@pytest.mark.parametrize(
    "batch,T,n,m",
    [((), 37, 5, 33), ((2,), 1, 33, 5), ((2, 1), 37, 33, 33), ((2,), 0, 5, 3)],
    ids=["T37", "T1", "batch2d", "T0"],
)
def test_matches_reference(batch, T, n, m, x_dtype, v_dtype):
    X, S, v_in, v_out = _problem(batch, T, n, m, x_dtype, v_dtype)
    args = (X, S, v_in, v_out, 0.95, 1e-3, -0.5, 1 / max(T, 1), float(T))
    _assert_matches(_kfac().kfac_metric_update(*args), reference.kfac_metric_update(*args),
                    _rtol(x_dtype, v_dtype, -0.5))


@pytest.mark.parametrize("power", [0.0, 1.0, 0.5, -0.25, -1.0, 2.0, 3.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_powers(power, dtype):
    X, S, v_in, v_out = _problem((2,), 37, 5, 33, dtype, dtype, seed=1)
    args = (X, S, v_in, v_out, 0.9, 1e-2, power, 1 / 37, 37.0)
    _assert_matches(_kfac().kfac_metric_update(*args), reference.kfac_metric_update(*args),
                    _rtol(dtype, dtype, power))


@pytest.mark.parametrize("power", [-1.0, 3.0, 0.5, 0.0])
def test_negative_base_follows_pow(power):
    # A negative damping makes v + δ negative: pow is real for integer powers (odd ones keep the sign),
    # NaN otherwise, and 1 for p = 0.
    X, S, v_in, v_out = _problem((), 37, 5, 33, torch.float64, torch.float64, seed=2)
    args = (X, S, v_in, v_out, 0.5, -1e6, power, 1.0, 1.0)
    out, ref = _kfac().kfac_metric_update(*args), reference.kfac_metric_update(*args)
    assert (out[0] - 1e6 < 0).all()
    _assert_matches(out, ref, 1e-13)


@pytest.mark.parametrize("splits", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_token_splits_match_reference(splits, dtype):
    # The two-launch path the GPU takes for few, tall inputs: partial sums, then the fused epilogue.
    X, S, v_in, v_out = _problem((2,), 300, 33, 5, dtype, dtype, seed=3)
    args = (X, S, v_in, v_out, 0.9, 1e-3, -0.5, 1 / 300, 300.0)
    _assert_matches(_kfac()._kfac_metric_update(*args, t_splits=splits), reference.kfac_metric_update(*args),
                    _rtol(dtype, dtype, -0.5))


def test_fp64_scalars_are_not_rounded_to_fp32():
    # Triton passes Python floats as fp32; 0.1 and 1/3 would then be off by ~1e-8 relative.
    X, S, v_in, v_out = _problem((), 37, 5, 33, torch.float64, torch.float64, seed=4)
    args = (X, S, v_in, v_out, 0.1, 1 / 3, -1 / 3, 1 / 37, 1 / 7)
    _assert_matches(_kfac().kfac_metric_update(*args), reference.kfac_metric_update(*args), 1e-14)


def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(5)
    X = torch.randn(2, 33, 37, generator=g).to(DEVICE).mT  # (2, 37, 33), tokens contiguous
    S = torch.randn(2, 37, 10, generator=g).to(DEVICE)[..., ::2]
    v_in = torch.rand(2, 66, generator=g).to(DEVICE)[:, ::2]
    v_out = torch.rand(5, 2, generator=g).to(DEVICE).mT
    args = (X, S, v_in, v_out, 0.9, 1e-3, -0.5, 1 / 37, 37.0)
    out = _kfac().kfac_metric_update(*args)
    _assert_matches(out, reference.kfac_metric_update(*args), _rtol(torch.float32, torch.float32, -0.5))
    contiguous = _kfac().kfac_metric_update(*(t.contiguous() for t in args[:4]), *args[4:])
    for a, b in zip(out, contiguous):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_inputs_are_not_modified():
    X, S, v_in, v_out = _problem((), 37, 5, 33, torch.float32, torch.float32, seed=6)
    saved = [t.clone() for t in (X, S, v_in, v_out)]
    _kfac().kfac_metric_update(X, S, v_in, v_out, 0.9, 1e-3, -0.5, 1.0, 1.0)
    for a, b in zip((X, S, v_in, v_out), saved):
        assert torch.equal(a, b)


@pytest.mark.parametrize("power", [-0.5, 0.0])
def test_nan_propagates_like_reference(power):
    X, S, v_in, v_out = _problem((2,), 37, 5, 33, torch.float32, torch.float32, seed=7)
    X[1, 4, 2] = float("nan")
    v_out[0, 7] = float("nan")
    args = (X, S, v_in, v_out, 0.9, 1e-3, power, 1 / 37, 37.0)
    out, ref = _kfac().kfac_metric_update(*args), reference.kfac_metric_update(*args)
    assert out[0].isnan().sum() == 1 and out[1].isnan().sum() == 1
    _assert_matches(out, ref, _rtol(torch.float32, torch.float32, power))


def test_rejects_mismatched_shapes_and_dtypes():
    X, S, v_in, v_out = _problem((2,), 7, 5, 3, torch.float32, torch.float32)
    kfac = _kfac()
    with pytest.raises(ValueError, match=r"v_in must be \(\.\.\., n\) = \(2, 5\)"):
        kfac.kfac_metric_update(X, S, v_in[0], v_out, 0.9, 1e-3, -0.5, 1.0, 1.0)
    with pytest.raises(ValueError, match=r"same batch shape and T"):
        kfac.kfac_metric_update(X, S[:, :3], v_in, v_out, 0.9, 1e-3, -0.5, 1.0, 1.0)
    with pytest.raises(TypeError, match=r"v_out must be one of float32, float64"):
        kfac.kfac_metric_update(X, S, v_in, v_out.bfloat16(), 0.9, 1e-3, -0.5, 1.0, 1.0)


def test_dispatch_reaches_the_triton_launcher(monkeypatch):
    from lorsum_kernels import triton_kernels

    X, S, v_in, v_out = _problem((2,), 7, 5, 3, torch.float32, torch.float32)
    calls = []
    real = _kfac().kfac_metric_update

    def spy(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(triton_kernels, "kfac_metric_update", spy)
    out = ops.kfac_metric_update(X, S, v_in, v_out, 0.9, 1e-3, -0.5, 1.0, 2.0, backend="triton")
    assert len(calls) == 1
    for a, b in zip(out, real(X, S, v_in, v_out, 0.9, 1e-3, -0.5, 1.0, 2.0)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
