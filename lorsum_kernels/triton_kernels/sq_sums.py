"""Triton ``col_sq_sums``: column sums of squares over the token dimension (reference.col_sq_sums).

Contract: ``col_sq_sums(x)`` for ``x`` (..., T, n) in fp32, fp64, bf16 or fp16, any strides, on a CUDA
device (or on the CPU in the Triton interpreter), returns a new contiguous (..., n) tensor, fp64 for fp64
input and fp32 otherwise, with ``out[..., j] = Σ_t x[..., t, j]²`` accumulated in that dtype. An empty
token dimension gives zeros; NaN and inf propagate as in the reference. Results are deterministic: no
atomics.

X is read once. Each program owns a block of columns of one batch element and a range of tokens; it keeps
BLOCK_T × BLOCK_N partial sums and reduces them once at the end, so the rounding error grows with
T / BLOCK_T rather than T. When batch × column blocks alone cannot fill the GPU (a few wide layers),
the token dimension is split too and the per-split partial sums are added by a second, tiny reduction
in a fixed order.
"""

from __future__ import annotations

import torch
import triton.language as tl
from torch import Tensor

from . import _jit
from ._lang import add as _add

OP = "col_sq_sums"


@_jit.kernel
def _col_sq_sums_kernel(
    x_ptr, out_ptr, T, n, rows_per_split,
    stride_xb, stride_xt, stride_xn, stride_os, stride_ob,
    ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    col_blocks = (n + BLOCK_N - 1) // BLOCK_N
    # int64 offsets: a stack of layers can exceed 2**31 elements.
    b = (pid // col_blocks).to(tl.int64)
    cols = (pid % col_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n
    t_start = split * rows_per_split
    t_end = tl.minimum(T, t_start + rows_per_split)
    col_ptrs = x_ptr + b * stride_xb + cols.to(tl.int64)[None, :] * stride_xn
    acc = tl.full((BLOCK_T, BLOCK_N), 0.0, ACC)
    for t0 in range(t_start, t_end, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        mask = (rows < t_end)[:, None] & col_mask[None, :]
        v = tl.load(col_ptrs + rows.to(tl.int64)[:, None] * stride_xt, mask=mask, other=0.0).to(ACC)
        acc += v * v
    total = tl.reduce(acc, 0, _add)
    tl.store(out_ptr + split.to(tl.int64) * stride_os + b * stride_ob + cols, total, mask=col_mask)


def _blocks(n: int, interpret: bool) -> tuple[int, int, int]:
    block_n = min(128, max(16, _jit.next_pow2(n)))
    # The interpreter pays per loop iteration, not per element: fewer, taller tiles.
    block_t = 64 if interpret else 32
    return block_t, block_n, 4


def _auto_splits(device: torch.device, programs: int, T: int, block_t: int) -> int:
    want = _jit.target_programs(device) // max(1, programs)
    # Each split keeps at least eight token tiles, so the second pass stays negligible.
    return max(1, min(want, T // (8 * block_t)))


def col_sq_sums(x: Tensor) -> Tensor:
    """Column sums of squares of ``x`` (..., T, n) over T: (..., n), fp64 for fp64 input, else fp32.

    Same signature and semantics as ``reference.col_sq_sums`` (see the module docstring).
    """
    return _col_sq_sums(x, t_splits=None)


def _col_sq_sums(x: Tensor, t_splits: int | None) -> Tensor:
    """``col_sq_sums`` with the number of token splits forced (tests cover both reduction paths)."""
    if x.ndim < 2:
        raise ValueError(f"{OP}: x must have at least 2 dimensions (..., T, n), got shape {tuple(x.shape)}")
    _jit.check_float(OP, "x", x)
    device = _jit.check_device(OP, x)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    T, n = x.shape[-2], x.shape[-1]
    out = torch.empty(x.shape[:-2] + (n,), dtype=acc, device=device)
    if out.numel() == 0:
        return out
    if T == 0:
        return out.zero_()
    x3 = x.reshape(-1, T, n)  # a view whenever the batch dimensions can be merged
    B = x3.shape[0]
    block_t, block_n, warps = _blocks(n, _jit.interpret_mode())
    col_blocks = _jit.cdiv(n, block_n)
    splits = t_splits if t_splits is not None else _auto_splits(device, B * col_blocks, T, block_t)
    rows_per_split = _jit.cdiv(_jit.cdiv(T, max(1, splits)), block_t) * block_t
    splits = _jit.cdiv(T, rows_per_split)  # no split left without tokens
    out2 = out.view(B, n)
    part = out2.unsqueeze(0) if splits == 1 else torch.empty(splits, B, n, dtype=acc, device=device)
    with _jit.device_guard(device):
        _col_sq_sums_kernel[(B * col_blocks, splits)](
            x3, part, T, n, rows_per_split,
            x3.stride(0), x3.stride(1), x3.stride(2), part.stride(0), part.stride(1),
            ACC=tl.float64 if acc == torch.float64 else tl.float32,
            BLOCK_T=block_t, BLOCK_N=block_n, num_warps=warps,
        )
    if splits > 1:
        torch.sum(part, dim=0, out=out2)
    return out
