"""Data-parallel training (lorsum_kernels.distributed; spec/lorsum.md §12, T18).

R ranks (gloo on CPU, spawned processes) train under torch DDP, each on its shard of a global batch with the
loss averaged over its own tokens; a single process trains the same model on the concatenated batch. The
factors must agree with the single process to fp32 accuracy, and be bit-identical across ranks (state
included). Every configuration runs in one spawn per world size; the tests read its results.
"""

from __future__ import annotations

import os
import socket
import warnings
from contextlib import nullcontext
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import lorsum_kernels as lk
from lorsum_kernels.functional.lorsum_step import scaled_psi_lora_step

from .conftest import rel_err

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                       reason="needs torch.distributed with gloo"),
]

N_IN, M_OUT, RANK, TOKENS, STEPS = 29, 37, 3, 11, 3  # small and odd: n=29, m=37, r=3, T=11 per rank


class TwoLoRA(nn.Module):
    """Two LoRA layers (37×29 and 37×37) and a trainable head; ``skip_second`` leaves the second unused."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.first = lk.LoRALinear(nn.Linear(N_IN, M_OUT), RANK, alpha=6.0)
        self.second = lk.LoRALinear(nn.Linear(M_OUT, M_OUT), RANK, alpha=6.0)
        self.head = nn.Linear(M_OUT, 5)
        for layer in (self.first, self.second):  # non-zero B: every factor moves from the first step
            nn.init.normal_(layer.lora_B.weight, std=0.3)

    def forward(self, x, skip_second: bool = False):
        h = torch.tanh(self.first(x))
        if not skip_second:
            h = torch.tanh(self.second(h))
        return self.head(h)


# name -> (optimizer factory (model, process_group), options). Options: "micro" micro-batches per rank
# (the first ones under DDP.no_sync), "uneven" (rank r has 11 − 2r tokens and rank 1 skips the second
# layer: the single process then accumulates the per-shard means / R, the objective DDP optimises), "lrs"
# (the LoRA group's lr at each step: a warm-up from 0 and a zero mid-run, which the normalised step takes
# without moving or measuring; the zero steps are streamed, as the others from step 2 on).
CASES = {
    "lorsum_k1": (lambda m, pg: lk.LoRSum(m, lr=1e-2, iters=1, process_group=pg), {}),  # normalised (default)
    "scaled_zero_lr": (lambda m, pg: lk.ScaledLoRSum(m, lr=1e-2, iters=1, process_group=pg),
                       {"lrs": [0.0, 1e-2, 0.0]}),
    "lorsum_k0_momentum": (lambda m, pg: lk.LoRSum(m, lr=0.5, normalize_step=False, iters=0, momentum=0.9,
                                                   dampening=0.1, process_group=pg), {}),
    "lorsum_k2_momentum_clipped": (
        lambda m, pg: lk.LoRSum(m, lr=0.5, iters=2, momentum=0.9, momentum_rank=4, max_grad_norm=0.05,
                                process_group=pg), {}),
    "lorsum_torch_backend": (lambda m, pg: lk.LoRSum(m, lr=0.5, iters=1, momentum=0.8, backend="torch",
                                                     process_group=pg), {}),
    "scaled_k1_momentum": (lambda m, pg: lk.ScaledLoRSum(m, lr=0.5, normalize_step=False, iters=1,
                                                         betas=(0.9, 0.9), process_group=pg), {}),
    "scaled_k1_normalized": (lambda m, pg: lk.ScaledLoRSum(m, lr=1e-2, iters=1, normalize_step=True,
                                                           process_group=pg), {}),
    # δ = 0.1 (not the default 1e-5): at p = 1 the metric's inverse would reach 1e5 and amplify fp32 rounding
    "scaled_k0_clipped": (lambda m, pg: lk.ScaledLoRSum(m, lr=0.5, normalize_step=False, iters=0,
                                                        betas=(0.0, 0.9), damping=0.1, metric_power=1.0,
                                                        max_grad_norm=0.05, process_group=pg), {}),
    "lorsum_accumulation": (lambda m, pg: lk.LoRSum(m, lr=0.5, iters=1, momentum=0.9, process_group=pg),
                            {"micro": 2}),
    "lorsum_uneven_shards": (lambda m, pg: lk.LoRSum(m, lr=0.5, iters=1, momentum=0.9, process_group=pg),
                             {"uneven": True}),
    "svdlora": (lambda m, pg: lk.SVDLoRA(m, lr=0.5, process_group=pg), {}),
    # The step inside backward (capture="auto" streams from the second step in the cases above that allow
    # it): forced from the first step, and the cache forced throughout.
    "lorsum_k2_momentum_stream": (lambda m, pg: lk.LoRSum(m, lr=0.5, iters=2, momentum=0.9, capture="stream",
                                                          process_group=pg), {}),
    "scaled_k1_stream": (lambda m, pg: lk.ScaledLoRSum(m, lr=0.5, normalize_step=False, iters=1,
                                                       betas=(0.9, 0.9), capture="stream",
                                                       process_group=pg), {}),
    "lorsum_k1_cached": (lambda m, pg: lk.LoRSum(m, lr=0.5, iters=1, momentum=0.9, capture="cache",
                                                 process_group=pg), {}),
    # Token-sum steps (iters=0; kfac): running sums over micro-batches in backward, averaged over ranks in
    # step(); auto streams them under accumulation and with a layer some rank skips.
    "lorsum_k0_accumulation": (lambda m, pg: lk.LoRSum(m, lr=0.5, normalize_step=False, iters=0, momentum=0.9,
                                                       momentum_rank=4, process_group=pg), {"micro": 2}),
    "scaled_k0_accumulation_stream": (
        lambda m, pg: lk.ScaledLoRSum(m, lr=0.5, normalize_step=False, iters=0, betas=(0.9, 0.9),
                                      beta2_warmup=True, capture="stream", accumulation_steps=2,
                                      process_group=pg), {"micro": 2}),
    "lorsum_k0_uneven_shards": (
        lambda m, pg: lk.LoRSum(m, lr=0.5, normalize_step=False, iters=0, momentum=0.9, process_group=pg),
        {"uneven": True}),
    # Factor-gradient methods: DDP's averaged .grad is all they read (with or without process_group).
    "scaled_gd": (lambda m, pg: lk.ScaledGD(m, lr=0.1), {}),
    "scaled_adamw_clipped": (lambda m, pg: lk.ScaledAdamW(m, lr=0.01, max_grad_norm=0.05,
                                                          process_group=pg), {}),
    "adaprelora_surrogate": (lambda m, pg: lk.AdaPreLoRA(m, lr=0.01, statistics="surrogate",
                                                         process_group=pg), {}),
}
CAPTURE_CASES = [c for c in CASES if c not in ("scaled_gd", "scaled_adamw_clipped", "adaprelora_surrogate")]


def _shards(world: int, uneven: bool) -> list[tuple[int, int]]:
    sizes = [TOKENS - 2 * r if uneven else TOKENS for r in range(world)]
    starts = [sum(sizes[:r]) for r in range(world)]
    return [(s, s + n) for s, n in zip(starts, sizes)]


def _train(case: str, world: int, rank: int | None, with_group: bool = True) -> dict:
    """STEPS steps of ``case``: on rank ``rank``'s shard under DDP, or (rank None) as the single process."""
    make, options = CASES[case]
    micro, uneven = options.get("micro", 1), options.get("uneven", False)
    model = TwoLoRA()
    net = DDP(model, find_unused_parameters=uneven) if rank is not None else model
    opt = make(model, "default" if rank is not None and with_group else None)
    shards = _shards(world, uneven)
    total = shards[-1][1] * micro
    for step in range(STEPS):
        if "lrs" in options:
            opt.param_groups[0]["lr"] = options["lrs"][step]
        g = torch.Generator().manual_seed(100 + step)
        x, y = torch.randn(total, N_IN, generator=g), torch.randn(total, 5, generator=g)
        if rank is None and not uneven:  # the concatenated global batch, one mean
            nn.functional.mse_loss(net(x), y).backward()
        elif rank is None:  # DDP's objective with unequal shards: the mean of the per-shard means
            for r, (lo, hi) in enumerate(shards):
                (nn.functional.mse_loss(net(x[lo:hi], skip_second=r == 1), y[lo:hi]) / world).backward()
        else:
            lo, hi = (bound * micro for bound in shards[rank])
            for i, (xs, ys) in enumerate(zip(x[lo:hi].chunk(micro), y[lo:hi].chunk(micro))):
                with net.no_sync() if i < micro - 1 else nullcontext():  # DDP syncs at the last one
                    loss = nn.functional.mse_loss(net(xs, skip_second=uneven and rank == 1), ys) / micro
                    loss.backward()
        capture = getattr(opt, "_capture", None)
        cached_rows = None if capture is None else sum(capture.rows(layer) for layer in opt._layers)
        opt.step()
        opt.zero_grad()
    state = {(name, key): value.clone() for name, p in model.named_parameters()
             for key, value in opt.state.get(p, {}).items() if isinstance(value, torch.Tensor)}
    capture = getattr(opt, "_capture", None)
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()}, "state": state,
            "grad_norm": opt.grad_norm, "streaming": capture is not None and capture.sink is not None,
            "last_step_cached_rows": cached_rows}


def _rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))  # a mismatched collective fails, never hangs
    try:
        results = {case: _train(case, world, rank) for case in CASES}
        # The negative control: the same DDP run with the products left local (which warns).
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results["no_reduce"] = _train("lorsum_k1", world, rank, with_group=False)
        results["no_reduce_warned"] = any("drift apart" in str(w.message) for w in caught)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=[2, 3], ids=["R2", "R3"])
def runs(request, tmp_path_factory):
    """(world, per-rank results) of one spawn of ``world`` ranks running every case."""
    world = request.param
    out_dir = tmp_path_factory.mktemp(f"ddp{world}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_rank_main, args=(world, _free_port(), str(out_dir)), nprocs=world, join=True)
    return world, [torch.load(out_dir / f"rank{r}.pt") for r in range(world)]


def _assert_ranks_identical(results: list[dict], case: str) -> None:
    first = results[0][case]
    for r, other in enumerate(results[1:], start=1):
        for part in ("params", "state"):
            for key, value in first[part].items():
                same = torch.equal(value, other[case][part][key])
                assert same, f"rank {r} differs from rank 0 in {part} {key}"


@pytest.mark.parametrize("case", list(CASES))
def test_ranks_equal_single_process_on_concatenated_batch(runs, case):
    world, results = runs
    _assert_ranks_identical(results, case)
    expected = _train(case, world, None)
    initial = {n: p.detach() for n, p in TwoLoRA().named_parameters()}
    for name, value in expected["params"].items():
        if ".lora_" not in name:
            continue
        assert rel_err(value, initial[name]) > 1e-3, f"{name} barely moved: the comparison would be empty"
        assert rel_err(results[0][case]["params"][name], value) < 2e-5, name
    for key, value in expected["state"].items():
        if value.dtype.is_floating_point and value.ndim > 0:  # momentum factors, metrics, moments
            assert rel_err(results[0][case]["state"][key], value) < 5e-5, key
    if expected["grad_norm"] is not None:  # the clipped cases: the exact global norm
        assert rel_err(results[0][case]["grad_norm"], expected["grad_norm"]) < 1e-5


def test_auto_streams_where_every_rank_had_one_backward_per_layer(runs):
    world, results = runs
    for res in results:
        assert res["lorsum_k1"]["streaming"] and res["scaled_k1_momentum"]["streaming"]
        assert res["lorsum_k2_momentum_stream"]["streaming"] and not res["lorsum_k1_cached"]["streaming"]
        # accumulation, clipping and a layer some rank skips keep the cache (no collective in a backward
        # that another rank never runs)
        for case in ("lorsum_accumulation", "lorsum_uneven_shards", "lorsum_k2_momentum_clipped"):
            assert not res[case]["streaming"], case
        # token-sum steps stream in those cases too: nothing was cached for the last step
        for case in ("lorsum_k0_accumulation", "scaled_k0_accumulation_stream", "lorsum_k0_uneven_shards"):
            assert res[case]["streaming"] and res[case]["last_step_cached_rows"] == 0, case


def test_without_the_reduce_ranks_diverge(runs):
    """The products left local (process_group=None under DDP): ranks step on their own G and differ."""
    world, results = runs
    expected = _train("lorsum_k1", world, None)["params"]["first.lora_A.weight"]
    local = [res["no_reduce"]["params"]["first.lora_A.weight"] for res in results]
    assert not torch.equal(local[0], local[1])
    assert rel_err(local[0], expected) > 1e-3
    assert all(res["no_reduce_warned"] for res in results)


# ------------------------------------------------------------------------------------------------------
# Bad input and the single-rank group (in this process)


def test_process_group_without_init_raises_before_hooking():
    assert not dist.is_initialized()
    model = TwoLoRA()
    with pytest.raises(RuntimeError, match="not initialised"):
        lk.LoRSum(model, process_group="default")
    assert not model.first._forward_hooks and not model.second._forward_hooks


@pytest.fixture
def single_rank_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_unsupported_configurations_raise_before_hooking(single_rank_group):
    for make, match in [
        (lambda m: lk.AdaPreLoRA(m, statistics="exact", process_group="default"), "statistics='exact'"),
        (lambda m: lk.ScaledLoRSum(m, metric="shampoo", process_group="default"), "metric='shampoo'"),
        (lambda m: lk.LoRSum(m, process_group="world"), "process_group must be"),
        (lambda m: lk.LoRSum(m, process_group=3), "process_group must be"),
    ]:
        model = TwoLoRA()
        with pytest.raises((ValueError, TypeError), match=match):
            make(model)
        assert not model.first._forward_hooks and not model.second._forward_hooks
    X, S = torch.randn(1, TOKENS, N_IN), torch.randn(1, TOKENS, M_OUT)
    A, B = torch.randn(1, RANK, N_IN), torch.randn(1, M_OUT, RANK)
    with pytest.raises(ValueError, match="cross-rank"):
        scaled_psi_lora_step(A, B, X, S, (torch.ones(1, N_IN), torch.ones(1, M_OUT)), None, lr=0.1, lmbd=0.01,
                             min_lmbd=1e-5, iters=1, betas=(0.0, 0.9), damping=0.1, metric="shampoo",
                             metric_power=0.5, loss_reduction="mean", reduce=lk.RankAverage(dist.group.WORLD))


def test_one_rank_group_equals_no_group(single_rank_group):
    """The decomposed path (products, all-reduce, solve) against the fused single-process one."""
    with_group = _train("lorsum_k2_momentum_clipped", 1, 0)["params"]
    without = _train("lorsum_k2_momentum_clipped", 1, None)["params"]
    for name, value in without.items():
        assert rel_err(with_group[name], value) < 1e-5, name


@pytest.mark.parametrize("iters", [0, 2])
def test_functional_reduce_on_one_rank_equals_no_reduce(single_rank_group, iters):
    g = torch.Generator().manual_seed(3)
    A, B = torch.randn(2, RANK, N_IN, generator=g), torch.randn(2, M_OUT, RANK, generator=g)
    X, S = torch.randn(2, TOKENS, N_IN, generator=g), torch.randn(2, TOKENS, M_OUT, generator=g)
    A_m, B_m = torch.randn(2, 4, N_IN, generator=g), torch.randn(2, M_OUT, 4, generator=g)
    metrics = (torch.rand(2, N_IN, generator=g) + 0.5, torch.rand(2, M_OUT, generator=g) + 0.5)
    pairs, coeffs = [(A, B), (X, S.mT), (A_m, B_m)], [1.0, -0.3, -0.2]
    reduce = lk.RankAverage(dist.group.WORLD)
    for run in (lambda **kw: lk.low_rank_sum(pairs, coeffs, lmbd=1e-3, iters=iters, **kw),
                lambda **kw: lk.scaled_low_rank_sum(pairs, coeffs, metrics, lmbd=1e-3, iters=iters, **kw)):
        for got, expected in zip(run(reduce=reduce), run()):
            assert rel_err(got, expected) < 1e-5
    with pytest.raises(ValueError, match="token pair"):
        lk.low_rank_sum(pairs[:1], coeffs[:1], reduce=reduce)
