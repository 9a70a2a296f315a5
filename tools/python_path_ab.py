"""The streamed step's work with this tree's Python against a commit's, in one process (issue #16).

Host drift between processes (±10–20% here) hides changes of a few percent, so this swaps the step's
Python functions between the working tree's and ``--against``'s, step by step, on the real-model
benchmark's SmolLM2 model (``benchmark/real_model.build``: LoRA r=16 on the 210 linear modules, 4 × 512
random tokens), and reports each side's work per step (the capture's sink, i.e. the work inside backward,
and the flush of the CPU's queue of layer steps at backward's end, plus ``step()``). Only Python is
swapped: both sides run the same native extension (the one built from the working tree). The swapped
functions: ``LoRAOptimizer.step``, ``._update_clip`` and ``._compute_bucket`` (optim/base.py; ``_update_clip``
in optim/writing.py since 2026-12-04),
``StreamedStep.take``, ``.collect``, ``.flush``, ``.prepare``, ``.run`` and ``._whole_step``
(optim/streaming.py; the latter calls a method's one-layer path since 2026-12-03; the tree's ``step``
finishes the normalised step with the native op the commit may lack in its Python), the optimizer's own ``_one_layer_step`` /
``_prepare_one_layer_step`` and the helpers they call (optim/lorsum.py; the base's None where the commit's
class has none), ``functional.low_rank_sum._lorsum`` and ``._als_rounds``, ``kfac_scaled_low_rank_sum`` as
``functional.lorsum_step`` calls it, and ``ops._half_step_args``.

    python tools/python_path_ab.py lorsum --against HEAD~1 [--steps 6] [--kwargs '{"momentum": 0.9}']
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import subprocess
import time
from pathlib import Path

import torch

from lorsum_kernels import create_optimizer, ops
from lorsum_kernels.benchmark import real_model
from lorsum_kernels.optim import base, streaming

ROOT = Path(__file__).resolve().parents[1]
low_rank_sum = importlib.import_module("lorsum_kernels.functional.low_rank_sum")
lorsum_step = importlib.import_module("lorsum_kernels.functional.lorsum_step")
lorsum_methods = importlib.import_module("lorsum_kernels.optim.lorsum")
ONE_LAYER_ATTRS = ("_one_layer_step", "_prepare_one_layer_step", "_one_layer_lr", "_balanced_layer")


def _module_at(commit: str, path: str, package: str) -> dict:
    """The namespace of ``path`` (a module of ``package``) as it was at ``commit``, executed anew."""
    source = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=ROOT, check=True, capture_output=True,
                            text=True).stdout
    namespace = {"__name__": f"{package}._ab_{Path(path).stem}", "__package__": package}
    exec(compile(source, f"{commit}:{path}", "exec"), namespace)
    return namespace


def _sides(commit: str, cls: type) -> dict:
    """Per side, (owner, attribute) -> function. ``step`` is set on the optimizer's own class ``cls``, where
    torch.optim's profiling wrapper put the inherited step at construction."""
    optim = "lorsum_kernels.optim"
    old_base = _module_at(commit, "lorsum_kernels/optim/base.py", optim)["LoRAOptimizer"]
    # _update_clip moved from base.py to the writing mixin (optim/writing.py) on 2026-12-04.
    old_update_clip = old_base.__dict__.get("_update_clip") or \
        _module_at(commit, "lorsum_kernels/optim/writing.py", optim)["WritingMixin"].__dict__["_update_clip"]
    old_streaming = _module_at(commit, "lorsum_kernels/optim/streaming.py", optim)
    # The commit's base imports the tree's LayerResults (its relative imports resolve to the tree's modules):
    # the commit's collect must build that class for step()'s isinstance to see the streamed results.
    old_results = old_streaming.get("LayerResults")
    if old_results is not None and old_results._fields == streaming.LayerResults._fields:
        old_streaming["LayerResults"] = streaming.LayerResults
    old_streamed = old_streaming["StreamedStep"]
    old_lrs = _module_at(commit, "lorsum_kernels/functional/low_rank_sum.py", "lorsum_kernels.functional")
    old_ops = _module_at(commit, "lorsum_kernels/ops.py", "lorsum_kernels")
    old_methods = _module_at(commit, "lorsum_kernels/optim/lorsum.py", optim)
    old_classes = {name: c for name, c in old_methods.items() if isinstance(c, type)}
    # The commit's methods test ``type(self)._method_step is <their class>._method_step``: let their globals
    # name the classes the optimizer is built from.
    old_methods.update({name: getattr(lorsum_methods, name) for name in ("LoRSum", "ScaledLoRSum")})
    # The one-layer path and the helpers it calls on self, as the commit's classes (or their bases) define
    # them; the base's None where the commit has no path, a helper the commit lacks left as it is.
    one_layer = {attr: next((old_classes[c.__name__].__dict__[attr] for c in cls.__mro__
                             if c.__name__ in old_classes and attr in old_classes[c.__name__].__dict__), None)
                 for attr in ONE_LAYER_ATTRS}
    for attr in ("_one_layer_step", "_prepare_one_layer_step"):
        one_layer[attr] = one_layer[attr] or base.LoRAOptimizer.__dict__[attr]
    one_layer = {attr: fn for attr, fn in one_layer.items() if fn is not None}
    targets = [(cls, "step"), (base.LoRAOptimizer, "_update_clip"),
               (base.LoRAOptimizer, "_compute_bucket"), (streaming.StreamedStep, "take"),
               (streaming.StreamedStep, "collect"), (streaming.StreamedStep, "_whole_step"),
               (streaming.StreamedStep, "flush"), (streaming.StreamedStep, "prepare"),
               (streaming.StreamedStep, "run"),
               (low_rank_sum, "_lorsum"), (low_rank_sum, "_als_rounds"), (ops, "_half_step_args"),
               (lorsum_step, "kfac_scaled_low_rank_sum")] + [(cls, attr) for attr in one_layer]
    old = [old_base.__dict__["step"], old_update_clip, old_base.__dict__["_compute_bucket"],
           old_streamed.__dict__["take"], old_streamed.__dict__["collect"],
           old_streamed.__dict__["_whole_step"], old_streamed.__dict__["flush"],
           # before 2026-12-04 the queue had no preparation (the commit's flush does not call the tree's)
           old_streamed.__dict__.get("prepare", streaming.StreamedStep.__dict__["prepare"]),
           old_streamed.__dict__["run"],
           old_lrs["_lorsum"],
           old_lrs["_als_rounds"], old_ops["_half_step_args"], old_lrs["kfac_scaled_low_rank_sum"],
           *one_layer.values()]
    # The tree's: the unwrapped step, the classes' own methods, the modules' functions.
    new = [base.LoRAOptimizer.__dict__["step"]]
    new += [_own(owner, attr) for owner, attr in targets[1:]]
    return {"tree": list(zip(targets, new)), commit: list(zip(targets, old))}


def _own(owner, attr: str):
    """The tree's ``attr`` of a class (its own, or the one it inherits) or of a module."""
    if not isinstance(owner, type):
        return getattr(owner, attr)
    return next(c.__dict__[attr] for c in owner.__mro__ if attr in c.__dict__)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name")
    parser.add_argument("--against", required=True, help="the commit whose Python the tree is compared with")
    parser.add_argument("--kwargs", default="{}", help="JSON keyword arguments of the optimizer")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per side, after 2 warm-up steps")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    model = real_model.build(30, 16, "none", torch.device("cpu"))
    opt = create_optimizer(model, args.name, **json.loads(args.kwargs))
    sides = _sides(args.against, type(opt))
    ids = torch.randint(0, model.config.vocab_size, (4, 512), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        real_model.timed_train_step(model, opt, ids)
    capture, spent = opt._capture, [0.0]

    def timed_sink(*a):  # looks the sink (StreamedStep.take) up at each call: the swap reaches it
        start = time.perf_counter()
        try:
            return opt._streamed.take(*a)
        finally:
            spent[0] += time.perf_counter() - start

    capture.sink = timed_sink
    # Since 354f5ec the CPU's layer steps may wait in a queue that backward's end flushes (an autograd final
    # callback, bound when registered): timed too, so the work is all of it whichever side runs.
    end_of_backward = getattr(opt._streamed, "_end_of_backward", None)
    if end_of_backward is not None:
        def timed_end(*a):
            start = time.perf_counter()
            try:
                return end_of_backward(*a)
            finally:
                spent[0] += time.perf_counter() - start

        opt._streamed._end_of_backward = timed_end
    work = {side: [] for side in sides}
    names = list(sides)
    for i in range(args.steps):
        for side in names if i % 2 == 0 else names[::-1]:
            for (owner, attr), fn in sides[side]:
                setattr(owner, attr, fn)
            spent[0] = 0.0
            _, step = real_model.timed_train_step(model, opt, ids)
            work[side].append(1e3 * (spent[0] + step))
    for side, values in work.items():
        print(f"{side}: work per step median {statistics.median(values):.1f} ms "
              f"(each step: {' '.join(f'{v:.0f}' for v in values)})")


if __name__ == "__main__":
    main()
