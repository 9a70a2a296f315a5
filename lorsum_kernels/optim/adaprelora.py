"""AdaPreLoRA as a torch.optim optimizer (spec/adaprelora.md §3.5–3.7).

Each step preconditions the merged weight's gradient G with Adafactor's factored second moment and maps
the result to the factors by the closed-form H-weighted solve (``functional.adaprelora``). Contract:

* The step is defined on the merged weight: the factors are handled balanced (``√s·A``, ``√s·B``, whose
  product is the merged ``s·B·A``), so the trajectory of ``s·B·A`` does not depend on α/r.
* ``statistics="exact"`` hooks the LoRA layers (``capture``) and takes the row and column energies of
  ``G = SᵀX`` block by block (no m×n tensor); gradient accumulation concatenates the captured rows, so
  the statistics are those of the accumulated G. ``statistics="surrogate"`` needs no capture: it uses the
  tangent surrogate ``B̄·∇_Ā + ∇_B̄·Ā`` of the balanced factors.
* State per pair: ``row_stat`` (m), ``col_stat`` (n) and a step count ``t``, plus 2·(m+n)·r momenta for
  ``momentum="input"`` (default) and 4·(m+n)·r for ``momentum="adam"``; fp32 (fp64 for fp64 factors).
  Nothing m×n survives a step.
* A layer whose gradients, captured data or results are not finite is skipped (parameters and state
  untouched) and counted in ``state["skipped_steps"]`` by the base class.
"""

from __future__ import annotations

import torch

from .. import ops
from ..functional.adaprelora import MOMENTUM_MODES, adaprelora_step
from .base import LoRAOptimizer
from .checks import check_positive

__all__ = ["AdaPreLoRA"]

STATISTICS = ("exact", "surrogate")


class AdaPreLoRA(LoRAOptimizer):
    """AdaPreLoRA: Adafactor's metric on the merged weight, projected onto the LoRA tangent space.

    Args:
        model (nn.Module): the model holding the LoRA layers (PEFT, ``LoRALinear`` or any module with
            ``lora_A``/``lora_B`` Linear children).
        lr (float): η, read from the param group at every step. (Default: 1e-3)
        betas (tuple[float, float | None]): β1 of the momentum and β2 of the statistics' EMA; β2 = None
            is Adafactor's schedule ``1 − t^(−decay_rate)`` (β̂2_1 = 0), a float is a fixed β2 with
            bias correction. (Default: (0.9, None))
        weight_decay (float): decoupled: ``A ← A(1 − η·wd)``, likewise B. (Default: 0)
        statistics (str): "exact" (energies of the true G = SᵀX from captured layer data) or
            "surrogate" (the rank-2r tangent surrogate from the factor gradients, no capture).
            (Default: "exact")
        momentum (str | None): "input" (M1: the closed form applied to bias-corrected EMAs of the
            gradients; the "AdamW variant"), "adam" (M2: Adam moments on the direction) or None (the
            "SGD variant"). (Default: "input")
        decay_rate (float): c in Adafactor's ``1 − t^(−c)``. (Default: 0.8)
        eps1 (float): Adafactor's ε1, added to every entry of G∘G. (Default: 1e-30)
        ridge (float): relative ridge of the two r×r solves (times their mean diagonal). (Default: 1e-6)
        adam_beta2 (float): β2 of the Adam second moment, ``momentum="adam"`` only. (Default: 0.999)
        eps (float): Adam's ε, ``momentum="adam"`` only. (Default: 1e-8)
        block_size (int): columns of G produced at a time by the exact statistics; the transient memory
            is at most ``3·L·m·block_size`` numbers for a bucket of L same-shape layers. (Default: 256)
        backend (str): "auto", "native", "triton" or "torch" for the hot paths. (Default: "auto")
        param_groups, other_lr, other_betas, other_eps, other_weight_decay, max_grad_norm, seed, capture,
            accumulation_steps, stream_batch_bytes: as in ``LoRSum`` (the last three: exact statistics
            only).
    """

    _data_op = "row_col_energies"
    _optional_state = {"exp_avg_A": ("momentum", lambda group: group["momentum"] is not None),
                       "exp_avg_sq_A": ("momentum", lambda group: group["momentum"] == "adam")}

    def __init__(
        self,
        model,
        lr: float = 1e-3,
        *,
        betas: tuple[float, float | None] = (0.9, None),
        weight_decay: float = 0.0,
        statistics: str = "exact",
        momentum: str | None = "input",
        decay_rate: float = 0.8,
        eps1: float = 1e-30,
        ridge: float = 1e-6,
        adam_beta2: float = 0.999,
        eps: float = 1e-8,
        block_size: int = 256,
        backend: str = "auto",
        **kwargs,
    ):
        if statistics not in STATISTICS:
            raise ValueError(f"statistics must be one of {STATISTICS}, got {statistics!r}")
        if momentum not in MOMENTUM_MODES:
            raise ValueError(f"momentum must be one of {MOMENTUM_MODES}, got {momentum!r}")
        if len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2 or None), got {betas!r}")
        if not 0.0 <= float(betas[0]) < 1.0:
            raise ValueError(f"invalid betas[0]: {betas[0]} (must be in [0, 1))")
        if betas[1] is not None and not 0.0 <= float(betas[1]) < 1.0:
            raise ValueError(f"invalid betas[1]: {betas[1]} (must be None or in [0, 1))")
        if not 0.0 <= adam_beta2 < 1.0:
            raise ValueError(f"invalid adam_beta2: {adam_beta2} (must be in [0, 1))")
        check_positive("decay_rate", decay_rate)
        check_positive("eps1", eps1, allow_zero=True)
        check_positive("ridge", ridge, allow_zero=True)
        check_positive("eps", eps, allow_zero=True)
        check_positive("weight_decay", weight_decay, allow_zero=True)
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        # Unknown names, and a forced backend lacking an op this configuration runs, raise now: before
        # the base class hooks the model, not at the first step.
        statistics_op = "row_col_energies" if statistics == "exact" else "tangent_energies"
        ops.check(backend, model, ("adaprelora_solve", statistics_op))
        self.statistics = statistics
        # Instance attributes read by the base class: only the exact statistics hook the layers, and the
        # factor gradients are needed either way.
        self.needs_capture = statistics == "exact"
        self.needs_grads = True
        defaults = dict(
            lr=lr, betas=(float(betas[0]), None if betas[1] is None else float(betas[1])),
            weight_decay=weight_decay, momentum=momentum, decay_rate=decay_rate, eps1=eps1, ridge=ridge,
            adam_beta2=adam_beta2, eps=eps, block_size=block_size, backend=backend,
        )
        super().__init__(model, defaults, **kwargs)

    def _init_layer_state(self, layer, group, generator):
        kw = dict(dtype=self._state_dtype(layer), device=layer.A.device)
        r, n, m = layer.rank, layer.in_features, layer.out_features
        # "t": the step count of the EMA schedule and the bias corrections, in the math dtype.
        state = {"t": torch.zeros((), **kw), "row_stat": torch.zeros(m, **kw),
                 "col_stat": torch.zeros(n, **kw)}
        if group["momentum"] is not None:
            state.update(exp_avg_A=torch.zeros(r, n, **kw), exp_avg_B=torch.zeros(m, r, **kw))
        if group["momentum"] == "adam":
            state.update(exp_avg_sq_A=torch.zeros(r, n, **kw), exp_avg_sq_B=torch.zeros(m, r, **kw))
        return state

    def _no_data_parallel_mode(self, group):
        if self.statistics == "exact":
            return ("statistics='exact' needs the row/column energies of the global G, which have "
                    "cross-rank terms (all-reducing the m×n G or gathering every rank's X and S); "
                    "statistics='surrogate' uses the factor gradients DDP already averages")
        return None

    def _method_step(self, group, A, B, X, S, state, grads, reduce, backend):
        g_A, g_B = grads
        A_new, B_new, new_state = adaprelora_step(
            A, B, g_A, g_B, state, X=X, S=S, lr=group["lr"], betas=group["betas"],
            weight_decay=group["weight_decay"], momentum=group["momentum"], decay_rate=group["decay_rate"],
            eps1=group["eps1"], ridge=group["ridge"], adam_beta2=group["adam_beta2"], eps=group["eps"],
            block_size=group["block_size"], backend=backend,
        )
        return A_new, B_new, new_state
