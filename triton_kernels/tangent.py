"""Triton ``tangent_energies``: row and column energies of ``B·E + F·A``, never formed.

Contract (reference.tangent_energies): ``tangent_energies(B, E, F, A) -> (rows, cols)`` for ``B``
(..., m, r_B), ``E`` (..., r_B, n), ``F`` (..., m, r_F) and ``A`` (..., r_F, n); the two ranks may differ
(either may be 0) and the batch dimensions of all four broadcast (as ``ops.tangent_energies`` expands them
for the native op). With ``Z = [B F]`` (m×R) and ``W = [E; A]`` (R×n), R = r_B + r_F: ``rows`` (..., m)
holds ``z_iᵀ (W·Wᵀ) z_i`` and ``cols`` (..., n) holds ``w_jᵀ (Zᵀ·Z) w_j``, each clamped at 0 (a NaN stays
NaN, and reaches the entries the reference's products carry it to). fp32, fp64, bf16 and fp16 inputs,
mixed too, any strides: the arithmetic runs in fp32 (fp64 if any input is fp64) and the results are new
contiguous tensors of the promoted dtype of the four inputs, as the native op returns them (all-bf16
inputs give bf16 results computed in fp32, where the reference computes in bf16).

What runs where. torch: the two R×R Grams, ``W·Wᵀ`` and ``Zᵀ·Z``, block by block from the factors
(``E·Eᵀ``, ``E·Aᵀ``, ``A·Aᵀ`` and ``BᵀB``, ``BᵀF``, ``FᵀF``; O((m+n)R²) flops, R×R results), so ``[B F]``
and ``[E; A]`` are never concatenated. Triton: the quadratic forms, the O((m+n)R²) part that reads every
input element. Both sides are one computation on an R×N matrix V whose rows come from two factors ("top"
and "bottom"): the row side is V = Zᵀ (top Bᵀ, bottom Fᵀ, N = m) in the Gram W·Wᵀ, the column side V = W
(top E, bottom A, N = n) in Zᵀ·Z. One launch per side; each program takes BLOCK_N columns of V of one
batch element, forms ``M·V`` in BLOCK_R×BLOCK_R tiles of M with ``tl.dot`` (``input_precision="ieee"``:
TF32 would miss the 1e-5 target) and reduces ``V ⊙ (M·V)`` over the rows. The kernel reads the factors
through their strides (0 included) and converts them in registers. Copies of inputs: where broadcast
batch dimensions cannot be merged into one stride (``reshape`` copies then), and the Grams' operands
when a factor is not in the arithmetic dtype (bf16, fp16, or fp32 among fp64 inputs: a half-precision
matmul would round its result). Results are deterministic: every sum runs in an order fixed by the shapes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _launch
from .._numerics import math_dtype

OP = "tangent_energies"


@triton.jit
def _rows_of_v(top_base, bottom_base, offs, r_top, R, c_mask, stride_tk, stride_bk, ACC: tl.constexpr):
    """Rows ``offs`` of V = [top; bottom] for this program's columns, in ACC: rows [0, r_top) from the top
    factor, [r_top, R) from the bottom one, zeros past R (disjoint masks; a masked-off lane's negative row
    offset is never dereferenced)."""
    in_top = offs[:, None] < r_top
    top = tl.load(top_base + offs[:, None] * stride_tk, mask=in_top & c_mask[None, :], other=0.0)
    bottom = tl.load(bottom_base + (offs[:, None] - r_top) * stride_bk,
                     mask=(~in_top) & (offs[:, None] < R) & c_mask[None, :], other=0.0)
    return tl.where(in_top, top.to(ACC), bottom.to(ACC))


@triton.jit
def _quadratic_forms_kernel(
    top_ptr, bottom_ptr, gram_ptr, out_ptr, N, r_top, R,
    stride_tb, stride_tk, stride_tc, stride_bb, stride_bk, stride_bc,
    stride_gb, stride_gi, stride_gj, stride_ob,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # out[b, c] = max(0, v_cᵀ M v_c) for the columns c of this block; V = [top; bottom] (R×N), M = gram[b].
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_c = (pid * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    c_mask = offs_c < N
    top_base = top_ptr + b * stride_tb + offs_c[None, :] * stride_tc
    bottom_base = bottom_ptr + b * stride_bb + offs_c[None, :] * stride_bc
    gram_base = gram_ptr + b * stride_gb
    offs_r = tl.arange(0, BLOCK_R).to(tl.int64)
    energy = tl.zeros((BLOCK_N,), ACC)
    for k0 in range(0, R, BLOCK_R):
        offs_k = k0 + offs_r
        # (M·V)[k0:k0+BLOCK_R, block]: padded rows of M and of V load as zeros, so they add nothing.
        mv = tl.zeros((BLOCK_R, BLOCK_N), ACC)
        for l0 in range(0, R, BLOCK_R):
            offs_l = l0 + offs_r
            g = tl.load(gram_base + offs_k[:, None] * stride_gi + offs_l[None, :] * stride_gj,
                        mask=(offs_k[:, None] < R) & (offs_l[None, :] < R), other=0.0)
            v_l = _rows_of_v(top_base, bottom_base, offs_l, r_top, R, c_mask, stride_tk, stride_bk, ACC)
            # out_dtype named: Triton 3.6 assumes fp32 even for an fp64 accumulator.
            mv = tl.dot(g, v_l, mv, input_precision="ieee", out_dtype=ACC)
        v_k = _rows_of_v(top_base, bottom_base, offs_k, r_top, R, c_mask, stride_tk, stride_bk, ACC)
        energy += tl.sum(v_k * mv, 0)
    # Rounding can take an exact zero slightly below 0. A comparison, not tl.maximum: NaN < 0 is false,
    # so a NaN stays NaN (the GPU's max returns the non-NaN operand).
    energy = tl.where(energy < 0.0, 0.0, energy)
    tl.store(out_ptr + b * stride_ob + offs_c, energy, mask=c_mask)


def plan(L: int, R: int, N: int, acc: torch.dtype, target: _launch.Target) -> _launch.LaunchPlan:
    """The quadratic forms of the N columns of L matrices V (R×N): grid (column blocks, L)."""
    # tl.dot needs every dimension ≥ 16. M is walked in BLOCK_R×BLOCK_R tiles: any rank fits in registers.
    block_r = min(64, max(16, triton.next_power_of_2(R)))
    if target.interpret:  # per-op overhead dominates: one block for small problems
        block_n, warps = min(64, max(16, triton.next_power_of_2(N))), 4
    else:
        block_n = min(64 if acc == torch.float64 else 128, max(16, triton.next_power_of_2(N)))
        warps = 8 if block_r * block_n >= 64 * 128 else 4
    # Two stages: the inner loop runs R / BLOCK_R times (at most 4 for r ≤ 128), too few for deeper
    # pipelining, and three stages of the 64×128 fp32 tiles (M and both factors' rows) take 192 KiB of
    # shared memory, above sm_80's 163 KiB (tests/test_triton_compile.py).
    return _launch.LaunchPlan(
        _quadratic_forms_kernel, (triton.cdiv(N, block_n), L),
        {"ACC": _launch.acc_type(acc), "BLOCK_R": block_r, "BLOCK_N": block_n},
        num_warps=warps, num_stages=2,
    )


def _gram(top: Tensor, bottom: Tensor, acc: torch.dtype) -> Tensor:
    """``V·Vᵀ`` (L, R, R) for ``V = [top; bottom]`` ((L, r_t, N) and (L, r_b, N)), block by block, in
    ``acc``: V itself is never formed. Factors in another dtype are upcast first (a bf16 matmul rounds its
    result)."""
    t, u = top.to(acc), bottom.to(acc)  # no copy in the common case: the dtype already is acc
    r_t, r_b = t.shape[-2], u.shape[-2]
    gram = torch.empty(t.shape[0], r_t + r_b, r_t + r_b, dtype=acc, device=t.device)
    cross = t @ u.mT
    gram[:, :r_t, :r_t] = t @ t.mT
    gram[:, :r_t, r_t:] = cross
    gram[:, r_t:, :r_t] = cross.mT
    gram[:, r_t:, r_t:] = u @ u.mT
    return gram


def _check(B: Tensor, E: Tensor, F: Tensor, A: Tensor) -> torch.Size:
    for name, t in (("B", B), ("E", E), ("F", F), ("A", A)):
        if t.ndim < 2:
            raise ValueError(f"{OP}: {name} must have at least 2 dimensions, got shape {tuple(t.shape)}")
        _launch.check_float(OP, name, t)
    m, r_B, n, r_F = B.shape[-2], B.shape[-1], E.shape[-1], F.shape[-1]
    if E.shape[-2] != r_B:
        raise ValueError(f"{OP}: B {tuple(B.shape)} is (..., m, r) and E {tuple(E.shape)} must be "
                         "(..., r, n) with the same r")
    if F.shape[-2] != m:
        raise ValueError(f"{OP}: F {tuple(F.shape)} must be (..., m, r_F) with the m of B "
                         f"{tuple(B.shape)}")
    if tuple(A.shape[-2:]) != (r_F, n):
        raise ValueError(f"{OP}: A must be (..., r_F, n) = (..., {r_F}, {n}) for F {tuple(F.shape)} and "
                         f"E {tuple(E.shape)}, got shape {tuple(A.shape)}")
    shapes = [t.shape[:-2] for t in (B, E, F, A)]
    try:
        return torch.broadcast_shapes(*shapes)
    except RuntimeError as e:
        raise ValueError(f"{OP}: the batch dimensions of B, E, F and A do not broadcast: "
                         f"{[tuple(s) for s in shapes]}") from e


def _forms(top: Tensor, bottom: Tensor, gram: Tensor, out: Tensor, acc: torch.dtype) -> None:
    """``out[b, c] = max(0, v_cᵀ·gram[b]·v_c)`` for the columns of ``V = [top; bottom]`` (L, R, N)."""
    L, r_top, N = top.shape
    R = gram.shape[-1]
    launch = plan(L, R, N, acc, _launch.target_of(out.device, _quadratic_forms_kernel))
    launch.launch(
        top, bottom, gram, out, N, r_top, R,
        top.stride(0), top.stride(1), top.stride(2), bottom.stride(0), bottom.stride(1), bottom.stride(2),
        gram.stride(0), gram.stride(1), gram.stride(2), out.stride(0),
    )


def tangent_energies(B: Tensor, E: Tensor, F: Tensor, A: Tensor) -> tuple[Tensor, Tensor]:
    """``(rows, cols)``, the row and column energies of ``B·E + F·A`` (``reference.tangent_energies``); see
    the module docstring."""
    batch = _check(B, E, F, A)
    device = _launch.check_device(OP, _quadratic_forms_kernel, B, E, F, A)
    out_dtype = B.dtype
    for t in (E, F, A):
        out_dtype = torch.promote_types(out_dtype, t.dtype)
    acc = math_dtype(out_dtype)
    m, n, R = B.shape[-2], E.shape[-1], B.shape[-1] + F.shape[-1]
    rows = torch.zeros(batch + (m,), dtype=acc, device=device)
    cols = torch.zeros(batch + (n,), dtype=acc, device=device)
    if R == 0 or batch.numel() == 0 or (m == 0 and n == 0):  # an empty sum, or nothing to compute
        return rows.to(out_dtype), cols.to(out_dtype)
    # (L, ·, ·) views of the factors over the full batch: expand makes stride-0 views, and reshape copies
    # only where the broadcast batch dimensions do not merge into one stride.
    L = batch.numel()
    B3, E3, F3, A3 = (t.expand(batch + t.shape[-2:]).reshape((L,) + t.shape[-2:]) for t in (B, E, F, A))
    with _launch.device_guard(device):
        if m > 0:  # rows: V = Zᵀ = [Bᵀ; Fᵀ] in W·Wᵀ
            _forms(B3.mT, F3.mT, _gram(E3, A3, acc), rows.view(L, m), acc)
        if n > 0:  # cols: V = W = [E; A] in Zᵀ·Z
            _forms(E3, A3, _gram(B3.mT, F3.mT, acc), cols.view(L, n), acc)
    return rows.to(out_dtype), cols.to(out_dtype)
