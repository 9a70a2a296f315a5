"""LoRA-One / LoRA-GA initialisation as pure functions of tensors (spec/lora_one.md §1, §2, §7, §8).

Contract:

* The gradient ``G`` (m×n) of a layer's merged weight is never needed explicitly. The top-k singular
  triplets come from randomized block subspace iteration (Halko, Martinsson & Tropp 2011, Alg. 4.4) driven
  by two callables that return the thin products ``G·V`` and ``Gᵀ·U``; the model-level driver
  (``lorsum_kernels.init``) implements them as passes over the init batches. This is the same implicit
  block power method as LoRSum with λ → 0 (spec/lorsum.md §3.5), started from a Gaussian test matrix.
* ``truncated_svd`` is the exact reference path (it needs G itself).
* The factor maps follow the PEFT orientation: ``A`` is r×n (``lora_A.weight``), ``B`` is m×r
  (``lora_B.weight``), the merged weight is ``W0 + s·B·A``. They take the triplets of **+G** and put the
  sign in themselves, so ``lora_one_factors`` always realises a *descent* step.
* Math in fp32, or fp64 when an input is fp64 (DESIGN.md "Numerical policy"); callers cast results to the
  parameter dtype. Every function accepts leading batch dimensions.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from .._numerics import math_dtype
from .low_rank_sum import compute_dtype

__all__ = [
    "gaussian_test_matrix",
    "orthonormalize",
    "subspace_iteration",
    "rayleigh_ritz_svd",
    "randomized_svd",
    "truncated_svd",
    "lora_one_factors",
    "lora_ga_factors",
]

Triplets = tuple[Tensor, Tensor, Tensor]


def gaussian_test_matrix(
    n: int,
    width: int,
    generator: torch.Generator,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    batch_shape: Sequence[int] = (),
) -> Tensor:
    """A standard Gaussian n×width test matrix drawn from ``generator`` on the CPU, then moved.

    Drawing on the CPU makes the sketch identical on every device and every data-parallel rank for the
    same seed (DESIGN.md "Randomness").

    Args:
        n: rows (the number of columns of G).
        width: columns, ``k + oversampling``.
        generator: a CPU ``torch.Generator``; it advances by ``n·width`` draws per batch element.
        dtype: dtype of the returned matrix (the draw itself is fp64 when dtype is fp64, else fp32).
        device: where the result goes.
        batch_shape: leading batch dimensions.

    Returns:
        Tensor of shape ``(*batch_shape, n, width)``.
    """
    draw_dtype = math_dtype(dtype)
    omega = torch.randn(*batch_shape, n, width, generator=generator, dtype=draw_dtype, device="cpu")
    return omega.to(device=device, dtype=dtype)


def orthonormalize(Y: Tensor) -> Tensor:
    """An orthonormal basis of the column space of ``Y`` (…, m, ℓ), by Householder QR.

    Householder QR rather than Cholesky-QR: the sketch of a low-rank G (few init tokens, or a layer the
    loss barely reaches) is rank-deficient, where Cholesky-QR breaks down but Householder still returns
    exactly orthonormal columns (spanning arbitrary directions beyond the rank, which is harmless).

    Args:
        Y: tall matrix (ℓ ≤ m), any float dtype.

    Returns:
        Q with the shape of ``Y``, in the compute dtype (fp64 for fp64 input, else fp32).
    """
    Q, _ = torch.linalg.qr(Y.to(compute_dtype(Y)), mode="reduced")
    return Q


def subspace_iteration(
    apply_G: Callable[[list[Tensor]], list[Tensor]],
    apply_Gt: Callable[[list[Tensor]], list[Tensor]],
    omegas: list[Tensor],
    power_iters: int,
) -> tuple[list[Tensor], list[Tensor]]:
    """Randomized block subspace iteration on several implicit matrices at once.

    Runs, for every matrix ``G_l`` of the list in lock-step (so that one call of ``apply_G`` can be one
    pass over the data for all layers)::

        Q = orth(G Ω)
        repeat power_iters times:  Q = orth(G · orth(Gᵀ Q))
        Z = Gᵀ Q

    That is ``2·power_iters + 2`` calls of the callables in total. Orthonormalising after every product
    keeps the small singular directions from being lost to round-off (HMT Alg. 4.4). The subspace error
    of the top-k directions decays like ``(σ_{ℓ+1}/σ_k)^(2·power_iters+1)`` with ℓ the sketch width.

    Args:
        apply_G: maps a list of V_l (n_l×ℓ_l) to the list of ``G_l @ V_l`` (m_l×ℓ_l).
        apply_Gt: maps a list of U_l (m_l×ℓ_l) to the list of ``G_lᵀ @ U_l`` (n_l×ℓ_l).
        omegas: the test matrices Ω_l (n_l×ℓ_l), e.g. from ``gaussian_test_matrix``.
        power_iters: q ≥ 0, the number of extra (Gᵀ, G) rounds.

    Returns:
        ``(Qs, Zs)``: orthonormal bases Q_l (m_l×ℓ_l) of the approximate dominant column space and
        ``Z_l = G_lᵀ Q_l``, the input of ``rayleigh_ritz_svd``.
    """
    if isinstance(power_iters, bool) or not isinstance(power_iters, int) or power_iters < 0:
        raise ValueError(f"power_iters must be an integer >= 0, got {power_iters!r}")
    Qs = [orthonormalize(Y) for Y in apply_G(list(omegas))]
    for _ in range(power_iters):
        Vs = [orthonormalize(Z) for Z in apply_Gt(Qs)]
        Qs = [orthonormalize(Y) for Y in apply_G(Vs)]
    return Qs, apply_Gt(Qs)


def rayleigh_ritz_svd(Q: Tensor, Z: Tensor, k: int) -> Triplets:
    """Top-k singular triplets of ``Q Qᵀ G`` from ``Q`` (m×ℓ, orthonormal) and ``Z = Gᵀ Q`` (n×ℓ).

    ``Qᵀ G = Zᵀ`` is only ℓ×n, so its SVD is cheap: ``Zᵀ = Ũ Σ Vh`` gives ``U = Q Ũ``. The result is the
    best rank-k approximation of G within the column space of Q.

    Args:
        Q: orthonormal basis (…, m, ℓ).
        Z: ``Gᵀ Q`` (…, n, ℓ).
        k: number of triplets, ``k ≤ ℓ``.

    Returns:
        ``(U (…, m, k), sigma (…, k), Vh (…, k, n))`` in the compute dtype, sigma descending.
    """
    if k > Q.shape[-1]:
        raise ValueError(f"k={k} is larger than the sketch width {Q.shape[-1]}")
    dt = compute_dtype(Q, Z)
    U_small, sigma, Vh = torch.linalg.svd(Z.to(dt).mT, full_matrices=False)
    return Q.to(dt) @ U_small[..., :, :k], sigma[..., :k], Vh[..., :k, :]


def randomized_svd(
    G: Tensor,
    k: int,
    *,
    oversample: int = 16,
    power_iters: int = 8,
    generator: torch.Generator | None = None,
) -> Triplets:
    """Top-k singular triplets of an explicit matrix G (…, m, n) by ``subspace_iteration``.

    The convenience form of the implicit method, for tests and for callers that already hold G; it uses
    exactly the code path of the model-level driver.

    Args:
        G: the matrix, any float dtype.
        k: number of triplets, ``1 ≤ k ≤ min(m, n)``.
        oversample: extra sketch columns; the width is ``min(k + oversample, m, n)``.
        power_iters: see ``subspace_iteration``.
        generator: CPU generator for the test matrix (a fresh one seeded with 0 when None).

    Returns:
        ``(U, sigma, Vh)`` as in ``rayleigh_ritz_svd``.
    """
    m, n = G.shape[-2], G.shape[-1]
    if not 1 <= k <= min(m, n):
        raise ValueError(f"k={k} must be in [1, min(m, n) = {min(m, n)}]")
    width = min(k + oversample, m, n)
    dt = compute_dtype(G)
    Gc = G.to(dt)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    omega = gaussian_test_matrix(n, width, gen, dtype=dt, device=G.device, batch_shape=G.shape[:-2])
    Qs, Zs = subspace_iteration(
        lambda Vs: [Gc @ Vs[0]], lambda Us: [Gc.mT @ Us[0]], [omega], power_iters
    )
    return rayleigh_ritz_svd(Qs[0], Zs[0], k)


def truncated_svd(G: Tensor, k: int) -> Triplets:
    """Top-k singular triplets of G (…, m, n) from a full (exact) SVD: the reference path.

    Args:
        G: the matrix, any float dtype (the SVD runs in the compute dtype).
        k: number of triplets, ``k ≤ min(m, n)``.

    Returns:
        ``(U (…, m, k), sigma (…, k), Vh (…, k, n))`` in the compute dtype.
    """
    U, sigma, Vh = torch.linalg.svd(G.to(compute_dtype(G)), full_matrices=False)
    return U[..., :, :k], sigma[..., :k], Vh[..., :k, :]


def lora_one_factors(
    U: Tensor, sigma: Tensor, Vh: Tensor, *, gamma: float = 128.0, normalize: bool = True
) -> tuple[Tensor, Tensor]:
    """LoRA-One's factors from the top-r singular triplets of **+G** (spec/lora_one.md §1.2).

    The official code takes the SVD of −G; with the triplets of +G the minus sign goes on B, which gives
    the same product (sign flips of singular vectors cancel in B·A)::

        B0 = −U_r diag(√σ) / √(γ·σ_1),   A0 = diag(√σ) V_rᵀ / √(γ·σ_1)
        s·B0·A0 = −(s / (γ·σ_1)) · [G]_r

    i.e. the merged weight moves by one rank-r gradient-descent step with step size η = s/(γ·σ_1(G))
    along −G, whatever the layer's scale s (α/r or α/√r): its spectral norm is s/γ. The factorisation
    is balanced, ``B0ᵀB0 = A0A0ᵀ = diag(σ/σ_1)/γ``.

    Args:
        U: left singular vectors of G (…, m, r), ``sigma`` (…, r) descending, ``Vh`` (…, r, n).
        sigma: singular values of G, descending; ``sigma[..., 0]`` is σ_1.
        Vh: right singular vectors of G, transposed.
        gamma: γ > 0 (the official default is 128).
        normalize: True (the official code) divides by σ_1. False gives the older "Spectral-Init"
            variant ``B0 = −U_r √Σ_r/√γ``, ``A0 = √Σ_r V_rᵀ/√γ``, i.e. ``s·B0·A0 = −(s/γ)[G]_r``
            (the removed ``spec_gamma = c`` corresponds to ``gamma = 1/c``).

    Returns:
        ``(A0 (…, r, n), B0 (…, m, r))`` in the compute dtype. A zero G (σ_1 = 0) gives zero factors,
        never NaN; callers should reject it (LoRA cannot leave B = A = 0).
    """
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    dt = compute_dtype(U, sigma, Vh)
    U, sigma, Vh = U.to(dt), sigma.to(dt), Vh.to(dt)
    root = sigma.clamp_min(0).sqrt()
    denom = gamma * (sigma[..., :1] if normalize else torch.ones_like(sigma[..., :1]))
    # √(σ_i/(γσ_1)); a zero σ_1 is clamped so that G = 0 maps to zero factors instead of 0/0.
    weights = root / denom.clamp_min(torch.finfo(dt).tiny).sqrt()
    B0 = -U * weights.unsqueeze(-2)
    A0 = weights.unsqueeze(-1) * Vh
    return A0, B0


def lora_ga_factors(
    U: Tensor, sigma: Tensor, Vh: Tensor, rank: int, *, gamma: float = 16.0
) -> tuple[Tensor, Tensor]:
    """LoRA-GA's factors ("ArB2r" direction, "stable" scale) from the top-2r triplets of G (spec §2).

    ``A0 = c·V_{1:r}ᵀ`` and ``B0 = c·U_{r+1:2r}`` with ``c = m^{1/4}/√γ``. The caller must offset the base
    weight, ``W0 ← W0 − s·B0·A0``, so the model's function is unchanged; then one plain gradient step of
    size η changes the merged weight by ``−η s² (√m/γ) [G]_{2r} + O(η²)``. Singular-vector signs do not
    matter (the offset cancels them at step 0, and ``B0B0ᵀ``, ``A0ᵀA0`` are sign-free).

    Args:
        U: (…, m, ≥2r) left singular vectors of G; ``sigma`` is unused but accepted for symmetry.
        sigma: singular values (unused by the "stable" scale).
        Vh: (…, ≥2r, n) right singular vectors.
        rank: r.
        gamma: γ > 0 (LoRA-GA's default is 16).

    Returns:
        ``(A0 (…, r, n), B0 (…, m, r))`` in the compute dtype.
    """
    del sigma
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    if U.shape[-1] < 2 * rank or Vh.shape[-2] < 2 * rank:
        raise ValueError(f"LoRA-GA needs the top 2r = {2 * rank} triplets, got {U.shape[-1]}")
    dt = compute_dtype(U, Vh)
    c = U.shape[-2] ** 0.25 / gamma**0.5
    return c * Vh[..., :rank, :].to(dt), c * U[..., :, rank : 2 * rank].to(dt)
