"""The op benchmarks of ``lorsum-bench``: what each hot-path op is timed on, and its memory-traffic floor.

Each ``OpCase`` builds its inputs for one configuration and calls ``ops.<op>(..., backend=b)``, so every
backend that the dispatcher can run for that op and device is measured the same way. ``floor_bytes`` is
the data an ideal kernel must move (inputs read once, outputs written once), from which the achieved
bandwidth is derived.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .. import ops
from ..functional import psi_lora_step


@dataclass
class OpCase:
    op: str
    config: str
    run: Callable[[str], object]  # backend -> result
    floor_bytes: int
    dispatch_op: str = ""  # the op whose backends are measured (backends.resolve_backend's name)

    def __post_init__(self):
        self.dispatch_op = self.dispatch_op or self.op


def _randn(*shape, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


def _bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


GRIDS = {  # (m = n, r, T, L)
    "full": [(1024, 8, 512, 1), (1024, 16, 4096, 24), (4096, 16, 4096, 1), (4096, 64, 4096, 1)],
    "quick": [(1024, 16, 512, 1), (1024, 16, 4096, 4)],
    "tiny": [(64, 3, 37, 2)],  # tests of the tool itself
}


OPS = ["col_sq_sums", "row_col_energies", "lorsum_update_in", "lorsum_update_out", "spd_solve",
       "kfac_metric_update", "pair_products", "adaprelora_solve", "lorsum_step"]


def cases(device: torch.device, dtype: torch.dtype, grid: str = "full") -> list[OpCase]:
    """The benchmark grid: realistic sizes (DESIGN.md targets), or a reduced one."""
    return [case for shape in GRIDS[grid] for case in shape_cases(device, dtype, shape)]


def iter_cases(device: torch.device, dtype: torch.dtype, grid: str = "full"):
    """``cases``, one shape's inputs at a time (the full grid's inputs need not all be alive at once)."""
    for shape in GRIDS[grid]:
        yield from shape_cases(device, dtype, shape)


def shape_cases(device: torch.device, dtype: torch.dtype, shape: tuple) -> list[OpCase]:
    """Every op's case (``OPS``, in that order) on one (m = n, r, T, L) shape."""
    out: list[OpCase] = []
    for d, r, T, L in [shape]:
        cfg = f"m=n={d} r={r} T={T} L={L} {str(dtype).removeprefix('torch.')}"
        X = _randn(L, T, d, dtype=dtype, device=device, seed=1)
        S = _randn(L, T, d, dtype=dtype, device=device, seed=2)
        A = _randn(L, r, d, dtype=torch.float32, device=device, seed=3)
        B = _randn(L, d, r, dtype=torch.float32, device=device, seed=4)
        Am = _randn(L, r, d, dtype=torch.float32, device=device, seed=5)
        Bm = _randn(L, d, r, dtype=torch.float32, device=device, seed=6)
        gram = B.mT @ B
        v = torch.rand(L, d, generator=torch.Generator().manual_seed(7)).to(device) + 0.5  # metrics, p, q > 0
        data_pairs = [(X, S.mT)]
        out += [
            OpCase("col_sq_sums", cfg, lambda b, X=X: ops.col_sq_sums(X, backend=b), _bytes(X) + 4 * L * d),
            OpCase("row_col_energies", cfg, lambda b, X=X, S=S: ops.row_col_energies(X, S, backend=b),
                   _bytes(X, S) + 8 * L * d),
            OpCase("lorsum_update_in", cfg,
                   lambda b, B=B, A=A, dp=data_pairs: ops.lorsum_update_in(
                       B, (A, B), dp, [1.0, -0.1], 1e-3, backend=b),
                   _bytes(X, S, A, B) + _bytes(A)),
            OpCase("lorsum_update_out", cfg,
                   lambda b, B=B, A=A, dp=data_pairs: ops.lorsum_update_out(
                       A, (A, B), dp, [1.0, -0.1], 1e-3, backend=b),
                   _bytes(X, S, A, B) + _bytes(B)),
            OpCase("spd_solve", cfg, lambda b, gram=gram, A=A: ops.spd_solve(gram, A, backend=b),
                   _bytes(gram, A, A)),
            OpCase("kfac_metric_update", cfg,
                   lambda b, X=X, S=S, v=v: ops.kfac_metric_update(X, S, v, v, 0.999, 0.1, 0.5, 1.0 / T, float(T),
                                                                   backend=b),
                   _bytes(X, S) + 6 * _bytes(v)),
            # Both products of one pass, for the weight and the momentum factors side by side (spec §9 H2).
            OpCase("pair_products", cfg,
                   lambda b, X=X, S=S, W=torch.cat([B, Bm], -1), V=torch.cat([A, Am], -2): ops.pair_products(
                       X, S.mT, W, V, backend=b),
                   _bytes(X, S, A, B, Am, Bm) + _bytes(A, B, Am, Bm)),
            OpCase("adaprelora_solve", cfg,
                   lambda b, A=A, B=B, gA=Am, gB=Bm, p=v, q=v: ops.adaprelora_solve(A, B, gA, gB, p, q, ridge=1e-6,
                                                                                    backend=b),
                   _bytes(A, B, Am, Bm, v, v) + _bytes(A, B)),
            # The whole PSI-LoRA step with momentum (k=1): the weight and the buffer LoRSum. Its floor
            # is two passes over X and S (A-steps, then B-steps, of both calls sharing each pass).
            OpCase("lorsum_step", cfg,
                   lambda b, A=A, B=B, X=X, S=S, Am=Am, Bm=Bm: psi_lora_step(
                       A, B, X, S, (Am, Bm), lr=0.1, lmbd=1e-2, lmbd_momentum=1e-2, iters=1, momentum=0.9,
                       dampening=0.0, backend=b),
                   2 * _bytes(X, S) + 4 * _bytes(A, B), dispatch_op="lorsum_update_in"),
        ]
    return out
