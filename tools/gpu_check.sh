#!/usr/bin/env bash
# One command for a machine with a CUDA GPU (issue #13): build, test, benchmark and profile the CUDA and
# Triton paths, and leave every log, CSV and plot under $OUT.
#
#   OUT=/some/folder bash tools/gpu_check.sh        (OUT defaults to ./gpu-check-<UTC time>)
#
# Expects the packages DEVELOPERS.md names for GPU machines to be installed already (torch with CUDA,
# triton, nvcc, pytest, pytest-benchmark, ninja, transformers, peft, accelerate) and needs no internet.
# Stages, each with its own time limit and log ($OUT/<stage>.log), run in order; a failed stage does not
# stop the later ones (the run collects everything it can), but makes the exit status 1:
#
#   env        nvidia-smi, the versions, torch.cuda.is_available()            (refuses to go on without a GPU)
#   build      pip install --no-build-isolation --no-deps -e . : the extension with its CUDA kernels,
#              for this GPU's architecture (torch's default without TORCH_CUDA_ARCH_LIST); fails when
#              setup.py fell back to a CPU-only build
#   tests      pytest -m "cuda or triton": the native-cuda parameters of tests/ops (the CUDA kernels against
#              the reference), its triton parameters compiled on this GPU, the CUDA memory figures of
#              lorsum-bench; JUnit XML in $OUT. test_triton_compile.py is left out: it compiles for GPUs
#              other than this one, and `make test` runs it on any machine
#   bench      lorsum-bench --grid quick (every op, every backend, fp32 and bf16): $OUT/bench/lorsum_bench.csv
#              and one PNG per op
#   memory     lorsum-bench --memory on the GPU (torch.cuda.max_memory_allocated per step, every default
#              optimizer) with allocator snapshots: $OUT/bench/memory.csv, $OUT/snapshots/*.pickle
#   graph      tools/cuda_graph_check.py: which optimizers' step() a CUDA graph captures, and whether a
#              replay equals an eager step: $OUT/cuda_graph.csv
#   step       the training step at 7B shapes on the GPU (issue #16): lorsum-bench --memory --model
#              llama7b-blocks (two Llama blocks, hidden 4096, MLP 11008, random weights, no download) for
#              LoRA + AdamW, LoRSum, ScaledLoRSum and AdaPreLoRA (surrogate), 4 × 512 tokens: end to end
#              against AdamW and each method's work against its flop bound, $OUT/step_cost/memory.csv
#   step_deep  the same with 8 blocks (56 LoRA layers), no profile: `step()`'s cost is per bucket of one
#              shape (three in Llama-7B, whatever its depth), which two blocks weigh more than a full model
#              does; $OUT/step_cost_deep/memory.csv. Not in the default stages: STAGES="... step_deep"
#
# STAGES="build tests graph" runs only those (env always runs first; build is needed once per machine, as
# the later stages import the built package): a lent GPU's time can then go to two shorter visits.
# The stages run in the order build, tests, step, bench, memory, graph. The stage limits add up to about 14.5
# minutes (override one with LIMIT_<STAGE>=seconds, e.g. LIMIT_BUILD=400); on a 16-core H200 the stages took
# build 57 s, tests 57 s, step 111 s, bench 56 s, memory 17 s, graph 93 s (docs/gpu.md). The summary (one line per
# stage) is printed at the end and kept in $OUT/summary.txt. Without a GPU it stops at `env` with one line
# saying why, and exit status 2.
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$(command -v python >/dev/null 2>&1 && echo python || echo python3)}
STAGES=" ${STAGES:-build tests bench memory graph step} "
OUT=${OUT:-gpu-check-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd -P)
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
status=0
t0=$(date +%s)

# stage NAME LIMIT_SECONDS COMMAND...: runs COMMAND (a program or one of the functions below, exported)
# with a time limit (LIMIT_<NAME> overrides it), its output in $OUT/NAME.log and on the terminal, and
# records "NAME ok|FAILED|TIMED OUT (Ns)" in the summary.
stage() {
    local name=$1 limit=$2
    shift 2
    [[ $name == env || $STAGES == *" $name "* ]] || { echo "$name not selected" | tee -a "$SUMMARY"; return 0; }
    local override="LIMIT_${name^^}"
    limit=${!override:-$limit}
    local start rc
    start=$(date +%s)
    echo "==== $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" bash -c '"$@"' "$name" "$@" 2>&1 | tee "$OUT/$name.log"
    rc=${PIPESTATUS[0]}
    local took=$(($(date +%s) - start))
    if [ "$rc" -eq 0 ]; then
        echo "$name ok (${took}s)" | tee -a "$SUMMARY"
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        echo "$name TIMED OUT after ${limit}s (log: $OUT/$name.log)" | tee -a "$SUMMARY"
        status=1
    else
        echo "$name FAILED with status $rc (${took}s; log: $OUT/$name.log)" | tee -a "$SUMMARY"
        status=1
    fi
    return "$rc"
}

# ---- env: refuse clearly without a GPU ---------------------------------------------------------------------
if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "gpu_check: FAILED: no $PYTHON on the PATH (set PYTHON)" | tee -a "$SUMMARY"
    exit 2
fi
env_check() {
    if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi; else echo "(nvidia-smi not found)"; fi
    command -v nvcc >/dev/null && nvcc --version | tail -n 2
    "$PYTHON" - <<'PY'
import sys

import torch

print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda})")
try:
    import triton

    print(f"triton {triton.__version__}")
except ImportError:
    print("triton not installed: the Triton tests will be skipped")
if not torch.cuda.is_available():
    sys.exit("no CUDA GPU: torch.cuda.is_available() is False"
             + ("" if torch.version.cuda else f" (torch {torch.__version__} is a CPU build)"))
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs")
PY
}
export PYTHON OUT
export -f env_check
if ! stage env 30 env_check; then
    echo "gpu_check: FAILED: $(tail -n 1 "$OUT/env.log")" >&2
    exit 2
fi

# ---- build -----------------------------------------------------------------------------------------------
build() {
    # The editable install builds in build/ here: its compiled objects are for this machine only. -v: pip
    # shows setup.py's one-line summary ("building lorsum_kernels._C ... with CUDA kernels") only then.
    "$PYTHON" -m pip install -v --no-build-isolation --no-deps -e . 2>&1 | tee "$OUT/pip-install.log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || return "$rc"
    grep -q 'with CUDA kernels' "$OUT/pip-install.log" ||
        { echo "gpu_check: setup.py built no CUDA kernels: $(grep -m1 'CPU kernels only' "$OUT/pip-install.log")"
          return 1; }
    # The installed package loads its library, and every op with a CPU kernel has a CUDA kernel too, but
    # the fused CPU-only steps (on a GPU their parts run as separate ops).
    "$PYTHON" - <<'PY'
import torch

from lorsum_kernels import _native

ops = sorted(n[len("lorsum::"):] for n in torch._C._dispatch_get_registrations_for_dispatch_key("CPU")
             if n.startswith("lorsum::"))
missing = [op for op in ops if not _native.has_native_op(op, "cuda") and op not in _native.CPU_ONLY_OPS]
print(f"native ops: {len(ops)}; without a CUDA kernel: {missing or 'none'} (CPU-only by design: "
      f"{sorted(_native.CPU_ONLY_OPS)}); loader error: {_native.native_error}")
raise SystemExit(1 if missing or not ops else 0)
PY
}
export -f build
stage build 200 build

# ---- tests -------------------------------------------------------------------------------------------------
# With pytest-xdist, eight workers: compiling the Triton kernels for the GPU is most of the stage's time
# (and since 2026-12-04 two Inductor compiles of a small model, test_optim_cuda's compiled-model test).
xdist=()
"$PYTHON" -c "import xdist" 2>/dev/null && xdist=(-n 8)
stage tests 150 "$PYTHON" -m pytest -q "${xdist[@]}" -m "cuda or triton" --deselect tests/test_triton_compile.py \
    --junitxml="$OUT/tests.xml" -p no:cacheprovider tests

# ---- the training step at 7B shapes (issue #16) ------------------------------------------------------------
stage step 200 "$PYTHON" -m lorsum_kernels.benchmark --memory --model llama7b-blocks --device cuda \
    --optimizers adamw,lorsum,scaled_lorsum,adaprelora --opt-kw adaprelora:statistics=surrogate \
    --checkpointing none --batch 4 --warmup 2 --reps 5 --profile --out "$OUT/step_cost"
stage step_deep 200 "$PYTHON" -m lorsum_kernels.benchmark --memory --model llama7b-blocks --device cuda \
    --layers 8 --optimizers adamw,lorsum,scaled_lorsum,adaprelora --opt-kw adaprelora:statistics=surrogate \
    --checkpointing none --batch 4 --warmup 2 --reps 5 --out "$OUT/step_cost_deep"

# ---- benchmarks --------------------------------------------------------------------------------------------
stage bench 120 "$PYTHON" -m lorsum_kernels.benchmark --device cuda --grid quick --out "$OUT/bench"
stage memory 60 "$PYTHON" -m lorsum_kernels.benchmark --memory --device cuda --out "$OUT/bench" \
    --cuda-snapshot "$OUT/snapshots"

# ---- CUDA graph capture ----------------------------------------------------------------------------------
stage graph 120 "$PYTHON" tools/cuda_graph_check.py --out "$OUT"

echo "==== gpu_check: $(($(date +%s) - t0))s in all; results in $OUT" | tee -a "$SUMMARY"
cat "$SUMMARY"
exit "$status"
