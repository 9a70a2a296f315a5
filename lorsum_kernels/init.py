"""LoRA-One (and LoRA-GA) initialisation of a model's LoRA factors from its gradient (spec/lora_one.md).

Contract of ``lora_one_init`` / ``lora_ga_init``:

* **What is estimated.** For every target LoRA layer, ``G = (1/N) Σ_b S_bᵀ X_b``: the mean over the N init
  batches of the gradient of ``loss_fn(model, batch)`` with respect to the layer's merged weight, taken
  at the base weight W0 (the targets' B factors are held at zero during the passes, as after PEFT's
  default init). X_b are the layer's inputs and S_b the gradients of its output (spec §1.1, §7.6).
* **How, without G.** ``method="power"`` (default) runs randomized block subspace iteration
  (``functional.lora_one.subspace_iteration``) on the implicit G. Each product ``G·V`` or ``Gᵀ·U`` is one
  forward+backward pass over the batches: the capture's sink (``capture.ActivationCapture``, X taken at
  the module's input, before LoRA dropout) multiplies that batch's X_b and S_b into an r'-wide accumulator
  (``ops.pair_products``, the op of LoRSum's token products) during backward and drops them. A layer
  holds O((m+n)·r') numbers with ``r' = rank + oversample``, plus one batch's activations; never an m×n
  gradient, and the only parameter gradients computed are the targets' A factors' (r×n, zero while B is). Cost:
  ``2·power_iters + 2`` passes.
  ``method="svd"`` accumulates each G explicitly (m×n per layer) and takes a full SVD: the reference.
* **What is written.** LoRA-One: ``s·B0·A0 = −(s/(γσ_1(G)))·[G]_r`` (balanced factors, W0 untouched,
  spec §1.2). LoRA-GA: ``A0 = c·V_{1:r}ᵀ``, ``B0 = c·U_{r+1:2r}``, ``c = m^{1/4}/√γ`` and
  ``W0 ← W0 − s·B0·A0`` (spec §2). Factors are written in place (``copy_``) in the parameter's dtype, so
  optimizer references stay valid; all math is fp32 (fp64 for fp64 parameters).
* **Nothing changes on failure.** Every argument is checked before the first forward; the factors are
  written only after every layer's result has been computed and checked (finite, non-zero gradient).
  Whatever happens, the model's train/eval mode, every parameter's ``requires_grad`` and ``.grad`` (the
  same tensor objects, untouched values) and the global RNG state are restored, and the hooks removed.
* **Determinism.** The Gaussian test matrices come from a CPU ``torch.Generator`` seeded with ``seed``
  (identical on every device and rank); every pass runs under a forked global RNG seeded with ``seed``,
  so dropout masks (``train_mode=True``) are the same in every pass, which the power method needs: all
  passes must see the same G. ``batches`` is materialised into a list for the same reason (a shuffling
  DataLoader would give another G on every pass).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from . import ops
from ._numerics import math_dtype
from .capture import ActivationCapture
from .functional.lora_one import (
    gaussian_test_matrix,
    lora_ga_factors,
    lora_one_factors,
    rayleigh_ritz_svd,
    subspace_iteration,
    truncated_svd,
)
from .lora import LoRALayer, find_lora_layers

__all__ = ["lora_one_init", "lora_ga_init"]

LossFn = Callable[[nn.Module, Any], Tensor]
_METHODS = ("power", "svd")


@dataclass(eq=False)
class _Target:
    """One target layer's estimation state: only r'-wide matrices (m×n only for ``method="svd"``)."""

    layer: LoRALayer
    dtype: torch.dtype  # compute dtype: fp64 for fp64 factors, else fp32
    width: int  # r' = min(k + oversample, m, n)
    side: str = "right"  # "right": accumulate G·operand; "left": Gᵀ·operand; "full": G itself
    operand: Tensor | None = None
    acc: Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.layer.A.device

    def start(self, side: str, operand: Tensor | None) -> None:
        m, n = self.layer.out_features, self.layer.in_features
        self.side, self.operand = side, operand
        rows = {"right": m, "left": n, "full": m}[side]
        cols = n if side == "full" else self.width
        self.acc = torch.zeros(rows, cols, dtype=self.dtype, device=self.device)

    def accumulate(self, X: Tensor, S: Tensor, backend: str | None) -> None:
        if self.side == "full":  # the reference path: G_b = S_bᵀ X_b, m×n on purpose
            self.acc += S.to(self.dtype).mT @ X.to(self.dtype)
        elif self.side == "right":
            # G·V = Sᵀ(X·V): the B-step product of LoRSum's token pair (X, Sᵀ) with V as the wide factor
            self.acc += ops.pair_products(X, S.mT, V=self.operand.mT, backend=backend)[1]
        else:
            # Gᵀ·U = Xᵀ(S·U) = ((S·U)ᵀX)ᵀ: the A-step product with U as the wide factor
            self.acc += ops.pair_products(X, S.mT, W=self.operand, backend=backend)[0].mT


@dataclass
class _SavedModelState:
    """What the passes change temporarily, and puts back in ``restore`` (always, even on error)."""

    modes: dict[nn.Module, bool] = field(default_factory=dict)
    requires_grad: dict[nn.Parameter, bool] = field(default_factory=dict)
    grads: dict[nn.Parameter, Tensor | None] = field(default_factory=dict)
    B_values: dict[nn.Parameter, Tensor] = field(default_factory=dict)

    def enter(self, model: nn.Module, targets: Sequence[_Target], train_mode: bool) -> None:
        self.modes = {module: module.training for module in model.modules()}
        model.train(train_mode)
        As = {t.layer.A: None for t in targets}  # dicts as ordered sets of parameters
        Bs = {t.layer.B: None for t in targets}
        # Only the targets' A factors require grad during the passes. Then each target's lora_B input
        # needs a gradient, which is what the capture's backward node (it holds X) rides on, and so does
        # the module's output (the capture sees S); with B held at zero, A's gradient is zero and r×n,
        # and no other parameter's gradient is ever computed. Backward (unlike autograd.grad) works with
        # any activation-checkpointing flavour.
        self.requires_grad = {p: p.requires_grad for p in model.parameters()}
        for p in model.parameters():
            if p not in As:
                p.requires_grad_(False)
        self.grads = {A: A.grad for A in As}
        with torch.no_grad():
            for A in As:
                A.grad = None
            for B in Bs:
                # The gradient is wanted at the base weight W0: hold B·A at zero during the passes.
                self.B_values[B] = B.detach().clone()
                B.zero_()

    def clear_grads(self) -> None:
        for A in self.grads:
            A.grad = None  # r×n, freed after every batch

    def restore(self) -> None:
        with torch.no_grad():
            for B, value in self.B_values.items():
                B.copy_(value)
        for B, grad in self.grads.items():
            B.grad = grad
        for p, flag in self.requires_grad.items():
            p.requires_grad_(flag)
        for module, training in self.modes.items():
            module.training = training  # per module, no recursion: mixed modes come back exactly


def _default_loss(model: nn.Module, batch: Any) -> Tensor:
    out = model(**batch)
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, Mapping):
        loss = out.get("loss")
    if loss is None:
        raise ValueError(
            "model(**batch) returned no loss: put the labels in the batch or pass loss_fn(model, batch)"
        )
    return loss


def _base_weight(layer: LoRALayer) -> nn.Parameter:
    """The frozen base weight (m×n) of a LoRA layer, for LoRA-GA's offset."""
    module = layer.module
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else getattr(module, "base", None)
    if not isinstance(base, nn.Linear) or getattr(module, "fan_in_fan_out", False):
        raise NotImplementedError(
            f"{layer.name}: LoRA-GA offsets the base weight and supports plain nn.Linear bases only, got "
            f"{type(base).__name__}"
        )
    if tuple(base.weight.shape) != (layer.out_features, layer.in_features):
        raise ValueError(f"{layer.name}: base weight {tuple(base.weight.shape)} does not match the factors")
    return base.weight


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _validate(
    model, batches, loss_fn, layers, *, gamma, method, oversample, power_iters, on_zero_gradient, rank_factor,
    backend,
) -> tuple[list[LoRALayer], list, LossFn]:
    """Every check that can be made before the first forward; raises, changes nothing."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    is_number = isinstance(gamma, (int, float)) and not isinstance(gamma, bool)
    if not (is_number and math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"gamma must be a finite number > 0, got {gamma!r}")
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    _check_int("oversample", oversample, 0)
    _check_int("power_iters", power_iters, 0)
    if on_zero_gradient not in ("raise", "skip"):
        raise ValueError(f"on_zero_gradient must be 'raise' or 'skip', got {on_zero_gradient!r}")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(model, batch), got {type(loss_fn).__name__}")

    found = find_lora_layers(model)
    if layers is None:
        layers = found
    else:
        layers = list(layers)
        known = {id(layer.A) for layer in found}
        seen = set()
        for layer in layers:
            if not isinstance(layer, LoRALayer) or id(layer.A) not in known:
                raise ValueError(
                    f"layers must be LoRALayer objects of this model (find_lora_layers), got {layer!r}"
                )
            if id(layer.A) in seen:
                raise ValueError(f"layers lists {layer.name} twice")
            seen.add(id(layer.A))
    if not layers:
        raise ValueError(
            "the model has no trainable LoRA layers (modules with lora_A/lora_B Linear factors); wrap it "
            "with PEFT or lorsum_kernels.LoRALinear first"
        )
    for layer in layers:
        needed = rank_factor * layer.rank
        limit = min(layer.in_features, layer.out_features)
        if needed > limit:
            what = f"rank {layer.rank}" if rank_factor == 1 else f"2·rank = {needed} (LoRA-GA)"
            raise ValueError(f"{layer.name}: {what} is larger than min(m, n) = {limit}")
        if getattr(layer.module, "merged", False):
            raise ValueError(f"{layer.name}: the adapter is merged into the base weight; unmerge it first")
        if method == "power":  # an unknown or unavailable backend raises now, not in the first backward
            ops.implementation(backend, layer.A.device, "pair_products")

    if isinstance(batches, (Mapping, Tensor)):
        raise TypeError(
            f"batches must be an iterable of batches (e.g. a list), got a single {type(batches).__name__}; "
            "wrap one batch in a list"
        )
    try:
        batches = list(batches)
    except TypeError as exc:
        raise TypeError(f"batches must be an iterable of batches, got {type(batches).__name__}") from exc
    if not batches:
        raise ValueError("batches is empty: the gradient estimate needs at least one batch")
    if loss_fn is None:
        bad = [i for i, b in enumerate(batches) if not isinstance(b, Mapping)]
        if bad:
            raise TypeError(
                f"batch {bad[0]} is a {type(batches[bad[0]]).__name__}, not a dict: without loss_fn the "
                "loss is model(**batch).loss, so pass loss_fn(model, batch) -> scalar loss for other batches"
            )
        loss_fn = _default_loss
    return layers, batches, loss_fn


def _run_pass(
    model, batches, loss_fn, saved: _SavedModelState, capture: ActivationCapture, seed: int
) -> None:
    """One forward+backward over every batch; the capture's sink folds the products into the accumulators."""
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)  # the same dropout masks (if any) in every pass, i.e. the same G
        for i, batch in enumerate(batches):
            with torch.enable_grad():
                loss = loss_fn(model, batch)
                if not isinstance(loss, Tensor) or loss.numel() != 1:
                    raise TypeError(
                        f"loss_fn must return a scalar tensor, got {type(loss).__name__} for batch {i}"
                    )
                if not loss.requires_grad:
                    raise RuntimeError(
                        f"the loss of batch {i} does not depend on any target LoRA layer (needs no gradient)"
                    )
                loss.reshape(()).backward()
            # Reset the gradients the way the optimizer's zero_grad does, capture included: a reset the
            # capture did not see would read, at the next backward, as a discarded backward (harmless
            # here, each batch's products being summed already, but not what happened).
            saved.clear_grads()
            capture.clear()


def _estimate(
    model, targets: list[_Target], batches, loss_fn, ks: list[int], *, method, power_iters, seed, train_mode,
    backend,
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Top-k triplets of every target's G; restores the model's temporary state whatever happens."""
    saved = _SavedModelState()
    by_layer = {target.layer: target for target in targets}

    def sink(layer: LoRALayer, X: Tensor, S: Tensor) -> bool:
        by_layer[layer].accumulate(X, S, backend)
        return True  # nothing is recorded: no layer's X or S outlives its own backward

    # Made while the factors still require grad (the capture hooks their gradient accumulation). X is the
    # module's input, before LoRA dropout: G is the gradient of the base weight W0 (that of the base model
    # before LoRA, as the official code takes it), not of the dropped-out LoRA path; the two differ only
    # with ``train_mode=True`` and LoRA dropout. The passes may run in eval mode, so eval forwards count.
    capture = ActivationCapture([t.layer for t in targets], x_from="module", training_only=False)
    capture.sink = sink
    N = len(batches)
    try:
        saved.enter(model, targets, train_mode)

        def run(side: str, operands: list[Tensor | None]) -> list[Tensor]:
            for target, operand in zip(targets, operands):
                target.start(side, operand)
            _run_pass(model, batches, loss_fn, saved, capture, seed)
            results = [target.acc / N for target in targets]  # the mean over batches (spec §1.1)
            # An inf/NaN loss gradient would make QR/SVD fail obscurely; name the layers instead (a host
            # sync per pass is fine here: this is a one-off initialisation, not an optimizer step).
            bad = [t.layer.name for t, G in zip(targets, results) if not torch.isfinite(G).all()]
            if bad:
                raise FloatingPointError(f"non-finite gradient estimate for {bad}; the model was not changed")
            for target in targets:
                target.operand = target.acc = None
            return results

        if method == "svd":
            return [truncated_svd(G, k) for G, k in zip(run("full", [None] * len(targets)), ks)]
        generator = torch.Generator().manual_seed(seed)
        omegas = [
            gaussian_test_matrix(t.layer.in_features, t.width, generator, dtype=t.dtype, device=t.device)
            for t in targets
        ]
        Qs, Zs = subspace_iteration(
            lambda Vs: run("right", Vs), lambda Us: run("left", Us), omegas, power_iters
        )
        return [rayleigh_ritz_svd(Q, Z, k) for Q, Z, k in zip(Qs, Zs, ks)]
    finally:
        capture.remove()
        saved.restore()


def _spectral_init(
    model, batches, loss_fn, layers, *, k_factor, gamma, method, oversample, power_iters, seed, train_mode,
    on_zero_gradient, backend,
):
    layers, batches, loss_fn = _validate(
        model, batches, loss_fn, layers, gamma=gamma, method=method, oversample=oversample,
        power_iters=power_iters, on_zero_gradient=on_zero_gradient, rank_factor=k_factor, backend=backend,
    )
    targets, ks = [], []
    for layer in layers:
        dt = math_dtype(layer.A)
        ks.append(k_factor * layer.rank)  # ranks may differ between layers
        targets.append(_Target(layer, dt, min(ks[-1] + oversample, layer.in_features, layer.out_features)))
    triplets = _estimate(
        model, targets, batches, loss_fn, ks, method=method, power_iters=power_iters, seed=seed,
        train_mode=train_mode, backend=backend,
    )
    # Check every result before writing anything: a layer the loss never reached has G = 0, for which
    # LoRA-One would write B = A = 0 (a saddle LoRA never leaves).
    bad, zero = [], []
    for layer, (U, sigma, Vh) in zip(layers, triplets):
        if not (torch.isfinite(U).all() and torch.isfinite(sigma).all() and torch.isfinite(Vh).all()):
            bad.append(layer.name)
        elif not sigma[0] > 0:
            zero.append(layer.name)
    if bad:
        raise FloatingPointError(f"non-finite gradient estimate for {bad}; the model was not changed")
    if zero and on_zero_gradient == "raise":
        raise ValueError(
            f"zero gradient for {zero} on the init batches (is the layer used by the loss?); the model was "
            "not changed. Pass on_zero_gradient='skip' to leave such layers as they are"
        )
    return layers, triplets, set(zero)


def lora_one_init(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    gamma: float = 128.0,
    loss_fn: LossFn | None = None,
    layers: Sequence[LoRALayer] | None = None,
    method: str = "power",
    oversample: int = 16,
    power_iters: int = 8,
    seed: int = 0,
    normalize: bool = True,
    train_mode: bool = False,
    on_zero_gradient: str = "raise",
    backend: str | None = "auto",
) -> dict[str, Tensor]:
    """Initialise every LoRA layer of ``model`` by LoRA-One from the gradient on ``batches``.

    Writes ``B0 = −U_r √Σ_r / √(γσ_1)`` and ``A0 = √Σ_r V_rᵀ / √(γσ_1)``, where ``U Σ Vᵀ`` is the SVD of the
    layer's one-step full gradient G (the module docstring says exactly which G). The merged weight
    becomes ``W0 + s·B0·A0 = W0 − (s/(γσ_1))·[G]_r``: one rank-r gradient-descent step of spectral norm
    s/γ (``α/(γ√r)`` with rsLoRA, ``α/(γr)`` with plain scaling). W0 is not modified, so a trained adapter
    stays a standard LoRA adapter (spec §6).

    The learning rate after it: the factors' tangent space now holds the gradient's top subspace, which
    PEFT's init (B = 0, A random) reaches only over training. An optimizer whose merged-weight step does not
    shrink with the factors' size (AdaPreLoRA, Scaled AdamW, ScaledGD: the step is a projection onto that
    tangent space) therefore moves the weight several times further at the same lr from the first step on,
    like a full fine-tuning step; the official runs pair LoRA-One with full-fine-tuning learning rates. The
    defaults sweep (docs/defaults_sweep.md) chose lr 3e-4 for AdaPreLoRA after LoRA-One: at its class
    default 1e-3 the SmolLM2 task's validation perplexity went to 46.1, against 41.0 from PEFT's init
    (seed 0).
    torch's AdamW steps each factor entry by about its lr, which moves the small balanced factors' product
    little, and needs no change (40.94 against 40.92 at 3e-3, one seed).

    Args:
        model: a PEFT model, or any model with ``LoRALinear`` (or lora_A/lora_B Linear) layers.
        batches: the init batches (official default: 8 examples). Materialised into a list; every pass
            runs over all of them in order.
        gamma: γ > 0; the official default is 128 (with α=16, r=8, rsLoRA: ‖ΔW0‖₂ = 0.0442).
        loss_fn: ``loss_fn(model, batch) -> scalar Tensor``, the loss to differentiate; it must not call
            backward itself. Default: ``model(**batch).loss`` (Hugging Face style), which needs dict
            batches with labels; any other batch type requires ``loss_fn``.
        layers: the LoRA layers to initialise (from ``find_lora_layers(model)``); default all trainable.
        method: ``"power"`` (randomized subspace iteration on the implicit G; O((m+n)·r') memory per
            layer) or ``"svd"`` (forms each m×n G and takes an exact SVD; the reference).
        oversample: extra sketch columns, r' = min(r + oversample, m, n).
        power_iters: power (Gᵀ, G) rounds; the passes over ``batches`` are ``2·power_iters + 2``. The
            defaults (16, 8: 18 passes) are chosen for gradients without a spectral gap: on the linear
            task of spec/lorsum.md §10 (Gaussian W*, σ_8/σ_9 ≈ 1.004) they capture all but ~0.5% of the
            top-8 energy; a decaying spectrum needs far fewer rounds.
        seed: seeds the test matrices and the global RNG inside the passes (restored afterwards).
        normalize: True (official) divides by σ_1; False is the older "Spectral-Init" scale,
            ``s·B0·A0 = −(s/γ)·[G]_r``.
        train_mode: run the passes with the model in train mode (dropout on, identical masks in every
            pass, as the official code does); default eval mode, i.e. the gradient of the deterministic
            model. The previous mode of every module is restored either way.
        on_zero_gradient: "raise" (default) if a layer's G is zero on the batches, or "skip" to leave
            such layers unchanged.
        backend: backend of the ``pair_products`` op ("auto", "native", "triton", "torch").

    Returns:
        ``{layer.name: sigma}``: the top-r singular values of each layer's G (fp32, or fp64 for fp64
        factors), descending; ``s/(gamma·sigma[0])`` is the step size the init realised.

    Raises:
        ValueError / TypeError: bad arguments, no LoRA layers, empty batches, rank > min(m, n), a merged
            adapter, non-dict batches without ``loss_fn``, or a zero gradient; all before any factor
            changes. The model's gradients (``.grad``) are left as they were: the passes compute only
            the target A factors' gradients, into a stash that is discarded, and put the original
            ``.grad`` tensors back.
    """
    layers, triplets, skipped = _spectral_init(
        model, batches, loss_fn, layers, k_factor=1, gamma=gamma, method=method, oversample=oversample,
        power_iters=power_iters, seed=seed, train_mode=train_mode, on_zero_gradient=on_zero_gradient,
        backend=backend,
    )
    results = {}
    new = []
    for layer, (U, sigma, Vh) in zip(layers, triplets):
        results[layer.name] = sigma
        if layer.name not in skipped:
            new.append((layer, *lora_one_factors(U, sigma, Vh, gamma=gamma, normalize=normalize)))
    with torch.no_grad():
        for layer, A0, B0 in new:
            layer.A.copy_(A0.to(layer.A.dtype))
            layer.B.copy_(B0.to(layer.B.dtype))
    return results


def lora_ga_init(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    gamma: float = 16.0,
    loss_fn: LossFn | None = None,
    layers: Sequence[LoRALayer] | None = None,
    method: str = "power",
    oversample: int = 16,
    power_iters: int = 8,
    seed: int = 0,
    train_mode: bool = False,
    on_zero_gradient: str = "raise",
    backend: str | None = "auto",
) -> dict[str, Tensor]:
    """Initialise every LoRA layer of ``model`` by LoRA-GA ("ArB2r", "stable" scale; spec §2).

    Same gradient estimate and machinery as ``lora_one_init`` with the top 2r triplets of G:
    ``A0 = c·V_{1:r}ᵀ``, ``B0 = c·U_{r+1:2r}``, ``c = m^{1/4}/√γ``, and the base weight is offset,
    ``W0 ← W0 − s·B0·A0``, so the model's function is unchanged (up to rounding in the base dtype). The
    first plain gradient step of size η then changes the merged weight by ``−η s² (√m/γ)[G]_{2r} + O(η²)``.
    Unlike LoRA-One, the adapter alone no longer reproduces the fine-tuned model (the base was changed).

    Args:
        model: as in ``lora_one_init``; each base layer must be a plain ``nn.Linear`` (not quantized, not
            fan-in-fan-out) since its weight is modified.
        batches: as in ``lora_one_init``.
        gamma: γ > 0 (LoRA-GA's default is 16).
        loss_fn: as in ``lora_one_init``.
        layers: as in ``lora_one_init``.
        method: as in ``lora_one_init``.
        oversample: extra sketch columns beyond 2r.
        power_iters: as in ``lora_one_init``.
        seed: as in ``lora_one_init``.
        train_mode: as in ``lora_one_init``.
        on_zero_gradient: as in ``lora_one_init``.
        backend: as in ``lora_one_init``.

    Returns:
        ``{layer.name: sigma}``: the top-2r singular values of each layer's G.

    Raises:
        As ``lora_one_init``, and when 2r > min(m, n) or a base layer is not a plain ``nn.Linear``.
    """
    layers, batches, loss_fn = _validate(
        model, batches, loss_fn, layers, gamma=gamma, method=method, oversample=oversample,
        power_iters=power_iters, on_zero_gradient=on_zero_gradient, rank_factor=2, backend=backend,
    )
    bases = {layer.name: _base_weight(layer) for layer in layers}  # also checked before anything runs
    layers, triplets, skipped = _spectral_init(
        model, batches, loss_fn, layers, k_factor=2, gamma=gamma, method=method, oversample=oversample,
        power_iters=power_iters, seed=seed, train_mode=train_mode, on_zero_gradient=on_zero_gradient,
        backend=backend,
    )
    results = {}
    new = []
    for layer, (U, sigma, Vh) in zip(layers, triplets):
        results[layer.name] = sigma
        if layer.name not in skipped:
            new.append((layer, *lora_ga_factors(U, sigma, Vh, layer.rank, gamma=gamma)))
    with torch.no_grad():
        for layer, A0, B0 in new:
            W0 = bases[layer.name]
            # The offset keeps the function at W0. It is the one m×n temporary of LoRA-GA (W0 itself is
            # m×n), made one layer at a time.
            W0.copy_((W0.to(A0.dtype) - layer.scale * (B0 @ A0)).to(W0.dtype))
            layer.A.copy_(A0.to(layer.A.dtype))
            layer.B.copy_(B0.to(layer.B.dtype))
    return results
