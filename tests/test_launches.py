"""benchmark/launches.py: the ops a GPU would launch per LoRA layer, counted on the meta device."""

from __future__ import annotations

import csv

import torch

from lorsum_kernels import _native, backends
from lorsum_kernels.benchmark import launches


def test_counts_what_a_step_launches_and_nothing_that_launches_nothing():
    adamw = launches.count("adamw", blocks=1)
    assert adamw["layers"] == len(launches._CHAIN)
    # AdamW's backward: the frozen and LoRA products, tanh's backward; no views or allocations counted
    assert adamw["ops"]["backward"]["aten::mm"] > 0
    assert not any(op.split("::")[1] in launches._FREE or op.endswith(("::view", "::t"))
                   for phase in ("backward", "step") for op in adamw["ops"][phase])
    lorsum = launches.count("lorsum", blocks=1, sites=True)
    # The streamed step runs in backward (the third step streams under capture="auto")
    assert lorsum["backward"] > adamw["backward"] and lorsum["step"] > 0
    assert sum(lorsum["sites"]["backward"].values()) == sum(lorsum["ops"]["backward"].values())
    assert any(site.startswith("optim/") for site in lorsum["sites"]["backward"])
    if _native.NATIVE_AVAILABLE:  # the native ops resolved as on a GPU: one half-step each per layer
        assert lorsum["ops"]["backward"]["lorsum::lorsum_update_in"] == lorsum["layers"]
    # The normalised finish, a Triton op with no CUDA kernel, resolves to Triton as on a GPU: its two kernel
    # launches counted once per shape of the chain's layers
    if backends.triton_available():
        shapes = len(set(launches._CHAIN))
        assert lorsum["ops"]["step"]["triton::_statistics_kernel"] == shapes == 3
        assert lorsum["ops"]["step"]["triton::_move_kernel"] == shapes
    # Nothing of the patches outlives the count
    assert not any(device == "meta" for _, device in _native._NATIVE_KERNELS)
    if backends.triton_available():
        from lorsum_kernels.triton_kernels import _launch

        assert _launch.LaunchPlan.launch.__module__ == _launch.__name__ and not launches._COUNTING


def test_ops_on_the_host_are_counted_apart():
    mode = launches.CountLaunches()
    with mode:
        torch.ones(3) * 2  # a CPU tensor: host time, no launch
        torch.ones(3, device="meta") * 2
    assert mode.host_ops["aten::mul"] == 1 and mode.ops["aten::mul"] == 1


def test_main_prints_and_appends_rows(tmp_path, capsys):
    launches.main(["--optimizers", "adamw,scaled_gd", "--blocks", "1", "--top", "3", "--sites", "2",
                   "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "scaled_gd" in out and "by call site" in out
    with (tmp_path / launches.FILE).open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["optimizer"] for r in rows] == ["adamw", "scaled_gd"]
    assert float(rows[1]["step_ops_per_layer"]) > 0 and rows[1]["commit"]
