"""Triton ``pair_products``: both token products of one factor pair, each a fused chained product.

Contract (reference.pair_products): ``pair_products(f_in, f_out, W=None, V=None) -> (P, Q)`` with
``P = Wᵀ·f_out·f_in`` (..., w, n) and ``Q = f_out·f_in·Vᵀ`` (..., m, v) for ``f_in`` (..., q, n), ``f_out``
(..., m, q), ``W`` (..., m, w), ``V`` (..., v, n); batch dimensions broadcast as in the reference (each
product over the batch dimensions of its own operands). An absent ``W`` or ``V`` gives an empty
(..., 0, n) or (..., m, 0) result with the batch shape of ``f_in``, as in the reference. Inputs are fp32,
fp64, bf16 or fp16, mixed too, any strides; the results are new contiguous tensors, fp64 when any input is
fp64, else fp32. For the gradient pair ``(X, Sᵀ)`` the products are ``(S·W)ᵀ·X`` and ``Sᵀ·(X·Vᵀ)``.

One kernel computes ``out = Wᵀ·F_out·F_in`` (w×n) for a chain of three operands; ``Q`` is the same kernel on
the transposed chain ``Qᵀ = V·f_inᵀ·f_outᵀ``, read and written through strides (no copies). Each program
owns one tile of BLOCK_W columns of W and one block of BLOCK_Q tokens (q): it computes
``U = W[:, tile]ᵀ·F_out[:, block]`` (BLOCK_W × BLOCK_Q) with ``tl.dot`` over the m dimension and keeps it in
registers, then walks the n dimension in BLOCK_N columns, writing ``U·F_in[block, :]`` for each. So F_out
and F_in are each read once per W tile (once when w ≤ BLOCK_W), U never goes to global memory and is
never recomputed, and no token-by-w intermediate is written (the reference and the torch route write
and re-read ``S·W``). Where the tokens span several blocks, each block's products go to a partial buffer
(blocks, batch, w, n), reduced by a torch ``sum`` over the block axis in a fixed order: no atomics, so
results are deterministic. The buffer holds ``w·n`` numbers per token block, at most a quarter of F_in
per W tile (BLOCK_Q ≥ 4·BLOCK_W, where the register budget allows); on a GPU the token blocks shrink
towards that bound only as far as needed to give every SM work. Broadcast batch dimensions are expanded
as views; only where they cannot be merged into one batch dimension does ``reshape`` copy.

Precision: every operand is converted to the working dtype in registers and multiplied with
``input_precision="ieee"`` (TF32 would miss the 1e-5 target; bf16 tensor cores would need U rounded to
bf16), accumulating in fp32, or fp64 for fp64 (Triton's fp64 dot). U is parenthesised as in the reference
(only q-by-w intermediates), so NaN and inf propagate as there: a NaN in ``f_out`` column t poisons every
entry of P that token t reaches. Padded tokens are zeroed in U, so an inf in W does not meet the padding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _launch
from .._numerics import math_dtype

OP = "pair_products"


@triton.jit
def _chain_kernel(
    w_ptr, fo_ptr, fi_ptr, out_ptr, M, Q, N, WD,
    stride_wb, stride_wm, stride_ww, stride_fob, stride_fom, stride_foq, stride_fib, stride_fiq, stride_fin,
    stride_os, stride_ob, stride_ow, stride_on,
    ACC: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    w_tile = tl.program_id(0)
    block = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_w = w_tile * BLOCK_W + tl.arange(0, BLOCK_W)
    offs_q = block * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    w_mask = offs_w < WD
    q_mask = offs_q < Q
    w64, m64, n64 = offs_w.to(tl.int64), offs_m.to(tl.int64), offs_n.to(tl.int64)

    wt_ptrs = w_ptr + b * stride_wb + w64[:, None] * stride_ww + m64[None, :] * stride_wm
    fo_ptrs = fo_ptr + b * stride_fob + m64[:, None] * stride_fom + offs_q[None, :] * stride_foq
    U = tl.zeros((BLOCK_W, BLOCK_Q), ACC)
    for m0 in range(0, M, BLOCK_M):
        m_mask = (m0 + offs_m) < M
        wt = tl.load(wt_ptrs, mask=w_mask[:, None] & m_mask[None, :], other=0.0).to(ACC)
        fo = tl.load(fo_ptrs, mask=m_mask[:, None] & q_mask[None, :], other=0.0).to(ACC)
        # out_dtype named: Triton 3.6 assumes fp32 even for an fp64 accumulator.
        U = tl.dot(wt, fo, U, input_precision="ieee", out_dtype=ACC)
        wt_ptrs += BLOCK_M * stride_wm
        fo_ptrs += BLOCK_M * stride_fom
    # The padded tokens' columns hold 0·W, which is NaN against an inf in W: keep them out of the sums.
    U = tl.where(q_mask[None, :], U, 0.0)

    fi_ptrs = fi_ptr + b * stride_fib + offs_q[:, None] * stride_fiq + n64[None, :] * stride_fin
    out_ptrs = out_ptr + block * stride_os + b * stride_ob + w64[:, None] * stride_ow + n64[None, :] * stride_on
    for n0 in range(0, N, BLOCK_N):
        n_mask = (n0 + offs_n) < N
        fi = tl.load(fi_ptrs, mask=q_mask[:, None] & n_mask[None, :], other=0.0).to(ACC)
        part = tl.dot(U, fi, input_precision="ieee", out_dtype=ACC)
        tl.store(out_ptrs, part.to(out_ptr.dtype.element_ty), mask=w_mask[:, None] & n_mask[None, :])
        fi_ptrs += BLOCK_N * stride_fin
        out_ptrs += BLOCK_N * stride_on


def _tiles(wd: int, m: int, q: int, n: int, batch: int, acc: torch.dtype,
           target: _launch.Target) -> tuple[int, int, int, int, int]:
    """(BLOCK_W, BLOCK_M, BLOCK_Q, BLOCK_N, num_warps) for a w×n product over q tokens and m rows."""
    block_w = min(64, max(16, triton.next_power_of_2(wd)))
    if target.interpret:  # per-op overhead dominates: the fewest, largest tiles
        block_q = min(128, max(16, triton.next_power_of_2(q)))
        block_m = min(64, max(16, triton.next_power_of_2(m)))
        return block_w, block_m, block_q, min(64, max(16, triton.next_power_of_2(n))), 4
    # Registers: U (BLOCK_W × BLOCK_Q) stays from the m loop through the n loop, beside the F_in tile
    # (BLOCK_Q × BLOCK_N).
    budget = 8192 if acc == torch.float32 else 4096
    cap_q = min(256, budget // block_w)
    floor_q = min(cap_q, 4 * block_w)  # bounds the partial buffer at a quarter of F_in per W tile
    # Never below the floor: fewer tokens only pad one block (masked loads read nothing), and a step with
    # an unusual token count reuses the kernel compiled for the usual ones.
    block_q = min(cap_q, max(floor_q, triton.next_power_of_2(q)))
    programs = triton.cdiv(wd, block_w) * batch
    while block_q > floor_q and programs * triton.cdiv(q, block_q) < target.programs:
        block_q //= 2
    block_n = max(16, min(128, budget // block_q, triton.next_power_of_2(n)))
    block_m = 32 if acc == torch.float32 else 16
    warps = 8 if max(block_w * block_q, block_q * block_n) >= 8192 else 4
    return block_w, block_m, block_q, block_n, warps


def plan(batch: int, m: int, wd: int, q: int, n: int, acc: torch.dtype,
         target: _launch.Target) -> _launch.LaunchPlan:
    """``Wᵀ·F_out·F_in`` for ``batch`` chains of W (m, wd), F_out (m, q), F_in (q, n): one program per W tile,
    token block and batch element, grid (w_tiles, token blocks, batch); token blocks past the first write
    partial products (``grid[1]`` of them) that the launcher sums."""
    block_w, block_m, block_q, block_n, warps = _tiles(wd, m, q, n, batch, acc, target)
    return _launch.LaunchPlan(
        _chain_kernel, (triton.cdiv(wd, block_w), triton.cdiv(q, block_q), batch),
        {"ACC": _launch.acc_type(acc), "BLOCK_W": block_w, "BLOCK_M": block_m, "BLOCK_Q": block_q,
         "BLOCK_N": block_n},
        num_warps=warps, num_stages=3,
    )


def _chain(W: Tensor, fo: Tensor, fi: Tensor, out: Tensor, acc: torch.dtype) -> None:
    """``out[b] = W[b]ᵀ·fo[b]·fi[b]`` for 3-d (possibly transposed, strided) views of one batch size."""
    Bn, m, wd = W.shape
    q, n = fi.shape[1], fi.shape[2]
    device = out.device
    launch = plan(Bn, m, wd, q, n, acc, _launch.target_of(device, _chain_kernel))
    blocks = launch.grid[1]
    # One token block writes its product straight into out; several write partials, summed below.
    part = out.unsqueeze(0) if blocks == 1 else torch.empty((blocks,) + out.shape, dtype=acc, device=device)
    with _launch.device_guard(device):
        launch.launch(
            W, fo, fi, part, m, q, n, wd,
            W.stride(0), W.stride(1), W.stride(2), fo.stride(0), fo.stride(1), fo.stride(2),
            fi.stride(0), fi.stride(1), fi.stride(2), part.stride(0), part.stride(1), part.stride(2),
            part.stride(3),
        )
    if blocks > 1:
        torch.sum(part, dim=0, out=out)


def _flat(t: Tensor, batch: torch.Size) -> Tensor:
    """``t`` with its batch dimensions broadcast to ``batch`` and merged into one (a view where they merge)."""
    return t.expand(batch + t.shape[-2:]).reshape((-1,) + t.shape[-2:])


def pair_products(
    f_in: Tensor, f_out: Tensor, W: Tensor | None = None, V: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``(Wᵀ·f_out·f_in, f_out·f_in·Vᵀ)`` (``reference.pair_products``); see the module docstring."""
    named = [("f_in", f_in), ("f_out", f_out), ("W", W), ("V", V)]
    present = [(name, t) for name, t in named if t is not None]
    for name, t in present:
        if t.ndim < 2:
            raise ValueError(f"{OP}: {name} must have at least 2 dimensions, got shape {tuple(t.shape)}")
        _launch.check_float(OP, name, t)
    q, n, m = f_in.shape[-2], f_in.shape[-1], f_out.shape[-2]
    if f_out.shape[-1] != q:
        raise ValueError(f"{OP}: f_in {tuple(f_in.shape)} is (..., q, n) and f_out {tuple(f_out.shape)} must be "
                         "(..., m, q) with the same q")
    if W is not None and W.shape[-2] != m:
        raise ValueError(f"{OP}: W must be (..., m, w) with m = {m}, got shape {tuple(W.shape)}")
    if V is not None and V.shape[-1] != n:
        raise ValueError(f"{OP}: V must be (..., v, n) with n = {n}, got shape {tuple(V.shape)}")
    device = _launch.check_device(OP, _chain_kernel, *(t for _, t in present))
    acc = math_dtype(*(t for _, t in present))
    if acc == torch.float64:
        # Triton 3.6 cannot compile an fp64 tl.dot with an operand loaded in 16 bits (its MMAv2 lowering
        # asserts "fp64 don't support largeK MMA", seen on an H200): widen those operands first (a rare mix).
        f_in, f_out, W, V = (t if t is None or t.element_size() > 2 else t.double()
                             for t in (f_in, f_out, W, V))

    def batch_of(*ts: Tensor) -> torch.Size:
        try:
            return torch.broadcast_shapes(*(t.shape[:-2] for t in ts))
        except RuntimeError as e:
            raise ValueError(f"{OP}: the batch dimensions of {[tuple(t.shape) for t in ts]} do not broadcast") from e

    if W is None:
        P = torch.empty(f_in.shape[:-2] + (0, n), dtype=acc, device=device)
    else:
        batch = batch_of(W, f_out, f_in)
        wd = W.shape[-1]
        P = torch.empty(batch + (wd, n), dtype=acc, device=device)
        if not (q and m):
            P.zero_()  # an empty sum
        elif P.numel():
            _chain(_flat(W, batch), _flat(f_out, batch), _flat(f_in, batch), P.view(-1, wd, n), acc)
    if V is None:
        Q = torch.empty(f_in.shape[:-2] + (m, 0), dtype=acc, device=device)
    else:
        batch = batch_of(f_out, f_in, V)
        v = V.shape[-2]
        Q = torch.empty(batch + (m, v), dtype=acc, device=device)
        if not (q and n):
            Q.zero_()
        elif Q.numel():
            # Qᵀ = V·f_inᵀ·f_outᵀ: the chain with (Vᵀ, f_inᵀ, f_outᵀ), written through Q's transpose.
            _chain(_flat(V, batch).mT, _flat(f_in, batch).mT, _flat(f_out, batch).mT, Q.view(-1, m, v).mT, acc)
    return P, Q
