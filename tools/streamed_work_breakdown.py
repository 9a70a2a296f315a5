"""Where a streamed optimizer's step work goes inside backward, on the real-model benchmark's SmolLM2 model
(issue #16; ``benchmark/real_model.build``: LoRA r=16 on all seven linear modules, 4 × 512 random tokens).

The streamed layer steps (``StreamedStep.run``, the whole per-layer step in backward; a queue's steps are
prepared together first, ``StreamedStep.prepare``, and counted in the streamed total) and the native ops they
call are wrapped with ``time.perf_counter``; per step it prints the forward + backward time, ``step()`` and
each wrapped part's total over the 210 layers (ms), and at the end the median of the work (layer steps +
``step()``). The wrappers cost some time of their own, and the host drifts ±10–20% between processes here:
compare two versions of the code by alternating them in one process, not by two runs of this tool.

Over the timed steps it then prints, per layer shape: each half-step op's median time per call against
its flop bound (its token products at the square-GEMM rate measured at the end), and the median layer step
that ran first in a flush of the CPU's queue (right after the layer GEMMs of backward) against those that
ran after another layer's step (and of it, the rounds call's).

With ``--profile-step`` one more step follows, its ``step()`` under ``torch.profiler``: the top ops by self
time, and the parts of ``step()`` (the streamed results' collection, the normalised step's finish, the writes)
by total time.

    python tools/streamed_work_breakdown.py lorsum [--kwargs '{"momentum": 0.9}'] [--steps 5] [--profile-step]
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import time
from collections import defaultdict

import torch

from lorsum_kernels import create_optimizer, ops
from lorsum_kernels.benchmark import real_model
from lorsum_kernels.benchmark.step_flops import gemm_flops_per_second
from lorsum_kernels.optim import base, guards

TIMED_OPS = ("lorsum_update_in", "lorsum_update_out", "lorsum_rounds", "kfac_lorsum_rounds",
             "lorsum_update_with_token_product", "pair_products", "kfac_metric_update", "kfac_lorsum_update_in")
PREPARED_OPS = ("prepare_lorsum_rounds", "prepare_kfac_lorsum_rounds")  # the one-layer paths' rounds
STREAMED = "streamed layer steps (the whole per-layer step)"
PREPARED = "of which the queues' preparation"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name")
    parser.add_argument("--kwargs", default="{}", help="JSON keyword arguments of the optimizer")
    parser.add_argument("--steps", type=int, default=5, help="timed steps, after 2 warm-up steps")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile-step", action="store_true", help="profile step() of one more step")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = real_model.build(30, 16, "none", torch.device("cpu"))
    opt = create_optimizer(model, args.name, **json.loads(args.kwargs))
    spent = collections.defaultdict(float)
    per_call = defaultdict(list)  # (op, m, n) -> seconds per call, timed steps only
    per_layer = defaultdict(list)  # (first in its flush, m, n) -> seconds per layer step, timed steps only
    rounds_first = defaultdict(list)  # (first in its flush, m, n) -> seconds per (kfac_)lorsum_rounds call
    timing = {"on": False, "first": True}

    def timed(fn, key):
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[key] += time.perf_counter() - start
                if timing["on"] and key.endswith("lorsum_rounds"):  # ((A0, B0), pairs, coeffs, lmbd, iters, ..)
                    (A0, B0), iters = a[0], a[4]
                    halves = 2 * max(iters, 1) - (k.get("first_A") is not None)
                    per_call[(key, B0.shape[-2], A0.shape[-1], A0.shape[-2], halves)].append(
                        time.perf_counter() - start)
                    rounds_first[(timing["first"], B0.shape[-2], A0.shape[-1])].append(time.perf_counter() - start)
                elif timing["on"] and len(a) > 1 and isinstance(a[1], tuple):  # (hat, (A0, B0), ...)
                    w = a[0].shape[-1] if "update_in" in key else a[0].shape[-2]  # B̂ (m×w) or Â (w×n)
                    shape = (a[1][1].shape[-2], a[1][0].shape[-1])
                    per_call[(key, *shape, w, 1)].append(time.perf_counter() - start)
        return wrapper

    def timed_prepared(prepare, key):
        """``prepare`` (an ``ops.prepare_*`` function), its prepared function timed as the op ``key`` with
        the arguments it was prepared with."""
        def wrapper(*a, **k):
            prepared = prepare(*a, **k)
            return lambda: timed(lambda *_, **__: prepared(), key)(*a, **k)
        return wrapper

    def timed_prepare(prepare_queue):
        def wrapper(queue):
            start = time.perf_counter()
            try:
                return prepare_queue(queue)
            finally:
                spent[STREAMED] += time.perf_counter() - start
                spent[PREPARED] += time.perf_counter() - start
        return wrapper

    def timed_run(run):
        def wrapper(layer, *a):
            start = time.perf_counter()
            try:
                return run(layer, *a)
            finally:
                spent[STREAMED] += time.perf_counter() - start
                key = (timing["first"], layer.out_features, layer.in_features)
                per_layer[key].append(time.perf_counter() - start)
                timing["first"] = False
        return wrapper

    def marked_flush(flush):
        def wrapper():
            timing["first"] = True
            return flush()
        return wrapper

    for name in TIMED_OPS:
        setattr(ops, name, timed(getattr(ops, name), name))
    for name in PREPARED_OPS:
        setattr(ops, name, timed_prepared(getattr(ops, name), name.removeprefix("prepare_")))
    # The optimizers check the data and the results through these names in optim.base.
    base.finite_once = timed(guards.finite_once, "finite checks of X and S")
    base.finite_rows_of = timed(guards.finite_rows_of, "finite checks of the results")
    ids = torch.randint(0, model.config.vocab_size, (4, 512), generator=torch.Generator().manual_seed(0))
    work = []
    for i in range(2 + args.steps):
        capture = getattr(opt, "_capture", None)
        if i == 2 and capture is not None and capture.sink is not None:  # capture="auto" streams from step 2 on
            opt._streamed.run = timed_run(opt._streamed.run)
            opt._streamed.prepare = timed_prepare(opt._streamed.prepare)
            opt._streamed.flush = marked_flush(opt._streamed.flush)
        timing["on"] = i >= 2
        spent.clear()
        fwd_bwd, step = real_model.timed_train_step(model, opt, ids)
        parts = "  ".join(f"{k} {1e3 * v:.0f}" for k, v in sorted(spent.items()))
        print(f"step {i}: fwd+bwd {fwd_bwd:.2f} s, step() {1e3 * step:.0f} ms; {parts}", flush=True)
        if i >= 2:
            work.append(1e3 * (spent[STREAMED] + step))
    if work:
        print(f"work (streamed layer steps + step()): median {statistics.median(work):.0f} ms over {len(work)} steps")
    rate = gemm_flops_per_second(2048, 2048, 2048, device=torch.device("cpu"))
    print(f"per call over the timed steps (square-GEMM rate {rate / 1e9:.1f} GFLOP/s; bound: the call's "
          "token products, 2·T·w·(m+n) flops per half-step, w the r-wide operand's width; (kfac_)lorsum_rounds: "
          "its half-steps)")
    T = ids.numel()
    for (name, m, n, w, halves), times in sorted(per_call.items()):
        bound = halves * 2 * T * w * (m + n) / rate
        med = statistics.median(times)
        print(f"  {name} {m}x{n}: {len(times)} calls, median {1e3 * med:.3f} ms, bound {1e3 * bound:.3f} ms, "
              f"{med / bound:.2f}x")
    for m, n in sorted({key[1:] for key in per_layer}):
        first, later = per_layer.get((True, m, n), []), per_layer.get((False, m, n), [])
        cell = lambda t: f"{1e3 * statistics.median(t):.3f} ms ({len(t)})" if t else "-"
        print(f"  layer step {m}x{n}: first in its flush {cell(first)}, "
              f"after another layer's step {cell(later)}")
        if (True, m, n) in rounds_first:
            print(f"    of which the rounds call: first in its flush {cell(rounds_first[(True, m, n)])}, "
                  f"after another layer's step {cell(rounds_first.get((False, m, n), []))}")
    if args.profile_step:
        _profile_step(model, opt, ids)


def _labelled(fn, label: str):
    def wrapper(*a, **k):
        with torch.profiler.record_function(label):
            return fn(*a, **k)
    return wrapper


def _profile_step(model, opt, ids) -> None:
    """One more step, its ``step()`` profiled: top ops by self time; the labelled parts by total time."""
    streamed = getattr(opt, "_streamed", None)
    if streamed is not None:
        streamed.collect = _labelled(streamed.collect, "step: collect the streamed results")
    for attr, label in (("_finish_normalized", "step: normalised step's finish"),
                        ("_update_clip", "step: max_update_norm"), ("_write_bucket", "step: write a bucket")):
        if hasattr(opt, attr):
            setattr(opt, attr, _labelled(getattr(opt, attr), label))
    model(input_ids=ids, labels=ids).loss.backward()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    opt.zero_grad()
    averages = prof.key_averages()
    print(averages.table(sort_by="self_cpu_time_total", row_limit=15))
    for event in sorted((e for e in averages if e.key.startswith("step: ")), key=lambda e: -e.cpu_time_total):
        print(f"  {event.key}: {event.count} calls, {event.cpu_time_total / 1e3:.1f} ms in all")


if __name__ == "__main__":
    main()
