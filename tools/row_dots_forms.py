"""The two forms of the CPU kernel ``row_dots`` (csrc/cpu/tiles.h) on the real-model benchmark's shapes, in
one process (issue #16; docs/step_cost.md).

``row_dots`` computes out = Y·Zᵀ (T×w) for the first pass of each LoRSum half-step (S·B̂ or X·Âᵀ). The dot
form sums 16 lanes per output and reduces them at the end; the broadcast form (fp32 rows, w ≥ 16) broadcasts
each Y[t][k] against a row of Zᵀ. This builds both from tiles.h into a small extension (torch's
``cpp_extension``, about a minute the first time), runs them as the half-steps do (64-row tasks over the
intra-op threads), alternating the forms over ``--rounds`` rounds, and prints each one's median time and
GFLOP/s per shape, with both results' largest difference from ``torch.mm``.

    python tools/row_dots_forms.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import pathlib
import statistics

import torch
from torch.utils import benchmark, cpp_extension

CSRC = pathlib.Path(__file__).resolve().parents[1] / "csrc" / "cpu"

SOURCE = r"""
#include <torch/extension.h>
#include "common.h"
#include "tiles.h"

namespace av = lorsum::cpu::avx512;

// out = Y·Zᵀ with `form` 0 (dot) or 1 (broadcast), over 64-row tasks as block_power.cpp runs row_dots.
void row_dots_form(const torch::Tensor& Y, const torch::Tensor& Z, const torch::Tensor& Zt,
                   torch::Tensor& out, int64_t form) {
  TORCH_CHECK(lorsum::cpu::avx512_enabled(), "needs AVX-512");
  const int64_t q = Y.size(0), K = Y.size(1), w = Z.size(0);
  const float* y = Y.data_ptr<float>();
  const float* z = Z.data_ptr<float>();
  const float* zt = Zt.data_ptr<float>();
  float* o = out.data_ptr<float>();
  lorsum::cpu::parallel_tasks((q + 63) / 64, 64 * K * w, [&](int64_t task) {
    const int64_t t0 = task * 64, rows = std::min<int64_t>(64, q - t0);
    if (form == 0) {
      av::row_dots_dot<float>(rows, w, K, y + t0 * K, K, z, K, o + t0 * w, w, 1.0f, nullptr);
    } else {
      av::row_dots_broadcast(rows, w, K, y + t0 * K, K, zt, w, o + t0 * w, w, 1.0f, nullptr);
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("row_dots_form", &row_dots_form); }
"""

FORMS = ("dot", "broadcast")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="alternations of the two forms per shape")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ext = cpp_extension.load_inline(
        "lorsum_row_dots_forms", cpp_sources=SOURCE, extra_include_paths=[str(CSRC)],
        extra_cflags=["-O3", "-std=c++20", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
    T = args.tokens
    print(f"row_dots, T = {T} fp32 rows, {args.threads} threads; "
          f"median ms over {args.rounds} alternated rounds")
    for w in (8, 16, 32):  # 8: below kBroadcastMinWidth, where row_dots keeps the dot form
        for K in (192, 576, 1536):
            Y, Z = torch.randn(T, K), torch.randn(w, K)
            Zt, out = Z.T.contiguous(), torch.empty(T, w)
            exact = Y.double() @ Z.double().T
            times = {form: [] for form in FORMS}
            errors = {}
            for _ in range(args.rounds):
                for f, form in enumerate(FORMS):
                    timer = benchmark.Timer("row_dots_form(Y, Z, Zt, out, f)", num_threads=args.threads,
                                            globals=dict(row_dots_form=ext.row_dots_form, Y=Y, Z=Z, Zt=Zt,
                                                         out=out, f=f))
                    times[form].append(timer.blocked_autorange(min_run_time=0.3).median)
                    errors[form] = float((out.double() - exact).abs().max() / exact.abs().max())
            flops = 2 * T * K * w
            medians = {form: statistics.median(times[form]) for form in FORMS}
            parts = [f"{form} {1e3 * medians[form]:.3f} ms ({flops / medians[form] / 1e9:.0f} GFLOP/s, "
                     f"max rel err {errors[form]:.1e})" for form in FORMS]
            print(f"  w = {w:2d}, K = {K:4d}: " + "; ".join(parts))


if __name__ == "__main__":
    main()
