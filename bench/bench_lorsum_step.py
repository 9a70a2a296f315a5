"""LoRSum step for a group of same-shape layers, torch reference (and every other backend present).

One call of ``low_rank_sum`` with the gradient pair and a momentum pair, as in PSI-LoRA's weight step,
for L layers batched. Rows go to bench/results/lorsum_step.csv.
"""

from __future__ import annotations

import pytest
import torch

from lorsum_kernels.functional import low_rank_sum

SHAPES = [  # (m = n, r, T, L)
    (1024, 16, 512, 1),
    (1024, 16, 2048, 4),
    (1024, 64, 2048, 1),
]


@pytest.mark.parametrize("iters", [0, 1])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "m{}_r{}_T{}_L{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_lorsum_step(benchmark, record, shape, iters, dtype):
    d, r, T, L = shape
    g = torch.Generator().manual_seed(0)
    A = torch.randn(L, r, d, generator=g)
    B = torch.randn(L, d, r, generator=g)
    Am, Bm = torch.randn(L, r, d, generator=g), torch.randn(L, d, r, generator=g)
    X = torch.randn(L, T, d, generator=g).to(dtype)
    S = torch.randn(L, T, d, generator=g).to(dtype)

    def step():
        return low_rank_sum([(A, B), (X, S.mT), (Am, Bm)], [1.0, -0.1, -0.09], lmbd=1e-3, iters=iters,
                            backend="torch")

    benchmark.pedantic(step, rounds=7, warmup_rounds=1)
    record("lorsum_step.csv", "lorsum_step", "torch",
           f"m=n={d} r={r} T={T} L={L} k={iters} {str(dtype).removeprefix('torch.')}", X.device)
