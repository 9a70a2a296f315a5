"""Triton ``kfac_metric_update``: the diagonal K-FAC metric step fused into one pass over X and S.

Contract (reference.kfac_metric_update): ``kfac_metric_update(X, S, v_in, v_out, beta, damping, power,
scale_in, scale_out) -> (v_in', v_out', M_in, M_out)`` with ``v' = β·v + (1−β)·scale·Σ_t x_t²`` and
``M = (v' + δ)^p``. ``X`` (..., T, n) and ``S`` (..., T, m) are fp32, fp64, bf16 or fp16 with any strides;
``v_in`` (..., n) and ``v_out`` (..., m) are fp32 or fp64 and share X's batch shape exactly (as the native
op requires; the reference would also broadcast). ``beta`` is a number, or a tensor in v's dtype on X's
device, one value per batch element or one for all, which the kernel reads from device memory
(ScaledLoRSum's β2 warm-up on a GPU; the native kernels take a number only). The outputs are new
contiguous tensors in v's dtype; the inputs are not modified.

Dtypes and order follow the reference: the sums accumulate in fp32 (fp64 for fp64 X), are multiplied by
the scale in that dtype, cast to v's dtype, and the EMA and damping run in v's dtype. The scalars reach
the kernel as fp64 bit patterns (``_launch.f64_bits``) and are rounded to the working dtype there, as the
reference rounds Python floats. The power is evaluated as ``exp(p·log|x|)`` in fp64 and rounded once to
v's dtype (within an ulp of ``torch.pow`` for fp32, a few ulps for fp64), with IEEE ``pow`` special cases:
``p = 0`` gives 1 everywhere (NaN included), ``p = 1`` is exact, a negative base gives NaN unless ``p``
is an integer (then the sign follows p's parity); ``p`` must be finite.

Each tensor (X, then S) takes one launch in which every program reads a column block once, reduces it
(``sq_sums.col_block_sums``) and applies the epilogue, writing v' and M. When the batch × column blocks
cannot fill the GPU, the token dimension is split: ``col_sq_sums``' kernel writes per-split partial sums
first, and this kernel (SQUARE=False) adds them in a fixed order and applies the epilogue. No atomics, so
results are deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _launch, sq_sums
from .._numerics import math_dtype
from ._launch import f64_from_bits

OP = "kfac_metric_update"


# The scalars' bit patterns vary per call: typed i64 whatever their value, and not specialised on it (== 1,
# divisible by 16), one compiled kernel serves every value.
@triton.jit(
    do_not_specialize=["scale_bits", "beta_bits", "one_minus_beta_bits", "damping_bits", "power_bits"]
)
def _kfac_kernel(
    x_ptr, T, n, stride_xb, stride_xt, stride_xn, v_ptr, stride_vb, stride_vn, new_ptr, metric_ptr,
    beta_ptr, stride_beta,
    scale_bits: tl.int64, beta_bits: tl.int64, one_minus_beta_bits: tl.int64, damping_bits: tl.int64,
    power_bits: tl.int64,
    ACC: tl.constexpr, SQUARE: tl.constexpr, BETA_TENSOR: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # SQUARE: x is the data (B, T, n); otherwise the (B, splits, n) partial sums of col_sq_sums' kernel.
    b, cols, col_mask, total = sq_sums.col_block_sums(x_ptr, T, n, stride_xb, stride_xt, stride_xn,
                                                      SQUARE, ACC, BLOCK_T, BLOCK_N)
    v = tl.load(v_ptr + b * stride_vb + cols.to(tl.int64) * stride_vn, mask=col_mask, other=0.0)
    VT = v.dtype
    stat = (total * f64_from_bits(scale_bits).to(ACC)).to(VT)
    if BETA_TENSOR:
        # β of this batch element from device memory (ScaledLoRSum's β2 warm-up: the host cannot read it
        # without waiting); 1 − β in β's own dtype, as the reference's ``1 - beta`` computes it.
        beta_b = tl.load(beta_ptr + b * stride_beta)
        new = v * beta_b.to(VT) + stat * (1.0 - beta_b).to(VT)
    else:
        new = v * f64_from_bits(beta_bits).to(VT) + stat * f64_from_bits(one_minus_beta_bits).to(VT)
    tl.store(new_ptr + b * n + cols, new, mask=col_mask)
    base = new + f64_from_bits(damping_bits).to(VT)
    # The power is a run-time value, so one compiled kernel serves every p: its special cases are selected
    # per element, not branched on. fp64 exp/log: Triton's fp32 exp is an approximation; rounded once to
    # VT this is pow to within an ulp.
    p = f64_from_bits(power_bits)
    x = base.to(tl.float64)
    mag = tl.exp(p * tl.log(tl.abs(x)))
    # A negative base: NaN unless p is an integer, whose parity gives the sign.
    p_int = tl.floor(p) == p
    p_odd = p_int & (p - 2.0 * tl.floor(0.5 * p) == 1.0)
    mag = tl.where(x < 0, tl.where(p_int, tl.where(p_odd, -mag, mag), float("nan")), mag)
    # p = 0 gives 1 everywhere (NaN included) and p = 1 the base itself, as pow does.
    metric = tl.where(p == 0.0, 1.0, tl.where(p == 1.0, base, mag.to(VT)))
    tl.store(metric_ptr + b * n + cols, metric.to(VT), mask=col_mask)


def plan(B: int, T: int, n: int, acc: torch.dtype, target: _launch.Target,
         splits: int | None = None, beta_tensor: bool = False) -> list[_launch.LaunchPlan]:
    """The launches of one metric step over B (T, n) matrices: the fused one, or ``col_sq_sums``' partial
    sums over ``grid[1]`` token splits followed by the epilogue over them. ``splits`` forces the number of
    token splits (tests cover both paths)."""
    partials = sq_sums.plan(B, T, n, acc, target, splits)
    block_t, block_n, warps = sq_sums.blocks(n, target)
    t_splits = partials.grid[1]
    # The partial sums (a few rows) are read with the data's tiles: one compiled epilogue per dtype,
    # whatever the number of splits.
    meta = {"ACC": _launch.acc_type(acc), "SQUARE": t_splits == 1, "BETA_TENSOR": beta_tensor,
            "BLOCK_T": block_t, "BLOCK_N": block_n}
    epilogue = _launch.LaunchPlan(_kfac_kernel, (partials.grid[0], 1), meta, num_warps=warps, num_stages=3)
    return [epilogue] if t_splits == 1 else [partials, epilogue]


def _metric_step(x, v, beta, damping, power, scale, t_splits):
    """(v', M) for one (statistic source, state) pair."""
    device = x.device
    acc = math_dtype(x)
    T, n = x.shape[-2], x.shape[-1]
    new = torch.empty(v.shape, dtype=v.dtype, device=device)
    metric = torch.empty(v.shape, dtype=v.dtype, device=device)
    if v.numel() == 0:
        return new, metric
    v2 = v.reshape(-1, n)
    B = v2.shape[0]
    if T == 0:  # no tokens: the statistic is 0 (a zero-stride view needs no memory)
        x3 = torch.zeros((), dtype=acc, device=device).expand(B, 1, n)
        T = 1
    else:
        x3 = x.reshape(-1, T, n)
    tensor = isinstance(beta, Tensor)
    launches = plan(B, T, n, acc, _launch.target_of(device, _kfac_kernel), t_splits, tensor)
    # A tensor β: one value per batch element (stride 1) or one for all (stride 0); the scalar slots unused.
    beta_args = (beta, 0 if beta.numel() == 1 else 1) if tensor else (v2, 0)
    number = 0.0 if tensor else beta
    scalars = [_launch.f64_bits(s) for s in (scale, number, 1.0 - number, damping, power)]
    with _launch.device_guard(device):
        if len(launches) == 2:
            partials = launches[0]
            part = torch.empty(partials.grid[1], B, n, dtype=acc, device=device)
            partials.launch(x3, part, T, n, x3.stride(0), x3.stride(1), x3.stride(2),
                            part.stride(0), part.stride(1))
            # The partial sums, read as a (B, splits, n) "token" matrix.
            x3, T = part.permute(1, 0, 2), part.shape[0]
        launches[-1].launch(x3, T, n, x3.stride(0), x3.stride(1), x3.stride(2),
                            v2, v2.stride(0), v2.stride(1), new, metric, *beta_args, *scalars)
    return new, metric


def _check(X, S, v_in, v_out):
    for name, t in (("X", X), ("S", S)):
        if t.ndim < 2:
            raise ValueError(f"{OP}: {name} must have at least 2 dimensions, got shape {tuple(t.shape)}")
        _launch.check_float(OP, name, t)
    for name, t in (("v_in", v_in), ("v_out", v_out)):
        if t.ndim < 1:
            raise ValueError(f"{OP}: {name} must have at least 1 dimension")
        _launch.check_float(OP, name, t, (torch.float32, torch.float64))
    batch = X.shape[:-2]
    if S.shape[:-2] != batch or S.shape[-2] != X.shape[-2]:
        raise ValueError(f"{OP}: X {tuple(X.shape)} is (..., T, n) and S {tuple(S.shape)} must be "
                         "(..., T, m) with the same batch shape and T")
    if v_in.shape != batch + X.shape[-1:]:
        raise ValueError(f"{OP}: v_in must be (..., n) = {tuple(batch + X.shape[-1:])}, "
                         f"got {tuple(v_in.shape)}")
    if v_out.shape != batch + S.shape[-1:]:
        raise ValueError(f"{OP}: v_out must be (..., m) = {tuple(batch + S.shape[-1:])}, "
                         f"got {tuple(v_out.shape)}")
    _launch.check_device(OP, _kfac_kernel, X, S, v_in, v_out)


def kfac_metric_update(
    X: Tensor, S: Tensor, v_in: Tensor, v_out: Tensor, beta: float, damping: float, power: float,
    scale_in: float, scale_out: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The diagonal K-FAC metric step (``reference.kfac_metric_update``); see the module docstring."""
    return _kfac_metric_update(X, S, v_in, v_out, beta, damping, power, scale_in, scale_out, t_splits=None)


def _kfac_metric_update(X, S, v_in, v_out, beta, damping, power, scale_in, scale_out, t_splits):
    """``kfac_metric_update`` with the number of token splits forced (tests cover both paths)."""
    _check(X, S, v_in, v_out)
    if isinstance(beta, Tensor):
        batch = X.shape[:-2].numel()
        if beta.numel() not in (1, batch):
            raise ValueError(f"{OP}: a tensor beta holds one value, or one per batch element ({batch}), got "
                             f"{tuple(beta.shape)}")
        if beta.dtype != v_in.dtype:  # the reference would promote the EMA to β's dtype
            raise TypeError(f"{OP}: a tensor beta must have v's dtype ({v_in.dtype}), got {beta.dtype}")
        _launch.check_device(OP, _kfac_kernel, X, beta)
        beta = beta.reshape(-1).contiguous()
    else:
        beta = float(beta)
    damping, power = float(damping), float(power)
    new_in, m_in = _metric_step(X, v_in, beta, damping, power, float(scale_in), t_splits)
    new_out, m_out = _metric_step(S, v_out, beta, damping, power, float(scale_out), t_splits)
    return new_in, new_out, m_in, m_out
