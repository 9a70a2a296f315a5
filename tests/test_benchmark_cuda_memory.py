"""lorsum-bench --memory's CUDA figures: torch.cuda.max_memory_allocated per step and --cuda-snapshot.

On the CPU (every machine here) the flag must be refused before any model is built, with a message that
says why; the CPU rows keep their columns, with an empty cuda_max_allocated_mib. The CUDA tests run where a
GPU is present (tools/gpu_check.sh runs them)."""

from __future__ import annotations

import csv
import pickle

import pytest
import torch

from lorsum_kernels.benchmark import cli, memory, real_model


def needs_cuda(test):
    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
    return pytest.mark.cuda(skip(test))


def test_cuda_snapshot_is_refused_without_a_cuda_device(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--memory", "--device", "cpu", "--cuda-snapshot", str(tmp_path / "snap"),
                  "--out", str(tmp_path)])
    assert exc.value.code == 2  # argparse's usage error
    assert "--cuda-snapshot needs a CUDA device" in capsys.readouterr().err
    # Refused before anything ran: no rows, no snapshot folder.
    assert not (tmp_path / "memory.csv").exists() and not (tmp_path / "snap").exists()


def test_cuda_snapshot_needs_memory_mode(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["--grid", "tiny", "--cuda-snapshot", str(tmp_path)])
    assert "add --memory" in capsys.readouterr().err


def test_measuring_functions_refuse_a_cpu_snapshot_before_building(tmp_path, monkeypatch):
    # The library entry points check too (scripts call them without the CLI); nothing is built first.
    monkeypatch.setattr(memory, "build", lambda *a, **k: pytest.fail("built a model before refusing"))
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        memory.measure_one("adamw", 8, 2, 1, 4, cpu, cuda_snapshot=str(tmp_path / "a.pickle"))
    with pytest.raises(ValueError, match="needs a CUDA device"):
        memory.run(["adamw"], 8, 2, 1, 4, cpu, cuda_snapshot=str(tmp_path))
    monkeypatch.setattr(real_model, "build", lambda *a, **k: pytest.fail("built a model before refusing"))
    with pytest.raises(ValueError, match="needs a CUDA device"):
        real_model.measure_one("adamw", layers=1, rank=2, batch=1, tokens=4, checkpointing="none", warmup=0,
                               reps=1, opt_kw={}, device=cpu, cuda_snapshot=str(tmp_path / "b.pickle"))
    with pytest.raises(ValueError, match="needs a CUDA device"):
        real_model.run_one_subprocess("adamw", layers=1, rank=2, batch=1, tokens=4, checkpointing="none",
                                      warmup=0, reps=1, opt_kw={}, device=cpu, lr=None, profile=None,
                                      cuda_snapshot=str(tmp_path / "c.pickle"))


def test_no_snapshot_is_a_no_op_context():
    with memory.cuda_memory_history(None):
        pass


def test_cpu_rows_have_an_empty_cuda_column(tmp_path):
    cli.main(["--memory", "--device", "cpu", "--dim", "32", "--rank", "2", "--layers", "1", "--tokens", "16",
              "--optimizers", "adamw", "--out", str(tmp_path)])
    with (tmp_path / "memory.csv").open(newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["cuda_max_allocated_mib"] == "" and row["measure"] == "cpu allocator (profiler)"


@needs_cuda
def test_cuda_step_peak_and_snapshot(tmp_path):
    device = torch.device("cuda")
    rows = memory.run(["adamw", "lorsum"], 256, 4, 2, 512, device, cuda_snapshot=str(tmp_path))
    for r in rows:
        # max_memory_allocated is reset before the measured step: the step's peak is above what was live
        # before it (the activations it keeps into backward at least) and the absolute peak contains it.
        assert r["measure"] == "cuda allocator"
        assert 2 * 512 * 256 * 4 <= r["step_peak_bytes"] <= r["cuda_max_allocated_bytes"]
        path = tmp_path / f"{r['optimizer']}.pickle"
        assert r["cuda_snapshot"] == str(path)
        with path.open("rb") as f:
            snapshot = pickle.load(f)
        # The snapshot format of torch.cuda.memory._snapshot: segments and per-device allocator traces.
        assert snapshot["segments"] and any(snapshot["device_traces"])


@needs_cuda
def test_cli_writes_cuda_columns_and_snapshots(tmp_path):
    cli.main(["--memory", "--device", "cuda", "--dim", "64", "--rank", "2", "--layers", "1", "--tokens", "64",
              "--optimizers", "adamw,lorsum", "--out", str(tmp_path),
              "--cuda-snapshot", str(tmp_path / "snap")])
    with (tmp_path / "memory.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["optimizer"] for r in rows] == ["adamw", "lorsum"]
    assert all(float(r["cuda_max_allocated_mib"]) >= float(r["step_peak_mib"]) > 0 for r in rows)
    assert sorted(p.name for p in (tmp_path / "snap").iterdir()) == ["adamw.pickle", "lorsum.pickle"]


@needs_cuda
@pytest.mark.skipif(not real_model.available("llama7b-blocks"), reason="needs transformers and peft")
def test_streamed_work_is_timed_on_the_gpu_without_waiting_for_it(monkeypatch):
    """On a GPU the streamed layer steps are timed by CUDA events: no synchronisation in backward, which
    would make the forward + backward and end-to-end figures those of a step that waits at every layer."""
    from lorsum_kernels import create_optimizer

    device = torch.device("cuda")
    model = real_model.build(1, 4, "none", device, "llama7b-blocks", 16)
    opt = create_optimizer(model, "lorsum")
    ids = torch.randint(0, model.config.vocab_size, (1, 16), device=device)
    for _ in range(2):  # the first step caches (capture="auto"), the second streams
        real_model.timed_train_step(model, opt, ids)
    total = {}
    syncs = []
    real_model.time_streamed_work(opt, total, lambda: syncs.append("timer"), device)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: syncs.append("torch"))
    model(input_ids=ids, labels=ids).loss.backward()
    monkeypatch.undo()
    assert syncs == [] and len(total["events"]) >= 7  # one pair per LoRA module (7 in a block) at least
    torch.cuda.synchronize(device)
    assert real_model.streamed_seconds(total) > 0
    opt.step()
    opt.zero_grad()
