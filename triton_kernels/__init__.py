"""Triton implementations of the hot-path ops, one module per op (Liger-Kernel style).

Contract: each launcher here has the signature and semantics of the function of the same name in
``lorsum_kernels.reference`` (read its docstring; each module's docstring says where it differs, e.g.
which dtypes it accepts and what is computed outside Triton). They run on CUDA tensors, or on CPU
tensors in the Triton interpreter (``TRITON_INTERPRET=1``, slow: for tests).

Importing this package does not import triton: each launcher's module (and triton with it) is loaded on
first use, so ``lorsum_kernels`` imports on machines without triton. ``LAUNCHERS`` is also the
registry dispatch consults (``lorsum_kernels.backends.TRITON_OPS`` is its key set): registering a
launcher here is what makes an op available to the Triton backend.
"""

from __future__ import annotations

import importlib

# Op name -> the module (in this package) that defines its launcher.
LAUNCHERS = {
    "adafactor_ema_scales": "adafactor",
    "adaprelora_solve": "adaprelora",
    "col_sq_sums": "sq_sums",
    "finish_normalized_stacked": "finish_normalized",
    "kfac_metric_update": "kfac",
    "row_col_energies": "energies",
    "spd_solve": "spd",
    "lorsum_update_in": "half_steps",
    "lorsum_update_out": "half_steps",
    "pair_products": "products",
    "tangent_energies": "tangent",
}

__all__ = [
    "LAUNCHERS", "adafactor_ema_scales", "adaprelora_solve", "col_sq_sums", "finish_normalized_stacked",
    "kfac_metric_update", "lorsum_update_in", "lorsum_update_out", "pair_products", "row_col_energies",
    "spd_solve", "tangent_energies",
]


def __getattr__(name: str):
    module = LAUNCHERS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    launcher = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = launcher  # later lookups skip __getattr__
    return launcher


def __dir__():
    return sorted(set(globals()) | set(LAUNCHERS))
