"""What a streamed layer step costs when it starts cold, on SmolLM2's shapes (issue #16; docs/step_cost.md).

Two measurements, each alternating its cases in one process (the host drifts between processes):

1. ``ops.lorsum_rounds`` of one layer (T = 2048 tokens, r = 16) right after the previous call, after the
   process idled (``time.sleep``) or both threads spun on tiny ops for a while, and after a 64 MB sweep
   of memory, with and without the layer's X and S read back after it: whether a slow first call of a
   flush is the threads waking, its data leaving the cache, or everything else (code, Python objects).
2. One transformer block's seven layer steps as a flush of the CPU's queue runs them (last queued first),
   after a 64 MB sweep and a 2 ms pause: each layer's step prepared and run in turn
   (``LoRAOptimizer._one_layer_step``), against all prepared first, then all run
   (``StreamedStep.prepare``, what ``flush`` does).

    python tools/cold_layer_step.py [--reps 40]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lorsum_kernels import create_optimizer, ops
from lorsum_kernels.benchmark import real_model

T, R = 2048, 16


def _median_ms(times: list[float]) -> str:
    return f"{1e3 * statistics.median(times):.3f}"


def cold_rounds(reps: int) -> None:
    sweep = torch.empty(16 << 20)  # 64 MB, twice the L3
    tiny = torch.zeros(1 << 16)

    def spin_tiny(seconds: float) -> None:  # both threads busy on small parallel ops
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            tiny.add_(1.0)

    cases = [("back to back", lambda: None), ("idle 1 ms", lambda: time.sleep(1e-3)),
             ("idle 3 ms", lambda: time.sleep(3e-3)), ("idle 10 ms", lambda: time.sleep(1e-2)),
             ("threads busy 10 ms", lambda: spin_tiny(1e-2)), ("64 MB sweep", lambda: sweep.add_(1.0)),
             # the same sweep, then the layer's X and S read back into the cache: what the rest costs cold
             ("64 MB sweep, X and S read again", lambda: (sweep.add_(1.0), X.sum(), S.sum()))]
    for m, n in [(576, 576), (1536, 576), (576, 1536)]:
        X, S = torch.randn(T, n), torch.randn(T, m) * 1e-3
        A, B = torch.randn(1, R, n) * 0.1, torch.randn(1, m, R) * 0.1

        def call():
            return ops.lorsum_rounds((A, B), [(X.unsqueeze(0), S.unsqueeze(0).mT)], [1.0, -1e-3], 1e-4, 1)
        times = {name: [] for name, _ in cases}
        for _ in range(reps):
            for name, before in cases:
                call()
                before()
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
        print(f"lorsum_rounds {m}x{n} (ms, median of {reps}): "
              + ", ".join(f"{name} {_median_ms(t)}" for name, t in times.items()), flush=True)


def block_flush(reps: int) -> None:
    model = real_model.build(1, R, "none", torch.device("cpu"))
    opt = create_optimizer(model, "lorsum")
    ids = torch.randint(0, model.config.vocab_size, (4, 512), generator=torch.Generator().manual_seed(0))
    for _ in range(2):  # past the normalised step's first (measured) step
        real_model.timed_train_step(model, opt, ids)
    # The block's layers in backward order, with the inputs they share in the model shared here too.
    inputs: dict = {}
    queue = []
    for layer in reversed(opt._layers):
        kind = layer.name.rsplit(".", 1)[-1].split("[")[0]
        shared = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "gate_proj": "mlp", "up_proj": "mlp"}
        X = inputs.setdefault(shared.get(kind, kind), torch.randn(T, layer.in_features))
        queue.append((layer, opt._group_of(layer), X, torch.randn(T, layer.out_features) * 1e-3))
    order = queue[::-1]  # as flush runs them
    streamed = opt._streamed

    def in_turn():
        with torch.no_grad():
            return [opt._one_layer_step(group, layer, X, S) for layer, group, X, S in order]

    def prepared_first():
        with torch.no_grad():
            streamed.prepare(order)
            runs = [streamed.prepared.pop(id(layer)) for layer, *_ in order]
            return [run() for run in runs]

    sweep = torch.empty(16 << 20)
    times = {"each prepared and run in turn": [], "all prepared, then all run": []}
    for i in range(reps):
        cases = list(zip(times, (in_turn, prepared_first)))
        for name, fn in (cases if i % 2 else cases[::-1]):
            sweep.add_(1.0)
            time.sleep(2e-3)
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    diffs = [a - b for a, b in zip(*times.values())]
    print(f"one block's flush, {len(order)} layer steps (ms, median of {reps}): "
          + ", ".join(f"{name} {_median_ms(t)}" for name, t in times.items())
          + f"; paired difference {_median_ms(diffs)}, prepared first faster in {sum(d > 0 for d in diffs)}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=40)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    cold_rounds(args.reps)
    block_flush(args.reps)


if __name__ == "__main__":
    main()
