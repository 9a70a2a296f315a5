"""Triton-backend LoRSum half-steps (lorsum_kernels.triton_kernels.half_steps: torch products, Triton
spd_solve) against reference.lorsum_update_in / lorsum_update_out; the two mirror-image ops share this file
as they share their module.

Compiled on a GPU, or in Triton's interpreter (conftest.py).
"""

from __future__ import annotations

import pytest
import torch

from lorsum_kernels import ops, reference

from ..conftest import rel_err
from .conftest import DEVICE

pytestmark = pytest.mark.triton
SIDES = ["in", "out"]


def _half_steps():
    from lorsum_kernels.triton_kernels import half_steps

    return half_steps


def _problem(L, T, m, n, r, dtype, *, metrics=False, per_layer=False, seed=0):
    """A half-step as PSI-LoRA poses it: anchor (A0, B0), pairs [(X, Sᵀ), (A_m, B_m)]."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(DEVICE)

    batch = (L,) if L else ()
    A0, B0 = randn(*batch, r, n, scale=n**-0.5), randn(*batch, m, r, scale=3 * m**-0.5)
    X, S = randn(*batch, T, n), randn(*batch, T, m, scale=0.1)
    A_m, B_m = randn(*batch, r, n, scale=0.3), randn(*batch, m, r, scale=0.3)
    coeffs, lmbd = [1.0, -0.5, -0.05], 1e-2
    if per_layer:
        coeffs = [1.0, torch.linspace(-0.6, -0.4, L, dtype=dtype, device=DEVICE), -0.05]
        lmbd = torch.linspace(1e-2, 2e-2, L, dtype=dtype, device=DEVICE)
    m_pair = None
    if metrics:
        m_pair = ((torch.rand(*batch, n, generator=g, dtype=torch.float64) + 0.5).to(dtype).to(DEVICE),
                  (torch.rand(*batch, m, generator=g, dtype=torch.float64) + 0.5).to(dtype).to(DEVICE))
    return {"A0": A0, "B0": B0, "pairs": [(X, S.mT), (A_m, B_m)], "coeffs": coeffs, "lmbd": lmbd,
            "metrics": m_pair}


def _args(p, side):
    hat = p["B0"] * 1.1 if side == "in" else p["A0"] * 0.9  # B̂ / Â off the anchor
    return hat, (p["A0"], p["B0"]), p["pairs"], p["coeffs"], p["lmbd"], p["metrics"]


def _double(p):
    def cast(v):
        if isinstance(v, torch.Tensor):
            return v.double()
        if isinstance(v, (list, tuple)):
            return type(v)(cast(x) for x in v)
        return v

    return {k: cast(v) for k, v in p.items()}


SHAPES = [(1, 37, 5, 33, 3), (3, 1, 33, 5, 1), (1, 37, 33, 17, 16), (0, 37, 5, 5, 3)]  # (L, T, m, n, r)


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "L{}_T{}_m{}_n{}_r{}".format(*s))
@pytest.mark.parametrize("metrics", [False, True], ids=["plain", "metrics"])
def test_matches_reference(side, dtype, shape, metrics):
    p = _problem(*shape, dtype, metrics=metrics)
    fn = getattr(_half_steps(), f"lorsum_update_{side}")
    out = fn(*_args(p, side))
    expected = getattr(reference, f"lorsum_update_{side}")(*_args(_double(p), side))
    assert out.dtype == dtype and out.shape == expected.shape and out.device == expected.device
    assert rel_err(out, expected) < (1e-12 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("side", SIDES)
def test_per_layer_coefficients_and_lambda(side):
    p = _problem(3, 37, 33, 5, 3, torch.float64, per_layer=True, seed=1)
    out = getattr(_half_steps(), f"lorsum_update_{side}")(*_args(p, side))
    expected = getattr(reference, f"lorsum_update_{side}")(*_args(p, side))
    assert rel_err(out, expected) < 1e-12


@pytest.mark.parametrize("side", SIDES)
def test_nan_in_data_gives_nan_like_reference(side):
    p = _problem(2, 37, 5, 33, 3, torch.float32, seed=2)
    p["pairs"][0][0][1, 4, 2] = float("nan")  # X of layer 1
    args = _args(p, side)
    out = getattr(_half_steps(), f"lorsum_update_{side}")(*args)
    expected = getattr(reference, f"lorsum_update_{side}")(*args)
    assert torch.equal(out.isnan(), expected.isnan()) and out[1].isnan().any() and not out[0].isnan().any()


@pytest.mark.parametrize("side", SIDES)
def test_dispatch_reaches_the_triton_launcher(side, monkeypatch):
    from lorsum_kernels import triton_kernels

    name = f"lorsum_update_{side}"
    p = _problem(2, 7, 5, 6, 3, torch.float32, seed=3)
    calls = []
    real = getattr(_half_steps(), name)

    def spy(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(triton_kernels, name, spy)
    out = getattr(ops, name)(*_args(p, side), backend="triton")
    assert len(calls) == 1
    torch.testing.assert_close(out, real(*_args(p, side)), rtol=0, atol=0)
