"""Sharded training (FSDP2, ``torch.distributed.fsdp.fully_shard``): the optimizers on DTensor parameters.

Under ``fully_shard`` every parameter is a ``DTensor`` sharded over the ranks of a device mesh (``Shard(0)``:
rank i holds rows ``[i·c, (i+1)·c)`` of each factor, ``c = ⌈rows / ranks⌉``), and its ``.grad`` is the
gradient averaged over those ranks, sharded the same way. The LoRA methods couple all of a factor's rows
(r×r solves, products with the whole of A and B), so each step works on full factors:

* **gather**: the factors of a bucket of layers (and, for the methods that read them, their gradients)
  are all-gathered in one collective per dtype: ``O((m + n)·r)`` numbers per layer, the size of LoRA's own
  gradient. Inside backward (the streamed step) FSDP holds the layer's factors unsharded; when those hold
  the sharded parameter's values exactly (same dtype: no mixed-precision cast), they are read instead and
  nothing is gathered.
* **step**: every rank runs the method on the same full factors and the same rank-averaged token sums
  (the data-parallel mode of ``lorsum_kernels.distributed``, over the mesh's ranks), so every rank computes
  the same new factors, bit for bit.
* **write**: each rank copies its own rows of the new factors into its local shard (the DTensor's
  placements decide which); nothing is communicated.

The method state (momentum factors, metrics, moments of the factors) is ``O((m + n)·r)`` per layer, as large
as the gathered factors, and every rank needs all of it in each step: it is kept replicated, as plain
tensors, identical on every rank. The other parameters (heads, biases) step as torch's AdamW on their
shards: their moments are DTensors placed like the parameter, their non-finite check is agreed over ranks.

Supported: a 1-D mesh (``fully_shard`` with the default mesh or a 1-D one), any placement on it (``Shard(0)``
is gathered in one batched collective, others through ``DTensor.full_tensor``), parameters on the mesh's
device. Refused with a clear error: FSDP1 (``FullyShardedDataParallel``: flat parameters lose the (A, B)
pairing), meshes of 2 or more dimensions (HSDP, FSDP + TP), CPU offload of the sharded parameters.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["ShardedParams", "find_sharding", "local_tensor"]

try:  # torch.distributed may be missing (some builds); then nothing is ever sharded
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
except ImportError:  # pragma: no cover
    DTensor = Shard = distribute_tensor = None


# torch 2.13 renames all_gather_into_tensor (deprecated there) to all_gather_single.
_all_gather_single = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)


def is_sharded(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local_tensor(t: Tensor) -> Tensor:
    """The rank's shard of a DTensor (its storage: writes reach the parameter), or the tensor itself."""
    return t.to_local() if is_sharded(t) else t


def find_sharding(model: nn.Module, params: Iterable[Tensor]) -> ShardedParams | None:
    """The sharding of ``params`` (the trainable parameters of ``model``): None when none is a DTensor, else a
    ``ShardedParams`` for their mesh. Raises for what is not supported (module docstring)."""
    if DTensor is None or not dist.is_available():
        return None
    from torch.distributed.fsdp import FullyShardedDataParallel

    for module in model.modules():
        if isinstance(module, FullyShardedDataParallel):
            raise NotImplementedError(
                "the model is wrapped in FSDP1 (FullyShardedDataParallel), whose flat parameters mix the "
                "LoRA factors of several layers into one sharded buffer, so no rank sees an (A, B) pair: use "
                "FSDP2 (torch.distributed.fsdp.fully_shard; in accelerate/the HF Trainer fsdp_version=2)"
            )
    sharded = [p for p in params if is_sharded(p)]
    if not sharded:
        return None
    mesh = sharded[0].device_mesh
    for p in sharded:
        if p.device_mesh.ndim != 1:
            raise NotImplementedError(
                f"a parameter is sharded over a {p.device_mesh.ndim}-D device mesh (HSDP, or FSDP with "
                "tensor parallelism): only 1-D meshes (fully_shard with the default mesh) are supported"
            )
        if p.device_mesh != mesh:
            raise NotImplementedError(
                "the model's parameters are sharded over different device meshes: the optimizer averages "
                "over one group of ranks; shard every module over the same mesh"
            )
        if p.device.type != mesh.device_type:
            raise NotImplementedError(
                f"a sharded parameter lives on {p.device.type} while its mesh computes on {mesh.device_type} "
                "(FSDP2 CPU offload): not supported by the LoRA optimizers"
            )
    return ShardedParams(mesh)


class ShardedParams:
    """Reads full values of, and writes new values into, the DTensor parameters of one 1-D device mesh."""

    def __init__(self, mesh):
        self.mesh = mesh
        self.group = mesh.get_group()
        self.world_size = mesh.size()
        self.rank = mesh.get_local_rank()

    def ranks(self) -> list[int]:
        """The global ranks of the mesh, in order."""
        return self.mesh.mesh.flatten().tolist()

    # reading ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def full(self, tensors: Sequence[Tensor],
             registered: Sequence[Tensor | None] | None = None) -> list[Tensor]:
        """Full values of ``tensors``: plain tensors as they are; DTensors all-gathered, one collective per
        dtype for all the ``Shard(0)`` ones of this mesh. ``registered[i]``, when given, is what the module
        holding ``tensors[i]`` has registered now: FSDP's unsharded parameter during forward and backward,
        used as is when it has the sharded parameter's shape and dtype (its values are then exactly the
        gathered ones). Run it on every rank with the same tensors, in the same order."""
        out: list[Tensor | None] = [None] * len(tensors)
        batched: dict[tuple, list[int]] = defaultdict(list)
        for i, t in enumerate(tensors):
            if not is_sharded(t):
                out[i] = t
                continue
            current = None if registered is None else registered[i]
            if (current is not None and current is not t and not is_sharded(current)
                    and current.shape == t.shape and current.dtype == t.dtype):
                out[i] = current.detach()
            elif t.device_mesh == self.mesh and tuple(t.placements) == (Shard(0),) and t.ndim >= 1:
                batched[(t.dtype, t.device)].append(i)
            else:
                out[i] = t.full_tensor()
        for indices in batched.values():
            self._gather_rows(tensors, indices, out)
        return out  # type: ignore[return-value]

    def _chunk(self, rows: int) -> int:
        return -(-rows // self.world_size)  # torch.chunk's size, which Shard(0) and FSDP2 use

    def _gather_rows(self, tensors: Sequence[Tensor], indices: list[int], out: list) -> None:
        """One all_gather_into_tensor for the Shard(0) DTensors ``tensors[indices]``: each rank sends its
        rows of every tensor, padded to the chunk size, in one flat buffer."""
        world = self.world_size
        parts, layout = [], []
        for i in indices:
            t = tensors[i]
            rows, width = t.shape[0], math.prod(t.shape[1:])
            chunk = self._chunk(rows)
            local = t.to_local().reshape(-1)
            pad = chunk * width - local.numel()
            parts.append(local if pad == 0 else torch.cat([local, local.new_zeros(pad)]))
            layout.append((i, rows, width, chunk))
        send = torch.cat(parts)
        recv = send.new_empty(world * send.numel())
        _all_gather_single(recv, send, group=self.group)
        recv = recv.view(world, -1)
        offset = 0
        for i, rows, width, chunk in layout:
            pieces = []
            for r in range(world):
                held = max(0, min(chunk, rows - r * chunk))
                pieces.append(recv[r, offset:offset + held * width])
            out[i] = torch.cat(pieces).view(tensors[i].shape)
            offset += chunk * width

    # writing ---------------------------------------------------------------------------------------

    def shard_of(self, param: Tensor, value: Tensor) -> Tensor:
        """This rank's part of the full ``value`` of ``param`` (a DTensor), shaped like its local tensor."""
        if param.device_mesh == self.mesh and tuple(param.placements) == (Shard(0),):
            rows = param.shape[0]
            start = min(self.rank * self._chunk(rows), rows)
            return value.narrow(0, start, param.to_local().shape[0])
        placed = distribute_tensor(value.detach(), param.device_mesh, param.placements, src_data_rank=None)
        return placed.to_local()

    @torch.no_grad()
    def write(self, param: Tensor, value: Tensor, ok: Tensor) -> None:
        """``param ← value`` where the 0-d bool ``ok`` holds, else unchanged: each rank writes its shard."""
        local = local_tensor(param)
        new = self.shard_of(param, value) if is_sharded(param) else value
        local.copy_(torch.where(ok, new.to(local.dtype), local))

    @torch.no_grad()
    def like(self, param: Tensor, value: Tensor) -> Tensor:
        """A full (plain) tensor as state of ``param``: a DTensor placed like it when ``param`` is one."""
        if not is_sharded(param) or is_sharded(value) or value.shape != param.shape:
            return value
        local = self.shard_of(param, value.to(param.device)).clone()
        return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False,
                                  shape=param.shape, stride=param.stride())

    # agreeing --------------------------------------------------------------------------------------

    def all_ranks(self, flag: Tensor) -> Tensor:
        """Logical AND of a boolean tensor over the mesh's ranks."""
        agreed = flag.to(torch.int32)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=self.group)
        return agreed.bool()

    def sum(self, value: Tensor) -> Tensor:
        """Sum of a tensor over the mesh's ranks (a new tensor)."""
        total = value.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.group)
        return total
