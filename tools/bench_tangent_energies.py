"""Native CPU ``tangent_energies`` against the torch reference, the timing behind the README's Limits entry.

Prints the median of ``torch.utils.benchmark`` blocked runs (at least 1 s) per case and backend, for the
shapes AdaPreLoRA's surrogate statistics meet: (L layers, m, n, r). Run by hand, printed, not appended:
``.venv/bin/python tools/bench_tangent_energies.py``.
"""

from __future__ import annotations

import torch
from torch.utils.benchmark import Timer

from lorsum_kernels import ops

CASES = [(1, 11008, 4096, 16), (1, 4096, 4096, 16), (1, 576, 576, 16), (30, 576, 576, 16),
         (30, 1536, 576, 16), (4, 4096, 4096, 16), (8, 1024, 1024, 8), (8, 1024, 1024, 64)]


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for L, m, n, r in CASES:
        B, F = torch.randn(L, m, r), torch.randn(L, m, r)
        E, A = torch.randn(L, r, n), torch.randn(L, r, n)
        ms = {}
        for backend in ("native", "torch"):
            timer = Timer("ops.tangent_energies(B, E, F, A, backend=backend)",
                          globals=dict(ops=ops, B=B, E=E, F=F, A=A, backend=backend))
            ms[backend] = 1e3 * timer.blocked_autorange(min_run_time=1).median
        print(f"L={L:<3} m={m:<6} n={n:<5} r={r:<3} native {ms['native']:8.2f} ms   torch {ms['torch']:8.2f} ms"
              f"   native/torch {ms['native'] / ms['torch']:.1f}x")


if __name__ == "__main__":
    main()
