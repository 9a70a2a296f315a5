"""One function per hot-path op, each running on the backend that ``backends.resolve_backend`` picks.

The signatures and semantics are those of ``reference`` (read its docstrings); this module only
dispatches. ``backend`` is "auto", "native", "triton" or "torch" (see DESIGN.md "Dispatch"). An op with
no native or Triton implementation yet runs the reference under "auto"; forcing a backend that does not
implement the op raises.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import reference
from .backends import resolve_backend

__all__ = ["lorsum_update_in", "lorsum_update_out", "spd_solve", "col_sq_sums", "row_col_energies"]


def lorsum_update_in(
    B_hat: Tensor,
    anchor: tuple[Tensor, Tensor],
    pairs: Sequence[tuple[Tensor, Tensor]],
    coeffs: Sequence,
    lmbd,
    metrics: tuple[Tensor, Tensor] | None = None,
    *,
    backend: str | None = "auto",
) -> Tensor:
    resolve_backend(backend, B_hat.device, "lorsum_update_in")
    return reference.lorsum_update_in(B_hat, anchor, pairs, coeffs, lmbd, metrics)


def lorsum_update_out(
    A_hat: Tensor,
    anchor: tuple[Tensor, Tensor],
    pairs: Sequence[tuple[Tensor, Tensor]],
    coeffs: Sequence,
    lmbd,
    metrics: tuple[Tensor, Tensor] | None = None,
    *,
    backend: str | None = "auto",
) -> Tensor:
    resolve_backend(backend, A_hat.device, "lorsum_update_out")
    return reference.lorsum_update_out(A_hat, anchor, pairs, coeffs, lmbd, metrics)


def spd_solve(gram: Tensor, rhs: Tensor, *, left: bool = True, backend: str | None = "auto") -> Tensor:
    resolve_backend(backend, gram.device, "spd_solve")
    return reference.spd_solve(gram, rhs, left=left)


def col_sq_sums(x: Tensor, *, backend: str | None = "auto") -> Tensor:
    if resolve_backend(backend, x.device, "col_sq_sums") == "native":
        return torch.ops.lorsum.col_sq_sums(x)
    return reference.col_sq_sums(x)


def row_col_energies(
    X: Tensor, S: Tensor, *, block_size: int = 256, backend: str | None = "auto"
) -> tuple[Tensor, Tensor]:
    resolve_backend(backend, X.device, "row_col_energies")
    return reference.row_col_energies(X, S, block_size=block_size)


def sketch_products(
    X: Tensor,
    S: Tensor,
    V: Tensor | None = None,
    U: Tensor | None = None,
    *,
    backend: str | None = "auto",
) -> tuple[Tensor | None, Tensor | None]:
    resolve_backend(backend, X.device, "sketch_products")
    return reference.sketch_products(X, S, V, U)


__all__ += ["sketch_products"]


__all__ += ["adaprelora_solve", "tangent_energies"]


def adaprelora_solve(
    A: Tensor, B: Tensor, g_A: Tensor, g_B: Tensor, p: Tensor, q: Tensor, *, ridge,
    backend: str | None = "auto",
) -> tuple[Tensor, Tensor]:
    resolve_backend(backend, A.device, "adaprelora_solve")
    return reference.adaprelora_solve(A, B, g_A, g_B, p, q, ridge=ridge)


def tangent_energies(
    B: Tensor, E: Tensor, F: Tensor, A: Tensor, *, backend: str | None = "auto"
) -> tuple[Tensor, Tensor]:
    resolve_backend(backend, B.device, "tangent_energies")
    return reference.tangent_energies(B, E, F, A)
