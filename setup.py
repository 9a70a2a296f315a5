"""Build script: the Python package lorsum_kernels and its native extension lorsum_kernels._C.

Metadata and dependencies live in pyproject.toml; this file only says what to compile.

* CPU kernels (csrc/lorsum.cpp + csrc/cpu/*.cpp) are always built, as a CppExtension.
* CUDA kernels (csrc/cuda/*.cu + csrc/cuda/*.cpp) are added, turning it into a CUDAExtension, only when
  torch itself was built with CUDA, nvcc is found, there is CUDA source to compile, and
  LORSUM_SKIP_CUDA_BUILD is not 1. A CPU-only torch wheel has no CUDA headers, so nvcc alone is not
  enough.
* LORSUM_SKIP_BUILD=1 builds nothing native: a pure-Python install that runs on the torch backend.

Install for development with `pip install --no-build-isolation --no-deps -e .` (the Makefile's `venv`
target does), so the extension is compiled against the torch already installed: the .so depends on
torch's C++ ABI and must match the torch that loads it.
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip() == "1"


def _sources(*patterns: str) -> list[str]:
    # Relative to the repository root, sorted: setuptools wants relative source paths, and a stable order
    # keeps the ninja build file (and so incremental rebuilds) stable.
    found: list[str] = []
    for pattern in patterns:
        found += sorted(glob.glob(pattern, root_dir=ROOT))
    return found


def _native_build() -> tuple[list, dict]:
    """(ext_modules, cmdclass) for setup(); both empty when LORSUM_SKIP_BUILD=1."""
    if _env_flag("LORSUM_SKIP_BUILD"):
        print("lorsum_kernels: LORSUM_SKIP_BUILD=1, building no native extension", file=sys.stderr)
        return [], {}

    # Imported here, not at the top, so that LORSUM_SKIP_BUILD=1 installs without torch being present.
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    # torch >= 2.10 headers are written for C++20 (compiling them as C++17 gives -Wc++20-extensions
    # warnings), and torch's own builds add -std=c++20 by default; we say it explicitly.
    cxx_flags = ["-O3", "-std=c++20"]
    link_flags: list[str] = []
    # With torch's OpenMP parallel backend (the Linux wheels), at::parallel_for is an inline template
    # whose `#pragma omp parallel` is compiled into *our* object: without -fopenmp it silently runs on
    # one thread (ATen/Parallel-inl.h takes its serial branch when _OPENMP is undefined). At run time
    # libgomp.so.1 resolves to the copy torch already loaded, so there is one thread pool and
    # torch.set_num_threads applies. With the native backend, parallel_for calls into libtorch instead.
    if torch.backends.openmp.is_available() and sys.platform.startswith("linux"):
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")

    sources = _sources("csrc/lorsum.cpp", "csrc/cpu/*.cpp")
    cuda_sources = _sources("csrc/cuda/*.cu", "csrc/cuda/*.cpp")
    skip_cuda = _env_flag("LORSUM_SKIP_CUDA_BUILD")
    want_cuda = torch.version.cuda is not None and CUDA_HOME is not None and not skip_cuda
    if want_cuda and not cuda_sources:
        print("lorsum_kernels: no CUDA sources in csrc/cuda/, building CPU kernels only", file=sys.stderr)
    elif not want_cuda:
        why = (
            "LORSUM_SKIP_CUDA_BUILD=1"
            if skip_cuda
            else "torch has no CUDA"
            if torch.version.cuda is None
            else "nvcc / CUDA_HOME not found"
        )
        print(f"lorsum_kernels: building the CPU extension only ({why})", file=sys.stderr)

    # py_limited_api: csrc/lorsum.cpp uses only the stable Python C API (no pybind11), so one
    # _C.abi3.so serves every CPython >= 3.10 for a given torch (torch adds -DPy_LIMITED_API itself).
    common = dict(name="lorsum_kernels._C", py_limited_api=True, extra_link_args=link_flags)
    if want_cuda and cuda_sources:
        nvcc_flags = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
        ext = CUDAExtension(
            sources=sources + cuda_sources,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            **common,
        )
    else:
        ext = CppExtension(sources=sources, extra_compile_args={"cxx": cxx_flags}, **common)

    # ninja compiles sources in parallel and rebuilds only what changed; fall back to setuptools'
    # serial compiler when it is not installed.
    try:
        import ninja  # noqa: F401

        use_ninja = True
    except ImportError:
        use_ninja = False
    build_ext = BuildExtension.with_options(use_ninja=use_ninja)
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = _native_build()

# Our Triton kernels live in lorsum_kernels/triton_kernels/ and are installed only as that subpackage: a
# top-level module named `triton_kernels` belongs to the Triton project (vLLM installs it), and ours
# would shadow it or be shadowed.
packages = find_packages(include=["lorsum_kernels", "lorsum_kernels.*"])
assert "lorsum_kernels.triton_kernels" in packages
assert not any(p == "triton_kernels" or p.startswith("triton_kernels.") for p in packages)

setup(
    packages=packages,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    # The .so is built for torch's C++ ABI and must sit next to the package's Python files.
    zip_safe=False,
    # A limited-API extension makes the wheel tag cp310-abi3 (Python >= 3.10, any later CPython).
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {},
)
