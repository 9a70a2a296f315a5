"""One function per hot-path op, each running on the backend that ``backends.resolve_backend`` picks.

The signatures and semantics are those of ``reference`` (read its docstrings); this module only
dispatches. ``backend`` is "auto", "native", "triton" or "torch" (see DESIGN.md "Dispatch"), or a
``Backend`` value from :func:`resolve`, which a caller running many ops (an optimizer step) makes once and
passes down: each op is then resolved once per value, not per call. An op with no native or Triton
implementation yet runs the reference under "auto"; forcing a backend that does not implement the op
raises. The layers above (``functional``, ``optim``, ``init``) reach the backends only through this module.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from . import _half_steps, _native, backends, reference
from ._numerics import as_dtype
from .backends import Backend

__all__ = ["Backend", "check", "fused_or_reference", "implementation", "resolve", "lorsum_update_in",
           "lorsum_update_out",
           "spd_solve", "col_sq_sums", "row_col_energies"]


def resolve(backend: str | None | Backend, device: torch.device | str) -> Backend:
    """The backend choice for ``device``, resolved once (``backends.resolve``): pass it as ``backend=``."""
    return backends.resolve(backend, device)


def implementation(backend: str | None | Backend, device: torch.device, op: str) -> str:
    """Which implementation ("native", "triton" or "torch") runs ``op`` on ``device``."""
    if isinstance(backend, Backend):
        return backend.of(op, device)
    return backends.resolve_backend(backend, device, op)


def fused_or_reference(backend: str | None | Backend, device: torch.device, op: str) -> str | None | Backend:
    """The backend to pass to ``op``, a fused form of reference ops that a step runs whatever backend it was
    given (``finish_normalized_stacked``, ``adafactor_ema_scales``): ``backend`` itself where it has ``op``,
    else the reference (``native`` on a GPU or ``triton`` on a CPU lack it: the step does not raise)."""
    try:
        implementation(backend, device, op)
    except RuntimeError:
        return "torch"
    return backend


def check(backend: str | None, model, op_names: tuple[str, ...]) -> None:
    """For constructors, before anything is built: an unknown name raises, and so does a forced backend
    that lacks one of ``op_names`` on a device of the model (``backends.check_backend``)."""
    backends.check_name(backend)
    backends.check_backend(backend, model, op_names)


def lorsum_update_in(
    B_hat: Tensor,
    anchor: tuple[Tensor, Tensor],
    pairs: Sequence[tuple[Tensor, Tensor]],
    coeffs: Sequence,
    lmbd,
    metrics: tuple[Tensor, Tensor] | None = None,
    *,
    backend: str | None | Backend = "auto",
) -> Tensor:
    name = implementation(backend, B_hat.device, "lorsum_update_in")
    if name == "native":
        return torch.ops.lorsum.lorsum_update_in(*_half_step_args(B_hat, anchor, pairs, coeffs, lmbd, metrics))
    if name == "triton":
        from . import triton_kernels

        return triton_kernels.lorsum_update_in(B_hat, anchor, pairs, coeffs, lmbd, metrics)
    return reference.lorsum_update_in(B_hat, anchor, pairs, coeffs, lmbd, metrics)


def lorsum_update_out(
    A_hat: Tensor,
    anchor: tuple[Tensor, Tensor],
    pairs: Sequence[tuple[Tensor, Tensor]],
    coeffs: Sequence,
    lmbd,
    metrics: tuple[Tensor, Tensor] | None = None,
    *,
    backend: str | None | Backend = "auto",
) -> Tensor:
    name = implementation(backend, A_hat.device, "lorsum_update_out")
    if name == "native":
        return torch.ops.lorsum.lorsum_update_out(*_half_step_args(A_hat, anchor, pairs, coeffs, lmbd, metrics))
    if name == "triton":
        from . import triton_kernels

        return triton_kernels.lorsum_update_out(A_hat, anchor, pairs, coeffs, lmbd, metrics)
    return reference.lorsum_update_out(A_hat, anchor, pairs, coeffs, lmbd, metrics)


def lorsum_rounds(
    anchor: tuple[Tensor, Tensor],
    pairs: Sequence[tuple[Tensor, Tensor]],
    coeffs: Sequence,
    lmbd,
    iters: int,
    metrics: tuple[Tensor, Tensor] | None = None,
    *,
    backend: str | None | Backend = "auto",
    first_A: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``iters`` rounds of the half-steps from ``anchor = (A0, B0)``: the A-step from B0 (or ``first_A``, its
    result computed already), the B-step from its result, and so on; ``iters = 0`` is one Jacobi round (both
    half-steps from the anchor). The calls of ``lorsum_update_in`` / ``lorsum_update_out`` in turn, with the
    same arguments; where both run natively those are built once, for every call (a streamed layer step
    calls this once per layer, in backward, where each Python call costs several times its warm time)."""
    return prepare_lorsum_rounds(anchor, pairs, coeffs, lmbd, iters, metrics, backend=backend,
                                 first_A=first_A)()


def prepare_lorsum_rounds(
    anchor: tuple[Tensor, Tensor],
    pairs: Sequence[tuple[Tensor, Tensor]],
    coeffs: Sequence,
    lmbd,
    iters: int,
    metrics: tuple[Tensor, Tensor] | None = None,
    *,
    backend: str | None | Backend = "auto",
    first_A: Tensor | None = None,
) -> Callable[[], tuple[Tensor, Tensor]]:
    """``lorsum_rounds`` in two parts: the native ops' arguments are built now, and the returned function
    runs the rounds. A queue of layer steps (``StreamedStep.flush``) builds every layer's arguments first,
    then runs the native calls back to back: each layer's step streams megabytes of X and S through the
    cache, and Python run between two of them finds its own data evicted (docs/step_cost.md)."""
    A0, B0 = anchor
    hat = B0 if first_A is None else first_A
    if _native_rounds(backend, B0.device):
        # The first call's iterate (B0 for the A-step, or first_A for the B-step), broadcast as the ops would.
        hat, *rest = _half_step_args(hat, anchor, pairs, coeffs, lmbd, metrics)
        step_in, step_out = _native_half_steps(rest)
        return lambda: _alternate(step_in, step_out, hat, rest[0], iters, first_A is not None)

    def step_in(iterate):
        return lorsum_update_in(iterate, anchor, pairs, coeffs, lmbd, metrics, backend=backend)

    def step_out(iterate):
        return lorsum_update_out(iterate, anchor, pairs, coeffs, lmbd, metrics, backend=backend)
    return lambda: _alternate(step_in, step_out, hat, A0, iters, first_A is not None)


def _native_rounds(backend, device) -> bool:
    return implementation(backend, device, "lorsum_update_in") == "native" and \
        implementation(backend, device, "lorsum_update_out") == "native"


def _native_half_steps(rest: list):
    """The native A- and B-step as functions of their iterate, the other arguments (``_half_step_args``
    less the first) given."""
    def step_in(iterate):
        return torch.ops.lorsum.lorsum_update_in(iterate, *rest)

    def step_out(iterate):
        return torch.ops.lorsum.lorsum_update_out(iterate, *rest)
    return step_in, step_out


def _alternate(step_in, step_out, hat: Tensor, A0: Tensor, iters: int, hat_is_first_A: bool):
    """The half-steps of ``lorsum_rounds`` in turn from ``hat`` (B0, or the first A-step's result)."""
    A_new = hat if hat_is_first_A else step_in(hat)
    if iters == 0:
        return A_new, step_out(A0)
    B_new = step_out(A_new)
    for _ in range(iters - 1):
        A_new = step_in(B_new)
        B_new = step_out(A_new)
    return A_new, B_new


__all__ += ["lorsum_rounds", "prepare_lorsum_rounds"]


def spd_solve(gram: Tensor, rhs: Tensor, *, left: bool = True, backend: str | None | Backend = "auto") -> Tensor:
    name = implementation(backend, gram.device, "spd_solve")
    if name == "native":
        return torch.ops.lorsum.spd_solve(gram, rhs, left)
    if name == "triton":
        from . import triton_kernels

        return triton_kernels.spd_solve(gram, rhs, left=left)
    return reference.spd_solve(gram, rhs, left=left)


def col_sq_sums(x: Tensor, *, backend: str | None | Backend = "auto") -> Tensor:
    name = implementation(backend, x.device, "col_sq_sums")
    if name == "native":
        return torch.ops.lorsum.col_sq_sums(x)
    if name == "triton":
        from . import triton_kernels

        return triton_kernels.col_sq_sums(x)
    return reference.col_sq_sums(x)


def row_col_energies(
    X: Tensor, S: Tensor, *, block_size: int = 256, backend: str | None | Backend = "auto"
) -> tuple[Tensor, Tensor]:
    name = implementation(backend, X.device, "row_col_energies")
    if name == "native":
        return torch.ops.lorsum.row_col_energies(X, S)  # its own blocking; block_size is the reference's
    if name == "triton":
        from . import triton_kernels

        return triton_kernels.row_col_energies(X, S)  # its own tiles, as native
    return reference.row_col_energies(X, S, block_size=block_size)


__all__ += ["adaprelora_solve", "tangent_energies"]


def adaprelora_solve(
    A: Tensor, B: Tensor, g_A: Tensor, g_B: Tensor, p: Tensor, q: Tensor, *, ridge,
    backend: str | None | Backend = "auto",
) -> tuple[Tensor, Tensor]:
    name = implementation(backend, A.device, "adaprelora_solve")
    if name == "native":
        # The native schema wants one batch shape (expanded views, no copies) and the ridge as a float64
        # tensor, 0-d or one value per layer: a Python number never becomes a device tensor (no copy, no sync).
        batch = A.shape[:-2]
        if not (g_A.shape == A.shape and B.shape[:-2] == batch and g_B.shape == B.shape
                and p.shape[:-1] == batch and q.shape[:-1] == batch):  # broadcast_shapes costs ~0.1 ms
            batch = torch.broadcast_shapes(
                A.shape[:-2], B.shape[:-2], g_A.shape[:-2], g_B.shape[:-2], p.shape[:-1], q.shape[:-1]
            )
            A, g_A = A.expand(batch + A.shape[-2:]), g_A.expand(batch + g_A.shape[-2:])
            B, g_B = B.expand(batch + B.shape[-2:]), g_B.expand(batch + g_B.shape[-2:])
            p, q = p.expand(batch + p.shape[-1:]), q.expand(batch + q.shape[-1:])
        rho = ridge if isinstance(ridge, Tensor) else torch.tensor(float(ridge), dtype=torch.float64)
        if rho.ndim > 0:
            rho = rho.expand(batch).reshape(-1)
        return torch.ops.lorsum.adaprelora_solve(A, B, g_A, g_B, p, q, rho)
    if name == "triton":
        from . import triton_kernels

        return triton_kernels.adaprelora_solve(A, B, g_A, g_B, p, q, ridge=ridge)
    return reference.adaprelora_solve(A, B, g_A, g_B, p, q, ridge=ridge)


def tangent_energies(
    B: Tensor, E: Tensor, F: Tensor, A: Tensor, *, backend: str | None | Backend = "auto"
) -> tuple[Tensor, Tensor]:
    name = implementation(backend, B.device, "tangent_energies")
    if name == "native":
        # The native schema wants one batch shape (expanded views, no copies); the reference broadcasts
        # Z = [B F] against W = [E; A].
        batch = B.shape[:-2]
        if not (E.shape[:-2] == batch and F.shape[:-2] == batch and A.shape[:-2] == batch):
            batch = torch.broadcast_shapes(B.shape[:-2], E.shape[:-2], F.shape[:-2], A.shape[:-2])
            B, E, F, A = (t.expand(batch + t.shape[-2:]) for t in (B, E, F, A))
        return torch.ops.lorsum.tangent_energies(B, E, F, A)
    if name == "triton":
        from . import triton_kernels

        return triton_kernels.tangent_energies(B, E, F, A)
    return reference.tangent_energies(B, E, F, A)


__all__ += ["lorsum_update_with_token_product"]


def lorsum_update_with_token_product(
    side: str,
    hat: Tensor,
    anchor: tuple[Tensor, Tensor],
    pairs: Sequence[tuple[Tensor, Tensor]],
    coeffs: Sequence,
    lmbd,
    metrics: tuple[Tensor, Tensor] | None,
    token_product: Tensor,
    *,
    backend: str | None | Backend = "auto",
) -> Tensor:
    """A LoRSum half-step (``side`` "in": the A-step with ``hat`` = B̂; "out": the B-step with ``hat`` = Â)
    whose token pair is given by its r-wide token product, already summed over tokens and weighted by
    its coefficient: ``c·(S·B̂)ᵀX`` (r×n) or ``c·Sᵀ(X·Âᵀ)`` (m×r), e.g. averaged over data-parallel ranks.
    ``pairs`` and ``coeffs`` are the other terms, as for ``lorsum_update_in``.

    A composite: the half-step algebra of the reference around the backend's r×r solve (``spd_solve``);
    no backend has a kernel that takes the product in place of the pair."""
    update = {"in": _half_steps.update_in, "out": _half_steps.update_out}[side]
    return update(hat, anchor, pairs, coeffs, lmbd, metrics, extra=token_product,
                  solve=lambda gram, rhs, left: spd_solve(gram, rhs, left=left, backend=backend))


# --------------------------------------------------------------------------------------------------
# Fused hot paths with a native kernel (reference.pair_products, reference.kfac_metric_update), and the
# conversion of the Python-level arguments of the half-steps into the native schema (csrc/lorsum.cpp).

__all__ += ["kfac_metric_update", "pair_products"]


def pair_products(
    f_in: Tensor,
    f_out: Tensor,
    W: Tensor | None = None,
    V: Tensor | None = None,
    *,
    backend: str | None | Backend = "auto",
) -> tuple[Tensor, Tensor]:
    name = implementation(backend, f_in.device, "pair_products")
    if name == "native":
        return torch.ops.lorsum.pair_products(f_in, f_out, W, V)
    if name == "triton":
        from . import triton_kernels

        return triton_kernels.pair_products(f_in, f_out, W, V)
    return reference.pair_products(f_in, f_out, W, V)


def kfac_metric_update(
    X: Tensor,
    S: Tensor,
    v_in: Tensor,
    v_out: Tensor,
    beta: float | Tensor,
    damping: float,
    power: float,
    scale_in: float,
    scale_out: float,
    *,
    backend: str | None | Backend = "auto",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``reference.kfac_metric_update``. ``beta`` a number, or a tensor of one value per batch element
    (ScaledLoRSum's β2 warm-up, on the device: its value is not read on the host): the native kernels take a
    number, so a tensor runs on Triton where ``kfac_metric_on_triton`` says so, else on the reference."""
    if isinstance(beta, Tensor):
        args = (X, S, v_in, v_out, beta, float(damping), float(power), float(scale_in), float(scale_out))
        if kfac_metric_on_triton(backend, X.device):
            from . import triton_kernels

            return triton_kernels.kfac_metric_update(*args)
        per_row = beta.reshape(*v_in.shape[:-1], 1) if beta.numel() > 1 else beta.reshape(())
        return reference.kfac_metric_update(*args[:4], per_row, *args[5:])
    args = (X, S, v_in, v_out, float(beta), float(damping), float(power), float(scale_in), float(scale_out))
    name = implementation(backend, X.device, "kfac_metric_update")
    if name == "native":
        return torch.ops.lorsum.kfac_metric_update(*args)
    if name == "triton":
        from . import triton_kernels

        return triton_kernels.kfac_metric_update(*args)
    return reference.kfac_metric_update(*args)


__all__ += ["kfac_metric_on_triton"]


def kfac_metric_on_triton(backend: str | None | Backend, device: torch.device) -> bool:
    """Whether ``kfac_metric_update`` with a tensor β runs fused (on Triton) on ``device``: where the backend
    would run the op natively or on Triton and Triton runs there, a GPU (on the CPU ``auto`` never picks
    Triton; a forced ``native`` or ``torch`` runs the reference)."""
    try:
        name = implementation(backend, device, "kfac_metric_update")
    except RuntimeError:
        return False
    if name == "triton":
        return True
    requested = backends.requested_name(backend.requested if isinstance(backend, Backend) else backend)
    if name != "native" or requested != "auto" or torch.device(device).type == "cpu":
        return False
    try:
        backends.resolve_backend("triton", device, "kfac_metric_update")
    except RuntimeError:
        return False
    return True


__all__ += ["kfac_lorsum_update_in"]


def kfac_lorsum_update_in(
    B_hat: Tensor,
    anchor: tuple[Tensor, Tensor],
    pairs: Sequence[tuple[Tensor, Tensor]],
    coeffs: Sequence,
    lmbd,
    v_in: Tensor,
    v_out: Tensor,
    beta: float,
    damping: float,
    power: float,
    scale_in: float,
    scale_out: float,
    *,
    backend: str | None | Backend = "auto",
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``reference.kfac_lorsum_update_in``: the fused native op where the backend runs the half-steps natively
    and the extension has it for the device (the CPU: the statistics summed in the A-step's passes), else
    ``kfac_metric_update`` and ``lorsum_update_in`` in turn, each on the backend's own implementation."""
    scalars = (float(beta), float(damping), float(power), float(scale_in), float(scale_out))
    device = B_hat.device
    if implementation(backend, device, "lorsum_update_in") == "native" and \
            _native.has_native_op("kfac_lorsum_update_in", device.type):
        args = _half_step_args(B_hat, anchor, pairs, coeffs, lmbd, None)[:-2]
        return torch.ops.lorsum.kfac_lorsum_update_in(*args, v_in, v_out, *scalars)
    if not pairs:
        raise ValueError("kfac_lorsum_update_in needs the gradient pair (X, S.mT) as pairs[0]")
    X, S_t = pairs[0]
    new_in, new_out, m_in, m_out = kfac_metric_update(X, S_t.mT, v_in, v_out, *scalars, backend=backend)
    A = lorsum_update_in(B_hat, anchor, pairs, coeffs, lmbd, (m_in, m_out), backend=backend)
    return A, new_in, new_out, m_in, m_out


__all__ += ["kfac_lorsum_rounds", "prepare_kfac_lorsum_rounds"]


def kfac_lorsum_rounds(
    anchor: tuple[Tensor, Tensor], pairs: Sequence[tuple[Tensor, Tensor]], coeffs: Sequence, lmbd, iters: int,
    v_in: Tensor, v_out: Tensor, beta: float, damping: float, power: float, scale_in: float, scale_out: float,
    *, backend: str | None | Backend = "auto",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``kfac_lorsum_update_in`` from B̂ = B0, then ``lorsum_rounds`` from its result in the effective metrics
    it returns (``first_A``): ``iters`` ALS rounds of the K-FAC-scaled LoRSum with the metric step. The same
    calls with the same arguments; where all run natively those are built once (ScaledLoRSum's streamed
    layer step calls this once per layer, in backward). Returns ``(A, B, v_in, v_out)``, the new factors
    and metric EMAs; the effective metrics are those of the metric's dtype cast to the anchor's."""
    return prepare_kfac_lorsum_rounds(anchor, pairs, coeffs, lmbd, iters, v_in, v_out, beta, damping, power,
                                      scale_in, scale_out, backend=backend)()


def prepare_kfac_lorsum_rounds(
    anchor: tuple[Tensor, Tensor], pairs: Sequence[tuple[Tensor, Tensor]], coeffs: Sequence, lmbd, iters: int,
    v_in: Tensor, v_out: Tensor, beta: float, damping: float, power: float, scale_in: float, scale_out: float,
    *, backend: str | None | Backend = "auto",
) -> Callable[[], tuple[Tensor, Tensor, Tensor, Tensor]]:
    """``kfac_lorsum_rounds`` in two parts, as ``prepare_lorsum_rounds``: the native ops' arguments built now,
    the ops run by the returned function."""
    A0, B0 = anchor
    scalars = (float(beta), float(damping), float(power), float(scale_in), float(scale_out))
    if _native_rounds(backend, B0.device) and _native.has_native_op("kfac_lorsum_update_in", B0.device.type):
        hat, *rest = _half_step_args(B0, anchor, pairs, coeffs, lmbd, None)
        step_in, step_out = _native_half_steps(rest)

        def run():
            A_first, new_in, new_out, m_in, m_out = torch.ops.lorsum.kfac_lorsum_update_in(
                hat, *rest[:-2], v_in, v_out, *scalars)
            # As _half_step_args would pass these metrics: in the anchor's dtype, broadcast to the batch.
            batch = hat.shape[:-2]
            rest[-2:] = [m if m.shape[:-1] == batch else m.expand(batch + m.shape[-1:])
                         for m in (as_dtype(m_in, A0.dtype), as_dtype(m_out, A0.dtype))]
            A_new, B_new = _alternate(step_in, step_out, A_first, rest[0], iters, True)
            return A_new, B_new, new_in, new_out
        return run

    def run():
        A_first, new_in, new_out, m_in, m_out = kfac_lorsum_update_in(
            B0, anchor, pairs, coeffs, lmbd, v_in, v_out, *scalars, backend=backend)
        A_new, B_new = lorsum_rounds(anchor, pairs, coeffs, lmbd, iters,
                                     (as_dtype(m_in, A0.dtype), as_dtype(m_out, A0.dtype)), backend=backend,
                                     first_A=A_first)
        return A_new, B_new, new_in, new_out
    return run


# float64 tensors of plain numbers the half-steps are called with, by value (the native ops only read them):
# the optimizers call them with the same coefficients and λ for every layer, ~4 constructions per layer
# and round otherwise. Bounded: a schedule's new lr adds entries, and a full table starts over.
_SCALAR_TENSORS: dict = {}


def _float64_tensor(value: float | tuple[float, ...]) -> Tensor:
    """``torch.tensor(value, dtype=torch.float64)``, built once per value (keyed by ``float.hex``, which tells
    -0.0 from 0.0 and keeps NaN); read-only: the ops never write their scalar arguments."""
    key = value.hex() if isinstance(value, float) else tuple(v.hex() for v in value)
    t = _SCALAR_TENSORS.get(key)
    if t is None:
        if len(_SCALAR_TENSORS) >= 64:
            _SCALAR_TENSORS.clear()
        t = _SCALAR_TENSORS[key] = torch.tensor(value, dtype=torch.float64)
    return t


def _per_layer(values: Sequence, batch: torch.Size) -> Tensor:
    """Scalars (numbers, 0-d tensors, or tensors broadcastable to ``batch``) as one float64 tensor:
    (len(values),) when every value is shared by the batch, else (len(values), prod(batch))."""
    if all(isinstance(v, (int, float)) for v in values):  # the common case, in one tensor construction
        return _float64_tensor(tuple(float(v) for v in values))
    # On the device of the tensors among them (a per-layer lr on the GPU): stack needs one device. The
    # numbers by torch.full: a tensor made from a number elsewhere is a copy to the device, which waits.
    device = next((v.device for v in values if isinstance(v, Tensor)), None)
    ts = [v.to(device=device, dtype=torch.float64) if isinstance(v, Tensor)
          else torch.full((), float(v), dtype=torch.float64, device=device) for v in values]
    if all(t.ndim == 0 for t in ts):
        return torch.stack(ts) if ts else torch.empty(0, dtype=torch.float64)
    return torch.stack([t.expand(batch).reshape(-1) for t in ts])


def _half_step_args(hat, anchor, pairs, coeffs, lmbd, metrics) -> tuple:
    """The arguments of torch.ops.lorsum.lorsum_update_in/out: the tensors broadcast to one batch shape
    (views, no copies when they share it already), coefficients and λ as float64 tensors."""
    A0, B0 = anchor
    shapes = [hat.shape[:-2], A0.shape[:-2], B0.shape[:-2]] + [t.shape[:-2] for pair in pairs for t in pair]
    if metrics is not None:
        shapes += [metrics[0].shape[:-1], metrics[1].shape[:-1]]
    # The optimizers pass one batch shape throughout: no broadcasting to work out (torch.broadcast_shapes
    # costs ~50 us per call, twice per layer and round in the streamed step).
    batch = shapes[0] if all(shape == shapes[0] for shape in shapes) else torch.broadcast_shapes(*shapes)

    def expand(t: Tensor, trailing: int) -> Tensor:
        return t if t.shape[: t.ndim - trailing] == batch else t.expand(batch + t.shape[t.ndim - trailing :])

    lam = _float64_tensor(float(lmbd)) if isinstance(lmbd, (int, float)) else \
        torch.as_tensor(lmbd, dtype=torch.float64)
    if lam.ndim > 0:
        lam = lam.expand(batch).reshape(-1)
    m_in = m_out = None
    if metrics is not None:
        m_in, m_out = expand(metrics[0], 1), expand(metrics[1], 1)
    return (
        expand(hat, 2),
        expand(A0, 2),
        expand(B0, 2),
        [expand(f_in, 2) for f_in, _ in pairs],
        [expand(f_out, 2) for _, f_out in pairs],
        _per_layer(coeffs, batch),
        lam,
        m_in,
        m_out,
    )


__all__ += ["finish_normalized_step"]


def finish_normalized_step(
    A: Sequence[Tensor], B: Sequence[Tensor], A_new: Sequence[Tensor], B_new: Sequence[Tensor],
    checked: Sequence[Tensor], v: Sequence[Tensor], t: Sequence[Tensor], scale: Sequence[Tensor],
    root: Tensor, layer_lr: Tensor, allowed: Tensor, balanced: bool, lr: float, beta: float,
    *, backend: str | None | Backend = "auto",
) -> Tensor:
    """``reference.finish_normalized_step``: native on the CPU (fp32), the reference elsewhere and at
    ``lr`` = 0 (which keeps the statistics: a warm-up's first step, not worth a kernel's special case)."""
    device = A[0].device if len(A) else torch.device("cpu")
    if implementation(backend, device, "finish_normalized_step") == "native" and float(lr) != 0:
        written = torch.ops.lorsum.finish_normalized_step(A, B, A_new, B_new, checked, v, t, scale, root,
                                                          layer_lr, allowed, balanced, float(lr), float(beta))
        # The kernel writes through the tensors' data pointers, which autograd does not see: their version
        # counters advance as an in-place torch op's would (a graph that saved a parameter then raises).
        torch.autograd.graph.increment_version([*A, *B, *v, *t, *scale])
        return written
    return reference.finish_normalized_step(A, B, A_new, B_new, checked, v, t, scale, root, layer_lr, allowed,
                                            balanced, lr, beta)


__all__ += ["finish_normalized_stacked"]


def finish_normalized_stacked(
    A: Tensor, B: Tensor, A_new: Tensor, B_new: Tensor, root: Tensor, layer_lr: Tensor, v: Tensor, t: Tensor,
    lr: float, beta: float, *, backend: str | None | Backend = "auto",
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``reference.finish_normalized_stacked``: Triton on a GPU (two launches and the bound's two Grams where
    the reference takes ~45 small ops), the reference elsewhere and at ``lr`` = 0 (which keeps the
    statistics and factors)."""
    args = (A, B, A_new, B_new, root, layer_lr, v, t, float(lr), float(beta))
    if implementation(backend, A.device, "finish_normalized_stacked") == "triton" and float(lr) != 0:
        from . import triton_kernels

        return triton_kernels.finish_normalized_stacked(*args)
    return reference.finish_normalized_stacked(*args)


__all__ += ["adafactor_ema_scales"]


def adafactor_ema_scales(
    row_stat: Tensor, col_stat: Tensor, rows: Tensor, cols: Tensor, t: Tensor, beta2: float | None,
    decay_rate: float, eps1: float, dtype: torch.dtype, floor: float, *,
    backend: str | None | Backend = "auto",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``reference.adafactor_ema_scales``: Triton on a GPU (one launch where the reference takes ~19 small
    ops), the reference elsewhere."""
    args = (row_stat, col_stat, rows, cols, t, None if beta2 is None else float(beta2), float(decay_rate),
            float(eps1), dtype, float(floor))
    if implementation(backend, row_stat.device, "adafactor_ema_scales") == "triton":
        from . import triton_kernels

        return triton_kernels.adafactor_ema_scales(*args)
    return reference.adafactor_ema_scales(*args)
