"""One-layer timings behind docs/step_cost.md (issue #16), each an in-process comparison (this host drifts
±10–20% between processes), one LoRA layer at SmolLM2's shapes, T = 2048 tokens, r = 16:

* ``kernels``: the native half-steps (ops.lorsum_update_in / _out) with X and S in cache against evicted
  first (96 MiB written between calls), next to their flop bound at torch's square-GEMM rate.
* ``metric``: a ScaledLoRSum layer step at its defaults with the fused ``kfac_metric_update`` against the
  composite path (statistics, EMA, power) that a per-layer β2 tensor takes, alternated in rounds.
* ``sb0``: the A-step from a given T×r product ``S·B0`` (what autograd hands the layer's ``lora_A``
  output) with torch's ``Gᵀ·X`` and the composite half-step, against the native A-step, data evicted.
* ``fixed``: the native half-steps at T = 8 (torch.utils.benchmark, warm): what a half-step costs besides its
  token passes (the r-wide Grams and anchor terms, the r×r solve, the call itself), per layer shape; and
  ScaledLoRSum's fused first A-step (``kfac_lorsum_update_in``: the metric's EMA and power on top).
* ``rounds`` / ``rounds_kfac``: a layer step's rounds as the CPU's queue runs them
  (``ops.prepare_lorsum_rounds``, or ScaledLoRSum's ``prepare_kfac_lorsum_rounds``: one A-step from B0, one
  B-step) back to back, per SmolLM2 layer shape (k and v 192×576 too) at T = 1, 64 and 2048, and one block's
  seven layers summed: at T = 1 what is left is the fixed cost (the call, the r-wide algebra, the r×r
  solves); at T = 2048 the token products' flop bound is printed beside it. Compare two builds by running
  it with ``PYTHONPATH`` on the other's source tree (built in place), alternated.
* ``kfac_fold``: ScaledLoRSum's metric step and ALS round on one layer, data evicted first:
  ``kfac_lorsum_update_in`` (the K-FAC statistics summed in the A-step's passes) then the B-step, against
  ``kfac_metric_update``, ``lorsum_update_in`` and the B-step, alternated in rounds; ``kfac_fold_7b`` the
  same at a 7B model's shapes (hidden 4096, MLP 11008) and T = 512.
* ``after_gemm``: what a call costs where the streamed step runs it, right after a layer's GEMM (a
  2048×576 by 576×1536 fp32 product, as gate/up's backward): the first tiny torch op, and the native
  A-step at T = 1, 32 and 2048 (first, second and third call after the GEMM, and warm), per call; then the
  first and second call of each after other things than a GEMM (64 MiB written: the caches evicted, no
  threads involved; 2 ms asleep: the intra-op threads idle, nothing evicted), which tell the two apart.

    python tools/layer_step_ab.py \
        kernels|metric|sb0|fixed|rounds|rounds_kfac|kfac_fold|kfac_fold_7b|after_gemm
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

import lorsum_kernels as lk
from lorsum_kernels import ops
from lorsum_kernels.benchmark.step_flops import gemm_flops_per_second
from lorsum_kernels.lora import LoRALinear

SHAPES = [(576, 576), (1536, 576), (576, 1536)]  # (m, n): q/o, gate/up, down
T, R = 2048, 16


def _median_ms(fn, rounds: int, evict: torch.Tensor | None = None) -> float:
    times = []
    for i in range(rounds):
        if evict is not None:
            evict.add_(1.0)
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def kernels() -> None:
    evict = torch.randn(96 * 2**20 // 4)
    rate = gemm_flops_per_second(2048, 2048, 2048, device=torch.device("cpu"))
    for m, n in SHAPES:
        X, S = [torch.randn(1, T, n) for _ in range(4)], [torch.randn(1, T, m) for _ in range(4)]
        A, B = torch.randn(1, R, n) * 0.01, torch.randn(1, m, R) * 0.01
        for side, op, hat in (("in", ops.lorsum_update_in, B), ("out", ops.lorsum_update_out, A)):
            def run(i):
                op(hat, (A, B), [(X[i % 4], S[i % 4].mT)], [1.0, -0.1], 0.01)
            warm, cold = _median_ms(run, 25), _median_ms(run, 25, evict)
            print(f"{m}x{n} {side}-step: in cache {warm:.2f} ms, evicted {cold:.2f} ms, "
                  f"flop bound {1e3 * 2 * T * R * (m + n) / rate:.2f} ms")


def metric() -> None:
    step_module = sys.modules["lorsum_kernels.functional.lorsum_step"]
    fused = step_module._one_host_value
    paths = {"fused": fused, "composite": lambda beta: None if isinstance(beta, torch.Tensor) else beta}
    for m, n in SHAPES:
        model = torch.nn.Sequential(LoRALinear(torch.nn.Linear(n, m, bias=False), r=R))
        opt = lk.ScaledLoRSum(model)
        layer = opt._layers[0]
        group = opt._group_of(layer)
        X, S = torch.randn(T, n), torch.randn(T, m) * 1e-3
        out = {name: [] for name in paths}
        for rnd in range(12):
            name = "fused" if rnd % 2 == 0 else "composite"
            step_module._one_host_value = paths[name]
            with torch.no_grad():
                out[name].append(_median_ms(
                    lambda i: opt._compute_bucket(group, [layer], [(X, S)], grads_from_data=True), 20))
        step_module._one_host_value = fused
        print(f"{m}x{n} ScaledLoRSum layer step: " + ", ".join(
            f"{name} {statistics.median(v):.2f} ms" for name, v in out.items()))


def sb0() -> None:
    evict = torch.randn(96 * 2**20 // 4)
    for m, n in SHAPES:
        X, S = [torch.randn(1, T, n) for _ in range(4)], [torch.randn(1, T, m) for _ in range(4)]
        A, B = torch.randn(1, R, n) * 0.01, torch.randn(1, m, R) * 0.01
        G = [s @ B for s in S]

        def native(i):
            ops.lorsum_update_in(B, (A, B), [(X[i % 4], S[i % 4].mT)], [1.0, -0.1], 0.01)

        def from_sb0(i):
            ops.lorsum_update_with_token_product("in", B, (A, B), [], [1.0], 0.01, None,
                                                 -0.1 * (G[i % 4].mT @ X[i % 4]))
        print(f"{m}x{n} A-step, data evicted: native {_median_ms(native, 21, evict):.2f} ms, "
              f"from S·B0 {_median_ms(from_sb0, 21, evict):.2f} ms")


def fixed() -> None:
    from torch.utils import benchmark

    for m, n in SHAPES:
        X, S = torch.randn(1, 8, n), torch.randn(1, 8, m)
        A, B = torch.randn(1, R, n) * 0.01, torch.randn(1, m, R) * 0.01
        times = {}
        for side, op, hat in (("in", ops.lorsum_update_in, B), ("out", ops.lorsum_update_out, A)):
            timer = benchmark.Timer("op(hat, (A, B), [(X, S.mT)], [1.0, -0.1], 0.01)",
                                    globals=dict(op=op, hat=hat, A=A, B=B, X=X, S=S))
            times[side] = 1e6 * timer.blocked_autorange(min_run_time=1.0).median
        v_in, v_out = torch.rand(1, n), torch.rand(1, m)
        timer = benchmark.Timer(
            "ops.kfac_lorsum_update_in(B, (A, B), [(X, S.mT)], [1.0, -0.1], 0.01, v_in, v_out, *kfac)",
            globals=dict(ops=ops, A=A, B=B, X=X, S=S, v_in=v_in, v_out=v_out, kfac=(0.99, 1e-5, 0.5, 1 / 8, 8.0)))
        times["kfac"] = 1e6 * timer.blocked_autorange(min_run_time=1.0).median
        print(f"{m}x{n} half-steps at T = 8: A-step {times['in']:.1f} us, B-step {times['out']:.1f} us, "
              f"fused K-FAC A-step {times['kfac']:.1f} us")


# SmolLM2-135M's seven LoRA layers per block as (out m, in n), and how many of each shape.
BLOCK = {(576, 576): 2, (192, 576): 2, (1536, 576): 2, (576, 1536): 1}


def rounds(kfac: bool = False, tokens=(1, 64, T)) -> None:
    from torch.utils import benchmark

    rate = gemm_flops_per_second(T, 576, 576, device=torch.device("cpu"), min_run_time=0.3)
    print(f"{'K-FAC ' if kfac else ''}rounds; square-GEMM rate {rate / 1e9:.1f} GFLOP/s, r = {R}")
    block = dict.fromkeys(tokens, 0.0)
    for (m, n), count in BLOCK.items():
        cells = []
        for t in tokens:
            g = torch.Generator().manual_seed(m * 7 + n + t)
            A, B = torch.randn(1, R, n, generator=g) * n**-0.5, torch.randn(1, m, R, generator=g) * m**-0.5
            X, S = torch.randn(1, t, n, generator=g), torch.randn(1, t, m, generator=g) * 1e-3
            if kfac:  # ScaledLoRSum's defaults: β2 = 0.99, δ = 1e-5, p = 0.5, mean-reduced loss
                v_in, v_out = torch.rand(1, n, generator=g) + 0.5, torch.rand(1, m, generator=g) + 0.5
                run = ops.prepare_kfac_lorsum_rounds((A, B), [(X, S.mT)], [1.0, -1e-3], 1e-3, 1, v_in, v_out,
                                                     0.99, 1e-5, 0.5, 1.0 / t, 1.0)
            else:
                run = ops.prepare_lorsum_rounds((A, B), [(X, S.mT)], [1.0, -1e-3], 1e-3, 1)
            timer = benchmark.Timer("run()", globals={"run": run}, num_threads=torch.get_num_threads())
            us = timer.blocked_autorange(min_run_time=0.5).median * 1e6
            block[t] += count * us
            cells.append(f"T={t}: {us:8.1f} us" + (f" (bound {4 * t * R * (m + n) / rate * 1e6:.1f})"
                                                    if t >= 512 else ""))
        print(f"{m:5d}x{n:<5d} " + "  ".join(cells))
    print("one block (7 layers): " + "  ".join(f"T={t}: {us / 1e3:.3f} ms" for t, us in block.items()))


def kfac_fold(shapes=SHAPES, T=T) -> None:
    evict = torch.randn(96 * 2**20 // 4)
    for m, n in shapes:
        X, S = [torch.randn(1, T, n) for _ in range(4)], [torch.randn(1, T, m) * 1e-3 for _ in range(4)]
        A, B = torch.randn(1, R, n) * 0.01, torch.randn(1, m, R) * 0.01
        v_in, v_out = torch.rand(1, n), torch.rand(1, m)
        kfac = (0.99, 1e-5, 0.5, 1.0 / T, float(T))

        def fused(i):
            pairs = [(X[i % 4], S[i % 4].mT)]
            A_new, _, _, m_in, m_out = ops.kfac_lorsum_update_in(B, (A, B), pairs, [1.0, -0.1], 0.01, v_in,
                                                                 v_out, *kfac)
            ops.lorsum_update_out(A_new, (A, B), pairs, [1.0, -0.1], 0.01, (m_in, m_out))

        def separate(i):
            pairs = [(X[i % 4], S[i % 4].mT)]
            _, _, m_in, m_out = ops.kfac_metric_update(X[i % 4], S[i % 4], v_in, v_out, *kfac)
            A_new = ops.lorsum_update_in(B, (A, B), pairs, [1.0, -0.1], 0.01, (m_in, m_out))
            ops.lorsum_update_out(A_new, (A, B), pairs, [1.0, -0.1], 0.01, (m_in, m_out))

        out = {"fused": [], "separate": []}
        for rnd in range(10):
            name = "fused" if rnd % 2 == 0 else "separate"
            out[name].append(_median_ms(fused if name == "fused" else separate, 9, evict))
        print(f"{m}x{n} metric + ALS round, data evicted: " + ", ".join(
            f"{name} {statistics.median(v):.2f} ms" for name, v in out.items()))


def after_gemm() -> None:
    a, b, out = torch.randn(2048, 576), torch.randn(576, 1536), torch.empty(2048, 1536)
    m = n = 576
    tiny = torch.randn(16)

    def calls_after_gemm(fn, calls: int, rounds: int = 60) -> list[float]:
        times = [[] for _ in range(calls + 1)]
        for _ in range(rounds):
            torch.matmul(a, b, out=out)
            for k in range(calls):
                start = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - start)
        for _ in range(rounds):
            start = time.perf_counter()
            fn()
            times[calls].append(time.perf_counter() - start)
        return [1e6 * statistics.median(t) for t in times]

    first, *_, warm = calls_after_gemm(lambda: tiny.mul(2), 2)
    print(f"a 16-element torch op: first after the GEMM {first:.0f} us, warm {warm:.0f} us")
    for tokens in (1, 32, 2048):
        X, S = torch.randn(1, tokens, n), torch.randn(1, tokens, m)
        A, B = torch.randn(1, R, n) * 0.01, torch.randn(1, m, R) * 0.01
        t = calls_after_gemm(lambda: ops.lorsum_update_in(B, (A, B), [(X, S.mT)], [1.0, -0.1], 0.01), 3)
        print(f"native A-step 576x576, T = {tokens}: after the GEMM 1st {t[0]:.0f}, 2nd {t[1]:.0f}, "
              f"3rd {t[2]:.0f} us; warm {t[3]:.0f} us")
    big = torch.empty(16 << 20)
    X, S = torch.randn(1, 1, n), torch.randn(1, 1, m)
    A, B = torch.randn(1, R, n) * 0.01, torch.randn(1, m, R) * 0.01
    calls = {"a 16-element torch op": lambda: tiny.mul(2),
             "the native A-step at T = 1": lambda: ops.lorsum_update_in(B, (A, B), [(X, S.mT)], [1.0, -0.1], 0.01)}
    for before, prepare in (("64 MiB written", lambda: big.fill_(1.0)), ("2 ms asleep", lambda: time.sleep(2e-3))):
        for name, fn in calls.items():
            times = [[], []]
            for _ in range(60):
                prepare()
                for k in range(2):
                    start = time.perf_counter()
                    fn()
                    times[k].append(time.perf_counter() - start)
            first, second = (1e6 * statistics.median(t) for t in times)
            print(f"{name} after {before}: 1st {first:.0f} us, 2nd {second:.0f} us")


if __name__ == "__main__":
    torch.set_num_threads(2)
    modes = {"kernels": kernels, "metric": metric, "sb0": sb0, "fixed": fixed, "rounds": rounds,
             "rounds_kfac": lambda: rounds(kfac=True), "kfac_fold": kfac_fold,
             "kfac_fold_7b": lambda: kfac_fold([(11008, 4096), (4096, 11008), (4096, 4096)], 512),
             "after_gemm": after_gemm}
    modes[sys.argv[1]]()
