"""Triton ``finish_normalized_stacked``: ``normalize_step``'s statistics and shrink of a bucket, two launches.

Contract (reference.finish_normalized_stacked, i.e. ``optim.step_normalization.finish``):
``finish_normalized_stacked(A, B, A_new, B_new, root, layer_lr, v, t, lr, beta) -> (A_out, B_out, v', t',
scale')`` for L layers stacked: old factors A (L, r, n) and B (L, m, r), new ones of the same shapes, all
fp32 or all fp64; ``root`` (L,) √s; ``layer_lr`` (L,) the lr each step ran at; ``v`` and ``t`` (L,) the
statistics before the step (fp32 or fp64, one dtype). Per layer, with N the bound of
``update_clip.merged_update_bound`` on ‖B_new·A_new − B·A‖ of the balanced factors (s times that of these):

    u = N·s / (layer_lr·√(m·n)),  v' = β·v + (1−β)·u²,  t' = t + 1
    (v' = v, t' = t where N ≤ STEP_NOISE_FLOOR·ε·‖A‖_F·‖B‖_F: a step within the factors' rounding),
    scale' = 1/max(√(v'/(1 − β^t')), 1e-30) where v' > 0, else 0,
    α = min(1, η·scale'/layer_lr),  A_out = lerp(A, A_new, α), B_out likewise (α = 1: the new values exactly).

The outputs are new contiguous tensors (factors in the factors' dtype, statistics in v's); the inputs are
not modified. Non-finite values propagate (the optimizer keeps a layer whose results are not finite).

The launches: the bound's two 2r×2r Grams, ``Pᵀ·P`` with P = [B_new − B, B] and ``Q·Qᵀ`` with Q = [A; A_new
− A], come from ``torch.bmm`` (cuBLAS), as the reference computes them; one Triton program per layer then
reduces them to the bound and the statistics (the ~25 elementwise and reduction launches of the composite),
and one launch over (layer, chunk) moves both factors (four ``where``/``lerp`` launches in the composite).
The scalars reach the kernels as fp64 bit patterns and are rounded to the working dtype there, as torch
rounds Python scalars; β^t' (of β so rounded) is evaluated in fp64 and rounded once, within an ulp of
torch.pow. Square roots and quotients are IEEE (``_launch.sqrt_ieee``, ``div_ieee``), so the statistics are
the reference's up to the order of the Grams' final sums and that ulp.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._numerics import STEP_NOISE_FLOOR
from . import _launch
from ._launch import PROPAGATE_NAN as NAN
from ._launch import div_ieee, f64_from_bits, sqrt_ieee

OP = "finish_normalized_stacked"
_GRAM_BLOCK = 1024  # Gram entries reduced per iteration of a layer's statistics program
_MOVE_BLOCK = 1024  # factor entries per program of the move


@triton.jit(do_not_specialize=["lr_bits", "beta_bits", "one_minus_beta_bits", "entries_root_bits",
                               "floor_bits"])
def _statistics_kernel(
    gram_p_ptr, gram_q_ptr, root_ptr, layer_lr_ptr, v_ptr, t_ptr, v_out_ptr, t_out_ptr, scale_out_ptr,
    weight_ptr, r, lr_bits: tl.int64, beta_bits: tl.int64, one_minus_beta_bits: tl.int64,
    entries_root_bits: tl.int64, floor_bits: tl.int64, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    # One program per layer. The Grams are contiguous (L, 2r, 2r).
    layer = tl.program_id(0).to(tl.int64)
    width = 2 * r
    size = width * width
    gram_p = gram_p_ptr + layer * size
    gram_q = gram_q_ptr + layer * size
    # ‖δB·A + B·δA‖² = ⟨PᵀP, QQᵀ⟩; ‖δB·δA‖² = ⟨δBᵀδB, δA·δAᵀ⟩, from the Grams' top-left and bottom-right
    # r×r blocks.
    first = tl.zeros((BLOCK,), ACC)
    for start in range(0, size, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        mask = idx < size
        first += tl.load(gram_p + idx, mask=mask, other=0.0) * tl.load(gram_q + idx, mask=mask, other=0.0)
    second = tl.zeros((BLOCK,), ACC)
    for start in range(0, r * r, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        mask = idx < r * r
        row = idx // r
        col = idx - row * r
        p = tl.load(gram_p + row * width + col, mask=mask, other=0.0)
        q = tl.load(gram_q + (row + r) * width + col + r, mask=mask, other=0.0)
        second += p * q
    first = tl.maximum(tl.sum(first, 0), 0.0, propagate_nan=NAN)
    second = tl.maximum(tl.sum(second, 0), 0.0, propagate_nan=NAN)
    bound = sqrt_ieee(first) + sqrt_ieee(second)
    # ‖A‖² and ‖B‖²: the traces of A·Aᵀ (Q·Qᵀ's top-left block) and BᵀB (PᵀP's bottom-right one). A step
    # within the factors' rounding (bound ≤ STEP_NOISE_FLOOR·ε·‖A‖‖B‖) measures nothing: the statistics stay.
    trace_a = tl.zeros((BLOCK,), ACC)
    trace_b = tl.zeros((BLOCK,), ACC)
    for start in range(0, r, BLOCK):
        i = start + tl.arange(0, BLOCK)
        mask = i < r
        trace_a += tl.load(gram_q + i * width + i, mask=mask, other=0.0)
        trace_b += tl.load(gram_p + (i + r) * width + i + r, mask=mask, other=0.0)
    noise_floor = (f64_from_bits(floor_bits).to(ACC) * sqrt_ieee(tl.sum(trace_a, 0))
                   * sqrt_ieee(tl.sum(trace_b, 0)))
    unmeasured = bound <= noise_floor  # False for NaN: a non-finite step reaches v, as in the reference
    root = tl.load(root_ptr + layer).to(ACC)
    v = tl.load(v_ptr + layer)
    VT = v.dtype
    step_lr = tl.load(layer_lr_ptr + layer)
    # u: the merged step's RMS per entry and unit lr, for the balanced factors (s times the bound).
    u = div_ieee(bound, step_lr.to(ACC) * f64_from_bits(entries_root_bits).to(ACC)) * (root * root)
    u = u.to(VT)
    beta = f64_from_bits(beta_bits)
    t = tl.load(t_ptr + layer)
    v_new = tl.where(unmeasured, v, v * beta.to(VT) + f64_from_bits(one_minus_beta_bits).to(VT) * u * u)
    t_new = tl.where(unmeasured, t, t + 1)
    # β^t of β rounded to v's dtype (as torch rounds the Python scalar), in fp64 and rounded once: torch.pow
    # within an ulp; 1 − β^t is then exact in v's dtype (β^t near 1), as the reference's subtraction.
    beta_vt = beta.to(VT).to(tl.float64)
    debias = 1.0 - tl.exp(t_new.to(tl.float64) * tl.log(beta_vt)).to(VT)
    # 1/√v̂; 0 while every step was zero (or the step is not finite: v' > 0 fails for NaN, as in torch.where)
    root_v = tl.maximum(sqrt_ieee(div_ieee(v_new, debias)), 1e-30, propagate_nan=NAN)
    scale = tl.where(v_new > 0, div_ieee(tl.full((), 1.0, VT), root_v), 0.0)
    lr = f64_from_bits(lr_bits).to(VT)
    alpha = tl.minimum(div_ieee(lr * scale, step_lr.to(VT)), 1.0, propagate_nan=NAN)
    # lerp's weight: α where it is below 1, else 1 (which returns the new value exactly), NaN included, as
    # the reference's torch.where.
    weight = tl.where(alpha < 1, alpha, 1.0).to(ACC)
    tl.store(v_out_ptr + layer, v_new.to(VT))
    tl.store(t_out_ptr + layer, t_new)
    tl.store(scale_out_ptr + layer, scale.to(VT))
    tl.store(weight_ptr + layer, weight)


@triton.jit
def _move_block(old_ptr, new_ptr, out_ptr, layer, idx, size, weight):
    """Entries ``idx`` of one layer's factor (``size`` of them, contiguous) moved by lerp at ``weight``, as
    torch.lerp computes it: exact at both ends (the old value at weight 0, the new one at weight 1)."""
    mask = idx < size
    offs = layer * size + idx
    old = tl.load(old_ptr + offs, mask=mask, other=0.0)
    new = tl.load(new_ptr + offs, mask=mask, other=0.0)
    w = weight.to(old.dtype)
    diff = new - old
    tl.store(out_ptr + offs, tl.where(w < 0.5, old + w * diff, new - diff * (1 - w)), mask=mask)


@triton.jit
def _move_kernel(
    a_ptr, a_new_ptr, a_out_ptr, b_ptr, b_new_ptr, b_out_ptr, weight_ptr, a_size, b_size,
    BLOCK: tl.constexpr,
):
    # Program (layer, chunk) moves entries [chunk·BLOCK, (chunk + 1)·BLOCK) of the layer's A and of its B
    # (each (r·n) and (m·r) contiguous), whichever are in range.
    layer = tl.program_id(0).to(tl.int64)
    start = tl.program_id(1) * BLOCK
    idx = start + tl.arange(0, BLOCK)
    weight = tl.load(weight_ptr + layer)
    if start < a_size:
        _move_block(a_ptr, a_new_ptr, a_out_ptr, layer, idx, a_size, weight)
    if start < b_size:
        _move_block(b_ptr, b_new_ptr, b_out_ptr, layer, idx, b_size, weight)


def plan(L: int, r: int, n: int, m: int, dtype: torch.dtype) -> list[_launch.LaunchPlan]:
    """The two launches for L layers of factors (r, n) and (m, r): the statistics (one program a layer) and
    the move (a program per layer and chunk of the larger factor)."""
    acc = _launch.acc_type(dtype)
    gram_block = min(_GRAM_BLOCK, triton.next_power_of_2(max(4 * r * r, 16)))
    chunks = triton.cdiv(max(r * n, m * r, 1), _MOVE_BLOCK)
    return [
        _launch.LaunchPlan(_statistics_kernel, (L,), {"ACC": acc, "BLOCK": gram_block}, num_warps=4,
                           num_stages=1),
        _launch.LaunchPlan(_move_kernel, (L, chunks), {"BLOCK": _MOVE_BLOCK}, num_warps=4, num_stages=1),
    ]


def _check(A, B, A_new, B_new, root, layer_lr, v, t) -> None:
    if A.ndim != 3 or B.ndim != 3:
        raise ValueError(f"{OP}: A must be (L, r, n) and B (L, m, r), got {tuple(A.shape)} and "
                         f"{tuple(B.shape)}")
    L, r, n = A.shape
    m = B.shape[1]
    if B.shape != (L, m, r):
        raise ValueError(f"{OP}: B must be (L, m, r) = ({L}, m, {r}), got {tuple(B.shape)}")
    for name, new, old in (("A_new", A_new, A), ("B_new", B_new, B)):
        if new.shape != old.shape:
            raise ValueError(f"{OP}: {name} must be {tuple(old.shape)}, got {tuple(new.shape)}")
    for name, x in (("A", A), ("B", B), ("A_new", A_new), ("B_new", B_new)):
        _launch.check_float(OP, name, x, (torch.float32, torch.float64))
        if x.dtype != A.dtype:
            raise TypeError(f"{OP}: the factors must share one dtype, got {name} {x.dtype} and A {A.dtype}")
    for name, x in (("root", root), ("layer_lr", layer_lr), ("v", v), ("t", t)):
        if x.numel() != L:
            raise ValueError(f"{OP}: {name} must hold one value per layer ({L}), got {tuple(x.shape)}")
    for name, x in (("root", root), ("layer_lr", layer_lr)):
        _launch.check_float(OP, name, x)
    for name, x in (("v", v), ("t", t)):
        _launch.check_float(OP, name, x, (torch.float32, torch.float64))
    if t.dtype != v.dtype:
        raise TypeError(f"{OP}: v and t must share one dtype, got {v.dtype} and {t.dtype}")
    _launch.check_device(OP, _statistics_kernel, A, B, A_new, B_new, root, layer_lr, v, t)


def finish_normalized_stacked(
    A: Tensor, B: Tensor, A_new: Tensor, B_new: Tensor, root: Tensor, layer_lr: Tensor, v: Tensor, t: Tensor,
    lr: float, beta: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``normalize_step``'s finish of L stacked layers (``reference.finish_normalized_stacked``); see the
    module docstring."""
    _check(A, B, A_new, B_new, root, layer_lr, v, t)
    L, r, n = A.shape
    m = B.shape[1]
    device, dt = A.device, A.dtype
    A, B, A_new, B_new = (x.contiguous() for x in (A, B, A_new, B_new))
    A_out, B_out = torch.empty_like(A), torch.empty_like(B)
    v_new, t_new, scale = (torch.empty(L, dtype=v.dtype, device=device) for _ in range(3))
    if L == 0:
        return A_out, B_out, v_new, t_new, scale
    # The Grams as the reference takes them (update_clip.merged_update_bound).
    P = torch.cat([B_new - B, B], -1)
    Q = torch.cat([A, A_new - A], -2)
    gram_p, gram_q = torch.bmm(P.mT, P), torch.bmm(Q, Q.mT)
    weight = torch.empty(L, dtype=dt, device=device)
    statistics, move = plan(L, r, n, m, dt)
    noise = STEP_NOISE_FLOOR * torch.finfo(dt).eps
    scalars = [_launch.f64_bits(x) for x in (lr, beta, 1.0 - beta, float(m * n) ** 0.5, noise)]
    with _launch.device_guard(device):
        per_layer = (x.reshape(L).contiguous() for x in (root, layer_lr, v, t))
        statistics.launch(gram_p, gram_q, *per_layer, v_new, t_new, scale, weight, r, *scalars)
        move.launch(A, A_new, A_out, B, B_new, B_out, weight, r * n, m * r)
    return A_out, B_out, v_new, t_new, scale
