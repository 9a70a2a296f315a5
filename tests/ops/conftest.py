"""The op tests: one file per op, each test parametrized over the backends present (tests/problems.py).

Two processes. Triton picks, when ``triton.jit`` decorates a kernel at import, whether its kernels run
compiled or in its CPU interpreter, so the interpreter runs in a pytest process of its own that sets
``TRITON_INTERPRET=1`` before anything imports triton (``make test`` runs it after the main process):

    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/ops

That process runs only the ``triton`` parameters of these tests (the others are deselected: they ran in the
main process); the main process skips them, with the reason, unless it has a GPU to compile them for. The
kernels' compilation for real GPUs is tested in the main process: tests/test_triton_compile.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ..problems import INTERPRET, cpu_path  # noqa: F401  (cpu_path: a fixture of the native CPU tests)

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    """In the interpreter's process, only the Triton parameters of the op tests run."""
    if not INTERPRET:
        return
    dropped = [item for item in items
               if _HERE in Path(item.path).parents and item.get_closest_marker("triton") is None]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        ids = {id(item) for item in dropped}
        items[:] = [item for item in items if id(item) not in ids]


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    monkeypatch.delenv("LORSUM_BACKEND", raising=False)
