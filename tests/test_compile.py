"""torch.compile traces the hot-path dispatch and a whole functional step without graph breaks.

The backend choice (``backends.resolve_backend``) queries the dispatcher for a native kernel; that query
is a per-process constant (``_native.has_native_op`` is ``assume_constant_result``), so Dynamo folds it
instead of breaking the graph in front of every op.
"""

from __future__ import annotations

import torch

from lorsum_kernels import ops
from lorsum_kernels.functional.lorsum_step import psi_lora_step


def _step(A, B, X, S, A_m, B_m):
    return psi_lora_step(A, B, X, S, (A_m, B_m), lr=0.1, lmbd=1e-2, lmbd_momentum=1e-2, iters=1,
                         momentum=0.9, dampening=0.0)


def _problem():
    g = torch.Generator().manual_seed(0)
    L, r, m, n, T = 2, 3, 17, 11, 23
    return (torch.randn(L, r, n, generator=g), torch.randn(L, m, r, generator=g), torch.randn(L, T, n, generator=g),
            torch.randn(L, T, m, generator=g), torch.randn(L, r, n, generator=g), torch.zeros(L, m, r))


def test_ops_dispatch_has_no_graph_break():
    x, s = torch.randn(9, 7), torch.randn(9, 5)

    def f(x, s):
        rows, cols = ops.row_col_energies(x, s)
        return ops.col_sq_sums(x).sum() + rows.sum() + cols.sum()

    explained = torch._dynamo.explain(f)(x, s)
    assert explained.graph_break_count == 0, explained.break_reasons


def test_compiled_psi_lora_step_has_no_graph_break_and_matches_eager():
    args = _problem()
    explained = torch._dynamo.explain(_step)(*args)
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(_step, backend="aot_eager")(*args)
    eager = _step(*args)
    for c, e in zip(compiled[:2], eager[:2]):
        torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-6)
