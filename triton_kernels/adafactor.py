"""Triton ``adafactor_ema_scales``: AdaPreLoRA's Adafactor statistics step, EMA to scales, in one launch.

Contract (reference.adafactor_ema_scales, i.e. ``functional.adaprelora``'s ``adafactor_ema``,
``adafactor_debias`` and ``adafactor_scales`` in turn): ``adafactor_ema_scales(row_stat, col_stat, rows,
cols, t, beta2, decay_rate, eps1, dtype) -> (R, C, p, q)`` for L layers: states ``row_stat`` (L, m) and
``col_stat`` (L, n) (fp32 or fp64, one dtype), this step's energies ``rows`` (L, m) and ``cols`` (L, n) (fp32
or fp64), the step number ``t`` (one value per layer, or one for all; fp32 or fp64). With β̂ = ``beta2``, or
``1 − t^(−decay_rate)`` when it is None:

    R = β̂·row_stat + (1 − β̂)·(rows + n·ε1),  C = β̂·col_stat + (1 − β̂)·(cols + m·ε1)   (the states' dtype)
    R̂, Ĉ = R, C / (1 − β2^t) for a fixed β2 (the schedule needs no correction)
    p = max(√(R̂/ΣR̂), floor),  q = max(√Ĉ, floor)                                      (in ``dtype``)

The outputs are new contiguous tensors; the inputs are not modified. Dtypes and order follow the
reference: β̂ in t's dtype (t^(−d) and β2^t evaluated in fp64 and rounded once: torch.pow within an ulp),
the EMA in the states' dtype, the scales in ``dtype`` after a cast; the scalars reach the kernel as fp64
bit patterns and are rounded there as torch rounds Python scalars; square roots and quotients are IEEE in
fp32; NaN propagates through the clamps as through torch's. ΣR̂ is summed in another order than torch's.

One program per layer and side (grid (L, 2)): the row side computes and stores R while it sums R̂, then
reads R back for p; the column side needs no sum. The ~19 small ops of the composite are one launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _launch
from ._launch import PROPAGATE_NAN as NAN
from ._launch import div_ieee, f64_from_bits, sqrt_ieee

OP = "adafactor_ema_scales"
_BLOCK = 1024


@triton.jit(do_not_specialize=["beta_bits", "one_minus_beta_bits", "decay_bits", "row_eps_bits",
                               "col_eps_bits", "floor_bits"])
def _adafactor_kernel(
    row_stat_ptr, col_stat_ptr, rows_ptr, cols_ptr, t_ptr, t_stride, r_out_ptr, c_out_ptr, p_ptr, q_ptr, m, n,
    beta_bits: tl.int64, one_minus_beta_bits: tl.int64, decay_bits: tl.int64, row_eps_bits: tl.int64,
    col_eps_bits: tl.int64, floor_bits: tl.int64,
    FIXED_BETA: tl.constexpr, OUT: tl.constexpr, TINY: tl.constexpr, BLOCK: tl.constexpr,
):
    layer = tl.program_id(0).to(tl.int64)
    side = tl.program_id(1)  # 0: rows (R, p), 1: columns (C, q)
    t = tl.load(t_ptr + layer * t_stride)
    TT = t.dtype
    VT = row_stat_ptr.dtype.element_ty
    if FIXED_BETA:
        beta = f64_from_bits(beta_bits).to(VT)
        one_minus = f64_from_bits(one_minus_beta_bits).to(VT)
        # 1 − β2^t: torch.pow of β2 rounded to t's dtype, in t's dtype, then cast to the states'.
        base = f64_from_bits(beta_bits).to(TT).to(tl.float64)
        correction = (1.0 - tl.exp(t.to(tl.float64) * tl.log(base)).to(TT)).to(VT)
    else:
        # β̂ = 1 − t^(−d) in t's dtype (the schedule: β̂_1 = 0), then cast; no correction.
        power = tl.exp(-f64_from_bits(decay_bits) * tl.log(t.to(tl.float64))).to(TT)
        beta = (1.0 - power).to(VT)
        one_minus = 1.0 - beta
        correction = tl.full((), 1.0, VT)
    # One side's vectors: the rows (R, p: divided by ΣR̂) or the columns (C, q).
    if side == 0:
        state, energies, out, scales, size, eps = _side(row_stat_ptr, rows_ptr, r_out_ptr, p_ptr, layer, m,
                                                        row_eps_bits, VT)
    else:
        state, energies, out, scales, size, eps = _side(col_stat_ptr, cols_ptr, c_out_ptr, q_ptr, layer, n,
                                                        col_eps_bits, VT)
    total = tl.zeros((BLOCK,), OUT)
    for start in range(0, size, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        mask = idx < size
        old = tl.load(state + idx, mask=mask, other=0.0)
        energy = tl.load(energies + idx, mask=mask, other=0.0).to(VT)
        new = old * beta + (energy + eps) * one_minus
        tl.store(out + idx, new, mask=mask)
        if side == 0:
            if FIXED_BETA:
                new = div_ieee(new, correction)
            total += tl.where(mask, new.to(OUT), 0.0)
    # p = √(R̂/ΣR̂), the sum clamped at the dtype's smallest normal as the reference clamps it; q = √Ĉ (÷ 1:
    # exact).
    divisor = tl.full((), 1.0, OUT)
    if side == 0:
        divisor = tl.maximum(tl.sum(total, 0), TINY, propagate_nan=NAN)
    floor = f64_from_bits(floor_bits).to(OUT)
    for start in range(0, size, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        mask = idx < size
        new = tl.load(out + idx, mask=mask, other=0.0)
        if FIXED_BETA:
            new = div_ieee(new, correction)
        scale = tl.maximum(sqrt_ieee(div_ieee(new.to(OUT), divisor)), floor, propagate_nan=NAN)
        tl.store(scales + idx, scale, mask=mask)


@triton.jit
def _side(state_ptr, energies_ptr, out_ptr, scales_ptr, layer, size, eps_bits, VT: tl.constexpr):
    """One layer's vectors of one side (each (L, size) contiguous) and its ε1 term in the states' dtype."""
    offset = layer * size
    return (state_ptr + offset, energies_ptr + offset, out_ptr + offset, scales_ptr + offset, size,
            f64_from_bits(eps_bits).to(VT))

def plan(L: int, fixed_beta: bool, dtype: torch.dtype) -> _launch.LaunchPlan:
    """The launch for L layers: a program per layer and side, scales in ``dtype``."""
    out = _launch.acc_type(dtype)
    tiny = torch.finfo(dtype).tiny
    return _launch.LaunchPlan(_adafactor_kernel, (L, 2),
                              {"FIXED_BETA": fixed_beta, "OUT": out, "TINY": tiny, "BLOCK": _BLOCK},
                              num_warps=4, num_stages=1)


def _check(row_stat, col_stat, rows, cols, t, dtype) -> None:
    if row_stat.ndim < 1 or col_stat.shape[:-1] != row_stat.shape[:-1]:
        raise ValueError(f"{OP}: row_stat must be (..., m) and col_stat (..., n) with one batch shape, got "
                         f"{tuple(row_stat.shape)} and {tuple(col_stat.shape)}")
    for name, new, old in (("rows", rows, row_stat), ("cols", cols, col_stat)):
        if new.shape != old.shape:
            raise ValueError(f"{OP}: {name} must be {tuple(old.shape)}, got {tuple(new.shape)}")
    floats = (torch.float32, torch.float64)
    for name, x in (("row_stat", row_stat), ("col_stat", col_stat), ("rows", rows), ("cols", cols), ("t", t)):
        _launch.check_float(OP, name, x, floats)
    for a, b in ((row_stat, col_stat), (rows, cols)):
        if a.dtype != b.dtype:
            names = "row_stat and col_stat" if a is row_stat else "rows and cols"
            raise TypeError(f"{OP}: {names} must share one dtype, got {a.dtype} and {b.dtype}")
    if dtype not in floats:
        raise TypeError(f"{OP}: dtype must be float32 or float64, got {dtype}")
    layers = row_stat.shape[:-1].numel()
    if t.numel() not in (1, layers):
        raise ValueError(f"{OP}: t must hold one value, or one per layer ({layers}), got {tuple(t.shape)}")
    _launch.check_device(OP, _adafactor_kernel, row_stat, col_stat, rows, cols, t)


def adafactor_ema_scales(
    row_stat: Tensor, col_stat: Tensor, rows: Tensor, cols: Tensor, t: Tensor, beta2: float | None,
    decay_rate: float, eps1: float, dtype: torch.dtype, floor: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Adafactor's EMA, correction and scales of L layers (``reference.adafactor_ema_scales``); see the module
    docstring."""
    _check(row_stat, col_stat, rows, cols, t, dtype)
    batch, m, n = row_stat.shape[:-1], row_stat.shape[-1], col_stat.shape[-1]
    device = row_stat.device
    R, C = torch.empty_like(row_stat, memory_format=torch.contiguous_format), torch.empty_like(
        col_stat, memory_format=torch.contiguous_format)
    p = torch.empty(row_stat.shape, dtype=dtype, device=device)
    q = torch.empty(col_stat.shape, dtype=dtype, device=device)
    L = batch.numel()
    if L == 0:
        return R, C, p, q
    flat = [x.reshape(L, -1).contiguous() for x in (row_stat, col_stat, rows, cols)]
    t_flat = t.reshape(-1).contiguous()
    fixed = beta2 is not None
    beta = float(beta2) if fixed else 0.0
    scalars = [_launch.f64_bits(x) for x in (beta, 1.0 - beta, decay_rate, n * eps1, m * eps1, floor)]
    with _launch.device_guard(device):
        plan(L, fixed, dtype).launch(*flat, t_flat, 0 if t_flat.numel() == 1 else 1, R, C, p, q, m, n,
                                     *scalars)
    return R, C, p, q
