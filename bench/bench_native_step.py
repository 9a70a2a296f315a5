"""A whole PSI-LoRA / Scaled PSI-LoRA optimizer step for a group of L same-shape layers: native CPU kernels
against the torch reference and against torch.compile of the reference.

The step is the functional one the optimizers run for a bucket of layers (functional.psi_lora_step:
weight LoRSum over [(A,B), (X,Sᵀ), (A_m,B_m)] and the momentum buffer's LoRSum, k = 1; and
functional.scaled_psi_lora_step with the diagonal K-FAC metric). X and S are cast to fp32 by the
functional layer, for every backend; "psi_lora_uncast" is the same step with bf16 X and S handed to the
native ops as they are. Rows go to bench/results/native_step.csv.

    .venv/bin/python -m pytest bench/bench_native_step.py --benchmark-only -q
"""

from __future__ import annotations

import functools

import pytest
import torch

from lorsum_kernels import _native, ops
from lorsum_kernels.functional.psi_lora import psi_lora_step, scaled_psi_lora_step

pytestmark = pytest.mark.skipif(not _native.has_native_op("lorsum_update_in", "cpu"),
                                reason="native block power ops not built")

# (m = n, r, T, L)
SIZES = [(1024, 8, 2048, 24), (1024, 16, 2048, 24), (1024, 64, 2048, 24), (1024, 16, 512, 24)]
BACKENDS = ["torch", "native", "torch.compile"]
_compiled: dict = {}


def _inputs(d, r, T, L, dtype):
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(L, r, d, generator=g) / d**0.5, torch.randn(L, d, r, generator=g) / d**0.5
    Am, Bm = torch.randn(L, r, d, generator=g), torch.randn(L, d, r, generator=g) * 0.01
    X = torch.randn(L, T, d, generator=g).to(dtype)
    S = (torch.randn(L, T, d, generator=g) / T).to(dtype)
    return A, B, Am, Bm, X, S


def _psi_lora_step_uncast(A, B, X, S, momentum_factors, *, lr, lmbd, lmbd_momentum, iters, momentum, dampening,
                          backend):
    """functional.psi_lora_step for k = 1 without its up-front cast of X and S to fp32: the native ops read
    bf16 X and S as they are (and accumulate in fp32). The same math; what the step costs once the
    functional layer passes X and S through to the native backend."""
    assert iters == 1
    pair = (X, S.mT)

    def lorsum(anchor, rest, coeffs, lam):
        A_new = ops.lorsum_update_in(anchor[1], anchor, rest, coeffs, lam, backend=backend)
        return A_new, ops.lorsum_update_out(A_new, anchor, rest, coeffs, lam, backend=backend)

    A_m, B_m = momentum_factors
    new = lorsum((A, B), [pair, (A_m, B_m)], [1.0, -lr * (1 - dampening), -lr * momentum], lr * lmbd)
    buffer = lorsum((A_m, B_m), [pair], [momentum, 1 - dampening], lr * lmbd_momentum)
    return new[0], new[1], buffer


def _step_fn(method, backend):
    """The step as a function of tensors; "torch.compile" compiles the reference once per method."""
    if method == "psi_lora_uncast":
        fn = functools.partial(_psi_lora_step_uncast, lr=0.1, lmbd=1e-2, lmbd_momentum=1e-2, iters=1, momentum=0.9,
                               dampening=0.0)

        def step(A, B, X, S, Am, Bm, v_in, v_out, be):
            return fn(A, B, X, S, (Am, Bm), backend=be)
    elif method == "psi_lora":
        fn = functools.partial(psi_lora_step, lr=0.1, lmbd=1e-2, lmbd_momentum=1e-2, iters=1, momentum=0.9,
                               dampening=0.0)

        def step(A, B, X, S, Am, Bm, v_in, v_out, be):
            return fn(A, B, X, S, (Am, Bm), backend=be)
    else:
        fn = functools.partial(scaled_psi_lora_step, lr=0.1, lmbd=1e-2, min_lmbd=1e-5, iters=1, betas=(0.9, 0.999),
                               damping=0.1, metric="kfac", metric_power=0.5, loss_reduction="mean")

        def step(A, B, X, S, Am, Bm, v_in, v_out, be):
            return fn(A, B, X, S, (v_in, v_out), (Am, Bm), backend=be)

    if backend != "torch.compile":
        return functools.partial(step, be=backend)
    if method not in _compiled:
        _compiled[method] = torch.compile(functools.partial(step, be="torch"))
    return _compiled[method]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "m{}_r{}_T{}_L{}".format(*s))
@pytest.mark.parametrize("method", ["psi_lora", "scaled_psi_lora_kfac", "psi_lora_uncast"])
def test_step(benchmark, record, method, size, dtype, backend):
    if method == "scaled_psi_lora_kfac" and size != (1024, 16, 2048, 24):
        pytest.skip("the scaled step is measured at one size")
    if method == "psi_lora_uncast" and (dtype != torch.bfloat16 or backend != "native"):
        pytest.skip("the uncast step differs from psi_lora only for bf16 X and S on the native backend")
    d, r, T, L = size
    A, B, Am, Bm, X, S = _inputs(d, r, T, L, dtype)
    v_in, v_out = torch.ones(L, d), torch.ones(L, d)
    fn = _step_fn(method, backend)
    step = lambda: fn(A, B, X, S, Am, Bm, v_in, v_out)
    if backend == "torch.compile":
        step()  # compile outside the timed rounds
    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
    record("native_step.csv", method, backend,
           f"m=n={d} r={r} T={T} L={L} k=1 {str(dtype).removeprefix('torch.')}", X.device)
