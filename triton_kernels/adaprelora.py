"""Triton ``adaprelora_solve``: AdaPreLoRA's H-weighted factor solve, its r×r work in Triton.

Contract (reference.adaprelora_solve): ``adaprelora_solve(A, B, g_A, g_B, p, q, *, ridge) -> (dA, dB)`` for
``A``, ``g_A`` (..., r, n), ``B``, ``g_B`` (..., m, r), positive ``p`` (..., m) and ``q`` (..., n) (positivity
is the caller's, not checked); batch dimensions broadcast as in the reference. ``ridge`` is the relative
ridge of both r×r Grams (``reference.ridged_cholesky``): a number, or a tensor of one value per layer that
broadcasts against the batch dimensions (any device; it is copied to the inputs' device as fp64). fp32,
fp64, bf16 and fp16 inputs, mixed too: the arithmetic runs in fp32 (fp64 if any input is fp64) and ``dA``,
``dB`` are new tensors of the promoted dtype of the six inputs, as the native op returns them.

What runs where. torch (cuBLAS on a GPU, as in the reference): the r-wide products ``M_B = Bᵀ·P·B``,
``M_A = A·Q·Aᵀ``, the cross right-hand sides ``Y·Aᵀ`` and ``(P·B)ᵀ·Z`` and the final products and
combinations, plus the casts to the working dtype. Triton (``spd.ridged_spd_solve``, the kernel of
``spd_solve`` with the caller's ridge): both ridged Cholesky factorisations and all four substitutions,
``Y = M_B⁻¹·g_A``, ``Z = P⁻¹·g_B·M_A⁻¹``, ``M_B⁻¹K·M_A⁻¹`` from g_A and from g_B, on r-wide panels: four
launches, each program factoring its matrix in registers (spd.py says why the factor is not shared
through global memory). Ranks above ``spd.MAX_R`` are solved by torch (``ridged_cholesky`` with the same
ridge). No status is read on the host, no data-dependent Python branch: the ridge fallback is chosen per
layer on the device.

Where the results differ from the reference: within rounding (the Triton factorisation and substitution
order), and where a Gram cannot be factored even with the fallback ridge (a NaN or inf input, or an
indefinite Gram), that layer's ``dA`` and ``dB`` come out NaN, as the native kernels return them; the
reference then continues with LAPACK's partial factor, whose value depends on the LAPACK build.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _launch
from .._numerics import math_dtype
from .spd import _spd_solve_kernel, ridged_spd_solve

OP = "adaprelora_solve"


def _check(A: Tensor, B: Tensor, g_A: Tensor, g_B: Tensor, p: Tensor, q: Tensor, ridge) -> torch.Size:
    for name, t, dims in (("A", A, 2), ("B", B, 2), ("g_A", g_A, 2), ("g_B", g_B, 2), ("p", p, 1), ("q", q, 1)):
        if t.ndim < dims:
            raise ValueError(f"{OP}: {name} must have at least {dims} dimension{'s' if dims > 1 else ''}, "
                             f"got shape {tuple(t.shape)}")
        _launch.check_float(OP, name, t)
    r, n, m = A.shape[-2], A.shape[-1], B.shape[-2]
    if B.shape[-1] != r:
        raise ValueError(f"{OP}: A {tuple(A.shape)} is (..., r, n) and B {tuple(B.shape)} must be (..., m, r) "
                         "with the same r")
    for name, t, want in (("g_A", g_A, (r, n)), ("g_B", g_B, (m, r)), ("p", p, (m,)), ("q", q, (n,))):
        if tuple(t.shape[-len(want):]) != want:
            raise ValueError(f"{OP}: {name} must end in {want} (r = {r}, n = {n}, m = {m}), "
                             f"got shape {tuple(t.shape)}")
    shapes = [A.shape[:-2], B.shape[:-2], g_A.shape[:-2], g_B.shape[:-2], p.shape[:-1], q.shape[:-1]]
    if isinstance(ridge, Tensor):
        if not ridge.is_floating_point():
            raise TypeError(f"{OP}: a ridge tensor must be floating point, got {ridge.dtype}")
        shapes.append(ridge.shape)
    try:
        return torch.broadcast_shapes(*shapes)
    except RuntimeError as e:
        raise ValueError(f"{OP}: the batch dimensions of the inputs (and the ridge) do not broadcast: "
                         f"{[tuple(s) for s in shapes]}") from e


def adaprelora_solve(
    A: Tensor, B: Tensor, g_A: Tensor, g_B: Tensor, p: Tensor, q: Tensor, *, ridge
) -> tuple[Tensor, Tensor]:
    """AdaPreLoRA's factor direction ``(dA, dB)`` (``reference.adaprelora_solve``); see the module
    docstring."""
    batch = _check(A, B, g_A, g_B, p, q, ridge)
    device = _launch.check_device(OP, _spd_solve_kernel, A, B, g_A, g_B, p, q)
    out_dtype = A.dtype
    for t in (B, g_A, g_B, p, q):
        out_dtype = torch.promote_types(out_dtype, t.dtype)
    acc = math_dtype(out_dtype)
    r, n, m = A.shape[-2], A.shape[-1], B.shape[-2]
    if r == 0 or batch.numel() == 0 or (m == 0 and n == 0):
        return (torch.zeros(batch + (r, n), dtype=out_dtype, device=device),
                torch.zeros(batch + (m, r), dtype=out_dtype, device=device))

    A_, B_, gA, gB, p_, q_ = (t.to(acc) for t in (A, B, g_A, g_B, p, q))
    pB = B_ * p_.unsqueeze(-1)
    # Every layer gets its own factorisation with its own ridge: the Grams take the full batch shape (views).
    M_B = (B_.mT @ pB).expand(batch + (r, r))
    M_A = ((A_ * q_.unsqueeze(-2)) @ A_.mT).expand(batch + (r, r))
    Y = ridged_spd_solve(M_B, gA, ridge, left=True)  # M_B⁻¹ g_A (r×n)
    Z = ridged_spd_solve(M_A, gB / p_.unsqueeze(-1), ridge, left=False)  # P⁻¹ g_B M_A⁻¹ (m×r)
    cross_A = ridged_spd_solve(M_A, Y @ A_.mT, ridge, left=False)  # M_B⁻¹ K M_A⁻¹ from g_A
    cross_B = ridged_spd_solve(M_B, pB.mT @ Z, ridge, left=True)  # M_B⁻¹ K M_A⁻¹ from g_B
    dA = torch.add(Y / q_.unsqueeze(-2), cross_A @ A_, alpha=-0.5)
    dB = torch.add(Z, B_ @ cross_B, alpha=-0.5)
    return dA.to(out_dtype), dB.to(out_dtype)
