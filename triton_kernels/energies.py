"""Triton ``row_col_energies``: row and column energies of ``G = Sᵀ X`` without writing G.

Contract (reference.row_col_energies): ``row_col_energies(X, S, *, block_size=256) -> (rows, cols)`` for
``X`` (..., T, n) and ``S`` (..., T, m) with equal batch shapes and T, fp32, fp64, bf16 or fp16, any
strides; ``rows`` (..., m) = diag(G Gᵀ) and ``cols`` (..., n) = diag(Gᵀ G), fp64 when either input is
fp64, else fp32. ``block_size`` is the reference's slab width and is accepted for signature
compatibility only; the kernel has its own tiles. An empty token dimension gives zeros; NaN and inf
propagate as in the reference (a NaN in S row t, column i makes rows[i] and every cols entry NaN).

Each program computes one BLOCK_M × BLOCK_N tile of G for one batch element with ``tl.dot`` over the
token dimension, squares it in registers and reduces it both ways: its row sums go to a
(batch, n_tiles, m) buffer and its column sums to a (batch, m_tiles, n) buffer, which a second reduction
(torch ``sum`` over the tile axis, a fixed order) turns into ``rows`` and ``cols``. The buffers hold
m·n/BLOCK_N + m·n/BLOCK_M numbers per batch element, a small fraction of G; there are no atomics, so
results are deterministic.

Precision: fp32 and fp64 operands use ``input_precision="ieee"`` (TF32 would miss the 1e-5 target). bf16
and fp16 pairs of one dtype go to the tensor cores as they are: their products are exact in the fp32
accumulator, which is what the reference's upcast computes. Mixed dtypes are upcast in registers, and so
are bf16 pairs in the interpreter, whose ``tl.dot`` mishandles bf16. fp64 runs the same kernel with fp64
operands and accumulator (Triton's fp64 dot), so fp64 inputs keep fp64 accuracy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _launch
from .._numerics import math_dtype

OP = "row_col_energies"


@triton.jit
def _energies_kernel(
    x_ptr, s_ptr, rows_ptr, cols_ptr, T, n, m,
    stride_xb, stride_xt, stride_xn, stride_sb, stride_st, stride_sm,
    stride_rb, stride_rt, stride_cb, stride_ct,
    ACC: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    n_tiles = tl.cdiv(n, BLOCK_N)
    tile_m = pid // n_tiles
    tile_n = pid % n_tiles
    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < m
    n_mask = offs_n < n
    # Sᵀ tile (BLOCK_M × BLOCK_K) and X tile (BLOCK_K × BLOCK_N), walked down the token dimension.
    m64, n64, k64 = offs_m.to(tl.int64), offs_n.to(tl.int64), offs_k.to(tl.int64)
    s_ptrs = s_ptr + b * stride_sb + m64[:, None] * stride_sm + k64[None, :] * stride_st
    x_ptrs = x_ptr + b * stride_xb + k64[:, None] * stride_xt + n64[None, :] * stride_xn
    acc = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    for k0 in range(0, T, BLOCK_K):
        k_mask = (k0 + offs_k) < T
        s = tl.load(s_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        x = tl.load(x_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if UPCAST:
            s = s.to(ACC)
            x = x.to(ACC)
        # out_dtype named: Triton 3.6 assumes fp32 even for an fp64 accumulator.
        if IEEE:
            acc = tl.dot(s, x, acc, input_precision="ieee", out_dtype=ACC)
        else:
            acc = tl.dot(s, x, acc, out_dtype=ACC)
        s_ptrs += BLOCK_K * stride_st
        x_ptrs += BLOCK_K * stride_xt
    sq = acc * acc  # padded rows and columns of the tile are exact zeros
    tl.store(rows_ptr + b * stride_rb + tile_n * stride_rt + offs_m, tl.sum(sq, 1), mask=m_mask)
    tl.store(cols_ptr + b * stride_cb + tile_m * stride_ct + offs_n, tl.sum(sq, 0), mask=n_mask)


def plan(B: int, m: int, n: int, x_dtype: torch.dtype, s_dtype: torch.dtype,
         target: _launch.Target) -> _launch.LaunchPlan:
    """One program per BLOCK_M × BLOCK_N tile of G and batch element: grid (m_tiles · n_tiles, B)."""
    acc = math_dtype(x_dtype, s_dtype)
    if target.interpret:  # per-op overhead dominates: one tile for small problems
        block_m = min(64, max(16, triton.next_power_of_2(m)))
        block_n = min(64, max(16, triton.next_power_of_2(n)))
        block_k, warps = 32, 4
    else:
        big = 64 if acc == torch.float64 else 128
        block_m = min(big, max(16, triton.next_power_of_2(m)))
        block_n = min(big, max(16, triton.next_power_of_2(n)))
        block_k = 16 if acc == torch.float64 else 32
        warps = 8 if block_m * block_n >= 128 * 128 else 4
    # Same-dtype half pairs go to the tensor cores as they are, except bf16 in the interpreter, whose
    # tl.dot mishandles bf16 operands (numpy has no bf16).
    half = x_dtype == torch.float16 or (x_dtype == torch.bfloat16 and not target.interpret)
    native_dot = x_dtype == s_dtype and half
    return _launch.LaunchPlan(
        _energies_kernel, (triton.cdiv(m, block_m) * triton.cdiv(n, block_n), B),
        {"ACC": _launch.acc_type(acc), "UPCAST": not native_dot and not (x_dtype == s_dtype == acc),
         "IEEE": not native_dot, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k},
        num_warps=warps, num_stages=3,
    )


def row_col_energies(X: Tensor, S: Tensor, *, block_size: int = 256) -> tuple[Tensor, Tensor]:
    """``(diag(G Gᵀ), diag(Gᵀ G))`` for ``G = Sᵀ X`` (``reference.row_col_energies``); see the module
    docstring. ``block_size`` is ignored (the kernel's tiles replace the reference's slabs)."""
    for name, t in (("X", X), ("S", S)):
        if t.ndim < 2:
            raise ValueError(f"{OP}: {name} must have at least 2 dimensions, got shape {tuple(t.shape)}")
        _launch.check_float(OP, name, t)
    if S.shape[:-2] != X.shape[:-2] or S.shape[-2] != X.shape[-2]:
        raise ValueError(f"{OP}: X {tuple(X.shape)} is (..., T, n) and S {tuple(S.shape)} must be "
                         "(..., T, m) with the same batch shape and T")
    device = _launch.check_device(OP, _energies_kernel, X, S)
    acc = math_dtype(X, S)
    batch, T, n, m = X.shape[:-2], X.shape[-2], X.shape[-1], S.shape[-1]
    rows = torch.zeros(batch + (m,), dtype=acc, device=device)
    cols = torch.zeros(batch + (n,), dtype=acc, device=device)
    if T == 0 or rows.numel() == 0 or cols.numel() == 0:
        return rows, cols
    X3, S3 = X.reshape(-1, T, n), S.reshape(-1, T, m)
    B = X3.shape[0]
    launch = plan(B, m, n, X.dtype, S.dtype, _launch.target_of(device, _energies_kernel))
    block_m, block_n = launch.constexprs["BLOCK_M"], launch.constexprs["BLOCK_N"]
    row_part = torch.empty(B, triton.cdiv(n, block_n), m, dtype=acc, device=device)
    col_part = torch.empty(B, triton.cdiv(m, block_m), n, dtype=acc, device=device)
    with _launch.device_guard(device):
        launch.launch(
            X3, S3, row_part, col_part, T, n, m,
            X3.stride(0), X3.stride(1), X3.stride(2), S3.stride(0), S3.stride(1), S3.stride(2),
            row_part.stride(0), row_part.stride(1), col_part.stride(0), col_part.stride(1),
        )
    torch.sum(row_part, dim=1, out=rows.view(B, m))
    torch.sum(col_part, dim=1, out=cols.view(B, n))
    return rows, cols
