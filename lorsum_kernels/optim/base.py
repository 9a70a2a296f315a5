"""The machinery every LoRA optimizer of the package shares.

``LoRAOptimizer`` is a ``torch.optim.Optimizer`` built from a model, not from its parameters, because the
methods act on (A, B) pairs and on each layer's X and S:

* It finds the LoRA pairs (``lora.find_lora_layers``) and, when the method needs them, hooks the layers
  (``capture.ActivationCapture``).
* Param groups come in two kinds: ``"lora"`` groups hold factor pairs (a layer's A and B always in the
  same group) and are stepped by the method; ``"other"`` groups hold the remaining trainable parameters
  (heads, biases) and are stepped by torch's fused AdamW with their own ``lr``, its moments in fp32 like the
  method state (a bf16/fp16 parameter steps through an fp32 copy). LR schedulers scale both; every
  group's ``lr`` is validated again at each ``step()`` (a finite number ≥ 0, or such a tensor).
  ``add_param_group`` works as torch's for either kind (LoRA layers get the constructor's initial state).
* ``step()`` validates everything before it changes anything, buckets the layers of a group by shape,
  stacks each bucket into one batched call of the method's pure function (``_method_step``), and writes
  results back in the parameter dtype. A layer whose inputs or new values are not all finite is left untouched,
  state included, and counted in its ``state[A]["skipped_steps"]``; ``self.state["skipped_steps"]`` counts
  the ``step()`` calls that skipped anything (as GradScaler counts skipped steps). The choice is made with
  ``torch.where`` on the device, never by reading a flag on the host.
* ``max_grad_norm`` clips inside the step, since ``.grad`` clipping (``clip_grad_norm_``, the Trainer's
  ``max_grad_norm``) cannot reach the methods that step from the captured X and S: the global 2-norm is
  taken over what the step consumes (each captured layer's weight gradient ``G = Sᵀ·X``, computed by
  ``functional.gradient_norm`` without forming G; the factor gradients of the layers stepped from
  ``.grad``; the other groups' ``.grad``), and every one of them is scaled by
  ``min(1, max_grad_norm / (norm + 1e-6))`` as torch's ``clip_grad_norm_`` does. The pre-clip norm is
  ``optimizer.grad_norm`` (a device tensor, for logging). No host synchronisation: the factor is a tensor.
* ``torch.amp.GradScaler``: ``scaler.step(opt)`` passes the loss scale and its inf flag to ``step()``
  (``_step_supports_amp_scaling``), which unscales the captured S, the factor and other gradients and the
  clip norm, and skips every update on the flag; ``scaler.unscale_(opt)`` first cannot reach S and is
  refused (before any change) by the methods that step from it.
* ``process_group`` (None, ``"default"`` or a ``ProcessGroup``) turns on data-parallel training: the
  methods average their token sums over ranks, and ranks agree on the captured layers, the non-finite
  skip and the clip norm (``lorsum_kernels.distributed`` states what each method does). None: single
  process, nothing added. Under FSDP2 (``fully_shard``: DTensor parameters) the mesh's ranks average, the
  factors are gathered once per step and each rank writes its shard (``lorsum_kernels.fsdp``); an optimizer
  built before the model was sharded (accelerate's ``prepare(model, optimizer)``) moves to the sharded
  parameters at its next ``step()``/``state_dict()``/``load_state_dict()``.
* Method state (momentum factors, metrics) lives in fp32 (fp64 for fp64 parameters), keyed by the
  layer's A parameter, and keeps its dtype through ``state_dict``/``load_state_dict``. The state dict
  carries the class name and the parameter shapes; a checkpoint of another method or another model
  (LoRA rank) is refused before anything changes. It also works through ``torch.distributed.checkpoint``
  (``get_optimizer_state_dict``/``set_optimizer_state_dict``, sharded or full): the state dict has an entry
  for every parameter (B's is empty, an other parameter not stepped yet has AdamW's initial state), and the
  optimizer-wide entries travel in the first param group.

Subclasses set ``needs_capture`` (and ``needs_grads`` when they read the factors' gradients while
capturing) and implement ``_init_layer_state`` and ``_method_step``.
"""

from __future__ import annotations

import math
import numbers
import weakref
from collections import defaultdict
from typing import Any, Iterable

import torch
from torch import Tensor, nn
from torch.optim.adam import adam as _torch_adam

from ..backends import resolve_backend
from ..capture import ActivationCapture
from ..distributed import resolve_data_parallel
from ..fsdp import is_sharded, local_tensor
from ..functional.lorsum import gradient_norm
from ..lora import LoRALayer, find_lora_layers
from .streaming import StreamedStep, check_capture_options, check_stream_groups

__all__ = ["LoRAOptimizer"]

# Keys of a LoRA layer's state that are not method tensors to stack.
_COUNTERS = ("step", "skipped_steps")
_RANK_AVERAGE = object()  # _compute_bucket's default reduce: self._reduce, with the ranks' agreement


class LoRAOptimizer(torch.optim.Optimizer):
    # torch.amp.GradScaler hands the scale and its inf flag to step() instead of unscaling .grad itself
    # (``_loss_scale``): the captured S must be unscaled too, which unscale_ cannot do.
    _step_supports_amp_scaling = True
    needs_capture: bool = True
    # Whether _method_step receives the factors' autograd gradients; None means "when not capturing".
    needs_grads: bool | None = None

    def __init__(
        self,
        model: nn.Module,
        defaults: dict[str, Any],
        *,
        param_groups: Iterable[dict] | None = None,
        other_lr: float = 1e-4,
        other_betas: tuple[float, float] = (0.9, 0.999),
        other_eps: float = 1e-8,
        other_weight_decay: float = 0.0,
        max_grad_norm: float | None = None,
        seed: int = 0,
        process_group=None,
        capture: str = "auto",
        accumulation_steps: int | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"{type(self).__name__} takes the model (an nn.Module), not {type(model).__name__}: it pairs "
                "each LoRA A with its B by module and hooks the layers"
            )
        _check_positive("lr", defaults["lr"], allow_zero=True)
        _check_positive("other_lr", other_lr, allow_zero=True)
        if max_grad_norm is not None:
            _check_positive("max_grad_norm", max_grad_norm)
        check_capture_options(capture, accumulation_steps, max_grad_norm)
        # Averages token sums over ranks (None: single process); raises now if distributed is not set up.
        # Under FSDP2 the device mesh of the sharded parameters decides (lorsum_kernels.fsdp).
        self._process_group = process_group
        self._reduce, self._sharded = resolve_data_parallel(process_group, model,
                                                            steps_from_captured_data=self.needs_capture)
        layers = find_lora_layers(model)
        if not layers:
            raise ValueError(
                f"{type(self).__name__}: the model has no trainable LoRA layers (modules with lora_A/lora_B "
                "Linear factors); wrap it with PEFT or lorsum_kernels.LoRALinear first"
            )
        for layer in layers:
            if layer.rank > min(layer.in_features, layer.out_features):
                raise ValueError(
                    f"{layer.name}: rank {layer.rank} is larger than min(m, n) = "
                    f"{min(layer.in_features, layer.out_features)}"
                )
        self._layers_by_A = {id(layer.A): layer for layer in layers}
        by_B = {id(layer.B): layer for layer in layers}
        other_defaults = dict(
            lr=other_lr, betas=tuple(other_betas), eps=other_eps, weight_decay=other_weight_decay
        )
        if param_groups is None:
            groups = [{"params": [p for layer in layers for p in (layer.A, layer.B)], "kind": "lora"}]
            lora_ids = set(self._layers_by_A) | set(by_B)
            others = [p for p in model.parameters() if p.requires_grad and id(p) not in lora_ids]
            if others:  # never an empty group: schedulers and DeepSpeed trip over them
                groups.append({"params": others, "kind": "other", **other_defaults})
        else:
            groups = [self._classify_group(dict(g), by_B, other_defaults) for g in param_groups]
        for group in groups:
            if "lr" in group:
                _check_lr("lr" if group["kind"] == "lora" else "other_lr", group["lr"])
        self._model_ref = weakref.ref(model)  # add_param_group finds LoRA layers added to it since
        self._other_defaults = other_defaults
        self._options = frozenset(defaults)  # the method's (torch's __setstate__ adds keys to self.defaults)
        self._seed = seed
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.grad_norm: Tensor | None = None  # the last step's pre-clip norm when max_grad_norm is set
        super().__init__(groups, defaults)
        if self._reduce is not None:  # before any state is made and before the model is hooked
            for group in self._lora_groups():
                reason = self._no_data_parallel_mode(group)
                if reason is not None:
                    raise ValueError(f"{type(self).__name__} has no data-parallel mode here: {reason}")
        if self.needs_capture:
            check_stream_groups(self, capture, accumulation_steps)
        self._layers = [self._layers_by_A[id(p)] for g in self._lora_groups() for p in g["params"]
                        if id(p) in self._layers_by_A]
        self.state["skipped_steps"] = torch.zeros((), dtype=torch.int64, device=self._layers[0].A.device)
        # Kept: add_param_group draws a later group's initial state as if the constructor had had it.
        self._generator = generator = torch.Generator().manual_seed(seed)
        for group in self._lora_groups():
            for layer in self._group_layers(group):
                self._set_layer_state(layer, self._init_layer_state(layer, group, generator))
        self._owners = _parameter_owners(model)
        self._rehook_pending = False
        self._capture = ActivationCapture(self._layers) if self.needs_capture else None
        # The step inside backward (optim/streaming.py): None for the methods that step from .grad.
        self._streamed = None if self._capture is None else StreamedStep(self, capture, accumulation_steps)
        self._built = True  # from now on add_param_group is the user's (torch's __init__ calls it too)

    # ----------------------------------------------------------------------------------------------
    # construction helpers

    def _set_layer_state(self, layer: LoRALayer, method_state: dict) -> None:
        st = self.state[layer.A]
        st["step"] = torch.zeros((), dtype=torch.int64, device=layer.A.device)
        st["skipped_steps"] = torch.zeros((), dtype=torch.int64, device=layer.A.device)
        for key, value in method_state.items():
            st[key] = value

    def _classify_group(self, group: dict, by_B: dict, other_defaults: dict) -> dict:
        params = group["params"]
        if isinstance(params, Tensor):
            params = [params]
        elif isinstance(params, set):
            raise TypeError("optimizer parameters need to be organized in ordered collections, but the "
                            "ordering of tensors in sets will change between runs. Please use a list "
                            "instead.")
        params = list(params)
        if not params:
            raise ValueError("empty parameter group")
        # torch allows (name, tensor) pairs; they are classified by their tensor
        tensors = [p[1] if isinstance(p, tuple) else p for p in params]
        ids = {id(p) for p in tensors}
        is_lora = [id(p) in self._layers_by_A or id(p) in by_B for p in tensors]
        if all(is_lora):
            for p in tensors:
                layer = self._layers_by_A.get(id(p)) or by_B[id(p)]
                if id(layer.A) not in ids or id(layer.B) not in ids:
                    raise ValueError(f"{layer.name}: lora_A and lora_B must be in the same parameter group")
            group["kind"] = "lora"
        elif not any(is_lora):
            for key, value in other_defaults.items():
                group.setdefault(key, value)
            group["kind"] = "other"
        else:
            raise ValueError("a parameter group mixes LoRA factors with other parameters; split it in two")
        group["params"] = params
        return group

    def add_param_group(self, param_group: dict) -> None:
        """Like torch's: a group of other parameters takes the ``other_*`` defaults and is stepped by AdamW;
        a group of LoRA factors (each layer's A and B together, layers of the model not yet in a group) is
        stepped by the method, its layers' state initialised as the constructor would have (the momentum
        factors continue the seeded draws). Raises before any change for a parameter already in a group,
        a group mixing LoRA factors and other parameters, an invalid lr or per-layer option, and, for the
        methods that step from captured data, a call between a backward and its ``step()`` (that step's
        captured data would be lost)."""
        if not getattr(self, "_built", False):  # torch's __init__ adding the constructor's groups
            super().add_param_group(param_group)
            return
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
        self._follow_replaced_parameters()
        self._find_new_layers()
        by_B = {id(layer.B): layer for layer in self._layers_by_A.values()}
        group = self._classify_group(dict(param_group), by_B, self._other_defaults)
        filled = {**self.defaults, **group}  # what torch's add_param_group will make of it
        _check_lr("lr" if group["kind"] == "lora" else "other_lr", filled["lr"])
        tensors = [p[1] if isinstance(p, tuple) else p for p in group["params"]]
        taken = {id(p) for g in self.param_groups for p in g["params"]}
        if any(id(p) in taken for p in tensors):
            raise ValueError("some parameters appear in more than one parameter group")
        layers, states = [], []
        if group["kind"] == "lora":
            layers = [self._layers_by_A[id(p)] for p in tensors if id(p) in self._layers_by_A]
            if self._reduce is not None:
                reason = self._no_data_parallel_mode(filled)
                if reason is not None:
                    raise ValueError(f"{type(self).__name__} has no data-parallel mode here: {reason}")
            if self._capture is not None and any(
                self._capture.has_data(layer) or self._capture.received_grad(layer)
                or self._streamed.has_result(layer) for layer in self._layers
            ):
                raise RuntimeError(
                    "add_param_group of LoRA layers between a backward and its step(): the layers are "
                    "hooked anew, which would drop the captured data of that step; add the group after "
                    "step() or zero_grad()"
                )
        generator_state = self._generator.get_state()
        capture = None  # the new layers hooked with the old ones (after remove_hooks: nothing is hooked)
        try:
            states = [self._init_layer_state(layer, filled, self._generator) for layer in layers]
            if layers and self._capture is not None and not getattr(self._capture, "removed", False):
                capture = ActivationCapture(self._layers + layers)
            super().add_param_group(group)
        except BaseException:
            self._generator.set_state(generator_state)
            if capture is not None:
                capture.remove()
            raise
        for layer, method_state in zip(layers, states):
            self._set_layer_state(layer, method_state)
        self._owners = _parameter_owners(self._model_ref()) if self._model_ref() is not None else self._owners
        self._layers = self._layers + layers
        if capture is not None:
            streaming = self._capture.sink is not None
            self._capture.remove()
            self._capture = capture
            self._streamed.attach(capture)
            if streaming:
                self._streamed.start()

    def _find_new_layers(self) -> None:
        """Registers the model's LoRA layers that were not there when the optimizer was made."""
        model = self._model_ref()
        if model is None:
            return
        new = [layer for layer in find_lora_layers(model) if id(layer.A) not in self._layers_by_A]
        for layer in new:
            if layer.rank > min(layer.in_features, layer.out_features):
                raise ValueError(
                    f"{layer.name}: rank {layer.rank} is larger than min(m, n) = "
                    f"{min(layer.in_features, layer.out_features)}"
                )
        self._layers_by_A.update((id(layer.A), layer) for layer in new)

    def _group_of(self, layer: LoRALayer) -> dict:
        for group in self._lora_groups():
            if any(p is layer.A for p in group["params"]):
                return group
        raise KeyError(layer.name)

    def _lora_groups(self):
        return [g for g in self.param_groups if g["kind"] == "lora"]

    def _group_layers(self, group: dict) -> list[LoRALayer]:
        return [self._layers_by_A[id(p)] for p in group["params"] if id(p) in self._layers_by_A]

    # The op whose backend decides whether a bucket's captured X and S are stacked (see _unbatched_data).
    _data_op = "lorsum_update_in"

    def _unbatched_data(self, group: dict, device: torch.device) -> bool:
        """Whether layers with captured data step one at a time. Stacking a bucket copies its X and S (as
        large as the cache itself: measured 3.7× LoRA+AdamW's step peak against 1.4× unstacked, 8 layers
        1024², T=2048). Only a GPU gains from it (one launch sequence per group); on the CPU the native
        kernels parallelise within a layer and the torch reference runs the same products per layer."""
        return device.type == "cpu" or resolve_backend(group.get("backend"), device, self._data_op) == "torch"

    def _state_dtype(self, layer: LoRALayer) -> torch.dtype:
        return torch.float64 if layer.A.dtype == torch.float64 else torch.float32

    # ----------------------------------------------------------------------------------------------
    # subclass interface

    def _init_layer_state(self, layer: LoRALayer, group: dict, generator: torch.Generator) -> dict:
        """Initial method state of one layer (fp32 tensors on the layer's device)."""
        return {}

    def _no_data_parallel_mode(self, group: dict) -> str | None:
        """Why this group's configuration cannot run with a ``process_group`` (None when it can). Methods
        that step from the captured X and S must average their token sums over ``self._reduce``."""
        return None

    def _method_step(self, group: dict, A: Tensor, B: Tensor, X, S, state: dict, grads, reduce) -> tuple:
        """One step for a bucket of L layers. A (L,r,n) and B (L,m,r) are balanced factors in fp32
        (``√s·A``, ``√s·B``), X (L,T,n) and S (L,T,m) the captured data in their own dtype (None when
        the method needs no capture), ``state`` the stacked method state (per-layer tensors of any shape,
        0-d ones included), ``grads`` the stacked gradients of the balanced factors when ``needs_grads``
        (else None). ``reduce`` (None in one process) maps the token sums computed from X and S to the
        step's: the average over ranks (``self._reduce``), or the running sums over the step's backwards
        (optim/streaming.py). Returns (A_new, B_new, new_state)."""
        raise NotImplementedError

    def _steps_from_token_sums(self, group: dict) -> bool:
        """Whether this group's step reads X and S only through token sums of products with operands fixed
        during backward (the factors, the state), each passed through ``reduce``: then the sums add over
        gradient-accumulation micro-batches exactly, and the streamed step accumulates them instead of
        caching (optim/streaming.py). False unless a method says so."""
        return False

    # ----------------------------------------------------------------------------------------------
    # the step

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        if self._capture is not None:
            self._capture.clear()  # gradients were discarded: the matching X/S must go too
            self._streamed.clear()  # and so are the steps streamed from them

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._capture is not None and self._capture.removed:
            raise RuntimeError(
                f"{type(self).__name__}.remove_hooks() was called: the optimizer no longer sees the layers' "
                "inputs and output gradients and cannot step; build a new optimizer to train on"
            )
        self._follow_replaced_parameters()
        inv_scale, scaler_found_inf = self._loss_scale()  # GradScaler's; raises before any state changes
        # Schedulers and users set group["lr"]: checked at every step, before any state changes.
        lr_skip = {id(g): _check_lr("lr" if g["kind"] == "lora" else "other_lr", g["lr"])
                   for g in self.param_groups}
        if self._streamed is not None:
            self._streamed.check(loss_scaled=inv_scale is not None)  # raises before any state changes
        plan = self._plan()  # validates everything before any state changes
        # One factor for everything the step consumes: the loss scale's inverse times the clip coefficient.
        factor = inv_scale
        if self.max_grad_norm is not None:
            clip = self._clip_coefficient(plan, inv_scale)
            factor = clip if factor is None else factor * clip
        checked_inputs: dict = {}  # one finiteness check per captured tensor (q, k and v share their X)
        skipped = []  # device flags: whether a bucket or an other group skipped anything
        for group, buckets in plan:
            skip = _either(scaler_found_inf, lr_skip[id(group)])
            for layers, data in buckets:
                skipped.append(self._step_bucket(group, layers, data, factor, checked_inputs,
                                                 inv_scale is not None, skip))
        if self._streamed is not None:  # the steps computed in backward
            pairs = [self._capture.pairs(layer) for layer in self._layers]
            skipped += self._streamed.write(lambda group: _either(scaler_found_inf, lr_skip[id(group)]))
        for group in self.param_groups:
            if group["kind"] == "other":
                flag = self._step_other(group, factor, _either(scaler_found_inf, lr_skip[id(group)]))
                if flag is not None:
                    skipped.append(flag)
        if skipped:
            # As GradScaler counts: one per step() that skipped anything (the per-layer counts are in
            # state[A]["skipped_steps"]).
            counter = self.state["skipped_steps"]
            counter += torch.stack([f.to(counter.device) for f in skipped]).any()
        if self._capture is not None:
            self._capture.clear()
            self._streamed.after_cached_step(pairs, loss_scaled=inv_scale is not None)
        if self._rehook_pending:
            self._rehook()
        return loss

    def _loss_scale(self) -> tuple[Tensor | None, Tensor | None]:
        """``(1/scale, found_inf)`` of a ``torch.amp.GradScaler`` stepping this optimizer, else (None, None).

        With ``_step_supports_amp_scaling`` the scaler does not unscale ``.grad`` itself: it sets
        ``self.grad_scale`` (its scale, or None after a user's ``scaler.unscale_(optimizer)``) and
        ``self.found_inf`` (non-zero when a ``.grad`` has an inf or NaN) for the duration of ``step()``, as
        for torch's fused Adam. The step then unscales the factor gradients, the other groups' gradients and
        the captured S (which ``unscale_`` cannot reach) itself, and skips everything on ``found_inf``.
        """
        found_inf = getattr(self, "found_inf", None)
        if found_inf is None:
            return None, None
        scale = getattr(self, "grad_scale", None)
        if scale is None:
            if self.needs_capture:
                raise RuntimeError(
                    f"scaler.unscale_(optimizer) was called before scaler.step(optimizer): it unscales .grad "
                    f"but not the captured output-gradients S that {type(self).__name__} steps from. Drop "
                    "the unscale_ call (clip with the optimizer's max_grad_norm= instead of clip_grad_norm_)"
                )
            return None, found_inf > 0
        return scale.float().reciprocal(), found_inf > 0

    def _plan(self):
        data_of = {}  # id(layer) -> its captured (X, S) or None
        if self._capture is not None:
            for layer in self._layers:
                data = self._capture.get(layer)
                if data is None and self._streamed.has_result(layer):
                    continue  # stepped from what was streamed in backward
                if data is None and self._capture.received_grad(layer):
                    raise RuntimeError(
                        f"{layer.name} has gradients but no captured inputs/output-gradients: was its "
                        "forward run in eval mode, under no_grad, or before the optimizer was created?"
                    )
                data_of[id(layer)] = data
        uneven = self._agree_on_data(data_of) if self._reduce is not None and data_of else set()
        plan = []
        for group in self._lora_groups():
            buckets: dict[tuple, tuple[list, list]] = defaultdict(lambda: ([], []))
            for layer in self._group_layers(group):
                data = data_of.get(id(layer))
                if self._capture is not None:
                    if data is None:
                        continue
                elif layer.A.grad is None and layer.B.grad is None:
                    continue
                T = -1 if data is None else data[0].shape[0]
                xdt = None if data is None else (data[0].dtype, data[1].dtype)
                key = (tuple(layer.A.shape), tuple(layer.B.shape), layer.A.dtype, layer.A.device, T, xdt)
                if data is not None and (id(layer) in uneven or self._unbatched_data(group, layer.A.device)):
                    key = key + (id(layer),)  # a bucket of one: no stacked copy of X and S
                buckets[key][0].append(layer)
                buckets[key][1].append(data)
            plan.append((group, list(buckets.values())))
        return plan

    def _agree_on_data(self, data_of: dict) -> set:
        """Make every rank step the same layers in the same buckets, so that their collectives pair up.

        One all-reduce of the per-layer row counts (read on the host). A layer with rows on some rank but
        none here takes part with zero rows (a zero contribution to the averaged sums); a layer whose row
        count differs between ranks is returned, to be stepped alone (stacking needs one T). A rank
        without this layer's data on every rank would otherwise skip collectives the others wait in.
        """
        # Layers stepped from what was streamed in backward are not in data_of (on any rank): -1 everywhere.
        rows = torch.tensor([-1 if data_of.get(id(layer)) is None else data_of[id(layer)][0].shape[0]
                             for layer in self._layers], device=self._layers[0].A.device)
        low, high = (t.tolist() for t in self._reduce.min_max(rows))
        uneven = set()
        for layer, lo, hi in zip(self._layers, low, high):
            if hi >= 0 and data_of.get(id(layer)) is None:
                kw = dict(dtype=layer.A.dtype, device=layer.A.device)
                data_of[id(layer)] = (torch.zeros(0, layer.in_features, **kw),
                                      torch.zeros(0, layer.out_features, **kw))
            if lo != hi:
                uneven.add(id(layer))
        return uneven

    def _uses_grads(self) -> bool:
        return bool(self.needs_grads or (self.needs_grads is None and not self.needs_capture))

    def _clip_coefficient(self, plan, inv_scale: Tensor | None = None) -> Tensor:
        """``min(1, max_grad_norm / (‖everything the step consumes‖ + 1e-6))`` as a device tensor; the norm
        (unscaled by ``inv_scale`` under a GradScaler) goes to ``self.grad_norm``. A non-finite norm gives a
        non-finite factor, so the step is skipped."""
        squares = []
        for group, buckets in plan:
            for layers, data in buckets:
                for layer, d in zip(layers, data):
                    if d is not None and self._reduce is not None:
                        # The global G = mean over ranks of S_rᵀX_r: its norm has cross-rank terms.
                        squares.append((self._reduce.gradient_norm(d[0], d[1]).float().square(), False))
                    elif d is not None:
                        # The captured data define the method's gradient (weight gradient, or the
                        # statistics and factor gradients derived from it): G's norm is the one to clip.
                        norm = gradient_norm(d[0], d[1], backend=group.get("backend"))
                        squares.append((norm.float().square(), False))
                    else:
                        squares += _grad_squares((layer.A, layer.B))
        for group in self.param_groups:
            if group["kind"] == "other":
                squares += _grad_squares(group["params"])
        device = self._layers[0].A.device
        # Under FSDP2 a sharded gradient's local sum of squares is its part: summed over the mesh, once.
        sharded = [sq for sq, on_shard in squares if on_shard]
        squares = [sq for sq, on_shard in squares if not on_shard]
        if sharded:
            squares.append(self._sharded.sum(torch.stack(sharded).sum()))
        total = torch.stack(squares).sum().sqrt() if squares else torch.zeros((), device=device)
        if inv_scale is not None:
            total = total * inv_scale.to(total.device)
        self.grad_norm = total
        return (self.max_grad_norm / (total + 1e-6)).clamp(max=1.0)

    def _step_bucket(self, group: dict, layers: list[LoRALayer], data: list, clip: Tensor | None = None,
                     checked_inputs: dict | None = None, loss_scaled: bool = False,
                     skip_all: Tensor | None = None) -> Tensor:
        """Steps one bucket; returns a device flag, true when any of its layers was skipped.

        ``clip``: the factor every gradient is multiplied by (clip coefficient and/or inverse loss scale);
        ``loss_scaled``: S is unscaled in the state dtype (an fp16 S would underflow in its own);
        ``skip_all``: a device flag that skips every layer (GradScaler's found_inf)."""
        result = self._compute_bucket(group, layers, data, clip, checked_inputs, loss_scaled)
        return self._write_bucket(layers, *result, skip_all)

    def _compute_bucket(self, group: dict, layers: list[LoRALayer], data: list, clip: Tensor | None = None,
                        checked_inputs: dict | None = None, loss_scaled: bool = False,
                        grads_from_data: bool = False, reduce=_RANK_AVERAGE) -> tuple:
        """The bucket's new factors and state, and the (L,) device flag of the layers that may step (all
        they read and would write is finite; agreed over ranks when ``reduce`` is the rank average).
        Changes nothing. ``grads_from_data``: the factor gradients are computed from the captured data
        instead of read from ``.grad`` (the streamed step runs in backward, before autograd has accumulated
        them). ``reduce``: see ``_method_step``; by default ``self._reduce``."""
        agree = reduce is _RANK_AVERAGE
        if agree:
            reduce = self._reduce
        dev = layers[0].A.device
        dt = self._state_dtype(layers[0])
        root = torch.tensor([layer.scale for layer in layers], dtype=dt, device=dev).sqrt().view(-1, 1, 1)
        A_list, B_list, grad_lists = self._factor_values(layers)
        A = torch.stack(A_list).to(dt) * root
        B = torch.stack(B_list).to(dt) * root
        X = S = None
        if self.needs_capture:
            X = torch.stack([d[0] for d in data]) if len(data) > 1 else data[0][0].unsqueeze(0)
            S = torch.stack([d[1] for d in data]) if len(data) > 1 else data[0][1].unsqueeze(0)
            if clip is not None:
                # G = Sᵀ·X is linear in S. Out of place: the captured tensors may be shared (one X feeds
                # q, k and v; autograd can hand two layers the same output-gradient tensor). In S's own
                # dtype so a bf16 cache stays bf16 (the product's rounding is that of the storage), except
                # under loss scaling, whose purpose is that the unscaled fp16 values would underflow.
                S = S.to(dt) * clip.to(dt) if loss_scaled else S * clip.to(S.dtype)
        grads = None
        if self._uses_grads() and self.needs_capture:
            # The captured data define the step: the gradients of the balanced factors √s·A, √s·B are
            # B̄ᵀG = (S·B̄)ᵀX and G·Āᵀ = Sᵀ(X·Āᵀ), what autograd accumulates into A.grad/√s and B.grad/√s.
            # Taken from X and S in the cached and the streamed step alike (the streamed one runs before
            # autograd has accumulated .grad), so both give the same numbers; .grad is only checked.
            Xd, Sd = X.to(dt), S.to(dt)
            grads = ((Sd @ B).mT @ Xd, Sd.mT @ (Xd @ A.mT))
        elif self._uses_grads():
            # ∂L/∂(√s·A) = √s·BᵀG = A.grad/√s: the gradients of the balanced factors.
            grads = tuple(torch.stack(g).to(dt) / root for g in grad_lists)
            if clip is not None:
                grads = tuple(g * clip.to(dt) for g in grads)
        keys = [k for k in self.state[layers[0].A] if k not in _COUNTERS]
        state = {k: torch.stack([self.state[layer.A][k] for layer in layers]) for k in keys}
        A_new, B_new, new_state = self._method_step(group, A, B, X, S, state, grads, reduce)
        A_new, B_new = A_new / root, B_new / root
        # A layer steps only if everything it read and everything it would write is finite: a NaN input
        # almost always reaches the outputs, but not provably (a clamp, a zero weight), so both count.
        # The captured X and S are checked as captured (before the clip factor, checked on its own).
        checked = [A_new, B_new, *new_state.values(), *(grads or ())]
        if clip is not None:
            checked.append(clip.expand(len(layers)))
        finite = torch.stack([finite_rows(t, len(layers)) for t in checked])
        if data and data[0] is not None:
            cache = {} if checked_inputs is None else checked_inputs
            inputs = [torch.stack([_finite_once(d[side], cache) for d in data]) for side in (0, 1)]
            finite = torch.cat([finite, torch.stack(inputs)])
        if self._uses_grads() and self.needs_capture and not grads_from_data:
            finite = torch.cat([finite, self._factor_grads_finite(layers).unsqueeze(0)])
        finite = finite.all(0)  # (L,)
        if agree and self._reduce is not None and X is not None:
            # The local X and S were checked: step on all ranks or on none.
            finite = self._reduce.all_ranks(finite)
        return A_new, B_new, new_state, finite

    def _factor_grads_finite(self, layers: list[LoRALayer]) -> Tensor:
        """(L,) bool: the autograd gradients of each layer's factors are finite (absent ones are); under
        FSDP2 each rank checks its shards and the ranks agree."""
        flags = [finite_rows(local_tensor(p.grad), 1)[0] if p.grad is not None
                 else torch.ones((), dtype=torch.bool, device=p.device)
                 for layer in layers for p in (layer.A, layer.B)]
        finite = torch.stack(flags).view(len(layers), 2).all(1)
        if self._sharded is not None and any(is_sharded(layer.A.grad) for layer in layers):
            finite = self._sharded.all_ranks(finite)
        return finite

    def _factor_values(self, layers: list[LoRALayer]) -> tuple[list, list, tuple | None]:
        """The layers' factors and, for the methods that read them from ``.grad``, the factors' gradients
        (zeros where absent), as full tensors: the parameters themselves, or under FSDP2 their values
        gathered in one collective (inside backward FSDP's unsharded factors when they hold the same
        values, ``fsdp.ShardedParams.full``)."""
        A = [layer.A for layer in layers]
        B = [layer.B for layer in layers]
        grads = []
        if self._uses_grads() and not self.needs_capture:
            grads = [_grad_or_zeros(getattr(layer, side)) for side in ("A", "B") for layer in layers]
        if self._sharded is not None:
            registered = [layer.A_module.weight if layer.A_module is not None else None for layer in layers]
            registered += [layer.B_module.weight if layer.B_module is not None else None for layer in layers]
            values = self._sharded.full(A + B + grads, registered + [None] * len(grads))
            L = len(layers)
            A, B, grads = values[:L], values[L:2 * L], values[2 * L:]
        L = len(layers)
        return A, B, ((grads[:L], grads[L:]) if grads else None)

    def _write_param(self, p: Tensor, value: Tensor, ok: Tensor) -> None:
        """``p ← value`` (full, in p's dtype) where the 0-d ``ok`` holds; a sharded p takes its rows."""
        if self._sharded is not None and is_sharded(p):
            self._sharded.write(p, value, ok)
        else:
            p.copy_(torch.where(ok, value, p))

    def _write_bucket(self, layers: list[LoRALayer], A_new: Tensor, B_new: Tensor, new_state: dict,
                      finite: Tensor, skip_all: Tensor | None = None) -> Tensor:
        """Writes the layers whose ``finite`` flag is set (and not ``skip_all``), parameters in their dtype;
        returns a device flag, true when any layer was skipped."""
        pdt = layers[0].A.dtype
        if skip_all is not None:
            finite = finite & ~skip_all.to(finite.device)
        for i, layer in enumerate(layers):
            ok = finite[i]
            self._write_param(layer.A, A_new[i].to(pdt), ok)
            self._write_param(layer.B, B_new[i].to(pdt), ok)
            st = self.state[layer.A]
            for k, v in new_state.items():
                st[k].copy_(torch.where(ok, v[i], st[k]))
            st["step"] += ok
            st["skipped_steps"] += ~ok
        return ~finite.all()

    def _step_other(self, group: dict, clip: Tensor | None = None,
                    skip_all: Tensor | None = None) -> Tensor | None:
        """torch's fused AdamW on the group's parameters that have gradients; returns a device flag, true
        when the group was skipped (None when nothing had a gradient). The moments are kept in fp32 (fp64
        for fp64 parameters), as the method state is: a bf16/fp16 parameter steps through an fp32 copy of
        itself and its gradient (fused Adam wants one dtype) and is rounded back once, so its update is
        that of fp32 AdamW from the rounded parameter, not one computed against bf16 moments."""
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return None
        if clip is not None:  # in place, as clip_grad_norm_ does
            torch._foreach_mul_([local_tensor(p.grad) for p in params], clip)
        for p in params:
            self._init_other_state(p)
        # Under FSDP2, AdamW (elementwise) runs on each rank's shards of parameters, gradients and moments.
        grads = [local_tensor(p.grad) for p in params]
        # One device flag: a non-finite gradient skips this group's update (and its step count).
        found_inf = ~torch.cat([finite_rows(g, 1) for g in grads]).all()
        if self._sharded is not None and any(is_sharded(p) for p in params):  # on every rank, or on none
            found_inf = ~self._sharded.all_ranks(~found_inf)
        if skip_all is not None:
            found_inf = found_inf | skip_all.to(found_inf.device)
        skipped = found_inf
        found_inf = found_inf.float()
        low = [i for i, p in enumerate(params) if p.dtype != self.state[p]["exp_avg"].dtype]
        targets = [local_tensor(p) for p in params]
        for i in low:  # stepped in the state dtype, written back below
            targets[i] = targets[i].to(self.state[params[i]]["exp_avg"].dtype)
            grads[i] = grads[i].to(targets[i].dtype)
        beta1, beta2 = group["betas"]
        _torch_adam(
            targets,
            grads,
            [local_tensor(self.state[p]["exp_avg"]) for p in params],
            [local_tensor(self.state[p]["exp_avg_sq"]) for p in params],
            [],
            [self.state[p]["step"] for p in params],
            fused=True,
            found_inf=found_inf,
            decoupled_weight_decay=True,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )
        for i in low:  # unchanged when skipped: the copy rounds back to the parameter exactly
            local_tensor(params[i]).copy_(targets[i])
        return skipped

    def _init_other_state(self, p: Tensor) -> None:
        st = self.state[p]
        if not st:
            st.update(_fresh_other_state(p))
        elif st["exp_avg"].dtype != _other_state_dtype(p):  # a checkpoint kept the moments in p's dtype
            dt = _other_state_dtype(p)
            st["exp_avg"], st["exp_avg_sq"] = st["exp_avg"].to(dt), st["exp_avg_sq"].to(dt)

    # ----------------------------------------------------------------------------------------------
    # checkpoints

    def state_dict(self) -> dict:
        """torch's, plus ``"optimizer"`` (the class name) and ``"param_shapes"`` (each parameter's shape by
        its state-dict index), which ``load_state_dict`` checks: a checkpoint of another method, or of a
        model with another rank, is refused even where no method state would tell.

        torch.distributed.checkpoint keeps only ``"state"`` (keyed by parameter) and ``"param_groups"``: the
        optimizer-wide entries (the count of skipped steps, whether ``capture="auto"`` streams) are in the
        first param group (``_OPTIMIZER_WIDE``), where ``get_optimizer_state_dict`` keeps them."""
        self._follow_replaced_parameters()
        state_dict = super().state_dict()
        shapes = {}
        for saved, group in zip(state_dict["param_groups"], self.param_groups):
            for index, p in zip(saved["params"], group["params"]):
                shapes[index] = list(p.shape)
                # torch.distributed.checkpoint loads into the state dict it is given and wants an entry for
                # every trainable parameter: B's is empty (its layer's state is under A), an other parameter
                # not stepped yet has the AdamW state its first step would make.
                if index not in state_dict["state"]:
                    state_dict["state"][index] = _fresh_other_state(p) if group["kind"] == "other" else {}
        state_dict["optimizer"] = type(self).__name__
        state_dict["param_shapes"] = shapes
        if self._streamed is not None:
            # capture="auto" resumes in the mode it left: the first step after a load would otherwise
            # cache where the uninterrupted run streams (the same step, rounded differently).
            state_dict["capture_streaming"] = self._streamed.saved_mode()
        _optimizer_wide_to_group(state_dict)
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """Like torch's, after checking, before anything changes, that the state dict is this optimizer
        class's (its name; else the parameter groups' options and the LoRA layers' state keys), that every
        parameter and state shape matches, and keeping the saved state dtypes. Checkpoints without the
        ``"optimizer"`` and ``"param_shapes"`` entries (written before they existed) still load.

        torch casts floating state to the parameter's dtype on load, which would turn fp32 method state
        of bf16 LoRA factors into bf16; the saved tensors are restored with their own dtype instead.

        Under FSDP2 an other-group parameter's full (plain) moments are sharded like it, and sharded moments
        of an unsharded parameter gathered, so a state dict of either kind loads into either optimizer.
        """
        self._follow_replaced_parameters()
        state_dict = _optimizer_wide_from_group(state_dict)
        name = type(self).__name__
        saved_class = state_dict.get("optimizer")
        if saved_class is not None and saved_class != name:
            raise ValueError(f"the state dict was saved by another optimizer ({saved_class}); this is {name}")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"the state dict has {len(saved_groups)} parameter groups, this optimizer has "
                f"{len(self.param_groups)}"
            )
        id_to_param = {}
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError("a parameter group of the state dict has a different number of parameters")
            self._check_saved_group(i, saved, group, strict=saved_class is None)
            id_to_param.update(zip(saved["params"], group["params"]))
        shapes = state_dict.get("param_shapes")
        if shapes is not None:
            for pid, p in id_to_param.items():
                if pid in shapes and list(shapes[pid]) != list(p.shape):
                    raise ValueError(
                        f"parameter {pid} has shape {tuple(shapes[pid])} in the state dict but "
                        f"{tuple(p.shape)} here: a checkpoint of another model (or LoRA rank)?"
                    )
        saved_state = state_dict["state"]
        for saved, group in zip(saved_groups, self.param_groups):
            if group["kind"] == "lora":
                index_of = {id(p): pid for pid, p in zip(saved["params"], group["params"])}
                for layer in self._group_layers(group):
                    self._check_saved_layer_state(layer, saved, saved_state.get(index_of[id(layer.A)]))
        for pid, entries in saved_state.items():
            if pid not in id_to_param:
                continue
            current = self.state.get(id_to_param[pid], {})
            for key, value in entries.items():
                if key in current and isinstance(value, Tensor) and value.shape != current[key].shape:
                    raise ValueError(
                        f"state '{key}' of parameter {pid} has shape {tuple(value.shape)} in the state dict "
                        f"but {tuple(current[key].shape)} here"
                    )
            if isinstance(id_to_param[pid], Tensor) and "exp_avg" in entries:
                p = id_to_param[pid]
                if entries["exp_avg"].shape != p.shape:
                    raise ValueError(f"AdamW state of parameter {pid} does not match its shape {tuple(p.shape)}")
        skipped_before = self.state["skipped_steps"]
        super().load_state_dict(state_dict)
        other_ids = self._other_param_ids()
        for pid, entries in saved_state.items():
            if pid not in id_to_param:
                continue
            param = id_to_param[pid]
            for key, value in entries.items():
                if isinstance(value, Tensor):
                    value = value.to(device=param.device, dtype=value.dtype, copy=True)
                    self.state[param][key] = _placed_like(param, value) if id(param) in other_ids else value
        for param in [p for p, entries in self.state.items() if isinstance(p, Tensor) and not entries]:
            del self.state[param]  # B's empty entry: the layer's state is under A
        # A state dict without the count (written before it existed, or rebuilt by DCP's flattened format)
        # keeps this optimizer's.
        self.state["skipped_steps"] = saved_state.get("skipped_steps", skipped_before).clone()
        if self._streamed is not None and state_dict.get("capture_streaming"):
            self._streamed.resume(state_dict["capture_streaming"])

    # Keys torch's LR schedulers and SWA add to a param group.
    _SCHEDULER_KEYS = frozenset(("initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum", "swa_lr"))

    def _check_saved_group(self, i: int, saved: dict, group: dict, strict: bool) -> None:
        """A saved param group must be of the same kind with this optimizer's options (torch's load puts
        the saved group in place of this one: a missing option would fail at the next step). ``strict``
        (no class name in the state dict): options this optimizer does not have are refused too."""
        name = type(self).__name__
        if saved.get("kind") != group["kind"]:
            raise ValueError(
                f"parameter group {i} of the state dict is of kind {saved.get('kind')!r}, here "
                f"{group['kind']!r}: a state dict of another optimizer than {name}?"
            )
        required = set(self._options) | (set(self._other_defaults) if group["kind"] == "other" else set())
        missing = sorted(required - set(saved))
        unexpected = sorted(set(saved) - set(group) - {"params", "param_names"} - self._SCHEDULER_KEYS)
        if missing or (strict and unexpected):
            raise ValueError(
                f"parameter group {i} of the state dict does not match {name}'s options (missing keys: "
                f"{missing}, unexpected keys: {unexpected if strict else []}): a state dict of another "
                "optimizer?"
            )

    def _check_saved_layer_state(self, layer: LoRALayer, saved_group: dict, entries: dict | None) -> None:
        """The saved state of one LoRA layer has the keys and shapes its saved group's options give it."""
        name = type(self).__name__
        if entries is None:
            raise ValueError(
                f"the state dict has no state for {layer.name}: a state dict of another optimizer?"
            )
        try:
            expected = self._init_layer_state(layer, saved_group, torch.Generator().manual_seed(0))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"the state dict's options do not fit {layer.name}: {e}") from e
        keys = set(expected) | set(_COUNTERS)
        if set(entries) != keys:
            raise ValueError(
                f"the state of {layer.name} in the state dict has keys {sorted(entries)}, {name} with these "
                f"options keeps {sorted(keys)}: a state dict of another optimizer?"
            )
        for key, value in expected.items():
            if not isinstance(entries[key], Tensor) or entries[key].shape != value.shape:
                raise ValueError(
                    f"state '{key}' of {layer.name} has shape {tuple(getattr(entries[key], 'shape', ()))} in "
                    f"the state dict but {tuple(value.shape)} here: a checkpoint of another LoRA rank?"
                )

    # ----------------------------------------------------------------------------------------------
    # parameters replaced after construction (FSDP2)

    def _parameters_replaced(self) -> bool:
        """Whether the modules hold other parameters than the ones this optimizer steps: the model was
        sharded (``fully_shard``) after the optimizer was built. FSDP's unsharded parameters, registered in
        place of the sharded ones during forward and backward (or after it with
        ``set_reshard_after_backward(False)``), are not that."""
        for owner_id, (module, name, sharded) in self._owners.items():
            current = module._parameters.get(name)
            if current is None or id(current) == owner_id or (sharded and not is_sharded(current)):
                continue
            return True
        return False

    def _follow_replaced_parameters(self) -> None:
        """Moves the optimizer to the parameters the model holds now when ``fully_shard`` replaced them after
        construction (accelerate's ``prepare(model, optimizer)`` under FSDP2 does, and swaps the param
        groups' entries itself): param groups, state (other groups' moments sharded like their parameter; the
        method state is replicated and stays), LoRA layers, the rank average (now the mesh's), and the capture
        hooks (re-registered after the step in progress, whose captured data they hold)."""
        if not self._parameters_replaced():
            return
        model = self._model_ref()
        if model is None:
            raise RuntimeError("the model's parameters were replaced and the model is gone")
        if self._streamed is not None and any(self._streamed.has_result(layer) for layer in self._layers):
            self._streamed.clear()
            raise RuntimeError(
                f"{type(self).__name__} was built before the model was sharded (fully_shard, accelerate's "
                "prepare) and capture='stream' ran this step in backward from the parameters FSDP replaced; "
                "the step was dropped. Build the optimizer after sharding, or use capture='auto' (the "
                "default), whose first step is cached"
            )
        new_of = {}
        for owner_id, (module, name, _) in self._owners.items():
            current = module._parameters.get(name)
            if current is not None:
                new_of[owner_id] = current
        reduce, sharded = resolve_data_parallel(self._process_group, model,
                                                steps_from_captured_data=self.needs_capture)
        lora_ids = {id(p) for layer in self._layers for p in (layer.A, layer.B)}
        if sharded is not None and any(not is_sharded(new_of.get(i)) for i in lora_ids if i in new_of):
            raise RuntimeError(
                "FSDP holds some LoRA factors unsharded outside forward and backward "
                "(set_reshard_after_backward(False)?): step() must run after the backward that reshards them"
            )
        if reduce is not None:
            for group in self._lora_groups():
                reason = self._no_data_parallel_mode(group)
                if reason is not None:
                    raise ValueError(f"{type(self).__name__} has no data-parallel mode here: {reason}")
        current_ids = {id(p) for p in new_of.values()}
        if any(id(p) not in current_ids and id(p) not in new_of for g in self.param_groups for p in g["params"]):
            raise RuntimeError("a parameter of the optimizer is no longer a parameter of the model")
        # nothing has changed up to here
        for group in self.param_groups:  # entries accelerate swapped already are current
            group["params"] = [p if id(p) in current_ids else new_of[id(p)] for p in group["params"]]
        other_ids = self._other_param_ids()
        for old in [k for k in self.state if isinstance(k, Tensor)]:
            new = new_of.get(id(old))
            if new is None or new is old:
                continue
            entries = self.state.pop(old)
            if id(new) in other_ids:  # AdamW's moments, placed like their parameter
                entries = {k: _placed_like(new, v) if isinstance(v, Tensor) else v for k, v in entries.items()}
            self.state[new] = entries
        for layer in self._layers_by_A.values():
            layer.A, layer.B = new_of.get(id(layer.A), layer.A), new_of.get(id(layer.B), layer.B)
        self._layers_by_A = {id(layer.A): layer for layer in self._layers_by_A.values()}
        self._reduce, self._sharded = reduce, sharded
        self._owners = _parameter_owners(model)
        self._rehook()

    def _other_param_ids(self) -> set:
        return {id(p) for group in self.param_groups if group["kind"] == "other" for p in group["params"]}

    def _rehook(self) -> None:
        """Hooks the layers anew (their parameters changed); while a step's captured data are held, after
        that step."""
        self._rehook_pending = False
        if self._capture is None or self._capture.removed:
            return
        if any(self._capture.has_data(layer) or self._capture.received_grad(layer) for layer in self._layers):
            self._rehook_pending = True
            return
        streaming = self._capture.sink is not None
        capture = ActivationCapture(self._layers)
        self._capture.remove()
        self._capture = capture
        self._streamed.attach(capture)
        if streaming:
            self._streamed.start()

    def remove_hooks(self) -> None:
        """Detach the capture hooks from the model; ``step()`` raises afterwards (for the methods that step
        from captured data: the others have no hooks and keep working)."""
        if self._capture is not None:
            self._capture.remove()
            self._streamed.clear()


# Optimizer-wide entries of the state dict (not per parameter), and their place in the first param group
# there: torch.distributed.checkpoint's get_optimizer_state_dict keeps only "state", keyed by parameter,
# and "param_groups". Checkpoints written before keep them in "state" and at the top level; both load.
_OPTIMIZER_WIDE = (("state", "skipped_steps"), (None, "capture_streaming"))


def _optimizer_wide_to_group(state_dict: dict) -> None:
    group = state_dict["param_groups"][0]
    for where, key in _OPTIMIZER_WIDE:
        source = state_dict if where is None else state_dict[where]
        if key in source:
            group[key] = source.pop(key)


def _optimizer_wide_from_group(state_dict: dict) -> dict:
    """The state dict with the optimizer-wide entries back where ``load_state_dict`` reads them (copies of
    the containers it changes; the caller's dict is left as it is)."""
    groups = state_dict.get("param_groups")
    if not groups or not any(key in groups[0] for _, key in _OPTIMIZER_WIDE):
        return state_dict
    first = dict(groups[0])
    out = {**state_dict, "param_groups": [first, *groups[1:]], "state": dict(state_dict["state"])}
    for where, key in _OPTIMIZER_WIDE:
        if key in first:
            (out if where is None else out[where])[key] = first.pop(key)
    return out


def _parameter_owners(model: nn.Module) -> dict:
    """id(parameter) -> (module, attribute name, whether sharded): where each trainable parameter of the
    model is registered."""
    return {id(p): (module, name, is_sharded(p)) for module in model.modules()
            for name, p in module._parameters.items() if p is not None and p.requires_grad}


def _placed_like(param: Tensor, value: Tensor) -> Tensor:
    """A state tensor of ``param`` shaped like it, as the parameter is placed: full moments of a sharded
    parameter become DTensors placed like it, sharded moments of an unsharded one are gathered."""
    if is_sharded(param) and not is_sharded(value) and value.shape == param.shape:
        from ..fsdp import ShardedParams
        return ShardedParams(param.device_mesh).like(param, value)
    if is_sharded(value) and not is_sharded(param):
        return value.full_tensor()
    return value


def _other_state_dtype(p: Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def _fresh_other_state(p: Tensor) -> dict:
    """AdamW's initial state of an other-group parameter: moments in fp32 (fp64 for fp64 parameters), as the
    method state; DTensors placed like a sharded parameter."""
    dt = _other_state_dtype(p)
    return {"step": torch.zeros((), dtype=torch.float32, device=p.device),
            "exp_avg": torch.zeros_like(p, dtype=dt, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(p, dtype=dt, memory_format=torch.preserve_format)}


def _grad_squares(params) -> list[tuple[Tensor, bool]]:
    """(sum of squares of the local ``.grad``, whether it is a shard of a sharded gradient) per parameter."""
    return [(local_tensor(p.grad).float().square().sum(), is_sharded(p.grad))
            for p in params if p.grad is not None]


def finite_rows(t: Tensor, rows: int) -> Tensor:
    """(rows,) bool: whether each of the ``rows`` leading slices of ``t`` is entirely finite.

    ``amax`` and ``amin`` propagate NaN and keep ±inf, so both are finite exactly when every element is:
    two fast contiguous reductions instead of the three passes and the mask of ``isfinite().all()``
    (about 10x faster on a 1024x384 fp32 tensor on the CPU; ``aminmax(dim=...)`` is the slowest of all).
    Empty slices are finite.
    """
    flat = t.reshape(rows, -1)
    if flat.shape[1] == 0:
        return torch.ones(rows, dtype=torch.bool, device=t.device)
    return flat.amax(1).isfinite() & flat.amin(1).isfinite()


def _finite_once(t: Tensor, cache: dict) -> Tensor:
    """``finite_rows(t, 1)[0]``, computed once per step for tensors that several layers captured."""
    key = (t.data_ptr(), t.shape, t.stride(), t.dtype, t.device)
    if key not in cache:
        cache[key] = finite_rows(t, 1)[0]
    return cache[key]


def _either(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None or b is None:
        return b if a is None else a
    return a | b.to(a.device)


def _grad_or_zeros(p: Tensor) -> Tensor:
    return p.grad if p.grad is not None else torch.zeros_like(p)


def _check_positive(name: str, value, *, allow_zero: bool = False) -> None:
    """A finite real number > 0 (>= 0 with ``allow_zero``): a Python or NumPy number, or a one-element
    tensor (read on the host: call it where a sync is acceptable, or see ``_check_lr``)."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"invalid {name}: a tensor must hold one real number, got {value!r}")
        value = value.item()
    elif isinstance(value, (bool, str, bytes)) or not isinstance(value, numbers.Real):
        raise TypeError(f"invalid {name}: {value!r} is not a real number")
    value = float(value)
    if not (math.isfinite(value) and (value > 0 or (allow_zero and value == 0))):
        raise ValueError(f"invalid {name}: {value} (must be finite and {'>= 0' if allow_zero else '> 0'})")


def _check_lr(name: str, value) -> Tensor | None:
    """Validates a group's lr before a step. Numbers and CPU tensors are checked on the host (no device
    synchronisation); for a tensor on an accelerator, returns a device flag, true when it is not finite or
    negative, that skips the step (counted) instead of raising, so the step never waits on the device."""
    if isinstance(value, Tensor) and value.device.type not in ("cpu", "meta"):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"invalid {name}: a tensor must hold one real number, got {value!r}")
        return ~(value.isfinite() & (value >= 0)).reshape(())
    _check_positive(name, value, allow_zero=True)
    return None
