"""Kernel launches per layer of each optimizer's training step as a GPU would run it, counted without one.

On a GPU the streamed step runs in backward, one layer at a time, and each ATen or native op it calls is a
kernel launch the host pays for, with the Python around it: on the H200's host LoRSum's ``step()`` took 8.9
ms for about 340 such ops (docs/gpu.md; this counter's 21.0 a layer × 16 at that code, per bucket of one
shape, three there as here), and in backward the host's time per layer must stay below the device's (LoRA +
AdamW's forward and backward: 75 ms for 14 layers at 7B shapes) for the backward to stay bound by the
device. This counts those ops on the meta device (shapes, no values, no memory) with every op that has a
native CUDA kernel resolved to it, as on a GPU (``as_gpu_on_meta``: its fake implementation runs), so the
count is the GPU path's and changes to it can be measured on any machine:

    python -m lorsum_kernels.benchmark.launches [--optimizers adamw,lorsum,...] [--blocks 2] [--out DIR]

prints, per optimizer at its class defaults, the ops on the device (kernel launches on a GPU) of a training
step's backward and of ``step()`` (with ``zero_grad()``) per LoRA layer, the backward's over LoRA + AdamW's,
and the ops on CPU tensors only (host time, no launch: coefficient tables), both phases together. Ops that
launch no kernel (views, allocations, metadata) are not counted; each native op counts once though it
launches a few kernels. The model: ``blocks`` Llama-7B-shaped blocks of eight LoRA linears (r = 16) in a
chain, 2 × 8 tokens; the counts do not depend on the widths. ``--out DIR`` appends one row per optimizer to
``DIR/launches.csv`` (with the torch version and commit; bench/results/launches.csv holds the project's).
"""

from __future__ import annotations

import argparse
import contextlib
import traceback
from collections import Counter
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

# Llama-7B's seven projections, chained so that each one's output feeds the next (q, k, v, o, gate,
# down, up, down'): the shapes of its LoRA layers, three of them (one bucket each in step()).
_CHAIN = [(4096, 4096)] * 4 + [(4096, 11008), (11008, 4096), (4096, 11008), (11008, 4096)]
FILE = "launches.csv"
FIELDS = ["timestamp", "optimizer", "options", "blocks", "layers", "backward_ops_per_layer", "over_adamw",
          "step_ops_per_layer", "host_ops_per_layer", "torch", "commit"]
# Ops that launch no kernel: allocations and metadata.
_FREE = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "lift_fresh",
         "set_", "resize_", "_reshape_alias", "sym_size", "sym_stride", "sym_numel", "is_same_size",
         "_has_compatible_shallow_copy_type", "record_stream"}


_COUNTING: list["CountLaunches"] = []  # the counters entered, innermost last


@contextlib.contextmanager
def as_gpu_on_meta():
    """The meta device as a GPU with the native CUDA kernels: every op with one resolves to ``native`` on
    the meta device and runs its fake (shape) implementation, so the ops' Python wrappers (coefficient
    tables, arguments) run as they do on a GPU. The fused CPU-only ops are left out, as on a GPU. An op
    with a Triton kernel and no CUDA one resolves to ``triton`` where triton imports, as ``auto`` does on a
    GPU: its launcher runs on the meta tensors (its ATen ops are counted as any) and each kernel launch is
    counted as ``triton::<kernel>`` instead of running."""
    from .. import _native, backends

    on_cuda = {op for op, device in _native._NATIVE_KERNELS if device == "cuda"} or {
        op for op, device in _native._NATIVE_KERNELS if device == "cpu"} - _native.CPU_ONLY_OPS
    saved_kernels, saved_resolve = _native._NATIVE_KERNELS, backends.resolve_backend

    def resolve(backend, device, op):
        requested = backend if backend is not None else "auto"
        if torch.device(device).type == "meta" and requested == "auto":
            if _native.has_native_op(op, "meta"):
                return "native"
            if backends._triton_missing_reason(device, op) is None:  # the patched rule below: as on a GPU
                return "triton"
        return saved_resolve(backend, device, op)

    from ..optim import base

    saved_missing = backends._triton_missing_reason

    def triton_missing(device, op):  # Triton runs on the meta device as on a GPU, where it is importable
        if torch.device(device).type == "meta":
            return saved_missing(torch.device("cuda"), op)
        return saved_missing(device, op)

    saved_devices = base.IEEE_NATIVE_DEVICES
    _native._NATIVE_KERNELS = saved_kernels | {(op, "meta") for op in on_cuda}
    backends.resolve_backend, backends._triton_missing_reason = resolve, triton_missing
    base.IEEE_NATIVE_DEVICES = saved_devices | {"meta"}  # as "cuda": the results carry bad data
    try:
        with _triton_launches_counted():
            yield
    finally:
        _native._NATIVE_KERNELS, backends.resolve_backend = saved_kernels, saved_resolve
        backends._triton_missing_reason = saved_missing
        base.IEEE_NATIVE_DEVICES = saved_devices


@contextlib.contextmanager
def _triton_launches_counted():
    """Triton's launchers accept meta tensors, plan for an H100's 132 SMs and count their launches."""
    from .. import backends

    if not backends.triton_available():
        yield
        return
    from ..triton_kernels import _launch

    saved = _launch.check_device, _launch.target_of, _launch.LaunchPlan.launch

    def check_device(op, kernel, *tensors):
        if tensors[0].device.type == "meta":
            return tensors[0].device
        return saved[0](op, kernel, *tensors)

    def target_of(device, kernel):
        return _launch.Target(sm_count=132) if device.type == "meta" else saved[1](device, kernel)

    def launch(plan, *args):
        if not any(isinstance(a, torch.Tensor) and a.device.type == "meta" for a in args):
            return saved[2](plan, *args)
        if _COUNTING:
            _COUNTING[-1].record(f"triton::{plan.kernel.__name__}", on_device=True)

    _launch.check_device, _launch.target_of, _launch.LaunchPlan.launch = check_device, target_of, launch
    try:
        yield
    finally:
        _launch.check_device, _launch.target_of, _launch.LaunchPlan.launch = saved


class CountLaunches(TorchDispatchMode):
    """Counts the ops dispatched under it that launch a kernel (not views, allocations or metadata), by op
    and (``sites``) by the innermost line of the package's optimizer code that called each."""

    def __init__(self, sites: bool = False):
        super().__init__()
        self.ops = Counter()  # ops on the device (the meta device: a GPU's kernel launches)
        self.host_ops = Counter()  # ops on CPU tensors only (coefficient tables, host scalars): no launch
        self.sites = Counter() if sites else None

    def __enter__(self):
        _COUNTING.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        _COUNTING.remove(self)
        return super().__exit__(*exc)

    def record(self, op: str, on_device: bool) -> None:
        (self.ops if on_device else self.host_ops)[op] += 1
        if self.sites is not None and on_device:
            self.sites[_caller()] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if not (func.is_view or name in _FREE):
            tensors = [t for a in (*args, *(kwargs or {}).values(), out)
                       for t in (a if isinstance(a, (list, tuple)) else (a,)) if isinstance(t, torch.Tensor)]
            self.record(f"{func.namespace}::{name}", any(t.device.type == "meta" for t in tensors))
        return out


def _caller() -> str:
    """``file:line function`` of the innermost frame in the package but this module (else "torch")."""
    root = Path(__file__).resolve().parents[1]
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename)
        if root in path.parents and path.name != "launches.py":
            return f"{path.relative_to(root)}:{frame.lineno} {frame.name}"
    return "torch"


class _Chain(nn.Module):
    def __init__(self, blocks: int, rank: int):
        super().__init__()
        from ..lora import LoRALinear

        self.layers = nn.ModuleList(LoRALinear(nn.Linear(n, m, bias=False), rank)
                                    for _ in range(blocks) for n, m in _CHAIN)

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def count(name: str, opt_kw: dict | None = None, *, blocks: int = 2, rank: int = 16,
          sites: bool = False) -> dict:
    """Ops per LoRA layer in the backward and the ``step()`` + ``zero_grad()`` of the third training step
    of optimizer ``name`` (the first builds its caches, the second is the first streamed one under
    ``capture="auto"``), as on a GPU. Returns ``layers``, ``backward``, ``step`` (per layer) and the
    ``Counter`` of each phase's ops (``ops``) and, with ``sites``, of their call sites (``sites``)."""
    from ..optim import create_optimizer

    with as_gpu_on_meta():
        with torch.device("meta"):
            torch.manual_seed(0)
            model = _Chain(blocks, rank)
            for layer in model.layers:
                layer.lora_B.weight.data.normal_()
        opt = create_optimizer(model, name, **(opt_kw or {}))
        for layer in getattr(opt, "_layers", ()):  # as after the first step on a GPU: the scales known
            scale = opt.state[layer.A].get("step_norm_scale")
            if scale is not None:
                opt._positive_scales[id(layer.A)] = scale
        x = torch.empty(2, 8, 4096, device="meta")
        phases = {}
        for i in range(3):
            loss = model(x).square().mean()
            with CountLaunches(sites) as backward:
                loss.backward()
            with CountLaunches(sites) as step:
                opt.step()
                opt.zero_grad()
            phases = {"backward": backward, "step": step}
    layers = len(model.layers)
    return dict(layers=layers, backward=sum(phases["backward"].ops.values()) / layers,
                step=sum(phases["step"].ops.values()) / layers,
                host=sum(sum(mode.host_ops.values()) for mode in phases.values()) / layers,
                ops={phase: mode.ops for phase, mode in phases.items()},
                sites={phase: mode.sites for phase, mode in phases.items()})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lorsum_kernels.benchmark.launches", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optimizers",
                        default="adamw,lorsum,scaled_lorsum,adaprelora,scaled_adamw,scaled_gd")
    parser.add_argument("--opt-kw", action="append", default=[], metavar="NAME:KEY=VALUE",
                        help="an optimizer's keyword, e.g. adaprelora:statistics='surrogate' (repeatable)")
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--top", type=int, default=0, help="also list each phase's N most frequent ops")
    parser.add_argument("--out", default=None, help="folder whose launches.csv the rows are appended to")
    parser.add_argument("--sites", type=int, default=0,
                        help="also list each phase's N call sites in the package with the most ops")
    args = parser.parse_args(argv)
    import ast

    kws: dict = {}
    for item in args.opt_kw:
        name, _, pair = item.partition(":")
        key, _, value = pair.partition("=")
        try:
            kws.setdefault(name, {})[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kws.setdefault(name, {})[key] = value
    rows = {name: count(name, kws.get(name), blocks=args.blocks, sites=args.sites > 0)
            for name in args.optimizers.split(",")}
    base = rows.get("adamw")
    print(f"ops per LoRA layer as on a GPU ({args.blocks} Llama-7B-shaped blocks, "
          f"{next(iter(rows.values()))['layers']} LoRA layers; meta device)")
    print(f"{'optimizer':<16} {'backward':>9} {'over adamw':>11} {'step()':>8} {'host ops':>9}  options")
    for name, row in rows.items():
        over = f"{row['backward'] - base['backward']:11.1f}" if base else f"{'':>11}"
        print(f"{name:<16} {row['backward']:9.1f} {over} {row['step']:8.1f} {row['host']:9.1f}  "
              f"{kws.get(name, {})}")
        if args.top:
            for phase in ("backward", "step"):
                top = ", ".join(f"{op} {n}" for op, n in row["ops"][phase].most_common(args.top))
                print(f"    {phase}: {top}")
        for phase in ("backward", "step") if args.sites else ():
            print(f"    {phase}, by call site:")
            for site, n in row["sites"][phase].most_common(args.sites):
                print(f"      {n:5d}  {site}")
    if args.out:
        from . import env, results

        path = Path(args.out) / FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        environment = env.environment("cpu")
        results.append(path, FIELDS, [
            dict(timestamp=results.now(), optimizer=name, options=repr(kws.get(name, {})), blocks=args.blocks,
                 layers=row["layers"], backward_ops_per_layer=round(row["backward"], 2),
                 over_adamw=round(row["backward"] - base["backward"], 2) if base else "",
                 step_ops_per_layer=round(row["step"], 2), host_ops_per_layer=round(row["host"], 2),
                 torch=environment["torch"], commit=environment["commit"])
            for name, row in rows.items()])
        print(f"rows appended to {path}")


if __name__ == "__main__":
    main()
