"""lorsum-bench runs, prints its table and appends result rows (a tiny grid: the tool, not the timings)."""

from __future__ import annotations

import csv

import torch

from lorsum_kernels.benchmark import cli


def test_speed_rows_cover_every_op_and_backend(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "RESULTS", tmp_path)
    cli.main(["--grid", "tiny", "--dtype", "float32", "--reps", "2", "--warmup", "1", "--no-plot"])
    rows = list(csv.DictReader((tmp_path / "lorsum_bench.csv").open()))
    ops = {r["op"] for r in rows}
    assert {"col_sq_sums", "row_col_energies", "lorsum_update_in", "lorsum_step"} <= ops
    for op in ops:
        backends = {r["backend"] for r in rows if r["op"] == op}
        assert "torch" in backends
        assert backends == set(cli.available_backends(
            next(c.dispatch_op for c in cli.cases(torch.device("cpu"), torch.float32, "tiny") if c.op == op),
            torch.device("cpu")))
    torch_rows = [r for r in rows if r["backend"] == "torch"]
    assert all(float(r["speedup_vs_torch"]) == 1.0 for r in torch_rows)
    assert all(float(r["median_ms"]) > 0 and r["commit"] and r["device"] for r in rows)
    assert "lorsum_step" in capsys.readouterr().out


def test_memory_rows_are_relative_to_adamw(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "RESULTS", tmp_path)
    cli.main(["--memory", "--dim", "256", "--rank", "3", "--layers", "2", "--tokens", "512",
              "--optimizers", "adamw,lorsum"])
    rows = list(csv.DictReader((tmp_path / "memory.csv").open()))
    assert [r["optimizer"] for r in rows] == ["adamw", "lorsum"]
    assert float(rows[0]["vs_adamw"]) == 1.0
    assert all(float(r["process_peak_rss_mib"]) > 0 for r in rows)
    # the forward keeps 512×256 fp32 activations per layer alive into backward: the peak sees them
    assert all(float(r["step_peak_mib"]) >= 2 * 512 * 256 * 4 / 2**20 for r in rows)
    assert float(rows[1]["state_mib"]) < float(rows[0]["state_mib"])  # no Adam moments on the factors
