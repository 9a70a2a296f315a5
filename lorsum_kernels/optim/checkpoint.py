"""Checkpoints of the LoRA optimizers: ``state_dict`` / ``load_state_dict`` (a mixin of ``LoRAOptimizer``).

Contract (also in ``LoRAOptimizer``'s docstring): torch's state dict plus the class name and the parameter
shapes, checked on load before anything changes; method state keeps its saved dtype; the optimizer-wide
entries (the count of skipped steps, the streaming mode) travel in the first param group, where
torch.distributed.checkpoint keeps them; under FSDP2 other-group moments are placed like their parameter.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..lora import LoRALayer
from .other_adamw import fresh_other_state
from .resharding import placed_like

__all__ = ["CheckpointMixin", "LAYER_COUNTERS"]

# Keys of a LoRA layer's state that are counters, not method tensors to stack.
LAYER_COUNTERS = ("step", "skipped_steps")


class CheckpointMixin:
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
                    state_dict["state"][index] = fresh_other_state(p) if group["kind"] == "other" else {}
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
        state_dict = self._with_later_options(_optimizer_wide_from_group(state_dict))
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
        self._positive_scales.clear()  # the statistics are the checkpoint's now (_scales_known_positive)
        other_ids = self._other_param_ids()
        for pid, entries in saved_state.items():
            if pid not in id_to_param:
                continue
            param = id_to_param[pid]
            for key, value in entries.items():
                if isinstance(value, Tensor):
                    value = value.to(device=param.device, dtype=value.dtype, copy=True)
                    self.state[param][key] = placed_like(param, value) if id(param) in other_ids else value
        for param in [p for p, entries in self.state.items() if isinstance(p, Tensor) and not entries]:
            del self.state[param]  # B's empty entry: the layer's state is under A
        # A state dict without the count (written before it existed, or rebuilt by DCP's flattened format)
        # keeps this optimizer's.
        self.state["skipped_steps"] = saved_state.get("skipped_steps", skipped_before).clone()
        if self._streamed is not None and state_dict.get("capture_streaming"):
            self._streamed.resume(state_dict["capture_streaming"])

    # Options a method gained after checkpoints of it were written, with the value such a checkpoint meant
    # (LoRSum's normalize_step: its plain step was the only one): filled into the saved groups on load.
    _options_added_later: dict = {}

    def _with_later_options(self, state_dict: dict) -> dict:
        """The state dict with ``_options_added_later`` in the groups that lack them (every group carries the
        method's options, as torch's defaults; copies: the caller's dict is left as it is)."""
        later = self._options_added_later
        groups = state_dict.get("param_groups") or []
        if not later or all(later.keys() <= g.keys() for g in groups):
            return state_dict
        return {**state_dict, "param_groups": [{**later, **g} for g in groups]}

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
        keys = set(expected) | set(LAYER_COUNTERS)
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
