"""Triton ``spd_solve``: batched r×r SPD solves with the relative ridge of reference.ridged_cholesky.

Contract (reference.spd_solve): ``spd_solve(gram, rhs, *, left=True)`` solves ``gram @ Z = rhs`` (left,
rhs (..., r, N)) or ``Z @ gram = rhs`` (right, rhs (..., N, r)) for symmetric PSD ``gram`` (..., r, r),
reading only its lower triangle. Batch dimensions broadcast as in ``torch.cholesky_solve``. The result
is a new contiguous tensor of the promoted dtype of gram and rhs (fp32, fp64; bf16/fp16 inputs are
solved in fp32 and returned in the promoted dtype, as the native op does; the reference rejects them).

``ridged_spd_solve(gram, rhs, ridge, *, left=True)`` is the same solve with the caller's relative ridge
``ρ`` in place of ``RELATIVE_RIDGE`` (``reference.ridged_cholesky(gram, ρ)``, as AdaPreLoRA's solve uses
it): a number, or a tensor of one value per matrix broadcasting against the batch dimensions (moved to the
device as fp64); ``None`` means the working dtype's ``RELATIVE_RIDGE``, which is ``spd_solve``.

Ridge rules, as the reference and the native kernels: ``s`` = mean diagonal, floored at
``sqrt(finfo.tiny)`` (a NaN ``s`` stays NaN); factor ``gram + ρ·s·I`` (ρ = RELATIVE_RIDGE for
``spd_solve``); where a pivot is not > 0 (NaN included), factor ``gram + (ρ + FALLBACK_RIDGE)·s·I``
instead (ρ + FALLBACK_RIDGE summed in fp64, then rounded to the working dtype); where that fails too
(a non-finite or indefinite gram) the factor, hence the solution, is NaN. The native kernels return NaN
there as well; the reference then returns LAPACK's partial factor, whose value depends on the LAPACK
build. The choice is made per matrix on the device: no status is read on the host.

Each program owns one matrix and one block of BLOCK_C right-hand-side columns: it factors the matrix in
registers (a right-looking Cholesky over an R×R tile, R = r rounded up to a power of two), then runs the
forward and backward substitutions on its column block, also in registers. Matrices wider than ``MAX_R``
do not fit that tile and are solved by the reference (torch) in the working dtype. Every program of a
matrix repeats its factorisation (r³/3 flops, below the 2·r²·BLOCK_C of its substitutions) rather than
passing the factor through global memory and a second launch. A right solve is the left solve of the
transposes, done through strides: nothing is copied. Broadcast batch dimensions are expanded as views;
only where they cannot be merged into one batch dimension does ``reshape`` copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _numerics
from .._numerics import math_dtype
from . import _launch
from ._launch import f64_from_bits

OP = "spd_solve"
MAX_R = 64


@triton.jit
def _column(A, cols, k):
    """Column k of the register tile A (R×R), as a vector over its rows."""
    return tl.sum(tl.where(cols[None, :] == k, A, 0.0), 1)


@triton.jit
def _row(A, rows, k):
    """Row k of the register tile A, as a vector over its columns."""
    return tl.sum(tl.where(rows[:, None] == k, A, 0.0), 0)


@triton.jit
def _entry(v, idx, k):
    """v[k] of a register vector v indexed by idx."""
    return tl.sum(tl.where(idx == k, v, 0.0), 0)


# The ridge's bit pattern: typed i64 whatever its value, and not specialised on it (f64_bits).
@triton.jit(do_not_specialize=["ridge_bits"])
def _spd_solve_kernel(
    g_ptr, rhs_ptr, out_ptr, ridge_ptr, ridge_bits: tl.int64, r, N,
    stride_gb, stride_gi, stride_gj, stride_rb, stride_ri, stride_rc, stride_ob, stride_oi, stride_oc,
    stride_ridge,
    ACC: tl.constexpr, RIDGE_PER_MATRIX: tl.constexpr, FALLBACK_RIDGE: tl.constexpr, FLOOR: tl.constexpr,
    R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    c_block = tl.program_id(1)
    rows = tl.arange(0, R)
    cols = tl.arange(0, R)
    inside = (rows[:, None] < r) & (cols[None, :] < r)
    lower = inside & (rows[:, None] >= cols[None, :])
    diag = inside & (rows[:, None] == cols[None, :])
    G = tl.load(g_ptr + b * stride_gb + rows[:, None] * stride_gi + cols[None, :] * stride_gj,
                mask=lower, other=0.0).to(ACC)
    scale = tl.sum(tl.sum(tl.where(diag, G, 0.0), 1), 0) / r
    # Constants built in ACC from their Python values: a plain float literal would be rounded to fp32
    # (and the fp64 floor, 2**-511, would underflow to 0).
    floor = tl.full((), FLOOR, ACC)
    scale = tl.where(scale < floor, floor, scale)
    if RIDGE_PER_MATRIX:
        ridge = tl.load(ridge_ptr + b * stride_ridge).to(tl.float64)
    else:
        ridge = f64_from_bits(ridge_bits)
    # ridge + fallback in fp64, as the reference adds two Python floats, then rounded once to ACC.
    fallback = ridge + tl.full((), FALLBACK_RIDGE, tl.float64)
    shift = scale * ridge.to(ACC)
    fallback_shift = scale * fallback.to(ACC)

    A = G
    pivots = tl.zeros((R,), ACC)
    ok = scale > 0  # set by each attempt below
    for attempt in tl.static_range(2):
        # The second attempt repeats the first (same shift, same factor) unless that one failed.
        A = tl.where(diag, G + shift, G)
        for k in range(r):
            col_k = _column(A, cols, k)
            d = _entry(col_k, rows, k)
            pivots = tl.where(rows == k, d, pivots)
            l_k = tl.where(rows >= k, col_k / tl.sqrt(d), 0.0)
            trailing = (rows[:, None] > k) & (cols[None, :] > k) & (rows[:, None] >= cols[None, :])
            A = tl.where(trailing, A - l_k[:, None] * l_k[None, :], A)
            A = tl.where(cols[None, :] == k, l_k[:, None], A)
        # `not (p > 0)` is true for NaN pivots, as LAPACK's potrf test.
        failed = tl.sum(tl.where((rows < r) & ~(pivots > 0), 1, 0), 0)
        ok = failed == 0
        shift = tl.where(ok, shift, fallback_shift)
    A = tl.where(ok, A, float("nan"))

    c = c_block * BLOCK_C + tl.arange(0, BLOCK_C)
    b_mask = (rows[:, None] < r) & (c[None, :] < N)
    Z = tl.load(rhs_ptr + b * stride_rb + rows[:, None] * stride_ri + c.to(tl.int64)[None, :] * stride_rc,
                mask=b_mask, other=0.0).to(ACC)
    # Forward substitution L·Y = B, one row of Y at a time.
    for k in range(r):
        l_k = _column(A, cols, k)
        y_k = _row(Z, rows, k) / _entry(l_k, rows, k)
        Z = tl.where(rows[:, None] > k, Z - l_k[:, None] * y_k[None, :], Z)
        Z = tl.where(rows[:, None] == k, y_k[None, :], Z)
    # Backward substitution Lᵀ·X = Y, from the last row up; row k of L gives column k of Lᵀ.
    for kk in range(r):
        k = r - 1 - kk
        lt_k = _row(A, rows, k)
        x_k = _row(Z, rows, k) / _entry(lt_k, cols, k)
        Z = tl.where(rows[:, None] < k, Z - lt_k[:, None] * x_k[None, :], Z)
        Z = tl.where(rows[:, None] == k, x_k[None, :], Z)
    tl.store(out_ptr + b * stride_ob + rows[:, None] * stride_oi + c.to(tl.int64)[None, :] * stride_oc,
             Z.to(out_ptr.dtype.element_ty), mask=b_mask)


def plan(B: int, r: int, N: int, acc: torch.dtype, ridge_per_matrix: bool,
         target: _launch.Target) -> _launch.LaunchPlan:
    """B solves of r×r systems (r ≤ MAX_R) with N right-hand sides: grid (B, column blocks)."""
    R = max(16, triton.next_power_of_2(r))
    # Registers: the R×R factor and the R×BLOCK_C right-hand sides stay in the register file.
    budget = 8192 if target.interpret else (4096 if acc == torch.float32 else 2048)
    block_c = max(16, min(128, budget // R, triton.next_power_of_2(N)))
    return _launch.LaunchPlan(
        _spd_solve_kernel, (B, triton.cdiv(N, block_c)),
        {"ACC": _launch.acc_type(acc), "RIDGE_PER_MATRIX": ridge_per_matrix,
         "FALLBACK_RIDGE": _numerics.FALLBACK_RIDGE[acc], "FLOOR": torch.finfo(acc).tiny ** 0.5,
         "R": R, "BLOCK_C": block_c},
        num_warps=8 if R >= 64 else 4, num_stages=3,
    )


def spd_solve(gram: Tensor, rhs: Tensor, *, left: bool = True) -> Tensor:
    """Solve ``gram @ Z = rhs`` (``left``) or ``Z @ gram = rhs`` (``reference.spd_solve``); see the module
    docstring."""
    return ridged_spd_solve(gram, rhs, None, left=left)


def ridged_spd_solve(gram: Tensor, rhs: Tensor, ridge, *, left: bool = True) -> Tensor:
    """``spd_solve`` with the caller's relative ridge (``reference.ridged_cholesky``): ``None`` for the
    working dtype's ``relative_ridge``, a number, or a tensor of one value per matrix that broadcasts
    against the batch dimensions (it joins their broadcast). The fallback, floor and NaN rules are those of
    the module docstring."""
    for name, t in (("gram", gram), ("rhs", rhs)):
        if t.ndim < 2:
            raise ValueError(f"{OP}: {name} must have at least 2 dimensions, got shape {tuple(t.shape)}")
        _launch.check_float(OP, name, t)
    r = gram.shape[-1]
    if gram.shape[-2] != r:
        raise ValueError(f"{OP}: gram must be square (..., r, r), got shape {tuple(gram.shape)}")
    if (rhs.shape[-2] if left else rhs.shape[-1]) != r:
        form = "(..., r, N) for left=True" if left else "(..., N, r) for left=False"
        raise ValueError(f"{OP}: rhs must be {form} with r = {r} (the size of gram), "
                         f"got shape {tuple(rhs.shape)}")
    per_matrix = isinstance(ridge, Tensor)
    shapes = [gram.shape[:-2], rhs.shape[:-2]] + ([ridge.shape] if per_matrix else [])
    try:
        batch = torch.broadcast_shapes(*shapes)
    except RuntimeError as e:
        what = f"gram {tuple(gram.shape)} and rhs {tuple(rhs.shape)}"
        if per_matrix:
            what += f" and the ridge {tuple(ridge.shape)}"
        raise ValueError(f"{OP}: the batch dimensions of {what} do not broadcast") from e
    device = _launch.check_device(OP, _spd_solve_kernel, gram, rhs)
    out_dtype = torch.promote_types(gram.dtype, rhs.dtype)
    acc = math_dtype(out_dtype)
    out = torch.empty(batch + rhs.shape[-2:], dtype=out_dtype, device=device)
    if out.numel() == 0:
        return out
    if ridge is None:
        ridge = _numerics.relative_ridge(acc)
    if per_matrix:
        # fp64 on the device, as the native schema takes it; a CPU tensor is copied there (no sync).
        ridge = ridge.to(device=device, dtype=torch.float64).expand(batch)
    if r > MAX_R:
        g = gram.to(acc).expand(batch + (r, r))
        chol = _numerics.ridged_cholesky(g, ridge.to(acc) if per_matrix else ridge)
        b = rhs.to(acc).expand(out.shape)
        z = torch.cholesky_solve(b, chol) if left else torch.cholesky_solve(b.mT, chol).mT
        return z.to(out_dtype)

    N = rhs.shape[-1] if left else rhs.shape[-2]
    g3 = gram.expand(batch + (r, r)).reshape(-1, r, r)
    rhs3 = rhs.expand(out.shape).reshape((-1,) + rhs.shape[-2:])
    out3 = out.view((-1,) + rhs.shape[-2:])
    B = out3.shape[0]
    rho = ridge.reshape(-1) if per_matrix else g3  # g3: a placeholder pointer the kernel does not read
    # (row, column) strides of the r×N systems: a right solve reads and writes the transposes.
    rs = (rhs3.stride(1), rhs3.stride(2)) if left else (rhs3.stride(2), rhs3.stride(1))
    os_ = (out3.stride(1), out3.stride(2)) if left else (out3.stride(2), out3.stride(1))
    launch = plan(B, r, N, acc, per_matrix, _launch.target_of(device, _spd_solve_kernel))
    with _launch.device_guard(device):
        launch.launch(
            g3, rhs3, out3, rho, 0 if per_matrix else _launch.f64_bits(ridge), r, N,
            g3.stride(0), g3.stride(1), g3.stride(2), rhs3.stride(0), *rs, out3.stride(0), *os_,
            rho.stride(0) if per_matrix else 0,
        )
    return out
