"""One layer's PSI-LoRA / Scaled PSI-LoRA step with momentum at SmolLM2 shapes (T=2048, r=16, k=1), timed with
torch.utils.benchmark: the figures in docs/step_cost.md, and the fused K-FAC metric's gain (scaled_mom against
scaled_mom_unfused). Usage: python tools/bench_psi_step.py LABEL"""
import sys

import torch
from torch.utils import benchmark
from lorsum_kernels.functional.lorsum_step import psi_lora_step, scaled_psi_lora_step
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
T, r = 2048, 16
rows = []
for n, m in ((576, 576), (576, 1536), (1536, 576)):
    X, S = torch.randn(1, T, n, generator=g), torch.randn(1, T, m, generator=g) / T
    A, B = torch.randn(1, r, n, generator=g) * 0.1, torch.randn(1, m, r, generator=g) * 0.1
    mom = (torch.randn(1, r, n, generator=g) * 0.1, torch.randn(1, m, r, generator=g) * 0.1)
    v = (torch.rand(1, n) + 0.5, torch.rand(1, m) + 0.5)
    fs = {
        "lorsum_mom": lambda: psi_lora_step(A, B, X, S, mom, lr=0.1, lmbd=1e-2, lmbd_momentum=1e-2, iters=1, momentum=0.9, dampening=0.0),
        "scaled_mom": lambda: scaled_psi_lora_step(A, B, X, S, v, mom, lr=0.1, lmbd=1e-2, min_lmbd=1e-5, iters=1, betas=(0.9, 0.999), damping=0.1, metric="kfac", metric_power=0.5, loss_reduction="mean"),
        # β2 as a tensor takes the unfused metric path (col_sq_sums, ema, effective_metric): the fused
        # kfac_metric_update's gain is scaled_mom_unfused − scaled_mom.
        "scaled_mom_unfused": lambda: scaled_psi_lora_step(A, B, X, S, v, mom, lr=0.1, lmbd=1e-2, min_lmbd=1e-5, iters=1, betas=(0.9, torch.tensor(0.999)), damping=0.1, metric="kfac", metric_power=0.5, loss_reduction="mean"),
    }
    for name, f in fs.items():
        t = benchmark.Timer("f()", globals={"f": f}).blocked_autorange(min_run_time=1.5)
        print(f"{sys.argv[1]} {name} m={m} n={n}: median {t.median*1e3:.2f} ms (IQR {t.iqr*1e3:.2f})", flush=True)
