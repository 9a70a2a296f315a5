"""Triton ``col_sq_sums``: column sums of squares over the token dimension (reference.col_sq_sums).

Contract: ``col_sq_sums(x)`` for ``x`` (..., T, n) in fp32, fp64, bf16 or fp16, any strides, on a CUDA
device (or on the CPU in the Triton interpreter), returns a new contiguous (..., n) tensor, fp64 for fp64
input and fp32 otherwise, with ``out[..., j] = Σ_t x[..., t, j]²`` accumulated in that dtype. An empty
token dimension gives zeros; NaN and inf propagate as in the reference. Results are deterministic: no
atomics.

X is read once. Each program owns a block of columns of one batch element and a range of tokens; it keeps
BLOCK_T × BLOCK_N partial sums and reduces them once at the end, so the rounding error grows with
T / BLOCK_T rather than T. When batch × column blocks alone cannot fill the GPU (a few wide layers),
the token dimension is split too (the grid's second axis) and the per-split partial sums are added by a
second, tiny reduction in a fixed order. ``kfac.py`` reuses the per-program sum and this kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _launch
from .._numerics import math_dtype

OP = "col_sq_sums"


@triton.jit
def col_block_sums(
    x_ptr, T, n, stride_xb, stride_xt, stride_xn,
    SQUARE: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """This program's column block: ``(b, cols, col_mask, Σ_t x[b, t, cols]²)`` over its token split (the
    grid's second axis splits T evenly, in whole BLOCK_T tiles), or ``Σ_t x`` when not SQUARE."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    col_blocks = tl.cdiv(n, BLOCK_N)
    # int64 offsets: a stack of layers can exceed 2**31 elements.
    b = (pid // col_blocks).to(tl.int64)
    cols = (pid % col_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n
    rows_per_split = tl.cdiv(tl.cdiv(T, tl.num_programs(1)), BLOCK_T) * BLOCK_T
    t_start = split * rows_per_split
    t_end = tl.minimum(T, t_start + rows_per_split)
    col_ptrs = x_ptr + b * stride_xb + cols.to(tl.int64)[None, :] * stride_xn
    acc = tl.zeros((BLOCK_T, BLOCK_N), ACC)
    for t0 in range(t_start, t_end, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        mask = (rows < t_end)[:, None] & col_mask[None, :]
        v = tl.load(col_ptrs + rows.to(tl.int64)[:, None] * stride_xt, mask=mask, other=0.0).to(ACC)
        if SQUARE:
            acc += v * v
        else:
            acc += v
    return b, cols, col_mask, tl.sum(acc, 0)


@triton.jit
def _col_sq_sums_kernel(
    x_ptr, out_ptr, T, n, stride_xb, stride_xt, stride_xn, stride_os, stride_ob,
    ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # out[split, b, cols]: one row of partial sums per token split (the result itself when there is one).
    b, cols, col_mask, total = col_block_sums(x_ptr, T, n, stride_xb, stride_xt, stride_xn,
                                              True, ACC, BLOCK_T, BLOCK_N)
    split = tl.program_id(1).to(tl.int64)
    tl.store(out_ptr + split * stride_os + b * stride_ob + cols, total, mask=col_mask)


def blocks(n: int, target: _launch.Target) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_N, num_warps) of a pass over n columns."""
    block_n = min(128, max(16, triton.next_power_of_2(n)))
    # The interpreter pays per loop iteration, not per element: fewer, taller tiles.
    block_t = 64 if target.interpret else 32
    return block_t, block_n, 4


def token_splits(programs: int, T: int, block_t: int, target: _launch.Target) -> int:
    """Token splits that fill the device when ``programs`` column blocks alone do not; every split keeps
    at least eight token tiles, so the second pass stays negligible, and none is left without tokens."""
    want = max(1, min(target.programs // max(1, programs), T // (8 * block_t)))
    return splits_used(T, want, block_t)


def splits_used(T: int, splits: int, block_t: int) -> int:
    """The splits that receive tokens when T is cut into ``splits`` ranges of whole BLOCK_T tiles (as
    ``col_block_sums`` cuts it)."""
    rows_per_split = triton.cdiv(triton.cdiv(T, max(1, splits)), block_t) * block_t
    return triton.cdiv(T, rows_per_split)


def plan(B: int, T: int, n: int, acc: torch.dtype, target: _launch.Target,
         splits: int | None = None) -> _launch.LaunchPlan:
    """Sums of squares of B (T, n) matrices into a (splits, B, n) buffer, ``splits = grid[1]``;
    ``splits`` forces the number of token splits (tests cover both reduction paths)."""
    block_t, block_n, warps = blocks(n, target)
    col_blocks = triton.cdiv(n, block_n)
    splits = (token_splits(B * col_blocks, T, block_t, target) if splits is None
              else splits_used(T, splits, block_t))
    return _launch.LaunchPlan(
        _col_sq_sums_kernel, (B * col_blocks, splits),
        {"ACC": _launch.acc_type(acc), "BLOCK_T": block_t, "BLOCK_N": block_n},
        num_warps=warps, num_stages=3,
    )


def col_sq_sums(x: Tensor) -> Tensor:
    """Column sums of squares of ``x`` (..., T, n) over T: (..., n), fp64 for fp64 input, else fp32.

    Same signature and semantics as ``reference.col_sq_sums`` (see the module docstring).
    """
    return _col_sq_sums(x, t_splits=None)


def _col_sq_sums(x: Tensor, t_splits: int | None) -> Tensor:
    """``col_sq_sums`` with the number of token splits forced (tests cover both reduction paths)."""
    if x.ndim < 2:
        raise ValueError(f"{OP}: x must have at least 2 dimensions (..., T, n), got shape {tuple(x.shape)}")
    _launch.check_float(OP, "x", x)
    device = _launch.check_device(OP, _col_sq_sums_kernel, x)
    acc = math_dtype(x)
    T, n = x.shape[-2], x.shape[-1]
    out = torch.empty(x.shape[:-2] + (n,), dtype=acc, device=device)
    if out.numel() == 0:
        return out
    if T == 0:
        return out.zero_()
    x3 = x.reshape(-1, T, n)  # a view whenever the batch dimensions can be merged
    B = x3.shape[0]
    launch = plan(B, T, n, acc, _launch.target_of(device, _col_sq_sums_kernel), t_splits)
    splits = launch.grid[1]
    out2 = out.view(B, n)
    part = out2.unsqueeze(0) if splits == 1 else torch.empty(splits, B, n, dtype=acc, device=device)
    with _launch.device_guard(device):
        launch.launch(x3, part, T, n, x3.stride(0), x3.stride(1), x3.stride(2),
                      part.stride(0), part.stride(1))
    if splits > 1:
        torch.sum(part, dim=0, out=out2)
    return out
