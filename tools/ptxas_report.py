"""Registers, spills and shared memory per CUDA kernel, from the `ptxas -v` output of a build log.

Used by tools/cuda_build_check.sh (`make cuda-build-check`); standard library only (it runs under any
python3). ptxas prints, for each kernel ("entry function") it compiles for each architecture:

    ptxas info    : Compiling entry function '_ZN6lorsum4cuda...' for 'sm_90'
    ptxas info    : Function properties for _ZN6lorsum4cuda...
        0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
    ptxas info    : Used 40 registers, used 1 barriers, 16896 bytes smem, 400 bytes cmem[0]

Writes one CSV row per (kernel instantiation, architecture), rewriting the file (the table describes the
sources of one commit; git keeps the earlier ones), and a Markdown summary per kernel template: the most
registers and spilled bytes over its instantiations, for each architecture.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import re
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

ENTRY = re.compile(r"Compiling entry function '(?P<name>[^']+)' for '(?P<arch>sm_\w+)'")
FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers")
BARRIERS = re.compile(r"used (\d+) barriers")
SMEM = re.compile(r"(\d+) bytes smem")
# An anonymous namespace's mangled name carries its translation unit's file name: ..._GLOBAL__N__<hash>_
# <len>_<file>_cu_<hash>... (every kernel of csrc/cuda lives in one).
SOURCE = re.compile(r"_GLOBAL__N__[0-9a-f]+_\d+_(\w+?)_cu_[0-9a-f]+")

FIELDS = ["timestamp", "source", "kernel", "arch", "registers", "spill_stores_bytes", "spill_loads_bytes",
          "stack_frame_bytes", "smem_bytes", "barriers", "torch", "nvcc", "commit", "mangled"]


def parse(log: str) -> list[dict]:
    """One dict per kernel and architecture, in the order ptxas compiled them."""
    rows: list[dict] = []
    current: dict | None = None
    for line in log.splitlines():
        if m := ENTRY.search(line):
            current = {"mangled": m["name"], "arch": m["arch"], "stack_frame_bytes": 0,
                       "spill_stores_bytes": 0, "spill_loads_bytes": 0}
            source = SOURCE.search(m["name"])
            current["source"] = f"{source[1]}.cu" if source else ""
            continue
        if current is None:
            continue
        if m := FRAME.search(line):
            current["stack_frame_bytes"], current["spill_stores_bytes"], current["spill_loads_bytes"] = map(
                int, m.groups())
        elif m := USED.search(line):
            # The "Used" line closes an entry's report.
            current["registers"] = int(m[1])
            current["barriers"] = int(b[1]) if (b := BARRIERS.search(line)) else 0
            current["smem_bytes"] = int(s[1]) if (s := SMEM.search(line)) else 0
            rows.append(current)
            current = None
    return rows


def short_name(demangled: str) -> str:
    """`void lorsum::cuda::(anonymous namespace)::k<float>(float const*, ...)` -> `k<float>`."""
    name = demangled.replace("(anonymous namespace)::", "")
    name = re.sub(r"^void ", "", name)
    depth = 0
    for i, ch in enumerate(name):  # the parameter list starts at the first '(' outside template brackets
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            name = name[:i]
            break
    for prefix in ("lorsum::cuda::detail::", "lorsum::cuda::"):
        name = name.replace(prefix, "")
    return name


def demangle(names: list[str]) -> list[str]:
    if not names or shutil.which("c++filt") is None:
        return names
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    return lines if len(lines) == len(names) else names


def _arch_number(arch: str) -> int:
    """sm_80 -> 80, sm_100 -> 100 (sm_100 sorts after sm_90)."""
    return int(re.sub(r"\D", "", arch) or 0)


def template_of(kernel: str) -> str:
    return kernel.split("<", 1)[0]


def summary(rows: list[dict], meta: dict[str, str]) -> str:
    archs = sorted({r["arch"] for r in rows}, key=_arch_number)
    per: dict[tuple[str, str], dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        per[(r["source"], template_of(r["kernel"]))][r["arch"]].append(r)
    lines = [
        "# CUDA kernels: registers and spills (ptxas -v)",
        "",
        f"Produced by `{meta.get('command', 'tools/cuda_build_check.sh')}` (tools/cuda_build_check.sh) at "
        f"{meta.get('commit', '?')}: torch {meta.get('torch', '?')}, nvcc {meta.get('nvcc', '?')}, "
        f"TORCH_CUDA_ARCH_LIST={meta.get('archs', '?')}, clean build in {meta.get('build_s', '?')} s on "
        f"{meta.get('machine', 'this machine')}. Compiled only: not run on a GPU.",
        "",
        ("Each cell: the most registers per thread over the kernel's instantiations (dtypes, tile shapes), "
         "then the most bytes spilled (stores/loads) where any. Every row of bench/results/cuda_ptxas.csv is "
         "one instantiation."),
        "",
        "| source | kernel | instantiations | " + " | ".join(archs) + " |",
        "|---|---|---|" + "---|" * len(archs),
    ]
    for (source, kernel), by_arch in sorted(per.items()):
        cells = []
        for arch in archs:
            rs = by_arch.get(arch, [])
            if not rs:
                cells.append("-")
                continue
            regs = max(r["registers"] for r in rs)
            st = max(r["spill_stores_bytes"] for r in rs)
            ld = max(r["spill_loads_bytes"] for r in rs)
            cells.append(f"{regs}" + (f", spills {st}/{ld} B" if st or ld else ""))
        count = max(len(v) for v in by_arch.values())
        lines.append(f"| {source} | {kernel} | {count} | " + " | ".join(cells) + " |")
    spilled = sorted({f"{r['kernel']} ({r['arch']}: {r['spill_stores_bytes']}/{r['spill_loads_bytes']} B)"
                      for r in rows if r["spill_stores_bytes"] or r["spill_loads_bytes"]})
    lines += ["", f"{len(rows)} kernel builds, {len(spilled)} with spills" + (":" if spilled else ".")]
    lines += [f"- {s}" for s in spilled]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log", required=True, type=Path, help="build log with ptxas -v output")
    parser.add_argument("--csv", required=True, type=Path, help="CSV to (re)write")
    parser.add_argument("--summary", type=Path, help="Markdown summary to (re)write")
    parser.add_argument("--meta", nargs="*", default=[],
                        help="key=value pairs: torch, nvcc, commit, build_s, archs, command, machine")
    args = parser.parse_args(argv)
    meta = dict(kv.split("=", 1) for kv in args.meta)

    rows = parse(args.log.read_text(errors="replace"))
    if not rows:
        raise SystemExit(f"ptxas_report: no ptxas -v output in {args.log} (built without -Xptxas=-v?)")
    for r, name in zip(rows, demangle([r["mangled"] for r in rows])):
        r["kernel"] = short_name(name)
    stamp = dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()
    for r in rows:
        r.update(timestamp=stamp, torch=meta.get("torch", ""), nvcc=meta.get("nvcc", ""),
                 commit=meta.get("commit", ""))
    rows.sort(key=lambda r: (r["source"], r["kernel"], _arch_number(r["arch"])))

    args.csv.parent.mkdir(parents=True, exist_ok=True)
    with args.csv.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    text = summary(rows, meta)
    if args.summary is not None:
        args.summary.write_text(text)
    print(text, end="")
    print(f"ptxas_report: {len(rows)} rows -> {args.csv}"
          + (f", summary -> {args.summary}" if args.summary else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
