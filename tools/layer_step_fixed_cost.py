"""A streamed layer step's rounds back to back on SmolLM2's layer shapes, from one token to a real step's 2048
(issue #16; docs/step_cost.md).

``ops.prepare_lorsum_rounds`` (LoRSum's one-layer path: one A-step from B0, one B-step, r = 16, fp32, as
the CPU's queue runs them) timed with ``torch.utils.benchmark`` per layer shape (m×n: q and o 576×576, k and
v 192×576, gate and up 1536×576, down 576×1536) and token count. At T = 1 the token products are nothing and
what is left is the step's fixed cost: the call, the r-wide algebra (Grams, anchor terms, transposes, the
r×r solves) and the result; at T = 2048 it prints the token products' flop bound beside the time (4·T·r·(m+n)
flops at the square-GEMM rate measured here). One block's fixed cost is the sum over its seven layers.

Compare two builds by running this with ``PYTHONPATH`` set to the other's source tree (built in place), one
process after the other, alternated: the host drifts between processes.

With ``--kfac``, ScaledLoRSum's rounds instead (``ops.prepare_kfac_lorsum_rounds``: the K-FAC statistics
summed in the A-step's passes, the EMA and the power, then the metric-scaled B-step).

    python tools/layer_step_fixed_cost.py [--tokens 1,64,2048] [--threads 2] [--kfac]
"""

from __future__ import annotations

import argparse

import torch
from torch.utils import benchmark

from lorsum_kernels import ops
from lorsum_kernels.benchmark.step_flops import gemm_flops_per_second

R = 16
# SmolLM2-135M's seven LoRA layers per block as (out m, in n), and how many of each shape.
BLOCK = {(576, 576): 2, (192, 576): 2, (1536, 576): 2, (576, 1536): 1}


def rounds_us(m: int, n: int, T: int, kfac: bool = False) -> float:
    g = torch.Generator().manual_seed(m * 7 + n + T)
    A = torch.randn(1, R, n, generator=g) * n**-0.5
    B = torch.randn(1, m, R, generator=g) * m**-0.5
    X = torch.randn(1, T, n, generator=g)
    S = torch.randn(1, T, m, generator=g) * 1e-3
    if kfac:  # ScaledLoRSum's defaults: β2 = 0.99, δ = 1e-5, p = 0.5, mean-reduced loss
        v_in, v_out = torch.rand(1, n, generator=g) + 0.5, torch.rand(1, m, generator=g) + 0.5
        run = ops.prepare_kfac_lorsum_rounds((A, B), [(X, S.mT)], [1.0, -1e-3], 1e-3, 1, v_in, v_out,
                                             0.99, 1e-5, 0.5, 1.0 / T, 1.0)
    else:
        run = ops.prepare_lorsum_rounds((A, B), [(X, S.mT)], [1.0, -1e-3], 1e-3, 1)
    timer = benchmark.Timer("run()", globals={"run": run}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=0.5).median * 1e6


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="1,64,2048", help="comma-separated token counts")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kfac", action="store_true", help="ScaledLoRSum's K-FAC rounds")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tokens = [int(t) for t in args.tokens.split(",")]
    # The real-model benchmark's rate: its bound's square product (T × hidden by hidden × hidden).
    rate = gemm_flops_per_second(2048, 576, 576, device=torch.device("cpu"), min_run_time=0.3)
    print(f"{'K-FAC ' if args.kfac else ''}rounds; square-GEMM rate {rate / 1e9:.1f} GFLOP/s, "
          f"{args.threads} threads, r = {R}")
    block = dict.fromkeys(tokens, 0.0)
    for (m, n), count in BLOCK.items():
        cells = []
        for T in tokens:
            us = rounds_us(m, n, T, args.kfac)
            block[T] += count * us
            cell = f"T={T}: {us:8.1f} us"
            if T >= 512:
                cell += f" (bound {4 * T * R * (m + n) / rate * 1e6:.1f})"
            cells.append(cell)
        print(f"{m:5d}x{n:<5d} " + "  ".join(cells))
    print("one block (7 layers): " + "  ".join(f"T={T}: {us / 1e3:.3f} ms" for T, us in block.items()))


if __name__ == "__main__":
    main()
