#!/usr/bin/env bash
# Checks that the committed HEAD installs with plain pip on a fresh machine, without the Makefile
# (issue #11): each step clones HEAD into a temporary folder (no build/ left over from another step) and
# uses a fresh venv (no --system-site-packages), and prints how long it took.
#
#   1. `pip install .`    into a venv holding only torch==2.13.0 (installed first, as PyTorch extension
#                         projects ask); an isolated build, against the build-system torch (2.13.0+cpu here);
#   2. `pip install -e .` likewise, an editable install: the package imports from the clone;
#   3. `pip wheel .`      the wheel: its size, its metadata, and a stripped .so (no .debug_* sections);
#   4. (CHECK_CUDA_TORCH=1, the default) a venv with the newest torch the runtime range allows (on this
#      machine 2.14.1, a CUDA build, ~3.4 GB from local disk), where
#      a. `pip install --no-build-isolation .` must build CPU-only: CUDA_HOME is a fake toolkit with a
#         working bin/nvcc but no headers (the machine of the issue), so setup.py's toolkit check must say
#         why and fall back instead of failing on cuda_bf16.h;
#      b. the wheel of step 3 (built against torch 2.13.0) installed there must not break the package: the
#         loader sees from _C.torch_version that the .so is for another torch release, does not load it,
#         warns once and runs on the torch backend.
#
# Every step runs with that fake CUDA_HOME (and its nvcc first on the PATH); with a CPU torch it is never
# used, since setup.py builds CUDA only for a torch that has CUDA.
#
# After each install: import lorsum_kernels from outside the clone, check lorsum_kernels._C loaded, that
# torch.ops.lorsum ops have CPU kernels and one agrees with the reference.
#
# Slow (several native builds: about 20-30 min on 2 cores), so not part of `make test`.
# Environment: PYTHON (interpreter for the venvs, default python3), KEEP=1 (keep the temporary folder),
# CHECK_CUDA_TORCH=0 (skip step 4), STEPS (default "1 2 3 4": the steps to run), WORK (temporary folder,
# default mktemp -d).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd -P)
PYTHON=${PYTHON:-python3}
CHECK_CUDA_TORCH=${CHECK_CUDA_TORCH:-1}
STEPS=${STEPS:-1 2 3 4}  # which steps to run (step 4b needs step 3's wheel)
want() { [[ " $STEPS " == *" $1 "* ]]; }
WORK=${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/lorsum-fresh.XXXXXX")}
mkdir -p "$WORK"
if [ "${KEEP:-0}" != "1" ]; then
    trap 'rm -rf "$WORK"' EXIT
fi
# Never a torch from another environment, nor this checkout's .venv.
unset PYTHONPATH VIRTUAL_ENV LORSUM_SKIP_BUILD LORSUM_SKIP_CUDA_BUILD LORSUM_DEBUG_BUILD LORSUM_SKIP_LOADING_SO

HEAD=$(git -C "$REPO" rev-parse --short HEAD)
echo "check_fresh_install: HEAD $HEAD of $REPO, in $WORK ($(nproc) cores, $("$PYTHON" --version 2>&1))"

# A CUDA toolkit that is not one: bin/nvcc runs and reports CUDA 13.0, include/ is empty.
FAKE_CUDA="$WORK/fake-cuda"
mkdir -p "$FAKE_CUDA/bin" "$FAKE_CUDA/include"
cat >"$FAKE_CUDA/bin/nvcc" <<'EOF'
#!/bin/sh
echo "nvcc: NVIDIA (R) Cuda compiler driver"
echo "Cuda compilation tools, release 13.0, V13.0.88"
EOF
chmod +x "$FAKE_CUDA/bin/nvcc"
export CUDA_HOME="$FAKE_CUDA" PATH="$FAKE_CUDA/bin:$PATH"

TIMINGS=()
timed() {  # timed LABEL LOGFILE CMD...: runs CMD, output to LOGFILE; records and prints the wall time
    local label=$1 log=$2
    shift 2
    local t0 t1 rc=0
    t0=$(date +%s.%N)
    "$@" >"$log" 2>&1 || rc=$?
    t1=$(date +%s.%N)
    local secs
    secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.0f", b - a }')
    if [ "$rc" != 0 ]; then
        echo "FAILED ($rc after ${secs} s): $label; last lines of $log:"
        tail -n 40 "$log"
        exit 1
    fi
    TIMINGS+=("$(printf '%-58s %5d s  (%d min %02d s)' "$label" "$secs" $((secs / 60)) $((secs % 60)))")
    echo "  ok: $label: ${secs} s"
}

clone() {  # clone NAME: a fresh clone of HEAD at $WORK/NAME
    git clone -q --no-hardlinks "$REPO" "$WORK/$1"
    git -C "$WORK/$1" checkout -q "$HEAD"
}

venv() {  # venv NAME: a fresh venv at $WORK/NAME
    "$PYTHON" -m venv "$WORK/$1"
}

# Imports the package from outside any clone and checks the native library. EXPECT: native (the .so loads
# and has CPU kernels) or mismatch (a .so built against another torch: if it does not load, exactly one
# warning; either way the package imports and its ops agree with the reference).
check_import() {  # check_import VENV EXPECT [EXPECTED_ORIGIN_PREFIX]
    (cd "$WORK" && "$WORK/$1/bin/python" - "$2" "${3:-}" <<'PY'
import logging, os, sys, warnings

expect, origin_prefix = sys.argv[1], sys.argv[2]
records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append(record.getMessage())
logging.getLogger("lorsum_kernels").addHandler(Keep())

import torch
import lorsum_kernels as lk
from lorsum_kernels import _native, ops, reference

where = os.path.dirname(lk.__file__)
print(f"    torch {torch.__version__} (cuda {torch.version.cuda}); lorsum_kernels from {where}")
if origin_prefix:
    assert os.path.realpath(where).startswith(os.path.realpath(origin_prefix)), (where, origin_prefix)
x = torch.randn(64, 24, dtype=torch.float64)
if expect == "native":
    assert _native.NATIVE_AVAILABLE, _native.native_error
    import lorsum_kernels._C as C
    print(f"    lorsum_kernels._C: {C.__file__} ({os.path.getsize(C.__file__) / 1e6:.2f} MB)")
    for name in ("col_sq_sums", "lorsum_update_in", "spd_solve", "adaprelora_solve"):
        assert _native.has_native_op(name, "cpu"), f"no CPU kernel for lorsum::{name}"
    got = torch.ops.lorsum.col_sq_sums(x)
    torch.testing.assert_close(got, reference.col_sq_sums(x))
    print("    native CPU ops registered; torch.ops.lorsum.col_sq_sums agrees with the reference")
else:  # mismatch: a .so built against another torch release must not be loaded (_C.torch_version says)
    assert not _native.NATIVE_AVAILABLE, "a .so built against another torch release was loaded"
    assert len(records) == 1, records
    print(f"    the .so was not loaded; one warning: {records[0][:400]}")
    torch.testing.assert_close(ops.col_sq_sums(x), reference.col_sq_sums(x))
    print(f"    ops.col_sq_sums ({'native' if _native.NATIVE_AVAILABLE else 'torch backend'}) agrees with the reference")
PY
    )
}

cpu_fallback_said() {  # cpu_fallback_said LOG WHY: the build said, once, why it is CPU-only
    local n
    n=$(grep -c "CPU kernels only ($2" "$1" || true)
    if [ "$n" != 1 ]; then
        echo "FAILED: expected one 'CPU kernels only ($2...' line in $1, found $n"
        grep -n "lorsum_kernels:" "$1" || true
        exit 1
    fi
    echo "    build log: $(grep -o "lorsum_kernels: building.*" "$1")"
}

if want 1; then
echo "== 1. pip install . (fresh venv holding torch==2.13.0, isolated build)"
clone c1
venv v1
timed "venv v1: pip install torch==2.13.0 (runtime torch first)" "$WORK/v1-torch.log" \
    "$WORK/v1/bin/pip" install torch==2.13.0
cd "$WORK/c1"
timed "pip install . (isolated build)" "$WORK/v1-install.log" "$WORK/v1/bin/pip" install -v .
cd "$WORK"
cpu_fallback_said "$WORK/v1-install.log" "this torch has no CUDA"
check_import v1 native "$WORK/v1/lib"
fi

if want 2; then
echo "== 2. pip install -e . (fresh venv holding torch==2.13.0, isolated build)"
clone c2
venv v2
timed "venv v2: pip install torch==2.13.0" "$WORK/v2-torch.log" "$WORK/v2/bin/pip" install torch==2.13.0
cd "$WORK/c2"
timed "pip install -e . (isolated build)" "$WORK/v2-install.log" "$WORK/v2/bin/pip" install -v -e .
cd "$WORK"
cpu_fallback_said "$WORK/v2-install.log" "this torch has no CUDA"
check_import v2 native "$WORK/c2/lorsum_kernels"
fi

WHEEL=
if want 3; then
if [ ! -x "$WORK/v1/bin/pip" ]; then venv v1; fi
echo "== 3. pip wheel . (isolated build)"
clone c3
cd "$WORK/c3"
timed "pip wheel . (isolated build; --no-deps)" "$WORK/v3-wheel.log" \
    "$WORK/v1/bin/pip" wheel -v --no-deps -w "$WORK/dist" .
cd "$WORK"
WHEEL=$(ls "$WORK"/dist/lorsum_kernels-*.whl)
echo "    $(basename "$WHEEL"): $(du -k "$WHEEL" | cut -f1) kB"
"$WORK/v1/bin/python" - "$WHEEL" <<'PY'
import subprocess, sys, tempfile, zipfile

wheel = zipfile.ZipFile(sys.argv[1])
names = wheel.namelist()
meta = wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
headers = meta.split("\n\n", 1)[0].splitlines()
for key in ("Metadata-Version", "License-Expression", "License-File", "Requires-Python", "Requires-Dist",
            "Provides-Extra", "Project-URL", "Description-Content-Type"):
    found = [h for h in headers if h.startswith(key + ":")]
    assert found, f"METADATA has no {key}"
    print("    " + "\n    ".join(found))
assert not any(h.startswith("Requires-Dist: numpy") and "extra ==" not in h for h in headers), "numpy is a runtime dependency"
assert {"Provides-Extra: demo", "Provides-Extra: triton", "Provides-Extra: test"} <= set(headers)
assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), "LICENSE not in the wheel"
assert not any(n.startswith("triton_kernels") for n in names), "a top-level triton_kernels"
assert "lorsum_kernels/triton_kernels/__init__.py" in names, "the Triton kernels are not in the wheel"
so = [n for n in names if n.startswith("lorsum_kernels/_C") and n.endswith(".so")]
assert len(so) == 1, so
with tempfile.TemporaryDirectory() as tmp:
    path = wheel.extract(so[0], tmp)
    sections = subprocess.run(["readelf", "-S", "-W", path], capture_output=True, text=True, check=True).stdout
    debug = [line.split()[1] for line in sections.splitlines() if ".debug_" in line or " .symtab " in line]
    import os
    print(f"    {so[0]}: {os.path.getsize(path) / 1e6:.2f} MB, stripped: {not debug}")
    assert not debug, f"the .so keeps {debug}"
PY
fi

if [ "$CHECK_CUDA_TORCH" = "1" ] && want 4; then
    echo "== 4. a CUDA torch, a CUDA_HOME without headers (fresh venv, newest torch of the runtime range)"
    clone c4
    venv v4
    timed "venv v4: pip install 'torch>=2.11,<2.15' setuptools>=77 ninja" "$WORK/v4-torch.log" \
        "$WORK/v4/bin/pip" install "torch>=2.11,<2.15" "setuptools>=77" ninja
    "$WORK/v4/bin/python" -c "import torch; print(f'    torch {torch.__version__}, CUDA {torch.version.cuda}')"
    cd "$WORK/c4"
    timed "pip install --no-build-isolation . (CUDA torch, no headers)" \
        "$WORK/v4-install.log" "$WORK/v4/bin/pip" install -v --no-build-isolation .
    cd "$WORK"
    if "$WORK/v4/bin/python" -c "import sys, torch; sys.exit(torch.version.cuda is None)"; then
        cpu_fallback_said "$WORK/v4-install.log" "CUDA_HOME=$FAKE_CUDA has no cuda_runtime.h"
    else
        echo "    (this torch has no CUDA: the toolkit check was not reached)"
    fi
    check_import v4 native "$WORK/v4/lib"
    if [ -n "$WHEEL" ] && [ "$("$WORK/v4/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])')" != 2.13.0 ]; then
        echo "   b. the wheel built against torch 2.13.0, installed beside torch $("$WORK/v4/bin/python" -c 'import torch; print(torch.__version__)')"
        "$WORK/v4/bin/pip" install -q --no-deps --force-reinstall "$WHEEL"
        check_import v4 mismatch
    fi
fi

echo
echo "check_fresh_install: all steps passed (HEAD $HEAD). Wall times:"
printf '  %s\n' "${TIMINGS[@]}"
