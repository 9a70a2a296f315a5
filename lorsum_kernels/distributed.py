"""Data-parallel training (DDP, and FSDP2's sharded data parallelism): what each optimizer all-reduces, and
the helpers that do it.

Turn it on with ``process_group=`` on any optimizer of the package::

    model = DDP(model)                         # DDP keeps averaging every .grad as usual
    opt = LoRSum(model, lr=1e-3, process_group="default")   # or a ProcessGroup from dist.new_group()

``process_group=None`` (the default) is single-process training: no collective, no extra work, and no
auto-detection; an initialised default group is used only when asked for by name (``"default"``). A method
that steps from captured data, built with None while torch.distributed runs several ranks, warns: its
ranks would each step on their local data and drift apart.
``torch.distributed`` must be initialised when the optimizer is built, else it raises before touching
the model. Every rank builds the optimizer with the same arguments (``seed`` included) on the same model.
With the Hugging Face Trainer: ``create_optimizer(model, "lorsum", process_group="default")``, or
``lorsum_kernels.hf.LoRAOptimizerMixin``, which passes it (and works under FSDP).

FSDP2 (``fully_shard``): the parameters are DTensors and ``process_group=None`` means the ranks of their
device mesh (``resolve_data_parallel``); each step gathers the factors once and every rank writes its own
shard (``lorsum_kernels.fsdp``). What is averaged over ranks, and what is refused, is the same as under DDP
below: the token sums, never X or S; the factor-gradient methods read ``.grad``, which FSDP has averaged.
Per step and layer the traffic adds, to the DDP mode's, one all-gather of the factors (r·(m + n) numbers;
none when the step is streamed in backward, where FSDP holds the layer unsharded, without a
mixed-precision cast) and, for the factor-gradient methods, one of their gradients (r·(m + n)); FSDP's own
all-gather and reduce-scatter of the factors stay as for any parameter.

The contract (spec/lorsum.md §12, T18): with each rank's loss the mean over its own shard, DDP's gradient
is ``G = (1/R)·Σ_r S_rᵀX_r``, and the optimizers step from that same G. With equal-size shards this is the
single process on the concatenated batch (its mean loss), up to rounding. The factors and the method state
stay bit-identical on all ranks: they start replicated, every rank reduces the same inputs and receives the
same averages, and all solves are deterministic. A rank's captured X and S never leave it.

What each optimizer does under DDP:

* ``LoRSum`` and ``ScaledLoRSum(metric="kfac")`` (all PSI-LoRA modes: any ``iters``, momentum): every
  data-dependent quantity is an r-wide sum over tokens, so only those are averaged, between product and
  solve: the A-step's ``(S·B̂)ᵀ·X`` (r×n) and the B-step's ``Sᵀ·(X·Âᵀ)`` (m×r), and the K-FAC statistics
  (n + m numbers, averaged per-rank statistics: the global ones for equal shards). The weight LoRSum and
  the momentum buffer's LoRSum run in lock step, so one collective carries both problems' products of a
  half-step, for all layers of a bucket (on the CPU layers step one at a time, so per layer): 2k
  collectives per bucket per step (one for k = 0), plus one for the K-FAC statistics. Traffic per layer
  and step: k'·(r + r_m)·(m + n) numbers (k' = max(k, 1), r_m the momentum rank, 0 without momentum),
  i.e. k'·(1 + r_m/r) times LoRA's own gradient all-reduce of r·(m + n). The fused native half-steps
  cannot take a collective in the middle, so this mode runs the products op (``ops.pair_products``), the
  all-reduce, then the r×r solves. ``ScaledLoRSum(metric="shampoo")`` raises at construction: diag(GᵀG)
  of the global G has cross-rank terms (it is no token sum), and computing it would mean all-reducing the
  m×n G or gathering every rank's X and S.
* ``ScaledGD``, ``ScaledAdamW`` and ``AdaPreLoRA(statistics="surrogate")`` step from the factors' ``.grad``
  alone, which DDP has already averaged and which is therefore identical on every rank: nothing to add.
  ``process_group`` is accepted and adds no collective.
* ``AdaPreLoRA(statistics="exact")`` raises at construction: Adafactor's row and column energies of the
  global G have cross-rank terms, so they need the m×n G all-reduced (as much traffic as full fine-tuning)
  or all ranks' X and S gathered (R·T·(m + n) per layer). The surrogate statistics are exact under DDP.
* ``SVDLoRA`` (a baseline that forms G anyway) all-reduces each layer's m×n G.
* The "other" parameters (heads, biases) are stepped by AdamW from their ``.grad``, averaged by DDP.

Also agreed over ranks, so that no rank steps alone or waits in a collective the others never enter:

* Which layers have captured data and how many rows: one small all-reduce per step, read on the host
  (a host synchronisation on the GPU, the one this mode adds). A layer that received no tokens on some rank
  (conditional computation) enters the collectives there with zero rows, i.e. a zero contribution; a
  layer whose row count differs between ranks is stepped in a bucket of its own (stacking needs equal T).
* The non-finite skip: a layer stepped from captured data steps only if it is finite on every rank (one
  all-reduce per bucket), since its local X and S are part of the check.
* ``max_grad_norm``: the norm of the global G has cross-rank terms (⟨G_r, G_r'⟩), so the sum of local
  ‖G_r‖² is wrong. It is computed exactly by forming each layer's local G = SᵀX (2·T·m·n flops), averaging
  it over ranks (m·n numbers per layer, one layer at a time) and taking its norm: as expensive as
  full fine-tuning's gradient all-reduce, and paid only when clipping is asked for. ``.grad``-based norms
  (other parameters, factor gradients) are already global through DDP.

Gradient accumulation and ``DDP.no_sync``: the captured rows of all micro-batches are concatenated per rank
(``capture``), and the reduction happens once, at ``step()``. DDP also all-reduces the LoRA factors'
``.grad``, which the capture-based methods do not read; excluding them from DDP's reducer saves that
traffic but is left to the user.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import warnings

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._numerics import math_dtype
from .fsdp import ShardedParams, find_sharding

__all__ = ["RankAverage", "resolve_data_parallel", "resolve_process_group"]


class RankAverage:
    """Averages tensors over the ranks of a process group: ``reduce(tensors) -> averaged tensors``.

    One collective per call (per dtype and device present), whatever the number of tensors: they are
    flattened into one buffer, summed over ranks and divided by the group size (gloo has no AVG). Inputs
    are not modified. Every rank receives the same bits.
    """

    def __init__(self, process_group):
        self.group = process_group
        self.world_size = dist.get_world_size(process_group)

    def _all_reduce(self, flat: Tensor, op) -> None:
        dist.all_reduce(flat, op=op, group=self.group)

    def __call__(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        tensors = list(tensors)
        by_kind: dict[tuple, list[int]] = defaultdict(list)
        for i, t in enumerate(tensors):
            by_kind[(t.dtype, t.device)].append(i)
        out: list[Tensor | None] = [None] * len(tensors)
        for indices in by_kind.values():
            flat = torch.cat([tensors[i].reshape(-1) for i in indices])  # a fresh buffer: inputs untouched
            self._all_reduce(flat, dist.ReduceOp.SUM)
            flat.div_(self.world_size)
            for i, part in zip(indices, flat.split([tensors[i].numel() for i in indices])):
                out[i] = part.view(tensors[i].shape)
        return out

    def all_ranks(self, flags: Tensor) -> Tensor:
        """Elementwise logical AND of a boolean tensor over ranks."""
        agreed = flags.to(torch.int32)
        self._all_reduce(agreed, dist.ReduceOp.MIN)
        return agreed.bool()

    def min_max(self, values: Tensor) -> tuple[Tensor, Tensor]:
        """Elementwise minimum and maximum of an integer tensor over ranks, in one collective."""
        both = torch.cat([values, -values])
        self._all_reduce(both, dist.ReduceOp.MAX)
        high, neg_low = both.split(values.numel())
        return -neg_low, high

    def gradient_norm(self, X: Tensor, S: Tensor) -> Tensor:
        """``‖(1/R)·Σ_r S_rᵀX_r‖_F`` per batch element, exactly: the local G (m×n) is formed in the math
        dtype and averaged over ranks. Cross-rank terms forbid summing local norms (module docstring)."""
        dt = math_dtype(X, S)
        (G,) = self([S.to(dt).mT @ X.to(dt)])
        return torch.linalg.matrix_norm(G)


def resolve_process_group(process_group, *, steps_from_captured_data: bool = True) -> RankAverage | None:
    """The optimizers' ``process_group`` argument as a ``RankAverage`` (None for single-process training).

    Accepts None, ``"default"`` (the default group of ``torch.distributed.init_process_group``) or a
    ``ProcessGroup``. Raises if torch.distributed is missing or not initialised. Warns for None when the
    method steps from captured data and torch.distributed runs more than one rank.
    """
    if process_group is None:
        if steps_from_captured_data and dist.is_available() and dist.is_initialized() \
                and dist.get_world_size() > 1:
            warnings.warn(
                "torch.distributed runs several ranks but the optimizer was built with process_group=None: "
                "each rank steps on its own captured data and the LoRA weights drift apart under DDP; pass "
                "process_group='default' (or a ProcessGroup) for data-parallel training (under FSDP2: build "
                "the optimizer after fully_shard, or pass process_group)",
                stacklevel=3,
            )
        return None

    if not dist.is_available():
        raise RuntimeError("process_group was given but this torch build has no torch.distributed")
    if not dist.is_initialized():
        raise RuntimeError(
            "process_group was given but torch.distributed is not initialised: call "
            "torch.distributed.init_process_group(...) (torchrun does not do it for you) before building "
            "the optimizer, or pass process_group=None for single-process training"
        )
    if isinstance(process_group, str):
        if process_group != "default":
            raise ValueError(
                f"process_group must be None, 'default' or a ProcessGroup, got {process_group!r}"
            )
        return RankAverage(dist.group.WORLD)
    if isinstance(process_group, int) and process_group == dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError(
            "process_group does not include this rank (dist.new_group returned NON_GROUP_MEMBER): every rank "
            "that trains the model must be in the group that averages"
        )
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            f"process_group must be None, 'default' or a torch.distributed ProcessGroup, got "
            f"{type(process_group).__name__}"
        )
    return RankAverage(process_group)


def resolve_data_parallel(process_group, model: nn.Module, *, steps_from_captured_data: bool = True
                          ) -> tuple[RankAverage | None, ShardedParams | None]:
    """The optimizers' ``process_group`` for ``model``: ``(rank average or None, sharding or None)``.

    Unsharded parameters: ``resolve_process_group``. Parameters sharded by FSDP2 (DTensors,
    ``lorsum_kernels.fsdp``): the ranks of their device mesh average (``process_group=None`` means the
    mesh's group, with no warning);
    a ``process_group`` given must hold exactly the mesh's ranks, since the gathered factors and the
    averaged token sums must come from the same ranks.
    """
    sharding = find_sharding(model, [p for p in model.parameters() if p.requires_grad])
    if sharding is None:
        return resolve_process_group(process_group, steps_from_captured_data=steps_from_captured_data), None
    if process_group is None:
        return RankAverage(sharding.group), sharding
    reduce = resolve_process_group(process_group, steps_from_captured_data=steps_from_captured_data)
    ranks = dist.get_process_group_ranks(reduce.group)
    if sorted(ranks) != sorted(sharding.ranks()):
        raise ValueError(
            f"process_group holds ranks {sorted(ranks)} but the model is sharded over ranks "
            f"{sorted(sharding.ranks())} (its FSDP2 mesh): the optimizer averages over the ranks that shard "
            "it; pass process_group=None to use the mesh's group"
        )
    return RankAverage(sharding.group), sharding
