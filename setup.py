"""Build script: the Python package lorsum_kernels and its native extension lorsum_kernels._C.

Metadata and dependencies live in pyproject.toml; this file only says what to compile.

* CPU kernels (csrc/lorsum.cpp + csrc/cpu/*.cpp) are always built, as a CppExtension.
* CUDA kernels (csrc/cuda/*.cu + csrc/cuda/*.cpp) are added, turning it into a CUDAExtension, only when
  torch itself was built with CUDA, there is CUDA source to compile, LORSUM_SKIP_CUDA_BUILD is not 1, and
  the CUDA toolkit at torch's CUDA_HOME is really usable: its nvcc runs, reports the CUDA major version
  torch was built with, and CUDA_HOME/include has the runtime and bf16 headers. A CUDA_HOME guessed from
  an `nvcc` wrapper on the PATH (e.g. /usr/local/bin/nvcc -> CUDA_HOME=/usr/local, no headers) fails that
  check, and the build goes on CPU-only, saying so once, instead of failing on a missing header.
* LORSUM_SKIP_BUILD=1 builds nothing native: a pure-Python install that runs on the torch backend.
* Release builds are stripped (-g0, and -s at link time on Linux): Python's own CFLAGS carry -g, which
  made a 20 MB .so. LORSUM_DEBUG_BUILD=1 builds with -O0 -g (and nvcc -lineinfo) and keeps the symbols.

The .so is built against one torch's C++ ABI and must be loaded by that torch. `pip install .` builds in an
isolated environment with the torch pinned in pyproject.toml's [build-system] requires; to build against
the torch already installed (any supported release, with or without CUDA), which is also much faster,
install with `pip install --no-build-isolation .` (the Makefile's `venv` target runs
`pip install --no-build-isolation --no-deps -e .`). The loader (lorsum_kernels/_native.py) falls back to the
torch backend, with one warning, when the .so does not load.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip() == "1"


def _log(message: str) -> None:
    print(f"lorsum_kernels: {message}", file=sys.stderr, flush=True)


def _sources(*patterns: str) -> list[str]:
    # Relative to the repository root, sorted: setuptools wants relative source paths, and a stable order
    # keeps the ninja build file (and so incremental rebuilds) stable.
    found: list[str] = []
    for pattern in patterns:
        found += sorted(glob.glob(pattern, root_dir=ROOT))
    return found


def _cuda_toolkit_problem(torch_cuda: str, cuda_home: str | None) -> str | None:
    """Why the CUDA toolkit at cuda_home cannot build our CUDA kernels for this torch, or None if it can.

    Checks what torch's BuildExtension would otherwise trip over mid-build: the headers kernels.h includes,
    an nvcc that runs (the one torch will call: $PYTORCH_NVCC or CUDA_HOME/bin/nvcc), and nvcc's CUDA major
    version equal to torch's (torch raises on a major mismatch).
    """
    if not cuda_home:
        return "no CUDA toolkit found (set CUDA_HOME, or put nvcc on the PATH)"
    include = os.path.join(cuda_home, "include")
    missing = [h for h in ("cuda_runtime.h", "cuda_bf16.h") if not os.path.isfile(os.path.join(include, h))]
    if missing:
        return f"CUDA_HOME={cuda_home} has no {' or '.join(missing)} in {include}"
    nvcc = os.environ.get("PYTORCH_NVCC") or os.path.join(cuda_home, "bin", "nvcc")
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{nvcc} --version failed ({type(exc).__name__}: {exc})"
    if out.returncode != 0:
        return f"{nvcc} --version exited with status {out.returncode}"
    found = re.search(r"release (\d+)\.(\d+)", out.stdout)
    if found is None:
        return f"{nvcc} --version does not report a CUDA release"
    if found.group(1) != torch_cuda.split(".")[0]:
        return f"nvcc is CUDA {found.group(1)}.{found.group(2)}, torch was built with CUDA {torch_cuda}"
    return None


# Written next to the built library: the torch version it was compiled against (read by _native.py).
BUILT_TORCH_FILE = "_C.torch_version"


def _native_build() -> tuple[list, dict]:
    """(ext_modules, cmdclass) for setup(); both empty when LORSUM_SKIP_BUILD=1."""
    if _env_flag("LORSUM_SKIP_BUILD"):
        _log("LORSUM_SKIP_BUILD=1, building no native extension")
        return [], {}

    # Imported here, not at the top, so that LORSUM_SKIP_BUILD=1 installs without torch being present.
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    debug = _env_flag("LORSUM_DEBUG_BUILD")
    linux = sys.platform.startswith("linux")
    # torch >= 2.10 headers are written for C++20 (compiling them as C++17 gives -Wc++20-extensions
    # warnings), and torch's own builds add -std=c++20 by default; we say it explicitly. The flags come
    # after Python's CFLAGS (which carry -g), so -g0 wins; -s strips the symbol table at link time (the
    # dynamic symbols, which the loader needs, stay).
    cxx_flags = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    cxx_flags.append("-std=c++20")
    link_flags: list[str] = [] if debug or not linux else ["-s"]
    # With torch's OpenMP parallel backend (the Linux wheels), at::parallel_for is an inline template
    # whose `#pragma omp parallel` is compiled into *our* object: without -fopenmp it silently runs on
    # one thread (ATen/Parallel-inl.h takes its serial branch when _OPENMP is undefined). At run time
    # libgomp.so.1 resolves to the copy torch already loaded, so there is one thread pool and
    # torch.set_num_threads applies. With the native backend, parallel_for calls into libtorch instead.
    if torch.backends.openmp.is_available() and linux:
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")

    sources = _sources("csrc/lorsum.cpp", "csrc/cpu/*.cpp")
    # Per op: <op>.cu (plain-CUDA kernels and launchers) and <op>_binding.cpp (its ATen binding).
    cuda_sources = _sources("csrc/cuda/*.cu", "csrc/cuda/*.cpp")
    # Each object file is named after its source's path without the extension, so csrc/cuda/x.cu and
    # csrc/cuda/x.cpp would both build csrc/cuda/x.o, one silently replacing the other at link time.
    stems = [os.path.splitext(s)[0] for s in sources + cuda_sources]
    clashes = sorted({s for s in stems if stems.count(s) > 1})
    if clashes:
        raise RuntimeError(f"sources that would compile to the same object file: {', '.join(clashes)}")
    if _env_flag("LORSUM_SKIP_CUDA_BUILD"):
        why_not_cuda = "LORSUM_SKIP_CUDA_BUILD=1"
    elif torch.version.cuda is None:
        why_not_cuda = "this torch has no CUDA"
    elif not cuda_sources:
        why_not_cuda = "no CUDA sources in csrc/cuda/"
    else:
        why_not_cuda = _cuda_toolkit_problem(torch.version.cuda, CUDA_HOME)
    want_cuda = why_not_cuda is None

    # py_limited_api: csrc/lorsum.cpp uses only the stable Python C API (no pybind11), so one
    # _C.abi3.so serves every CPython >= 3.10 for a given torch (torch adds -DPy_LIMITED_API itself).
    common = dict(name="lorsum_kernels._C", py_limited_api=True, extra_link_args=link_flags)
    if want_cuda:
        nvcc_flags = ["-O0" if debug else "-O3", "-std=c++20", "--expt-relaxed-constexpr"]
        if debug:
            nvcc_flags += ["-g", "-lineinfo"]
        ext = CUDAExtension(
            sources=sources + cuda_sources,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            **common,
        )
    else:
        ext = CppExtension(sources=sources, extra_compile_args={"cxx": cxx_flags}, **common)

    # ninja (a build requirement in pyproject.toml) compiles sources in parallel and rebuilds only what
    # changed; fall back to setuptools' serial compiler when it is not installed (--no-build-isolation in an
    # environment without it).
    try:
        import ninja  # noqa: F401

        use_ninja = True
    except ImportError:
        use_ninja = False
    summary = (
        f"building lorsum_kernels._C against torch {torch.__version__}"
        + (f" with CUDA kernels (nvcc from {CUDA_HOME})" if want_cuda else f", CPU kernels only ({why_not_cuda})")
        + (", debug build (LORSUM_DEBUG_BUILD=1)" if debug else "")
        + ("" if use_ninja else ", without ninja (serial compiles: pip install ninja)")
    )
    base = BuildExtension.with_options(use_ninja=use_ninja)

    class build_ext(base):
        # Said once, when the extension is built: pip runs setup.py in several hooks (requirements,
        # metadata, build), and each would repeat a message printed at import.
        def run(self):
            _log(summary)
            super().run()
            # The .so is tied to this torch release's C++ ABI: record it beside the library, so that the
            # loader (lorsum_kernels/_native.py) refuses it, with a warning, under any other torch.
            if self.extensions:
                folder = os.path.dirname(self.get_ext_fullpath(self.extensions[0].name))
                with open(os.path.join(folder, BUILT_TORCH_FILE), "w") as f:
                    f.write(torch.__version__ + "\n")

        def get_outputs(self):
            outputs = super().get_outputs()
            if self.extensions:
                folder = os.path.dirname(self.get_ext_fullpath(self.extensions[0].name))
                outputs.append(os.path.join(folder, BUILT_TORCH_FILE))
            return outputs

    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = _native_build()

# The Triton kernels live in the top-level folder triton_kernels/ (the design card's layout) and are
# installed only as the subpackage lorsum_kernels.triton_kernels (package_dir): a top-level module named
# `triton_kernels` belongs to the Triton project (vLLM installs it), and ours would shadow it or be
# shadowed. The editable install maps the subpackage to the folder the same way.
TRITON_PACKAGE = "lorsum_kernels.triton_kernels"
packages = find_packages(include=["lorsum_kernels", "lorsum_kernels.*"]) + [TRITON_PACKAGE]
assert not any(p == "triton_kernels" or p.startswith("triton_kernels.") for p in packages)

setup(
    packages=packages,
    package_dir={TRITON_PACKAGE: "triton_kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    # The .so is built for torch's C++ ABI and must sit next to the package's Python files.
    zip_safe=False,
    # A limited-API extension makes the wheel tag cp310-abi3 (Python >= 3.10, any later CPython).
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {},
)
