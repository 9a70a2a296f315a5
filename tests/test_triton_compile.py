"""Every Triton kernel compiled for real GPUs (sm_80, sm_90, sm_100) on this GPU-less machine.

What is compiled is what the launchers would launch on such a GPU. Each launcher runs on meta tensors
(shapes, dtypes and strides, no data) of the shape grid below, with the device boundary of
``triton_kernels._launch`` replaced: any device passes ``check_device``, ``target_of`` returns the
target's SM count (A100 108, H100 132, B200 148: the plans size their grids for them), and
``LaunchPlan.launch`` records the plan and the runtime arguments instead of launching. Each recorded
launch is specialised as Triton's JIT specialises it at a launch (an integer argument equal to 1 becomes a
constexpr, integers divisible by 16 and 16-byte aligned pointers get ``tt.divisibility = 16``, integers
beyond int32 are i64, except the arguments a kernel marks ``do_not_specialize``), so the contiguous views
compile with the vectorised loads and the pipelined shared-memory buffers a GPU would get. Many shapes
share a plan: each distinct (kernel, argument dtypes, plan, memory layout, target) compiles once,
specialised as the first (largest) grid point that reaches it, in parallel over the cores; Triton's own
cache (``~/.triton/cache``) makes repeated runs fast.

A compile error fails the test, and so does shared memory above the target's per-block limit (opt-in:
sm_80 163 KiB, sm_90 and sm_100 227 KiB). Registers and spills come from ``cuobjdump -res-usage`` on the
cubin (Triton ships the tool), which is what the driver would report as ``n_regs`` at load.

With ``LORSUM_TRITON_COMPILE_CSV=path`` the test writes one row per compiled kernel variant (shared
memory, registers, spills, the plan) to that file; bench/results/triton_compile.csv is that output:

    LORSUM_TRITON_COMPILE_CSV=bench/results/triton_compile.csv .venv/bin/python -m pytest -q \\
        tests/test_triton_compile.py

The interpreter replaces ``triton.jit`` functions, so this runs in the main test process only.
"""

from __future__ import annotations

import csv
import itertools
import multiprocessing
import os
import re
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
import torch

from lorsum_kernels import backends

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not backends.triton_available(), reason="triton is not importable"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") == "1",
                       reason="the interpreter replaces the kernels: compiled in the main test process"),
]

# name: (compute capability, SMs of the flagship part, shared memory per block with opt-in, bytes)
TARGETS = {
    "sm_80": (80, 108, 163 * 1024),
    "sm_90": (90, 132, 227 * 1024),
    "sm_100": (100, 148, 227 * 1024),
}
# Largest first: a variant is compiled as the first grid point that chose it specialises it.
SIDES = (11008, 4096, 1024, 64)  # m, n
RANKS = (128, 64, 16, 8)
TOKENS = (8192, 512, 1)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The r-wide factors and r×r Grams of spd_solve and tangent_energies come from the package in its math
# dtype (functional.* computes them in fp32); their kernels read other dtypes through the same code.
FACTOR_DTYPES = (torch.float32,)
# Every op with a kernel of its own (adaprelora_solve and the LoRSum half-steps launch spd_solve's).
OPS = ("col_sq_sums", "kfac_metric_update", "row_col_energies", "pair_products", "spd_solve",
       "tangent_energies", "finish_normalized_stacked", "adafactor_ema_scales")

_TRITON_TYPES = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _empty(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


def _calls(op: str):
    """(description, launcher call) for every point of the grid that ``op`` depends on. The data (X, S)
    take the grid's dtypes; what the package always passes in fp32 stays fp32: the K-FAC states v, the
    wide factors W and V of the token products, the factors and Grams of the r-wide ops."""
    from lorsum_kernels import triton_kernels as tk

    if op == "finish_normalized_stacked":  # the optimizer's factors in its math dtype, the statistics fp32
        shapes = [(11008, 4096), (64, 64)]
        for d, r, (m, n) in itertools.product((torch.float32, torch.float64), RANKS, shapes):
            yield f"L=3 r={r} m={m} n={n} {_TRITON_TYPES[d]}", lambda r=r, m=m, n=n, d=d: (
                tk.finish_normalized_stacked(*(_empty(3, *shape, dtype=d) for shape in [(r, n), (m, r)] * 2),
                                             _empty(3, dtype=d), _empty(3), _empty(3), _empty(3), 1e-3, 0.999))
        return
    if op == "adafactor_ema_scales":  # the states and step count in the math dtype, both β2 modes
        for d, fixed, (m, n) in itertools.product((torch.float32, torch.float64), (False, True),
                                                  [(11008, 4096), (64, 64)]):
            yield f"L=3 m={m} n={n} fixed={fixed} {_TRITON_TYPES[d]}", lambda d=d, fixed=fixed, m=m, n=n: (
                tk.adafactor_ema_scales(_empty(3, m, dtype=d), _empty(3, n, dtype=d), _empty(3, m, dtype=d),
                                        _empty(3, n, dtype=d), _empty(3, dtype=d), 0.999 if fixed else None,
                                        0.8, 1e-30, d, 1e-15))
        return
    dtypes = FACTOR_DTYPES if op in ("spd_solve", "tangent_energies") else DTYPES
    for d, m, n in itertools.product(dtypes, SIDES, SIDES):
        name = _TRITON_TYPES[d]
        if op == "col_sq_sums":
            for T in TOKENS:
                yield f"T={T} n={n} {name}", lambda T=T, n=n, d=d: tk.col_sq_sums(_empty(T, n, dtype=d))
        elif op == "kfac_metric_update":
            # The scalars (β, δ, the power, the scales) are run-time arguments: any values compile the same.
            for T in TOKENS:
                yield f"T={T} m={m} n={n} {name}", lambda T=T, m=m, n=n, d=d: tk.kfac_metric_update(
                    _empty(T, n, dtype=d), _empty(T, m, dtype=d), _empty(n), _empty(m),
                    0.9, 1e-8, 0.5, 1 / T, T)
                if d == torch.float32:  # β from device memory (the β2 warm-up), one per layer of a bucket
                    yield f"T={T} m={m} n={n} {name} beta tensor", lambda T=T, m=m, n=n: (
                        tk.kfac_metric_update(_empty(3, T, n), _empty(3, T, m), _empty(3, n), _empty(3, m),
                                              _empty(3), 1e-8, 0.5, 1 / T, T))
        elif op == "row_col_energies":
            for T in TOKENS:
                yield f"T={T} m={m} n={n} {name}", lambda T=T, m=m, n=n, d=d: tk.row_col_energies(
                    _empty(T, n, dtype=d), _empty(T, m, dtype=d))
        elif op == "pair_products":
            for T, r in itertools.product(TOKENS, RANKS):
                yield f"T={T} m={m} n={n} r={r} {name}", lambda T=T, m=m, n=n, r=r, d=d: tk.pair_products(
                    _empty(T, n, dtype=d), _empty(T, m, dtype=d).mT, _empty(m, r), _empty(r, n))
        elif op == "spd_solve":
            for r in RANKS:
                yield f"r={r} N={n} left {name}", lambda r=r, n=n, d=d: tk.spd_solve(
                    _empty(r, r, dtype=d), _empty(r, n, dtype=d))
                yield f"r={r} N={m} right {name}", lambda r=r, m=m, d=d: tk.spd_solve(
                    _empty(r, r, dtype=d), _empty(m, r, dtype=d), left=False)
        elif op == "tangent_energies":
            for r in RANKS:
                yield f"m={m} n={n} r={r} {name}", lambda r=r, m=m, n=n, d=d: tk.tangent_energies(
                    _empty(m, r, dtype=d), _empty(r, n, dtype=d), _empty(m, r, dtype=d),
                    _empty(r, n, dtype=d))


def _launches(op: str, sm_count: int) -> dict:
    """{compile key: (plan, signature, constexprs, attrs, first case)} of every launch of ``op`` over the
    grid, on a GPU with ``sm_count`` SMs."""
    from lorsum_kernels.triton_kernels import _launch

    recorded = []
    variants = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_launch, "check_device", lambda op, kernel, *tensors: tensors[0].device)
        mp.setattr(_launch, "target_of", lambda device, kernel: _launch.Target(sm_count))
        mp.setattr(_launch.LaunchPlan, "launch", lambda plan, *args: recorded.append((plan, args)))
        for case, call in _calls(op):
            recorded.clear()
            call()
            for plan, args in recorded:
                signature, constexprs, attrs = _specialise(plan, args)
                # The plan and the memory layout (the unit strides: kernels name strides stride_*), not
                # the sizes: a size specialised to 1 only drops a loop.
                layout = tuple(k for k, v in constexprs.items() if k.startswith("stride") and v == 1)
                key = (plan.kernel.fn.__module__, plan.kernel.fn.__name__,
                       tuple(t for t in signature.values() if t.startswith("*")),
                       tuple((k, str(v)) for k, v in plan.constexprs.items()), layout,
                       tuple(plan.options.items()))
                variants.setdefault(key, (plan, signature, constexprs, attrs, case))
    return variants


def _specialise(plan, args) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) of ``triton.compiler.ASTSource`` for this launch, as the JIT would
    specialise it (module docstring)."""
    signature, constexprs, attrs = {}, dict(plan.constexprs), {}
    runtime = iter(args)
    for i, param in enumerate(plan.kernel.params):
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            continue
        value = next(runtime)
        if isinstance(value, torch.Tensor):
            signature[param.name] = "*" + _TRITON_TYPES[value.dtype]
            divisible = value.data_ptr() % 16 == 0
        elif param.do_not_specialize:
            signature[param.name] = param.annotation_type or ("i32" if -2**31 <= value < 2**31 else "i64")
            divisible = False
        elif value == 1:
            signature[param.name] = "constexpr"
            constexprs[param.name] = 1
            continue
        else:
            signature[param.name] = "i32" if -2**31 <= value < 2**31 else "i64"
            divisible = value % 16 == 0
        if divisible:
            attrs[(i,)] = [["tt.divisibility", 16]]
    assert next(runtime, None) is None, f"{plan.kernel.__name__}: more arguments than parameters"
    return signature, constexprs, attrs


def _compile(module: str, name: str, signature: dict, constexprs: dict, attrs: dict, options: dict,
             arch: int) -> dict:
    """Compile one variant for sm_<arch>: its shared memory, registers and spills, or the error (a worker
    process returns it rather than raising: Triton's exceptions need not survive pickling)."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(module), name)
    try:
        src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as e:  # any compile error is a finding: report it with the variant
        return {"error": f"{type(e).__name__}: {str(e)[:1000]}"}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "-res-usage", cubin.name],
                               capture_output=True, text=True, check=True).stdout
    return {"shared_bytes": compiled.metadata.shared,
            "registers": int(re.search(r"REG:(\d+)", usage).group(1)),
            "spill_bytes": int(re.search(r"LOCAL:(\d+)", usage).group(1))}


@pytest.fixture(scope="module")
def compiled() -> dict:
    """{(op, target): [(where, result)]}: every variant of the grid, each distinct one compiled once, in
    parallel over the cores (fresh processes: a forked one would inherit torch's threads)."""
    per_test, jobs, rows = {}, {}, {}
    for op, (target, (arch, sm_count, _)) in itertools.product(OPS, TARGETS.items()):
        per_test[op, target] = []
        for key, (plan, signature, constexprs, attrs, case) in _launches(op, sm_count).items():
            where = (f"{plan.kernel.__name__} for {target} ({case}; {plan.num_warps} warps, "
                     f"{plan.num_stages} stages)")
            per_test[op, target].append((where, (key, arch)))
            if (key, arch) not in jobs:
                jobs[key, arch] = (key[0], key[1], signature, constexprs, attrs, plan.options, arch)
                rows[key, arch] = {
                    "kernel": plan.kernel.__name__, "target": target, "first_case": case,
                    "signature": " ".join(t for t in signature.values() if t != "constexpr"),
                    "constexprs": " ".join(f"{k}={v}" for k, v in constexprs.items()),
                    "num_warps": plan.num_warps, "num_stages": plan.num_stages,
                    "shared_limit_bytes": TARGETS[target][2],
                }
    with ProcessPoolExecutor(os.cpu_count(), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {job: pool.submit(_compile, *args) for job, args in jobs.items()}
        results = {job: future.result() for job, future in futures.items()}
    out = os.environ.get("LORSUM_TRITON_COMPILE_CSV")
    if out:
        import triton

        fields = ["kernel", "target", "first_case", "signature", "constexprs", "num_warps", "num_stages",
                  "shared_bytes", "shared_limit_bytes", "registers", "spill_bytes", "error", "triton"]
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            for job in sorted(rows, key=lambda j: tuple(str(rows[j][k]) for k in fields[:5])):
                writer.writerow({**rows[job], **results[job], "triton": triton.__version__})
    return {test: [(where, results[job]) for where, job in variants] for test, variants in per_test.items()}


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("op", OPS)
def test_kernels_compile_within_the_target(op, target, compiled):
    limit = TARGETS[target][2]
    variants = compiled[op, target]
    assert variants, f"{op}: no launch recorded over the grid"
    failures = [f"{where}: {result['error']}" for where, result in variants if "error" in result]
    failures += [f"{where}: {result['shared_bytes']} B of shared memory, above {limit} B"
                 for where, result in variants if result.get("shared_bytes", 0) > limit]
    assert not failures, "\n".join(failures)
