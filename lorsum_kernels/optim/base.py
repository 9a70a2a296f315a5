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
* ``max_update_norm`` clips the step itself (``update_clip``): every layer's result exists before
  ``step()`` writes, in every capture mode (the streamed one included), so the global norm of the merged
  updates over the lr is known then, and all layers move by one factor ``min(1, max_update_norm / norm)``
  of their step; ``optimizer.update_norm`` keeps the norm.
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

Where each job lives: this module plans, buckets and computes the step; the group's backend is resolved
once per step (``ops.resolve``) and passed to every op; ``writing`` finishes, clips and writes the results,
``other_adamw`` steps the other groups, ``clipping`` takes the clip norm, ``guards`` makes the device skip
flags, ``checks`` validates arguments; ``writing``, ``checkpoint`` and ``resharding`` are mixins (the
results' write; state dicts; parameters replaced by ``fully_shard``), and ``streaming`` runs the step inside
backward.
"""

from __future__ import annotations

import difflib
import inspect
import weakref
from collections import defaultdict
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from .. import ops
from .._numerics import as_dtype, math_dtype
from ..capture import ActivationCapture
from ..distributed import resolve_data_parallel
from ..fsdp import is_sharded, local_tensor
from ..lora import LoRALayer, find_lora_layers
from .checkpoint import LAYER_COUNTERS, CheckpointMixin
from .checks import check_lr, check_positive
from .clipping import clip_coefficient, global_grad_norm
from .guards import either, finite_each, finite_once, finite_rows_of
from .other_adamw import step_other
from .resharding import ReshardingMixin, parameter_owners
from . import guards
from .streaming import StreamedStep, check_capture_options, check_stream_groups
from .writing import WritingMixin, stacked

__all__ = ["LoRAOptimizer"]

# Devices whose native kernels carry any non-finite X or S into the step's results (_results_carry_bad_data).
IEEE_NATIVE_DEVICES = {"cpu", "cuda"}

_RANK_AVERAGE = object()  # _compute_bucket's default reduce: self._reduce, with the ranks' agreement


class LoRAOptimizer(WritingMixin, CheckpointMixin, ReshardingMixin, torch.optim.Optimizer):
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
        max_update_norm: float | None = None,
        seed: int = 0,
        process_group=None,
        capture: str = "auto",
        accumulation_steps: int | None = None,
        stream_batch_bytes: int | None = None,
        **unknown,
    ):
        if unknown:
            # Named for the class the user built, with the options it takes (Python's own error names this
            # base class, whose keyword arguments the subclasses pass through).
            options = [name for cls in type(self).__mro__ if "__init__" in cls.__dict__
                       for name in inspect.signature(cls.__init__).parameters
                       if name not in ("self", "model", "defaults", "unknown", "kwargs")]
            key = next(iter(unknown))
            close = difflib.get_close_matches(key, options, n=1)
            raise TypeError(f"{type(self).__name__}() got an unexpected keyword argument {key!r}"
                            + (f"; did you mean {close[0]!r}?" if close else ""))
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"{type(self).__name__} takes the model (an nn.Module), not {type(model).__name__}: it pairs "
                "each LoRA A with its B by module and hooks the layers"
            )
        check_positive("lr", defaults["lr"], allow_zero=True)
        check_positive("other_lr", other_lr, allow_zero=True)
        if max_grad_norm is not None:
            check_positive("max_grad_norm", max_grad_norm)
        if max_update_norm is not None:
            check_positive("max_update_norm", max_update_norm)
        check_capture_options(capture, accumulation_steps, max_grad_norm, stream_batch_bytes)
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
        self._groups_by_A: dict[int, dict] = {}  # _group_of's answers
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
                check_lr("lr" if group["kind"] == "lora" else "other_lr", group["lr"])
        self._model_ref = weakref.ref(model)  # add_param_group finds LoRA layers added to it since
        self._other_defaults = other_defaults
        self._options = frozenset(defaults)  # the method's (torch's __setstate__ adds keys to self.defaults)
        self._seed = seed
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.grad_norm: Tensor | None = None  # the last step's pre-clip norm when max_grad_norm is set
        self.max_update_norm = None if max_update_norm is None else float(max_update_norm)
        self.update_norm: Tensor | None = None  # the last step's update norm when max_update_norm is set
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
        self._owners = parameter_owners(model)
        self._rehook_pending = False
        self._resolved: dict = {}  # (id(group), device) -> ops.Backend, for one step (_backend)
        # id(layer.A) -> the layer's step_norm_scale tensor, once seen positive (_scales_known_positive)
        self._positive_scales: dict = {}
        self._bucket_scales_known = False  # _scales_known_positive of the bucket being computed
        self._roots: dict = {}  # (scales, dtype, device) -> √s of a bucket (_scale_root)
        self._capture = ActivationCapture(self._layers) if self.needs_capture else None
        # The step inside backward (optim/streaming.py): None for the methods that step from .grad.
        self._streamed = None if self._capture is None else StreamedStep(self, capture, accumulation_steps,
                                                                        stream_batch_bytes)
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
        check_lr("lr" if group["kind"] == "lora" else "other_lr", filled["lr"])
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
        self._owners = parameter_owners(self._model_ref()) if self._model_ref() is not None else self._owners
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
        # Asked per layer in backward (the streamed step): a lookup by identity while the group found is
        # still one of param_groups (load_state_dict replaces them; a scan of every parameter otherwise).
        cached = self._groups_by_A.get(id(layer.A))
        if cached is not None and any(g is cached for g in self.param_groups):
            return cached
        for group in self._lora_groups():
            if any(p is layer.A for p in group["params"]):
                self._groups_by_A[id(layer.A)] = group
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
        return device.type == "cpu" or self._backend(group, device).of(self._data_op) == "torch"

    # The ops through which the method's step reads the captured X and S (empty: some of it goes through
    # torch). See _results_carry_bad_data.
    _data_ops: tuple[str, ...] = ()

    def _results_carry_bad_data(self, group: dict, device: torch.device) -> bool:
        """Whether a non-finite value anywhere in a layer's X or S provably makes that layer's step results
        non-finite, so that checking the results checks the data too and the separate pass over X and S
        (the step's largest tensors) can be skipped. True when every op of ``_data_ops`` runs natively on
        the CPU or on a CUDA GPU (``IEEE_NATIVE_DEVICES``): those kernels multiply every element of X and S
        into every result it feeds in plain IEEE arithmetic (no fast-math, no skipped zeros: NaN·0 is NaN),
        and the r×r solves turn a non-finite right-hand side or Gram into a non-finite solution (tests/ops:
        ``*nan*``; on CUDA ``test_cuda_zero_gram_no_pairs_and_nan``, ``test_cuda_nan`` and the ops' NaN and
        inf tests, passed on an H200, docs/gpu.md). Not assumed of torch's BLAS, which may skip zeros, nor
        of Triton's kernels (whose compiler may contract and reorder)."""
        if device.type not in IEEE_NATIVE_DEVICES or not self._data_ops:
            return False
        backend = self._backend(group, device)
        return all(backend.of(op) == "native" for op in self._data_ops)

    def _scales_known_positive(self, group: dict, layers: list[LoRALayer]) -> bool:
        """Whether the host knows every layer's ``step_norm_scale`` is positive (``normalize_step``): then
        the step runs at η·scale without reading the scales, a read that on an accelerator waits for the
        device, once per layer in backward (the streamed step), where the device must stay ahead of the
        host. A scale once positive stays positive (its v only decays towards 0 and grows with each step:
        optim/step_normalization.py), so the read happens until a layer's first step has been taken, then
        once more, and never again while the state tensor is the same object (``load_state_dict``
        replaces it, and clears this). On the CPU a read costs nothing: always False there."""
        if not group.get("normalize_step") or not guards.host_waits_for(layers[0].A.device):
            return False
        scales = [self.state[layer.A].get("step_norm_scale") for layer in layers]
        known = self._positive_scales
        if all(known.get(id(layer.A)) is scale for layer, scale in zip(layers, scales)):
            return True
        if any(scale is None for scale in scales) or bool((torch.stack(scales) == 0).any()):
            return False  # a layer's first step: measured (step_at_layer_lr)
        known.update((id(layer.A), scale) for layer, scale in zip(layers, scales))
        return True

    def _backend(self, group: dict, device: torch.device) -> ops.Backend:
        """The group's ``backend`` on ``device``, resolved once per step (``ops.resolve``: each op looked up
        once) and passed down to every op of the step; dropped when the step ends, so a change of the
        group's option or of ``LORSUM_BACKEND`` takes effect at the next."""
        key = (id(group), device)
        value = self._resolved.get(key)
        if value is None or value.requested != group.get("backend"):
            value = self._resolved[key] = ops.resolve(group.get("backend"), device)
        return value

    def _state_dtype(self, layer: LoRALayer) -> torch.dtype:
        return math_dtype(layer.A)

    # ----------------------------------------------------------------------------------------------
    # subclass interface

    def _init_layer_state(self, layer: LoRALayer, group: dict, generator: torch.Generator) -> dict:
        """Initial method state of one layer (fp32 tensors on the layer's device)."""
        return {}

    # State keys a layer holds only under some options: key -> (the option's name, whether a group's options
    # ask for the key). Such an option decides which state each layer keeps, at construction; changed later
    # (a scheduler that cycles momentum) the step would run without state it needs, or ignore state it has,
    # and the state dict would no longer load: step() raises first (_check_options_fit_state).
    _optional_state: dict = {}

    def _check_options_fit_state(self) -> None:
        """Raises (before any state changes) where a LoRA group's options now ask for other state than its
        layers were built with (``_optional_state``)."""
        if not self._optional_state:
            return
        for group in self._lora_groups():
            layers = self._layers_by_A
            layer = next((layers[id(p)] for p in group["params"] if id(p) in layers), None)
            if layer is not None:
                self._check_options_fit_layer(group, layer)

    def _check_options_fit_layer(self, group: dict, layer: LoRALayer) -> None:
        """``_check_options_fit_state`` for one layer of ``group`` (the streamed step checks each layer in
        backward, before its step reads the state)."""
        state = self.state[layer.A]
        for key, (option, asks) in self._optional_state.items():
            if bool(asks(group)) == (key in state):
                continue
            value = group["betas"][0] if option == "betas[0]" else group[option]
            index = next(i for i, g in enumerate(self.param_groups) if g is group)
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            hint = ""
            if option in ("momentum", "betas[0]"):
                hint = (" A scheduler that cycles momentum does this (OneCycleLR and CyclicLR do by "
                        f"default): pass cycle_momentum=False to it, or build the optimizer with a nonzero "
                        f"{option} to cycle it.")
            raise ValueError(
                f"{type(self).__name__}: param group {index} has {option} = {value!r}, but its layers were "
                f"built {'with' if key in state else 'without'} the state it decides ('{key}'): {option} was "
                f"changed after the optimizer was built, and {'whether it is 0' if numeric else 'it'} decides "
                f"which state each layer keeps, made at construction.{hint}"
            )

    def _no_data_parallel_mode(self, group: dict) -> str | None:
        """Why this group's configuration cannot run with a ``process_group`` (None when it can). Methods
        that step from the captured X and S must average their token sums over ``self._reduce``."""
        return None

    # State keys the method step does not read (step() updates them from the results, e.g. normalize_step's
    # statistics): not stacked for it, which in backward costs an op per key and layer.
    _state_for_step: tuple = ()

    def _method_step(self, group: dict, A: Tensor, B: Tensor, X, S, state: dict, grads, reduce,
                     backend: ops.Backend) -> tuple:
        """One step for a bucket of L layers. A (L,r,n) and B (L,m,r) are balanced factors in fp32
        (``√s·A``, ``√s·B``), X (L,T,n) and S (L,T,m) the captured data in their own dtype (None when
        the method needs no capture), ``state`` the stacked method state (per-layer tensors of any shape,
        0-d ones included), ``grads`` the stacked gradients of the balanced factors when ``needs_grads``
        (else None). ``reduce`` (None in one process) maps the token sums computed from X and S to the
        step's: the average over ranks (``self._reduce``), or the running sums over the step's backwards
        (optim/streaming.py). ``backend`` is the group's backend resolved for the bucket's device (pass it
        to every op). Returns (A_new, B_new, new_state)."""
        raise NotImplementedError

    def _prepare_one_layer_step(self, group: dict, layer: LoRALayer, X: Tensor, S: Tensor):
        """The streamed step of one layer in one process, where a method has a path for it that gives
        ``_compute_bucket([layer], grads_from_data=True, check_results=False)``'s result bit for bit with
        fewer Python and ATen calls (in backward each costs several times its warm time: docs/step_cost.md);
        None (the default) where it has none, and the bucket path runs. Otherwise a function: the step's
        arguments are built here and its native work runs when it is called (the CPU's queue prepares all
        its layer steps first, then runs them back to back: ``StreamedStep.flush``); it returns
        ``(A_new, B_new, new_state, finite, balanced)``: with ``balanced`` the factors are still the
        balanced ones (``√s·A``, ``√s·B``), which ``StreamedStep.collect`` divides by √s per bucket,
        warm, rather than per layer in backward."""
        return None

    def _one_layer_step(self, group: dict, layer: LoRALayer, X: Tensor, S: Tensor) -> tuple | None:
        """``_prepare_one_layer_step`` run at once: its result, or None where the method has no such path."""
        run = self._prepare_one_layer_step(group, layer, X, S)
        return None if run is None else run()

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
        self._resolved.clear()
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
        lr_skip = {id(g): check_lr("lr" if g["kind"] == "lora" else "other_lr", g["lr"])
                   for g in self.param_groups}
        if self._streamed is not None:
            self._streamed.check(loss_scaled=inv_scale is not None)  # raises before any state changes
        self._check_options_fit_state()
        plan = self._plan()  # validates everything before any state changes
        # One factor for everything the step consumes: the loss scale's inverse times the clip coefficient.
        factor = inv_scale
        if self.max_grad_norm is not None:
            clip = self._clip_coefficient(plan, inv_scale)
            factor = clip if factor is None else factor * clip
        checked_inputs: dict = {}  # one finiteness check per captured tensor (q, k and v share their X)
        # Every layer's result before any write (max_update_norm scales them all by one factor):
        # (group, layers, A_new, B_new, new_state, finite, skip) per bucket.
        results = []
        for group, buckets in plan:
            skip = either(scaler_found_inf, lr_skip[id(group)])
            for layers, data in buckets:
                results.append((group, layers, *self._compute_bucket(group, layers, data, factor, checked_inputs,
                                                                     inv_scale is not None), skip))
        if self._streamed is not None:  # the steps computed in backward (or from their running sums)
            pairs = [self._capture.pairs(layer) for layer in self._layers]
            results += self._streamed.collect(lambda group: either(scaler_found_inf, lr_skip[id(group)]))
        # device flags: whether a bucket or an other group skipped anything
        skipped = self._write_results(results)
        for group in self.param_groups:
            if group["kind"] == "other":
                flag = self._step_other(group, factor, either(scaler_found_inf, lr_skip[id(group)]))
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
        self._resolved.clear()
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
                        "forward run in eval mode, under no_grad, or before the optimizer was created? Or by "
                        "a torch.compile'd model that had run before the optimizer was created (or run a model "
                        "of the same class): its compiled graphs do not see module hooks added later; build "
                        "the optimizer before the first compiled forward, or call torch.compiler.reset() "
                        "after building it"
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
        """The clip coefficient of ``max_grad_norm`` (optim/clipping.py) as a device tensor; the norm
        (unscaled by ``inv_scale`` under a GradScaler) goes to ``self.grad_norm``."""
        total = global_grad_norm(plan, self.param_groups, self._reduce, self._sharded, self._backend,
                                 self._layers[0].A.device)
        if inv_scale is not None:
            total = total * inv_scale.to(total.device)
        self.grad_norm = total
        return clip_coefficient(self.max_grad_norm, total)

    def _compute_bucket(self, group: dict, layers: list[LoRALayer], data: list, clip: Tensor | None = None,
                        checked_inputs: dict | None = None, loss_scaled: bool = False,
                        grads_from_data: bool = False, reduce=_RANK_AVERAGE,
                        check_results: bool = True) -> tuple:
        """The bucket's new factors and state, and the (L,) device flag of the layers that may step (all
        they read and would write is finite; agreed over ranks when ``reduce`` is the rank average).
        Changes nothing. ``grads_from_data``: the factor gradients are computed from the captured data
        instead of read from ``.grad`` (the streamed step runs in backward, before autograd has accumulated
        them). ``reduce``: see ``_method_step``; by default ``self._reduce``. ``check_results=False``: the
        flag leaves out the results (new factors and state), which the caller then checks itself, and is
        None when nothing else needed a check."""
        agree = reduce is _RANK_AVERAGE
        if agree:
            reduce = self._reduce
        dev = layers[0].A.device
        dt = self._state_dtype(layers[0])
        root = self._scale_root([layer.scale for layer in layers], dt, dev)
        A_list, B_list, grad_lists = self._factor_values(layers)
        A = as_dtype(stacked(A_list), dt) * root
        B = as_dtype(stacked(B_list), dt) * root
        X = S = None
        if self.needs_capture:
            X = stacked([d[0] for d in data])
            S = stacked([d[1] for d in data])
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
        keys = [k for k in self.state[layers[0].A]
                if k not in LAYER_COUNTERS and k not in self._state_for_step]
        # Copies for a bucket, views for one layer (every streamed step): the method returns new tensors and
        # nothing writes the state before step() has taken the results.
        state = {k: stacked([self.state[layer.A][k] for layer in layers]) for k in keys}
        self._bucket_scales_known = self._scales_known_positive(group, layers)
        try:
            A_new, B_new, new_state = self._method_step(group, A, B, X, S, state, grads, reduce,
                                                        self._backend(group, dev))
        finally:
            self._bucket_scales_known = False
        A_new, B_new = A_new / root, B_new / root
        # A layer steps only if everything it read and everything it would write is finite: a NaN input
        # almost always reaches the outputs, but not provably (a clamp, a zero weight), so both count,
        # except where the method's native ops make it provable (_results_carry_bad_data). The captured
        # X and S are checked as captured (before the clip factor, checked on its own).
        checked = [A_new, B_new, *new_state.values(), *(grads or ())]
        if clip is not None:
            checked.append(clip.expand(len(layers)))
        # check_results=False (the streamed step in one process): the caller checks the results later, in
        # step(), where the sums run warm instead of right after the layer's GEMMs; only what it cannot
        # check later (the captured data, freed after backward) is checked here.
        finite = finite_rows_of(checked, len(layers)).unsqueeze(0) if check_results else None
        if data and data[0] is not None and not self._results_carry_bad_data(group, dev):
            cache = {} if checked_inputs is None else checked_inputs
            inputs = finite_once([d[0] for d in data] + [d[1] for d in data], cache).view(2, len(data))
            finite = inputs if finite is None else torch.cat([finite, inputs])
        if self._uses_grads() and self.needs_capture and not grads_from_data:
            grads_ok = self._factor_grads_finite(layers).unsqueeze(0)
            finite = grads_ok if finite is None else torch.cat([finite, grads_ok])
        if finite is None:
            return A_new, B_new, new_state, None
        finite = finite.all(0)  # (L,)
        if agree and self._reduce is not None and X is not None:
            # The local X and S were checked: step on all ranks or on none.
            finite = self._reduce.all_ranks(finite)
        return A_new, B_new, new_state, finite

    def _scale_root(self, scales: list[float], dt: torch.dtype, dev: torch.device) -> Tensor:
        """(L, 1, 1) ``√s`` of a bucket's layers, built once per distinct list of scales (a bucket's layers
        and their scales do not change from step to step: no tensor construction per step and layer)."""
        key = (tuple(scales), dt, dev)
        root = self._roots.get(key)
        if root is None:
            root = self._keep(key, torch.tensor(scales, dtype=dt, device=dev).sqrt().view(-1, 1, 1))
        return root

    def _host_values(self, values: list[float], dt: torch.dtype, dev: torch.device) -> Tensor:
        """(len(values),) the host numbers ``values`` on ``dev``, built once per distinct list, as
        ``_scale_root`` (read only: the callers never write it)."""
        key = ("values", tuple(values), dt, dev)
        t = self._roots.get(key)
        if t is None:
            t = self._keep(key, torch.tensor(values, dtype=dt, device=dev))
        return t

    def _keep(self, key, value: Tensor) -> Tensor:
        """``value`` kept in ``self._roots`` under ``key``; a table grown past what the layers' buckets need
        (their scales or the lr changed many times) starts over."""
        if len(self._roots) > 4 * len(self._layers) + 16:
            self._roots.clear()
        self._roots[key] = value
        return value

    def _factor_grads_finite(self, layers: list[LoRALayer]) -> Tensor:
        """(L,) bool: the autograd gradients of each layer's factors are finite (absent ones are); under
        FSDP2 each rank checks its shards and the ranks agree."""
        params = [p for layer in layers for p in (layer.A, layer.B)]
        present = [i for i, p in enumerate(params) if p.grad is not None]
        if not present:
            return torch.ones(len(layers), dtype=torch.bool, device=params[0].device)
        flags = finite_each([local_tensor(params[i].grad) for i in present])  # all at once: 4·L + 4 ops
        if len(present) < len(params):  # absent gradients are finite
            found = dict(zip(present, flags.unbind(0)))
            true = torch.ones((), dtype=torch.bool, device=flags.device)
            flags = torch.stack([found.get(i, true) for i in range(len(params))])
        finite = flags.view(len(layers), 2).all(1)
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

    def _step_other(self, group: dict, clip: Tensor | None = None,
                    skip_all: Tensor | None = None) -> Tensor | None:
        """One other group's AdamW step (``other_adamw.step_other``)."""
        return step_other(group, self.state, self._sharded, clip, skip_all)

    def remove_hooks(self) -> None:
        """Detach the capture hooks from the model; ``step()`` raises afterwards (for the methods that step
        from captured data: the others have no hooks and keep working)."""
        if self._capture is not None:
            self._capture.remove()
            self._streamed.clear()


def _grad_or_zeros(p: Tensor) -> Tensor:
    return p.grad if p.grad is not None else torch.zeros_like(p)
