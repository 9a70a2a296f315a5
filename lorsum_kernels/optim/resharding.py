"""An optimizer built before its model was sharded (accelerate's ``prepare(model, optimizer)`` under FSDP2):
``fully_shard`` replaces the parameters, and the optimizer follows them at its next ``step()`` /
``state_dict()`` / ``load_state_dict()`` (a mixin of ``LoRAOptimizer``): param groups, state (other
groups' moments sharded like their parameter), LoRA layers, the rank average and the capture hooks."""

from __future__ import annotations

from torch import Tensor, nn

from ..capture import ActivationCapture
from ..distributed import resolve_data_parallel
from ..fsdp import is_sharded

__all__ = ["ReshardingMixin", "parameter_owners", "placed_like"]


class ReshardingMixin:
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
                entries = {k: placed_like(new, v) if isinstance(v, Tensor) else v for k, v in entries.items()}
            self.state[new] = entries
        for layer in self._layers_by_A.values():
            layer.A, layer.B = new_of.get(id(layer.A), layer.A), new_of.get(id(layer.B), layer.B)
        self._layers_by_A = {id(layer.A): layer for layer in self._layers_by_A.values()}
        self._reduce, self._sharded = reduce, sharded
        self._owners = parameter_owners(model)
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


def parameter_owners(model: nn.Module) -> dict:
    """id(parameter) -> (module, attribute name, whether sharded): where each trainable parameter of the
    model is registered."""
    return {id(p): (module, name, is_sharded(p)) for module in model.modules()
            for name, p in module._parameters.items() if p is not None and p.requires_grad}


def placed_like(param: Tensor, value: Tensor) -> Tensor:
    """A state tensor of ``param`` shaped like it, as the parameter is placed: full moments of a sharded
    parameter become DTensors placed like it, sharded moments of an unsharded one are gathered."""
    if is_sharded(param) and not is_sharded(value) and value.shape == param.shape:
        from ..fsdp import ShardedParams
        return ShardedParams(param.device_mesh).like(param, value)
    if is_sharded(value) and not is_sharded(param):
        return value.full_tensor()
    return value
