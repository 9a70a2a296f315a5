"""One benchmark per op: each case of the shared case list on every backend present, timed by pytest-benchmark.

The cases are ``lorsum_kernels.benchmark.ops_suite``'s full grid, the list ``lorsum-bench`` times too: the
hot-path ops (LoRSum's half-steps, the batched r×r solve, the column sums of squares, the row/column
energies of G = SᵀX, the fused K-FAC metric step, both token products of one pass, AdaPreLoRA's factor
solve and its surrogate energies) and the steps built on them (one LoRSum call with k = 0 and 1, PSI-LoRA's
step and Scaled PSI-LoRA's K-FAC step, k = 1), at realistic sizes, fp32 and bf16 X and S.

``test_<op>`` for each op, parametrized over its cases, the devices present (the CPU; a CUDA GPU when there
is one) and the backends the dispatcher runs there (``Case.backends``: native when built, Triton on a GPU
when importable, the torch reference always and first; for the steps also ``torch.compile`` of the
reference). A backend that is missing is not collected. The first call runs before the timed rounds
(Triton compiles, ``torch.compile`` traces); on a GPU each round synchronizes. Each test appends a row to
bench/results/lorsum_bench.csv (``conftest.record``: the schema of ``lorsum_kernels.benchmark.results``).

    .venv/bin/python -m pytest bench/bench_ops.py --benchmark-only -q                  # everything
    .venv/bin/python -m pytest bench/bench_ops.py::test_spd_solve --benchmark-only -q  # one op
    .venv/bin/python -m pytest bench/bench_ops.py -k "cpu and float32" --benchmark-only -q
"""

from __future__ import annotations

import pytest
import torch

from lorsum_kernels.benchmark.ops_suite import OPS, SPECS, case_list

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
_last: dict = {}  # the last built case: a case's backends run one after another on the same inputs


def _built(case, device: str):
    if (case, device) not in _last:
        _last.clear()
        _last[case, device] = case.build(device)
    return _last[case, device]


def _benchmark(op: str):
    params = [pytest.param(case, device, backend, id=f"{case.id}-{device}-{backend}")
              for case in case_list("full", ops=[op]) for device in DEVICES
              for backend in case.backends(device, compile=True)]

    @pytest.mark.parametrize("case,device,backend", params)
    def test(benchmark, record, case, device, backend):
        built, device = _built(case, device), torch.device(device)

        def call():
            built(backend)
            if device.type == "cuda":
                torch.cuda.synchronize()  # a launch returns before the kernel ends

        call()  # compiles (Triton, torch.compile) and allocates outside the timed rounds
        benchmark.group = f"{op} {case.config} {device.type}"
        benchmark.pedantic(call, rounds=case.spec.rounds if device.type == "cpu" else 20, warmup_rounds=1)
        record(case, backend, device, built.floor_bytes)

    test.__name__ = test.__qualname__ = f"test_{op}"
    test.__doc__ = SPECS[op].build.__doc__
    return test


for _op in OPS:
    globals()[f"test_{_op}"] = _benchmark(_op)
