"""The "other" param groups (heads, biases: trainable parameters that are not LoRA factors): torch's fused
AdamW, its moments in fp32 (fp64 for fp64 parameters) like the method state, under FSDP2 on each rank's
shards. ``step_other`` is the whole step of one group; ``fresh_other_state`` the state its first step makes
(a checkpoint has an entry for every parameter, stepped or not)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.adam import adam as _torch_adam

from .._numerics import math_dtype
from ..fsdp import is_sharded, local_tensor
from .guards import finite_each

__all__ = ["fresh_other_state", "init_other_state", "other_state_dtype", "step_other"]


def step_other(group: dict, state, sharded, clip: Tensor | None = None,
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
        init_other_state(state[p], p)
    # Under FSDP2, AdamW (elementwise) runs on each rank's shards of parameters, gradients and moments.
    grads = [local_tensor(p.grad) for p in params]
    # One device flag: a non-finite gradient skips this group's update (and its step count).
    found_inf = ~finite_each(grads).all()
    if sharded is not None and any(is_sharded(p) for p in params):  # on every rank, or on none
        found_inf = ~sharded.all_ranks(~found_inf)
    if skip_all is not None:
        found_inf = found_inf | skip_all.to(found_inf.device)
    skipped = found_inf
    found_inf = found_inf.float()
    low = [i for i, p in enumerate(params) if p.dtype != state[p]["exp_avg"].dtype]
    targets = [local_tensor(p) for p in params]
    for i in low:  # stepped in the state dtype, written back below
        targets[i] = targets[i].to(state[params[i]]["exp_avg"].dtype)
        grads[i] = grads[i].to(targets[i].dtype)
    beta1, beta2 = group["betas"]
    _torch_adam(
        targets,
        grads,
        [local_tensor(state[p]["exp_avg"]) for p in params],
        [local_tensor(state[p]["exp_avg_sq"]) for p in params],
        [],
        [state[p]["step"] for p in params],
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


def init_other_state(st: dict, p: Tensor) -> None:
    """Fills a parameter's empty state entry, or moves a checkpoint's moments kept in p's dtype to fp32."""
    if not st:
        st.update(fresh_other_state(p))
    elif st["exp_avg"].dtype != other_state_dtype(p):
        dt = other_state_dtype(p)
        st["exp_avg"], st["exp_avg_sq"] = st["exp_avg"].to(dt), st["exp_avg_sq"].to(dt)


def other_state_dtype(p: Tensor) -> torch.dtype:
    return math_dtype(p)


def fresh_other_state(p: Tensor) -> dict:
    """AdamW's initial state of an other-group parameter: moments in fp32 (fp64 for fp64 parameters), as the
    method state; DTensors placed like a sharded parameter."""
    dt = other_state_dtype(p)
    return {"step": torch.zeros((), dtype=torch.float32, device=p.device),
            "exp_avg": torch.zeros_like(p, dtype=dt, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(p, dtype=dt, memory_format=torch.preserve_format)}
