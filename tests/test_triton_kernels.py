"""The lorsum_kernels.triton_kernels subpackage in the main test process (no interpreter): its registry,
its import without triton, and its launchers' refusal of CPU tensors outside Triton's interpreter.

The launchers' results are tested in tests/ops/ (on a GPU, or in the interpreter's own process),
their compilation for real GPUs in tests/test_triton_compile.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from lorsum_kernels import backends

needs_triton = pytest.mark.skipif(not backends.triton_available(), reason="triton is not importable")


@needs_triton
def test_every_registered_triton_op_has_its_launcher():
    from lorsum_kernels import triton_kernels

    for name in backends.TRITON_OPS:
        assert callable(getattr(triton_kernels, name)), name


def test_package_imports_without_triton():
    # triton blocked in a fresh interpreter: the package, the subpackage and the torch/native paths still
    # work, and forcing the Triton backend names the cause.
    code = """
import sys
sys.modules["triton"] = None
import torch
import lorsum_kernels, lorsum_kernels.triton_kernels
from lorsum_kernels import ops
x = torch.randn(4, 3)
torch.testing.assert_close(ops.col_sq_sums(x, backend="torch"), (x * x).sum(0))
try:
    ops.col_sq_sums(x, backend="triton")
except RuntimeError as e:
    assert "triton is not importable" in str(e), e
else:
    raise AssertionError("forced triton without triton did not raise")
assert "triton" not in [m for m in sys.modules if sys.modules[m] is not None and m.split(".")[0] == "triton"]
"""
    env = {k: v for k, v in os.environ.items() if k != "LORSUM_BACKEND"}
    env["TRITON_INTERPRET"] = "1"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env=env, check=False)
    assert result.returncode == 0, result.stderr[-2000:]


def _cpu_args(op: str) -> tuple:
    """Small valid CPU inputs of each launcher that runs a kernel of its own."""
    t = torch.randn
    return {
        "col_sq_sums": (t(7, 3),),
        "kfac_metric_update": (t(7, 3), t(7, 4), t(3).abs(), t(4).abs(), 0.9, 1e-3, -0.5, 1.0, 1.0),
        "row_col_energies": (t(7, 3), t(7, 4)),
        "spd_solve": (torch.eye(3), t(3, 2)),
        "pair_products": (t(7, 3), t(4, 7), t(4, 2), t(2, 3)),
        "tangent_energies": (t(4, 2), t(2, 3), t(4, 2), t(2, 3)),
        "adaprelora_solve": (t(2, 3), t(4, 2), t(2, 3), t(4, 2), t(4).abs(), t(3).abs()),
    }[op]


@needs_triton
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the kernels are interpreted here")
@pytest.mark.parametrize("op", ["col_sq_sums", "kfac_metric_update", "row_col_energies", "spd_solve",
                                "pair_products", "tangent_energies", "adaprelora_solve"])
def test_cpu_tensors_outside_the_interpreter_raise(op):
    from lorsum_kernels import triton_kernels

    kwargs = {"ridge": 1e-6} if op == "adaprelora_solve" else {}
    with pytest.raises(RuntimeError, match=rf"{op}: Triton runs on CPU tensors only in its interpreter; "
                                           "set TRITON_INTERPRET=1"):
        getattr(triton_kernels, op)(*_cpu_args(op), **kwargs)
