"""Which optimizers' ``step()`` can be captured in a CUDA graph, and does a replay equal an eager step?

Run by tools/gpu_check.sh; needs a CUDA GPU (exits with status 2 and says so otherwise).

    python tools/cuda_graph_check.py [--optimizers adamw,lorsum,...] [--out DIR]

For each optimizer, in a process of its own (a failed capture can leave the CUDA context unusable):
two identical LoRA models (lorsum_kernels.benchmark.memory.build: a stack of LoRALinear layers, fp32) and
optimizers, warmed up identically on a side stream (state allocation, lazy initialisation, cuBLAS
workspaces: torch.cuda.graphs' rule before a capture). Then both run forward + backward on the same batch;
the first steps eagerly, the second captures ``opt.step()`` in a ``torch.cuda.CUDAGraph`` and replays it
once. The replay must give the first model's factors (max abs difference reported; the kernels are
deterministic, so 0 is expected). Torch's AdamW is created with ``capturable=True``, which it needs to
be captured. Each row also times an eager ``step()`` (CUDA events, median of 20 steps, each after its own
backward) and a replay (``lorsum_kernels.benchmark.timing``: ``triton.testing.do_bench``, else
``torch.utils.benchmark``): the host overhead a graph removes. The device, versions and commit are
``lorsum_kernels.benchmark.env``'s, as in every benchmark row.

What the capture replays is the step on the data of the captured backward: the graph reads the tensors
that step read, at their addresses. A training loop that replays it would have to refill those buffers
(static inputs and captured activations) before each replay, as with any CUDA-graph training loop; this
check establishes that the step has no host synchronisation or host-dependent work that capture forbids.

Writes ``DIR/cuda_graph.csv`` (one row per optimizer) and prints a table. Exit status 0 when every
optimizer ran its check (captured or not: the table says which), 1 when a check itself crashed.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import traceback
from pathlib import Path

import torch

from lorsum_kernels.benchmark.env import environment
from lorsum_kernels.benchmark.timing import event_ms, time_ms

DEFAULT_OPTIMIZERS = ["adamw", "lorsum", "scaled_lorsum", "adaprelora", "scaled_gd", "scaled_adamw",
                      "svdlora"]
FIELDS = ["optimizer", "captured", "replay_matches_eager", "max_abs_diff", "eager_step_ms", "replay_ms",
          "error", "device", "torch", "triton", "commit"]


def _pair(name: str, dim: int, rank: int, layers: int, device: torch.device):
    import lorsum_kernels as lk
    from lorsum_kernels.benchmark.memory import build

    kw = {"capturable": True} if name == "adamw" else {}
    models = [build(dim, rank, layers, device) for _ in range(2)]
    return models, [lk.create_optimizer(m, name, lr=1e-3, **kw) for m in models]


def check_one(name: str, dim: int = 256, rank: int = 8, layers: int = 4, tokens: int = 512) -> dict:
    device = torch.device("cuda")
    (m_eager, m_graph), (o_eager, o_graph) = _pair(name, dim, rank, layers, device)
    x = torch.randn(tokens, dim, device=device, generator=torch.Generator(device=device).manual_seed(0))

    def fwd_bwd(model):
        model(x).square().mean().backward()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            for model, opt in ((m_eager, o_eager), (m_graph, o_graph)):
                fwd_bwd(model)
                opt.step()
                opt.zero_grad(set_to_none=False)  # the grads keep their addresses for the capture
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    row = dict(optimizer=name, **environment(device), error="")
    fwd_bwd(m_eager)
    o_eager.step()
    fwd_bwd(m_graph)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            o_graph.step()
        graph.replay()
        torch.cuda.synchronize()
    except Exception as exc:  # what capture refuses (a host sync, a CPU tensor read): reported, not raised
        row.update(captured=False, replay_matches_eager="", max_abs_diff="",
                   error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
        return row
    diff = max((a - b).abs().max().item() for a, b in zip(m_eager.parameters(), m_graph.parameters()))
    row.update(captured=True, max_abs_diff=diff, replay_matches_eager=diff == 0.0)

    eager = []
    for _ in range(20):  # each eager step needs its own backward; only step() is timed
        o_eager.zero_grad(set_to_none=False)
        fwd_bwd(m_eager)
        eager.append(event_ms(o_eager.step))
    replay = time_ms(graph.replay, device, warmup=0, reps=20).times_ms
    row.update(eager_step_ms=round(statistics.median(eager), 4),
               replay_ms=round(statistics.median(replay), 4))
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optimizers", default=",".join(DEFAULT_OPTIMIZERS))
    parser.add_argument("--out", default=".", help="folder for cuda_graph.csv")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the per-optimizer subprocess
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("cuda_graph_check: needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    if args.one:
        try:
            row = check_one(args.one)
        except Exception as exc:
            traceback.print_exc()
            row = dict(optimizer=args.one, captured="",
                       error=f"check crashed: {type(exc).__name__}: {exc}"[:300])
        print(json.dumps(row))
        return 0

    rows, crashed = [], False
    for name in [n for n in args.optimizers.split(",") if n]:
        try:  # a capture that hangs costs one row, not the rest of the check
            out = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True,
                                 timeout=300)
        except subprocess.TimeoutExpired:
            out = subprocess.CompletedProcess([], "timeout", "", "no answer within 300 s")
        try:
            row = json.loads(out.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            row = dict(optimizer=name, captured="", error=f"exit {out.returncode}: "
                       + " | ".join(out.stderr.strip().splitlines()[-3:])[:300])
        crashed = crashed or str(row.get("error", "")).startswith(("check crashed", "exit "))
        rows.append(row)
        cells = [f"{name:<14}"] + [f"{key}={row.get(key, '')!s:<8}" for key in FIELDS[1:6]]
        print(" ".join(cells), row.get("error", ""), flush=True)
    path = Path(args.out) / "cuda_graph.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    captured = sum(r.get("captured") is True for r in rows)
    print(f"cuda_graph_check: {captured}/{len(rows)} optimizers captured; {path}")
    return 1 if crashed else 0


if __name__ == "__main__":
    raise SystemExit(main())
