"""PSI-LoRA (LoRSum) and Scaled PSI-LoRA as torch.optim optimizers (spec/lorsum.md §5.1, §6.4).

The step is defined on the merged weight: ``s·B·A`` moves as SVDLoRA's ``W`` would with the same lr,
whatever α/r (spec §11 P10). Internally the factors are balanced (``√s·A``, ``√s·B``), so the proximal
term ``λ(‖A − A0‖² + ‖B − B0‖²)`` is taken in those coordinates; with s = 1 this is the official method.
"""

from __future__ import annotations

import struct

import torch
from torch import Tensor

from .. import ops
from .._numerics import as_dtype
from ..functional.lorsum_step import kfac_scale_out, psi_lora_step, scaled_psi_lora_step
from .base import LoRAOptimizer
from .checks import check_positive
from . import guards, step_normalization

# The ops a LoRSum step dispatches (the half-steps, the lock-step token products, the r×r solves), and
# ScaledLoRSum's K-FAC statistics: a forced backend must have each on the model's devices.
_LORSUM_OPS = ("lorsum_update_in", "lorsum_update_out", "pair_products", "spd_solve")
_SCALED_OPS = _LORSUM_OPS + ("col_sq_sums", "kfac_metric_update")

__all__ = ["LoRSum", "ScaledLoRSum"]

# Data dtypes the native half-steps read as they are, into fp32 math (functional.low_rank_sum.data_operand).
_NATIVE_DATA = (torch.float32, torch.bfloat16, torch.float16)


def _check_iters(iters) -> None:
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be an integer >= 0, got {iters!r}")


def _check_unit(name: str, value, *, closed: bool = False) -> None:
    if not (0.0 <= value < 1.0 or (closed and value == 1.0)):
        raise ValueError(f"invalid {name}: {value} (must be in [0, 1{']' if closed else ')'})")


class _MomentumFactors:
    """Low-rank momentum state shared by both optimizers: A_m ~ N(0,1) seeds the subspace, B_m = 0."""

    def _momentum_state(self, layer, group, generator, beta: float) -> dict:
        if beta == 0:
            return {}
        rank = group["momentum_rank"] or layer.rank
        if rank > min(layer.in_features, layer.out_features):
            raise ValueError(
                f"{layer.name}: momentum_rank {rank} is larger than min(m, n) = "
                f"{min(layer.in_features, layer.out_features)}"
            )
        dt = self._state_dtype(layer)
        # Drawn in fp32 on the CPU from the optimizer's seeded generator, so every rank, device and
        # parameter dtype starts from the same numbers.
        A_m = torch.randn(rank, layer.in_features, generator=generator).to(device=layer.A.device, dtype=dt)
        return {"momentum_in": A_m, "momentum_out": torch.zeros(layer.out_features, rank, dtype=dt,
                                                                device=layer.A.device)}


class _NormalizedStep:
    """``normalize_step`` (optim/step_normalization.py), the same option of both optimizers: each layer's step
    at its own lr, the proximal weight kept at the group's ``η·λ0``."""

    _state_for_step = step_normalization.FINISHED_IN_STEP
    # Checkpoints from before the option (the plain step was the only one) load with it off.
    _options_added_later = {"normalize_step": False, "normalize_beta": 0.999}

    @staticmethod
    def _check_normalization(normalize_step, normalize_beta, max_update_norm) -> None:
        _check_unit("normalize_beta", normalize_beta)
        if normalize_step and max_update_norm is not None:
            raise ValueError(
                "normalize_step bounds each layer's step itself (RMS lr per entry), while max_update_norm "
                "measures steps in units of the gradient and would cut the normalised step to a fraction of "
                "it: pass max_update_norm=None with normalize_step=True")

    def _normalization_state(self, layer, group) -> dict:
        if not group["normalize_step"]:
            return {}
        return step_normalization.initial_state(self._state_dtype(layer), layer.A.device)

    @staticmethod
    def _proximal(group, key: str = "lmbd") -> float:
        """The proximal weight at any layer's lr: η·λ0 at the group's η (tied to the layer's lr it would grow
        with it and cap the step of a layer with small gradients at ~G/λ0). A number: from a per-layer lr
        tensor, as ``lr·(λ0·η/lr)``, it took four kernel launches a layer on a GPU."""
        return float(group["lr"]) * group[key]

    def _one_layer_lr(self, group, layer, X, S):
        """The lr of a one-layer path's step (``_prepare_one_layer_step``), as ``_at_layer_lr`` would pass
        it: the group's, or the normalised lr from the layer's statistics. None where no one-layer path
        applies: not the CPU's native half-steps (which also make the results carry any non-finite data),
        not fp32 math, FSDP2, a tensor as lr, or the normalised step's first step (measured: the bucket
        path); never on an accelerator (it reads the layer's scale on the host, and saved little there)."""
        lr = group["lr"]
        if (guards.host_waits_for(layer.A.device) or self._state_dtype(layer) != torch.float32
                or self._sharded is not None or isinstance(lr, Tensor)
                or X.dtype not in _NATIVE_DATA or S.dtype not in _NATIVE_DATA
                or not self._results_carry_bad_data(group, layer.A.device)):
            return None
        if group["normalize_step"]:  # as step_normalization.step_at_layer_lr with one known scale
            scale = self.state[layer.A].get("step_norm_scale")
            known = float(scale) if scale is not None else 0.0
            if not known > 0:
                return None
            lr = float(lr) * known
        return lr

    def _balanced_layer(self, layer):
        """One layer's balanced factors (1, r, n) and (1, m, r) in fp32, as ``_compute_bucket`` stacks them
        for a bucket of that layer."""
        root = self._scale_root([layer.scale], torch.float32, layer.A.device)
        return (as_dtype(layer.A.unsqueeze(0), torch.float32) * root,
                as_dtype(layer.B.unsqueeze(0), torch.float32) * root)

    def _at_layer_lr(self, step_at, group, A, B, state):
        """``step_at(lr)`` at the group's lr, or at each layer's normalised lr (without reading the scales
        where ``_compute_bucket`` found them known: ``LoRAOptimizer._scales_known_positive``)."""
        if not group["normalize_step"]:
            return step_at(group["lr"])
        if "step_norm_scale" not in state:
            raise ValueError("normalize_step was turned on after the optimizer was built; pass it to the "
                             "constructor (its statistics are part of each layer's state)")
        return step_normalization.step_at_layer_lr(step_at, A, B, group["lr"], state,
                                                   known_positive=self._bucket_scales_known)


def _round_fp32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def warmup_beta2_on_host(t: Tensor, beta2: float) -> float | None:
    """``min(β2, 1 − 1/(t+1))`` of one layer's update count ``t`` (a CPU fp32 or fp64 tensor of one element)
    as a number, bit for bit the value ``(1 - 1 / (t + 1)).clamp(max=β2)`` takes in t's dtype (each IEEE
    operation rounded to it; fp64 arithmetic rounds to fp32 exactly for +, − and ÷), without its six small
    ops; None for anything else."""
    if t.device.type != "cpu" or t.numel() != 1 or t.dtype not in (torch.float32, torch.float64):
        return None
    rnd = _round_fp32 if t.dtype == torch.float32 else float
    count = rnd(float(t) + 1.0)
    return min(rnd(1.0 - rnd(1.0 / count)), rnd(beta2))


def _momentum_of(state: dict):
    return (state["momentum_in"], state["momentum_out"]) if "momentum_in" in state else None


def _momentum_dict(buffer) -> dict:
    return {} if buffer is None else {"momentum_in": buffer[0], "momentum_out": buffer[1]}


class LoRSum(_NormalizedStep, _MomentumFactors, LoRAOptimizer):
    """PSI-LoRA: each step is the rank-r LoRSum of ``s·B·A − η_l·(momentum direction)``.

    By default each layer's step is normalised (``normalize_step``, optim/step_normalization.py): the layer
    steps at its own lr ``η_l`` such that its merged-weight step has RMS ``lr`` per entry, from a per-layer
    second moment of the step's size (Adam-mini's block scale on LoRSum's step), so ``lr`` is a step size,
    Adam-like in magnitude. ``normalize_step=False`` is the published method, a gradient step (``η_l = lr``),
    whose lr is a multiple of the gradient: ``lr=1.0, max_update_norm=1.0`` was its recommended setting.

    Args:
        model (nn.Module): the model holding the LoRA layers (PEFT, ``LoRALinear`` or any module with
            ``lora_A``/``lora_B`` Linear children).
        lr (float): η, read from the param group at every step (schedulers work); the default is the
            defaults sweep's choice (docs/defaults_sweep.md). With ``normalize_step`` the RMS per entry of
            each layer's merged-weight step; without, the multiple of the gradient. (Default: 1e-4)
        lmbd (float): λ0; the proximal weight is λ = η·λ0 (the group's η, also with ``normalize_step``).
            (Default: 1e-2)
        iters (int): k ALS rounds; 0 is one Jacobi round, the Riemannian-preconditioned step. (Default: 1)
        momentum (float): β of the low-rank heavy-ball buffer; 0 keeps no buffer. (Default: 0)
        dampening (float): d, as in torch SGD. (Default: 0)
        momentum_rank (int, optional): rank of the buffer factors; None means the layer's rank r.
        lmbd_momentum (float, optional): λ0 of the buffer's LoRSum; None means ``lmbd``.
        backend (str): "auto", "native", "triton" or "torch" for the hot paths. (Default: "auto")
        seed (int): seeds the momentum factors' random start. (Default: 0)
        param_groups (list[dict], optional): torch-style groups of LoRA factors (a layer's A and B
            together) or of other parameters, with per-group overrides.
        other_lr, other_betas, other_eps, other_weight_decay: torch AdamW for trainable non-LoRA
            parameters (heads, biases). (Default: 1e-4, (0.9, 0.999), 1e-8, 0)
        max_grad_norm (float, optional): clip the global gradient norm inside the step (``.grad`` clipping
            does not reach the captured data this method steps from); the pre-clip norm is
            ``optimizer.grad_norm``. Needs the cached step. None: no clipping. (Default: None)
        max_update_norm (float, optional): clip the step itself, in every capture mode (the streamed
            step included): all layers move by ``min(1, max_update_norm / N)`` of their step, N being the
            global norm of the merged-weight updates over the lr (at most the global norm of the gradient
            a step of this method follows, so 1.0 is the analogue of the official ``max_grad_norm=1.0``);
            N is ``optimizer.update_norm`` (optim/update_clip.py). None: no clipping. Only without
            ``normalize_step`` (which bounds each layer's step itself). (Default: None)
        normalize_step (bool): scale each layer's step to RMS lr per entry (above). Its first step per
            layer is computed two to four times (measuring the step's size); a whole step, also at k = 0.
            Checkpoints written before the option existed load with it off. (Default: True)
        normalize_beta (float): β of the per-layer second moment of the step's size. (Default: 0.999)
        process_group (optional): data-parallel training (DDP): None (single process), ``"default"``
            (torch.distributed's default group) or a ``ProcessGroup``; the token products are averaged
            over its ranks each half-step (``lorsum_kernels.distributed``). (Default: None)
        capture (str): where the step's data-dependent work runs (``optim/streaming.py``): "stream" runs
            each layer's step in its backward, while its X and S are alive, and keeps only the new factors
            (memory at the LoRA + AdamW level; one backward per step, no ``max_grad_norm``, no GradScaler);
            "cache" keeps X and S until ``step()`` (accumulation, clipping, GradScaler); "auto" caches the
            first step and streams from the second when it had one backward per layer and neither
            clipping nor a scaler. (Default: "auto")
        accumulation_steps (int, optional): backwards per step; N > 1 tells "auto" to keep the cache.
            (Default: None)
        stream_batch_bytes (int, optional): on the CPU, in one process, the streamed layer steps wait in a
            queue of at most this many bytes of X and S (until the next layer would overfill it, or backward
            ends) and then run in a row, warm instead of each right after its layer's GEMMs; a larger layer
            and every layer with 0 run in their own backward. None: 64 MiB. Accelerators and data-parallel
            runs never queue. (Default: None)
    """

    # Every read of X and S goes through these (psi_lora_step: the half-steps, or the lock-step products).
    _data_ops = ("lorsum_update_in", "lorsum_update_out", "pair_products")
    _optional_state = {"momentum_in": ("momentum", lambda group: group["momentum"]),
                       "step_norm_scale": ("normalize_step", lambda group: group["normalize_step"])}

    def __init__(
        self,
        model,
        lr: float = 1e-4,
        *,
        lmbd: float = 1e-2,
        iters: int = 1,
        momentum: float = 0.0,
        dampening: float = 0.0,
        momentum_rank: int | None = None,
        lmbd_momentum: float | None = None,
        backend: str = "auto",
        seed: int = 0,
        max_update_norm: float | None = None,
        normalize_step: bool = True,
        normalize_beta: float = 0.999,
        **kwargs,
    ):
        check_positive("lmbd", lmbd, allow_zero=True)
        _check_iters(iters)
        self._check_normalization(normalize_step, normalize_beta, max_update_norm)
        _check_unit("momentum", momentum)
        _check_unit("dampening", dampening, closed=True)
        if momentum_rank is not None and (not isinstance(momentum_rank, int) or momentum_rank < 1):
            raise ValueError(f"momentum_rank must be a positive integer or None, got {momentum_rank!r}")
        ops.check(backend, model, _LORSUM_OPS)  # unknown names, and a forced backend lacking an op, raise now
        defaults = dict(
            lr=lr, lmbd=lmbd, iters=iters, momentum=momentum, dampening=dampening, momentum_rank=momentum_rank,
            lmbd_momentum=lmbd if lmbd_momentum is None else lmbd_momentum, backend=backend,
            normalize_step=bool(normalize_step), normalize_beta=normalize_beta,
        )
        super().__init__(model, defaults, seed=seed, max_update_norm=max_update_norm, **kwargs)

    def _init_layer_state(self, layer, group, generator):
        return {**self._momentum_state(layer, group, generator, group["momentum"]),
                **self._normalization_state(layer, group)}

    def _steps_from_token_sums(self, group):
        # k = 0 is one Jacobi round from the anchors: the only token sums are the products of X and S with
        # the factors and momentum factors, fixed during backward. k ≥ 1 rounds multiply by the previous
        # round's result, which depends on all of the step's tokens.
        # The normalised step (normalize_step) computes a layer's first step 2-4 times: a whole step.
        return group["iters"] == 0 and not group["normalize_step"]

    def _prepare_one_layer_step(self, group, layer, X, S):
        """The streamed layer step of the usual configuration, as ``_compute_bucket`` computes it for one
        layer (the same ops on the same arguments, in the same order: ``psi_lora_step`` without momentum,
        at the normalised lr the layer's statistics give, or at the group's), without the bucket, the
        functional layers and the per-call argument handling between them. Applies on the CPU with the
        native half-steps (which also make the results carry any non-finite data: no separate check),
        fp32 math, no momentum buffer, a number as lr, and past the normalised step's first step; None
        otherwise. The factors it returns are the balanced ones
        (``LoRAOptimizer._prepare_one_layer_step``)."""
        if group["momentum"] or type(self)._method_step is not LoRSum._method_step:
            return None
        lr = self._one_layer_lr(group, layer, X, S)
        if lr is None:
            return None
        A, B = self._balanced_layer(layer)
        lam = self._proximal(group)  # psi_lora_step's λ = η·λ0
        rounds = ops.prepare_lorsum_rounds((A, B), [(X.unsqueeze(0), S.unsqueeze(0).mT)],
                                           [1.0, -lr * (1 - group["dampening"])], lam, group["iters"],
                                           backend=self._backend(group, layer.A.device))
        return lambda: (*rounds(), {}, None, True)  # balanced: collect divides them by √s per bucket

    def _method_step(self, group, A, B, X, S, state, grads, reduce, backend):
        def step_at(lr):
            # At the group's lr its λ as psi_lora_step makes it (lr·λ0); at a layer's own (normalize_step) the
            # group's, η·λ0, as a number.
            proximal = None
            if lr is not group["lr"]:
                proximal = (self._proximal(group), self._proximal(group, "lmbd_momentum"))
            A_new, B_new, buffer = psi_lora_step(
                A, B, X, S, _momentum_of(state), lr=lr, lmbd=group["lmbd"],
                lmbd_momentum=group["lmbd_momentum"], iters=group["iters"], momentum=group["momentum"],
                dampening=group["dampening"], backend=backend, reduce=reduce, proximal=proximal,
            )
            return A_new, B_new, _momentum_dict(buffer)

        return self._at_layer_lr(step_at, group, A, B, state)


class ScaledLoRSum(_NormalizedStep, _MomentumFactors, LoRAOptimizer):
    """Scaled PSI-LoRA: LoRSum in a diagonal K-FAC or Shampoo metric with a fractional power.

    The defaults are the setting the defaults sweep chose (docs/defaults_sweep.md): the official GLUE
    experiments' δ = 1e-5 and β2 = 0.99 with the β2 warm-up, no momentum buffer (β1 = 0), and each layer's
    step normalised as LoRSum's (``normalize_step``: the metric's direction, at RMS lr per entry of the
    merged weight), lr 3e-4. With δ that small the metric normalises both sides of the step, which is then
    invariant to the loss's scale as Adam's is; the normalisation sets each layer's step size, which the
    metric alone left dependent on the task (lr 0.1 to 0.3 without it). ``normalize_step=False, lr=0.1,
    betas=(0.9, 0.99)`` is the metric step alone with the official momentum (the previous default); the
    official code's class defaults (δ = 0.1, β2 = 0.999, no warm-up) leave the output-gradient side at δ and
    need the step clip (``normalize_step=False, max_update_norm=1.0``).

    Args:
        model, lmbd, iters, momentum_rank, backend, seed, param_groups, other_*: as in ``LoRSum``;
            the proximal weight is λ = max(η·λ0, min_lmbd). ``process_group`` as in ``LoRSum``
            (``metric="kfac"`` only; the K-FAC statistics are averaged over ranks too).
        lr (float): η, read from the param group at every step (schedulers work); with ``normalize_step``
            the RMS per entry of each layer's merged-weight step. (Default: 3e-4)
        max_update_norm (float, optional): as in ``LoRSum``. (Default: None)
        betas (tuple[float, float]): β1 of the low-rank momentum buffer (0 keeps none; the buffer's LoRSum
            doubles the step's token work) and β2 of the metric EMA. (Default: (0.0, 0.99))
        damping (float): δ added to the metric statistics before the power. (Default: 1e-5)
        metric (str): "kfac" (E[x²], E[s²]) or "shampoo" (diag(GᵀG), diag(GGᵀ)). (Default: "kfac")
        metric_power (float): p in (v + δ)^p, 0 ≤ p ≤ 1. (Default: 0.5)
        loss_reduction (str): "mean" or "sum", how the loss reduces over tokens; fixes the scale of the
            output-gradient statistic. (Default: "mean")
        min_lmbd (float): floor of λ, as in the official code. (Default: 1e-5)
        init_metric_scale (float): initial value of the metric EMAs. (Default: 1.0)
        beta2_warmup (bool): the metric EMAs use ``β2_t = min(β2, 1 − 1/(t+1))`` at their t-th update
            (t = 0, 1, …), so the first batch's statistics replace ``init_metric_scale`` and the metric
            tracks the data from the start instead of over ~1/(1−β2) steps (spec §6.1; off in the
            official code). Adds a per-layer update count ``metric_updates`` to the state.
            (Default: True)
        normalize_step (bool): scale each layer's step to RMS lr per entry, as in ``LoRSum``: the metric's
            direction at a per-layer size set by lr (lr is then a step size). A layer's first step is computed
            2-4 times, each from the metric state before the step. (Default: True)
        normalize_beta (float): as in ``LoRSum``. (Default: 0.999)
    """

    # LoRSum's, plus the metric statistics (fused, or the composite's sums of squares and Shampoo energies).
    _data_ops = LoRSum._data_ops + ("kfac_metric_update", "col_sq_sums", "row_col_energies")
    _optional_state = {"momentum_in": ("betas[0]", lambda group: group["betas"][0]),
                       "metric_updates": ("beta2_warmup", lambda group: group["beta2_warmup"]),
                       "step_norm_scale": ("normalize_step", lambda group: group["normalize_step"])}

    def __init__(
        self,
        model,
        lr: float = 3e-4,
        *,
        lmbd: float = 1e-2,
        iters: int = 1,
        betas: tuple[float, float] = (0.0, 0.99),
        damping: float = 1e-5,
        metric: str = "kfac",
        metric_power: float = 0.5,
        loss_reduction: str = "mean",
        min_lmbd: float = 1e-5,
        init_metric_scale: float = 1.0,
        beta2_warmup: bool = True,
        momentum_rank: int | None = None,
        backend: str = "auto",
        seed: int = 0,
        max_update_norm: float | None = None,
        normalize_step: bool = True,
        normalize_beta: float = 0.999,
        **kwargs,
    ):
        check_positive("lmbd", lmbd, allow_zero=True)
        _check_iters(iters)
        self._check_normalization(normalize_step, normalize_beta, max_update_norm)
        if not isinstance(beta2_warmup, bool):
            raise TypeError(f"beta2_warmup must be a bool, got {type(beta2_warmup).__name__}")
        _check_unit("betas[0]", betas[0])
        _check_unit("betas[1]", betas[1])
        check_positive("damping", damping, allow_zero=True)
        check_positive("min_lmbd", min_lmbd, allow_zero=True)
        check_positive("init_metric_scale", init_metric_scale)
        if metric not in ("kfac", "shampoo"):
            raise ValueError(f"metric must be 'kfac' or 'shampoo', got {metric!r}")
        if not 0.0 <= metric_power <= 1.0:
            raise ValueError(f"metric_power must be in [0, 1], got {metric_power}")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if momentum_rank is not None and (not isinstance(momentum_rank, int) or momentum_rank < 1):
            raise ValueError(f"momentum_rank must be a positive integer or None, got {momentum_rank!r}")
        ops.check(backend, model, _SCALED_OPS)
        defaults = dict(
            lr=lr, lmbd=lmbd, iters=iters, betas=tuple(betas), damping=damping, metric=metric,
            metric_power=metric_power, loss_reduction=loss_reduction, min_lmbd=min_lmbd,
            init_metric_scale=init_metric_scale, beta2_warmup=beta2_warmup, momentum_rank=momentum_rank,
            backend=backend, normalize_step=bool(normalize_step), normalize_beta=normalize_beta,
        )
        super().__init__(model, defaults, seed=seed, max_update_norm=max_update_norm, **kwargs)

    def _init_layer_state(self, layer, group, generator):
        dt, dev = self._state_dtype(layer), layer.A.device
        scale = group["init_metric_scale"]
        state = {
            "metric_in": torch.full((layer.in_features,), scale, dtype=dt, device=dev),
            "metric_out": torch.full((layer.out_features,), scale, dtype=dt, device=dev),
        }
        if group["beta2_warmup"]:
            state["metric_updates"] = torch.zeros((), dtype=dt, device=dev)
        state.update(self._momentum_state(layer, group, generator, group["betas"][0]))
        state.update(self._normalization_state(layer, group))
        return state

    def _steps_from_token_sums(self, group):
        # As LoRSum's at k = 0, plus the K-FAC column sums of squares and token counts; the Shampoo diagonal
        # diag(GᵀG) is quadratic in the step's G, no sum over micro-batches. normalize_step: a whole step.
        return group["iters"] == 0 and group["metric"] == "kfac" and not group["normalize_step"]

    def _no_data_parallel_mode(self, group):
        if group["metric"] != "kfac":
            return (f"metric={group['metric']!r}: diag(GᵀG) of the global G has cross-rank terms (it is no "
                    "sum over tokens); use metric='kfac'")
        return None

    def _prepare_one_layer_step(self, group, layer, X, S):
        """The streamed layer step of the usual configuration (the K-FAC metric, no momentum buffer; otherwise
        as ``LoRSum._prepare_one_layer_step``), as ``_compute_bucket`` computes it for one layer: the ops of
        ``scaled_psi_lora_step`` (``ops.kfac_lorsum_rounds``) on the same arguments (β2's warm-up on the
        host), without the bucket, the normalisation and the functional layers around them. None where it
        does not apply."""
        beta1, beta2 = group["betas"]
        if group["metric"] != "kfac" or beta1 or type(self)._method_step is not ScaledLoRSum._method_step:
            return None
        lr = self._one_layer_lr(group, layer, X, S)
        if lr is None:
            return None
        state = self.state[layer.A]
        extra = {}
        if "metric_updates" in state:
            t = state["metric_updates"].unsqueeze(0)
            beta2 = warmup_beta2_on_host(t, beta2)
            if beta2 is None:
                return None
            extra["metric_updates"] = t + 1
        A, B = self._balanced_layer(layer)
        T = X.shape[-2]
        # scaled_psi_lora_step's λ = max(η·λ0, min λ) and K-FAC scalars, as it rounds them
        lam = max(self._proximal(group), group["min_lmbd"])
        kfac = (beta2, group["damping"], group["metric_power"], 1.0 / max(T, 1),
                kfac_scale_out(group["loss_reduction"], T))
        rounds = ops.prepare_kfac_lorsum_rounds(
            (A, B), [(X.unsqueeze(0), S.unsqueeze(0).mT)], [1.0, -lr * (1 - beta1)], lam, group["iters"],
            state["metric_in"].unsqueeze(0), state["metric_out"].unsqueeze(0), *kfac,
            backend=self._backend(group, layer.A.device))

        def run():
            A_new, B_new, v_in, v_out = rounds()
            return A_new, B_new, {"metric_in": v_in, "metric_out": v_out, **extra}, None, True  # balanced
        return run

    def _method_step(self, group, A, B, X, S, state, grads, reduce, backend):
        beta1, beta2 = group["betas"]
        extra = {}
        if "metric_updates" in state:  # β2 warm-up: one β2 per layer of the bucket, (L, 1) against (L, n)
            t = state["metric_updates"]
            # The fused K-FAC ops take β2 as a number (one read of the tensor otherwise): for one layer on the
            # CPU (every streamed step) it is computed on the host, as the tensor ops would round it.
            host = warmup_beta2_on_host(t, beta2) if group["metric"] == "kfac" and reduce is None else None
            count = t + 1
            beta2 = host if host is not None else (1 - 1 / count).clamp(max=beta2).view(-1, 1)
            extra["metric_updates"] = count

        def step_at(lr):  # from the state before the step at every try (normalize_step's first step)
            A_new, B_new, (v_in, v_out), buffer = scaled_psi_lora_step(
                A, B, X, S, (state["metric_in"], state["metric_out"]), _momentum_of(state),
                lr=lr, lmbd=group["lmbd"], min_lmbd=group["min_lmbd"],
                proximal=None if lr is group["lr"] else self._proximal(group),
                iters=group["iters"], betas=(beta1, beta2), damping=group["damping"], metric=group["metric"],
                metric_power=group["metric_power"], loss_reduction=group["loss_reduction"], backend=backend,
                reduce=reduce,
            )
            return A_new, B_new, {"metric_in": v_in, "metric_out": v_out, **_momentum_dict(buffer), **extra}

        return self._at_layer_lr(step_at, group, A, B, state)
