"""Triton ``kfac_metric_update``: the diagonal K-FAC metric step fused into one pass over X and S.

Contract (reference.kfac_metric_update): ``kfac_metric_update(X, S, v_in, v_out, beta, damping, power,
scale_in, scale_out) -> (v_in', v_out', M_in, M_out)`` with ``v' = β·v + (1−β)·scale·Σ_t x_t²`` and
``M = (v' + δ)^p``. ``X`` (..., T, n) and ``S`` (..., T, m) are fp32, fp64, bf16 or fp16 with any strides;
``v_in`` (..., n) and ``v_out`` (..., m) are fp32 or fp64 and share X's batch shape exactly (as the native
op requires; the reference would also broadcast). The outputs are new contiguous tensors in v's dtype;
the inputs are not modified.

Dtypes and order follow the reference: the sums accumulate in fp32 (fp64 for fp64 X), are multiplied by
the scale in that dtype, cast to v's dtype, and the EMA and damping run in v's dtype. The scalars reach
the kernel as fp64 bit patterns (``_jit.f64_bits``) and are rounded to the working dtype there, as the
reference rounds Python floats. The power is evaluated as ``exp(p·log|x|)`` in fp64 and rounded once to
v's dtype (within an ulp of ``torch.pow`` for fp32, a few ulps for fp64), with IEEE ``pow`` special cases:
``p = 0`` gives 1 everywhere (NaN included), ``p = 1`` is exact, a negative base gives NaN unless ``p``
is an integer (then the sign follows p's parity); ``p`` must be finite.

Each tensor (X, then S) takes one launch in which every program reads a column block once, reduces it and
applies the whole EPILOGUE, writing v' and M. When the batch × column blocks cannot fill the GPU, the
token dimension is split: the first launch writes per-split partial sums, and a second launch of the
same kernel (SQUARE=False) adds them in a fixed order and applies the epilogue. No atomics, so results
are deterministic.
"""

from __future__ import annotations

import torch
import triton.language as tl
from torch import Tensor

from . import _jit
from ._lang import add as _add
from .sq_sums import _auto_splits, _blocks

OP = "kfac_metric_update"

_POW_ONE, _POW_IDENTITY, _POW_GENERAL = 0, 1, 2


# The scalars' bit patterns vary per call: specialising on their value (== 1, divisible by 16) would only
# multiply compilations.
@_jit.kernel(
    do_not_specialize=("scale_bits", "beta_bits", "one_minus_beta_bits", "damping_bits", "power_bits")
)
def _kfac_kernel(
    x_ptr, T, n, rows_per_split, stride_xb, stride_xt, stride_xn,
    v_ptr, stride_vb, stride_vn, new_ptr, metric_ptr, part_ptr, stride_ps, stride_pb,
    scale_bits, beta_bits, one_minus_beta_bits, damping_bits, power_bits,
    ACC: tl.constexpr, SQUARE: tl.constexpr, EPILOGUE: tl.constexpr,
    POW_KIND: tl.constexpr, POW_INT: tl.constexpr, POW_ODD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    col_blocks = (n + BLOCK_N - 1) // BLOCK_N
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
        val = tl.load(col_ptrs + rows.to(tl.int64)[:, None] * stride_xt, mask=mask, other=0.0).to(ACC)
        if SQUARE:
            acc += val * val
        else:  # adding the partial sums of a split first pass
            acc += val
    total = tl.reduce(acc, 0, _add)

    if EPILOGUE:
        v_offs = b * stride_vb + cols.to(tl.int64) * stride_vn
        v = tl.load(v_ptr + v_offs, mask=col_mask, other=0.0)
        VT = v.dtype
        scale = scale_bits.to(tl.int64).to(tl.float64, bitcast=True)
        beta = beta_bits.to(tl.int64).to(tl.float64, bitcast=True)
        one_minus_beta = one_minus_beta_bits.to(tl.int64).to(tl.float64, bitcast=True)
        damping = damping_bits.to(tl.int64).to(tl.float64, bitcast=True)
        stat = (total * scale.to(ACC)).to(VT)
        new = v * beta.to(VT) + stat * one_minus_beta.to(VT)
        tl.store(new_ptr + b * n + cols, new, mask=col_mask)
        base = new + damping.to(VT)
        if POW_KIND == 0:
            metric = tl.full((BLOCK_N,), 1.0, VT)
        elif POW_KIND == 1:
            metric = base
        else:
            power = power_bits.to(tl.int64).to(tl.float64, bitcast=True)
            x = base.to(tl.float64)
            # fp64 exp/log: Triton's fp32 exp is an approximation; rounded once to VT this is pow to
            # within an ulp.
            mag = tl.exp(power * tl.log(tl.abs(x)))
            if POW_INT:
                if POW_ODD:
                    mag = tl.where(x < 0, -mag, mag)
            else:
                mag = tl.where(x < 0, float("nan"), mag)
            metric = mag.to(VT)
        tl.store(metric_ptr + b * n + cols, metric, mask=col_mask)
    else:
        tl.store(part_ptr + split.to(tl.int64) * stride_ps + b * stride_pb + cols, total, mask=col_mask)


def _power_flags(power: float) -> tuple[int, bool, bool]:
    if power == 0.0:
        return _POW_ONE, True, False
    if power == 1.0:
        return _POW_IDENTITY, True, True
    is_int = float(power).is_integer()
    return _POW_GENERAL, is_int, is_int and int(power) % 2 == 1


def _metric_step(x, v, beta, damping, power, scale, t_splits):
    """(v', M) for one (statistic source, state) pair."""
    device = x.device
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
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
    interpret = _jit.interpret_mode()
    block_t, block_n, warps = _blocks(n, interpret)
    col_blocks = _jit.cdiv(n, block_n)
    splits = t_splits if t_splits is not None else _auto_splits(device, B * col_blocks, T, block_t)
    rows_per_split = _jit.cdiv(_jit.cdiv(T, max(1, splits)), block_t) * block_t
    splits = _jit.cdiv(T, rows_per_split)
    kind, is_int, is_odd = _power_flags(power)
    scalars = [_jit.f64_bits(s) for s in (scale, beta, 1.0 - beta, damping, power)]
    common = {"ACC": tl.float64 if acc == torch.float64 else tl.float32, "POW_KIND": kind, "POW_INT": is_int,
              "POW_ODD": is_odd, "BLOCK_N": block_n, "num_warps": warps}
    part = new  # unused by a fused launch; any pointer of the right device will do
    with _jit.device_guard(device):
        if splits > 1:
            part = torch.empty(splits, B, n, dtype=acc, device=device)
            _launch(x3, T, n, rows_per_split, v2, new, metric, part, scalars, (B * col_blocks, splits),
                        SQUARE=True, EPILOGUE=False, BLOCK_T=block_t, **common)
            # The partial sums, read as a (B, splits, n) "token" matrix by the same kernel.
            x3, T, rows_per_split = part.permute(1, 0, 2), splits, splits
            block_t = min(64, _jit.next_pow2(splits))
        _launch(x3, T, n, rows_per_split, v2, new, metric, part, scalars, (B * col_blocks, 1),
                    SQUARE=splits == 1, EPILOGUE=True, BLOCK_T=block_t, **common)
    return new, metric


def _launch(x3, T, n, rows_per_split, v2, new, metric, part, scalars, grid, **meta):
    _kfac_kernel[grid](
        x3, T, n, rows_per_split, x3.stride(0), x3.stride(1), x3.stride(2),
        v2, v2.stride(0), v2.stride(1), new, metric, part,
        part.stride(0) if part.ndim == 3 else 0, part.stride(1) if part.ndim == 3 else 0,
        *scalars, **meta,
    )


def _check(X, S, v_in, v_out):
    for name, t in (("X", X), ("S", S)):
        if t.ndim < 2:
            raise ValueError(f"{OP}: {name} must have at least 2 dimensions, got shape {tuple(t.shape)}")
        _jit.check_float(OP, name, t)
    for name, t in (("v_in", v_in), ("v_out", v_out)):
        if t.ndim < 1:
            raise ValueError(f"{OP}: {name} must have at least 1 dimension")
        _jit.check_float(OP, name, t, (torch.float32, torch.float64))
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
    _jit.check_device(OP, X, S, v_in, v_out)


def kfac_metric_update(
    X: Tensor, S: Tensor, v_in: Tensor, v_out: Tensor, beta: float, damping: float, power: float,
    scale_in: float, scale_out: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The diagonal K-FAC metric step (``reference.kfac_metric_update``); see the module docstring."""
    return _kfac_metric_update(X, S, v_in, v_out, beta, damping, power, scale_in, scale_out, t_splits=None)


def _kfac_metric_update(X, S, v_in, v_out, beta, damping, power, scale_in, scale_out, t_splits):
    """``kfac_metric_update`` with the number of token splits forced (tests cover both paths)."""
    _check(X, S, v_in, v_out)
    beta, damping, power = float(beta), float(damping), float(power)
    new_in, m_in = _metric_step(X, v_in, beta, damping, power, float(scale_in), t_splits)
    new_out, m_out = _metric_step(S, v_out, beta, damping, power, float(scale_out), t_splits)
    return new_in, new_out, m_in, m_out
