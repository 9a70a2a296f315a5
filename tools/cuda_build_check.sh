#!/usr/bin/env bash
# Builds lorsum_kernels._C with its CUDA kernels against a CUDA build of torch, on a machine without a GPU,
# and reports ptxas' registers and spills per kernel (issue #13; `make cuda-build-check`).
#
#   1. A separate, cached virtual environment with a CUDA torch whose CUDA major version is the local
#      nvcc's ($LORSUM_CUDA_VENV, default ~/.cache/lorsum-kernels/cuda-venv; a few GB, installed once,
#      reused while its torch matches). The development .venv keeps its CPU torch.
#   2. A clean copy of the working tree's build inputs (setup.py, pyproject.toml, csrc/, lorsum_kernels/)
#      in the cache, built there with `python setup.py build_ext --inplace`: the same CUDAExtension,
#      flags, nvcc and link step as `pip install` against a CUDA torch, for TORCH_CUDA_ARCH_LIST (default
#      8.0;9.0;10.0, sm_80/sm_90/sm_100; without a GPU torch cannot pick one), with ptxas -v on
#      (NVCC_APPEND_FLAGS). Nothing is written into the working tree but the results below: an in-place
#      build here would replace the CPU .so that the development .venv loads.
#   3. The built .so is loaded by that torch (every symbol resolved: a missing template instantiation fails
#      here, not on a GPU), and every lorsum op with a CPU kernel must have a CUDA kernel too (except the
#      CPU-only fused kfac_lorsum_update_in, whose two parts do).
#   4. tools/ptxas_report.py turns ptxas' output into $LORSUM_PTXAS_CSV (default
#      bench/results/cuda_ptxas.csv, one row per kernel instantiation and architecture, rewritten each
#      run) and a summary per kernel (max registers, spills) in bench/results/cuda_build_check.md.
#
# Environment: PYTHON (creates the venv, default python3), CUDA_HOME (else the toolkit of the nvcc on the
# PATH, else /usr/local/cuda), LORSUM_CUDA_TORCH (pip requirement, default "torch>=2.11,<2.15"),
# LORSUM_CUDA_PIP_ARGS (extra pip arguments, e.g. "--index-url https://download.pytorch.org/whl/cu130"
# where PyPI's default torch build is for another CUDA major), TORCH_CUDA_ARCH_LIST, MAX_JOBS.
# Exit status: 0 when the extension builds with its CUDA kernels and loads; non-zero, with the reason on
# the last line, otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
here=$(pwd -P)

PYTHON=${PYTHON:-python3}
CACHE=${LORSUM_CUDA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lorsum-kernels}
VENV=${LORSUM_CUDA_VENV:-$CACHE/cuda-venv}
TORCH_REQ=${LORSUM_CUDA_TORCH:-torch>=2.11,<2.15}
ARCHS=${TORCH_CUDA_ARCH_LIST:-8.0;9.0;10.0}
CSV=${LORSUM_PTXAS_CSV:-bench/results/cuda_ptxas.csv}
SUMMARY=${LORSUM_PTXAS_SUMMARY:-bench/results/cuda_build_check.md}
SRC=$CACHE/build-src
LOG=$CACHE/build.log

fail() {
    echo "cuda-build-check: FAILED: $*" >&2
    exit 1
}

# ---- the CUDA toolkit: one whose nvcc runs and whose include/ has the runtime headers -------------------
toolkit_ok() { [ -x "$1/bin/nvcc" ] && [ -f "$1/include/cuda_runtime.h" ] && [ -f "$1/include/cuda_bf16.h" ]; }
cuda_home=""
candidates=()
[ -n "${CUDA_HOME:-}" ] && candidates+=("$CUDA_HOME")
if command -v nvcc >/dev/null 2>&1; then
    # nvcc itself knows its toolkit (a wrapper script on the PATH, e.g. /usr/local/bin/nvcc, does not live
    # in it): `nvcc --dryrun` prints the TOP it was installed under.
    top=$(nvcc --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n1 || true)
    [ -n "$top" ] && candidates+=("$top")
    candidates+=("$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")")
fi
candidates+=(/usr/local/cuda)
for c in "${candidates[@]}"; do
    if toolkit_ok "$c"; then
        cuda_home=$(cd "$c" && pwd -P)
        break
    fi
done
[ -n "$cuda_home" ] || fail "no CUDA toolkit with bin/nvcc and include/cuda_runtime.h (tried: ${candidates[*]}); set CUDA_HOME"
nvcc_release=$("$cuda_home/bin/nvcc" --version | sed -n 's/.*release \([0-9]*\.[0-9]*\).*/\1/p')
[ -n "$nvcc_release" ] || fail "$cuda_home/bin/nvcc --version reports no release"
echo "cuda-build-check: CUDA toolkit $cuda_home (nvcc $nvcc_release), archs $ARCHS"

# ---- the CUDA torch environment ---------------------------------------------------------------------
# Prints "<torch version> <CUDA version or None>", or nothing when torch does not import.
torch_info() { "$VENV/bin/python" -c 'import torch; print(torch.__version__, torch.version.cuda)' 2>/dev/null || true; }
# A torch fits when it is a supported release (pyproject.toml: 2.11-2.14) built for nvcc's CUDA major:
# torch's extension builder refuses a CUDA major mismatch.
torch_fits() {
    "$VENV/bin/python" - "$nvcc_release" <<'PY' 2>/dev/null
import sys
import torch
major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
cuda = torch.version.cuda
ok = (2, 11) <= (major, minor) <= (2, 14) and cuda is not None and cuda.split(".")[0] == sys.argv[1].split(".")[0]
sys.exit(0 if ok else 1)
PY
}
if [ ! -x "$VENV/bin/python" ]; then
    echo "cuda-build-check: creating $VENV"
    mkdir -p "$(dirname "$VENV")"
    "$PYTHON" -m venv "$VENV"
fi
if ! torch_fits; then
    echo "cuda-build-check: installing '$TORCH_REQ' (a CUDA build, several GB) into $VENV (found: $(torch_info))"
    # shellcheck disable=SC2086  # extra pip arguments are split on purpose
    "$VENV/bin/python" -m pip install ${LORSUM_CUDA_PIP_ARGS:-} "$TORCH_REQ" ninja "setuptools>=77"
    torch_fits || fail "the torch in $VENV ($(torch_info)) is not a torch 2.11-2.14 built for CUDA ${nvcc_release%%.*}; set LORSUM_CUDA_TORCH / LORSUM_CUDA_PIP_ARGS to one that is"
fi
"$VENV/bin/python" -c 'import ninja, setuptools' 2>/dev/null || "$VENV/bin/python" -m pip install ninja "setuptools>=77"
read -r torch_version torch_cuda <<<"$(torch_info)"
echo "cuda-build-check: torch $torch_version (CUDA $torch_cuda) in $VENV"

# ---- a clean copy of the build inputs, built there -----------------------------------------------------
rm -rf "$SRC"
mkdir -p "$SRC"
tar -c --exclude='__pycache__' --exclude='*.so' --exclude='_C.torch_version' \
    setup.py pyproject.toml README.md LICENSE csrc lorsum_kernels | tar -x -C "$SRC"
echo "cuda-build-check: building in $SRC (log: $LOG)"
start=$(date +%s)
set +e
(
    cd "$SRC" &&
        env CUDA_HOME="$cuda_home" TORCH_CUDA_ARCH_LIST="$ARCHS" NVCC_APPEND_FLAGS="-Xptxas=-v" \
            MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$VENV/bin/python" setup.py build_ext --inplace
) >"$LOG" 2>&1
status=$?
set -e
build_s=$(($(date +%s) - start))
if [ "$status" -ne 0 ]; then
    grep -n -E 'error|Error' "$LOG" | head -n 40 >&2 || true
    fail "the build exited with status $status after ${build_s}s (full log: $LOG)"
fi
# setup.py falls back to a CPU-only build, saying why, when it finds the toolkit unusable: that is a failure
# here.
grep -q 'with CUDA kernels' "$LOG" || fail "setup.py built no CUDA kernels: $(grep -m1 'CPU kernels only' "$LOG" || echo 'see the log') ($LOG)"
so=$(find "$SRC/lorsum_kernels" -maxdepth 1 -name '_C*.so' | head -n1)
[ -n "$so" ] || fail "no lorsum_kernels/_C*.so after the build ($LOG)"
echo "cuda-build-check: built $(basename "$so") ($(du -h "$so" | cut -f1)) in ${build_s}s"

# ---- load it: every symbol resolves and every op has a CUDA kernel ----------------------------------------
load_check=$("$VENV/bin/python" - "$so" 2>&1 <<'PY'
import sys
import warnings

warnings.filterwarnings("ignore", message=".*NumPy.*")  # the venv has no numpy; torch warns at import
import torch

torch.ops.load_library(sys.argv[1])  # dlopen with RTLD_NOW: an unresolved symbol fails here
cpu = {n for n in torch._C._dispatch_get_registrations_for_dispatch_key("CPU") if n.startswith("lorsum::")}
cuda = {n for n in torch._C._dispatch_get_registrations_for_dispatch_key("CUDA") if n.startswith("lorsum::")}
# Fused CPU paths whose parts have CUDA kernels: on CUDA ops.kfac_lorsum_update_in runs kfac_metric_update
# and lorsum_update_in in turn (a fused CUDA kernel is future work).
cpu_only = {"lorsum::kfac_lorsum_update_in"}
missing = sorted(cpu - cuda - cpu_only)
print(f"cuda-build-check: loaded; {len(cuda)} ops with a CUDA kernel: {', '.join(sorted(n[8:] for n in cuda))}")
if not cpu or missing:
    sys.exit(f"cuda-build-check: no CUDA kernel for {', '.join(missing) or 'any op'}")
PY
) || fail "the built library does not load or lacks CUDA kernels: $load_check"
echo "$load_check"

# ---- ptxas' registers and spills ---------------------------------------------------------------------------
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ -n "$(git status --porcelain -- csrc setup.py 2>/dev/null)" ]; then
    commit="$commit+dirty"
fi
"$PYTHON" tools/ptxas_report.py --log "$LOG" --csv "$CSV" --summary "$SUMMARY" \
    --meta "torch=$torch_version" "nvcc=$nvcc_release" "commit=$commit" "build_s=$build_s" \
    "archs=$ARCHS" "command=make cuda-build-check" "machine=$(uname -m), $(nproc) cores"
echo "cuda-build-check: OK (torch $torch_version, nvcc $nvcc_release, ${build_s}s build; $here/$CSV)"
