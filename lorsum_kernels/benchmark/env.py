"""Where a measurement was taken: the device, the thread count, the versions and the commit, written once.

Every result row of ``lorsum-bench``, of the pytest benchmarks in bench/ and of the tools carries these
columns, and every printed report names them; they come from here (DESIGN.md: "Benchmarks report ... the
backend, the device name and versions").

* ``environment(device)`` -> ``{device, threads, torch, triton, commit}``: the columns of a result row.
* ``device_name(device)``: ``torch.cuda.get_device_name`` on a GPU; on the CPU the model name that
  ``torch.utils.collect_env`` reads (``lscpu`` on Linux, ``sysctl`` on macOS), else ``platform.processor()``,
  with the core count: ``"AMD EPYC (2 cores)"``.
* ``commit()``: the short hash of the checkout this package was imported from (not the current
  directory's), ``"+dirty"`` when a tracked file differs from it, ``"unknown"`` outside a git checkout.
* ``version(module)``: a module's ``__version__``, ``"none"`` when it is absent or fails to import (the
  benchmarks run without triton, transformers or peft).
* ``versions(*modules)``: one line for a printed report, ``"torch 2.13.0, peft 0.18.0, 2 threads"``.

Nothing here raises for a missing tool (git, lscpu): the benchmark still runs and the field says so.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from pathlib import Path

import torch

__all__ = ["commit", "device_name", "environment", "version", "versions"]


def version(module: str) -> str:
    try:
        return str(__import__(module).__version__)
    except Exception:  # absent, or broken on this machine: the benchmark runs without it
        return "none"


def versions(*modules: str) -> str:
    return ", ".join(f"{name} {version(name)}" for name in modules or ("torch",)) + \
        f", {torch.get_num_threads()} threads"


@functools.lru_cache(maxsize=None)
def _cpu_model() -> str:
    try:
        from torch.utils import collect_env

        info = collect_env.get_cpu_info(collect_env.run)
    except Exception:  # no lscpu / sysctl, or collect_env changed: fall back to the platform module
        info = ""
    lines = [line for line in info.splitlines() if line.strip()]
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() in ("Model name", "Name") and value.strip():
            return value.strip()
    if len(lines) == 1 and ":" not in lines[0]:  # macOS: the brand string alone
        return lines[0].strip()
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_model()} ({os.cpu_count()} cores)"


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=False,
                          cwd=Path(__file__).resolve().parent).stdout.strip()


def commit() -> str:
    try:
        head = _git("rev-parse", "--short", "HEAD")
        if not head:
            return "unknown"
        return head + ("+dirty" if _git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: torch.device | str) -> dict:
    return dict(device=device_name(device), threads=torch.get_num_threads(), torch=torch.__version__,
                triton=version("triton"), commit=commit())
