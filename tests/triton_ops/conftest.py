"""The Triton launchers (lorsum_kernels.triton_kernels) against the reference, one file per op.

They run compiled on a CUDA GPU, or on CPU tensors in Triton's interpreter. Triton picks the mode when
``triton.jit`` decorates a kernel, at import, so the interpreter runs in a process of its own that sets
``TRITON_INTERPRET=1`` before anything imports triton (``make test`` runs it after the main process):

    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/triton_ops

Without a GPU and without the interpreter (the main ``pytest tests`` process on a CPU machine), or
without triton, they are skipped. The kernels' compilation for real GPUs is tested in the main
process: tests/test_triton_compile.py.
"""

from __future__ import annotations

import os

import pytest
import torch

from lorsum_kernels import backends

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# The interpreter runs on CPU tensors, even where a GPU is present (compiled runs test that one).
DEVICE = torch.device("cuda" if torch.cuda.is_available() and not INTERPRET else "cpu")

if not backends.triton_available():
    SKIP = "triton is not importable"
elif DEVICE.type == "cpu" and not INTERPRET:
    SKIP = ("no GPU: Triton runs on the CPU only in its interpreter "
            "(TRITON_INTERPRET=1 pytest tests/triton_ops)")
else:
    SKIP = None


class _SkippedModule(pytest.Module):
    def collect(self):
        pytest.skip(SKIP)


def pytest_pycollect_makemodule(module_path, parent):
    """Where the kernels cannot run, each test module is skipped whole, unimported: one line in the
    summary instead of one per test."""
    if SKIP is not None:
        return _SkippedModule.from_parent(parent, path=module_path)
    return None


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    monkeypatch.delenv("LORSUM_BACKEND", raising=False)
