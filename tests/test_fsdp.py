"""Sharded training under FSDP2 and distributed checkpoints (lorsum_kernels.fsdp; issue #14).

R = 2 and 3 ranks (gloo on CPU, spawned processes) train a model of two LoRA layers (r = 3 and r = 2, so the
factors are sharded unevenly, some ranks holding no row of a factor) and a head, wrapped with ``fully_shard``
per LoRA module and at the root, each rank on its shard of a global batch; one process trains the unsharded
model on the concatenated batch. For every optimizer of the package the factors, the method state and the
head's AdamW moments must equal the single process to fp32 accuracy after 5 steps, and every rank must
compute the same new factors, bit for bit, before it writes its shard.

Checkpoints: on 2 ranks, 3 steps, then ``torch.distributed.checkpoint`` saves model and optimizer
(``get_optimizer_state_dict``, sharded) and a full state dict goes to one file; 2 more steps follow. Loaded
(sharded; full on every rank; full read by rank 0 and broadcast) on 2 ranks the run resumes bit-identical;
on 3 ranks and in one unsharded process the loaded state is bit-identical to the saved one and 2 more steps
equal the single process.
"""

from __future__ import annotations

import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import lorsum_kernels as lk
from lorsum_kernels.fsdp import ShardedParams

from .conftest import rel_err
from .test_distributed import _free_port, single_rank_group  # noqa: F401 (a fixture)

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                       reason="needs torch.distributed with gloo"),
]

if dist.is_available():
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor

N_IN, M_OUT, TOKENS, STEPS = 29, 37, 11, 5
SAVE_AT = 3  # checkpoint after this many steps, then STEPS - SAVE_AT more
GLOBAL_ROWS = 6 * TOKENS  # the checkpoint runs' global batch: equal shards on 1, 2 and 3 ranks


class Model(nn.Module):
    """LoRA 37×29 (r = 3) and 37×37 (r = 2: on 3 ranks one holds no row of A), and a trainable head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.first = lk.LoRALinear(nn.Linear(N_IN, M_OUT), 3, alpha=6.0)
        self.second = lk.LoRALinear(nn.Linear(M_OUT, M_OUT), 2, alpha=4.0)
        self.head = nn.Linear(M_OUT, 5)
        for layer in (self.first, self.second):  # non-zero B: every factor moves from the first step
            nn.init.normal_(layer.lora_B.weight, std=0.3)

    def forward(self, x):
        return self.head(torch.tanh(self.second(torch.tanh(self.first(x)))))


def shard(model: nn.Module, mp_policy=None) -> nn.Module:
    kw = {} if mp_policy is None else {"mp_policy": mp_policy}
    fully_shard(model.first, **kw)
    fully_shard(model.second, **kw)
    fully_shard(model, **kw)
    return model


# name -> (optimizer factory, options). "before": the optimizer is built before fully_shard (as accelerate's
# prepare(model, optimizer) does) and follows the sharded parameters; "bf16": MixedPrecisionPolicy with bf16
# parameters in forward and backward (compared with the fp32 single process at bf16 accuracy).
CASES = {
    # LoRSum's plain step (normalize_step=False) at an SGD-like lr, and its default, normalised one
    "lorsum_momentum": (lambda m: lk.LoRSum(m, lr=0.5, normalize_step=False, iters=1, momentum=0.9), {}),
    "lorsum_normalized": (lambda m: lk.LoRSum(m, lr=1e-2, iters=1, momentum=0.9), {}),
    "lorsum_k2_stream": (lambda m: lk.LoRSum(m, lr=0.5, normalize_step=False, iters=2, momentum=0.9,
                                             momentum_rank=4, capture="stream"), {}),
    "lorsum_cached_clipped": (lambda m: lk.LoRSum(m, lr=0.5, normalize_step=False, iters=1, momentum=0.9,
                                                  capture="cache", max_grad_norm=0.05), {}),
    "scaled_kfac": (lambda m: lk.ScaledLoRSum(m, lr=0.5, normalize_step=False, iters=1, betas=(0.9, 0.9)),
                    {}),
    "scaled_normalized": (lambda m: lk.ScaledLoRSum(m, lr=1e-2, iters=1, normalize_step=True), {}),
    "adaprelora_surrogate": (lambda m: lk.AdaPreLoRA(m, lr=0.01, statistics="surrogate"), {}),
    "scaled_adamw_clipped": (lambda m: lk.ScaledAdamW(m, lr=0.01, max_grad_norm=0.05), {}),
    "scaled_gd": (lambda m: lk.ScaledGD(m, lr=0.1), {}),
    "svdlora": (lambda m: lk.SVDLoRA(m, lr=0.5), {}),
    "lorsum_built_before_sharding": (  # process_group as LoRAOptimizerMixin passes it
        lambda m: lk.LoRSum(m, lr=0.5, normalize_step=False, iters=1, momentum=0.9,
                            process_group="default" if dist.is_initialized() else None), {"before": True}),
    "lorsum_bf16_mixed_precision": (
        lambda m: lk.LoRSum(m, lr=0.5, normalize_step=False, iters=1, momentum=0.9), {"bf16": True}),
}
CHECKPOINTED = ["lorsum_momentum", "scaled_kfac", "scaled_adamw_clipped"]
# On 3 ranks (3 processes on a small machine) the four methods and a forced streamed step; the rest
# on 2.
ON_3_RANKS = ["lorsum_momentum", "lorsum_k2_stream", "scaled_kfac", "adaprelora_surrogate",
              "scaled_adamw_clipped"]


def _full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def _snapshot(model: nn.Module, opt) -> dict:
    """Full values of the parameters and of every state tensor, by parameter name."""
    names = {p: n for n, p in model.named_parameters()}
    state = {(names[p], k): _full(v).detach().clone() for p, entries in opt.state.items()
             if isinstance(p, torch.Tensor) for k, v in entries.items() if isinstance(v, torch.Tensor)}
    state[("", "skipped_steps")] = opt.state["skipped_steps"].clone()
    return {"params": {n: _full(p).detach().clone() for n, p in model.named_parameters()}, "state": state}


def _batch(step: int, rows: int, world: int, rank: int | None):
    g = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(rows, N_IN, generator=g), torch.randn(rows, 5, generator=g)
    if rank is None:
        return x, y
    per = rows // world
    return x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]


def _steps(model, opt, first: int, last: int, rows: int, world: int, rank: int | None) -> None:
    for step in range(first, last):
        x, y = _batch(step, rows, world, rank)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()


class _Probe:
    """Counts the factor gathers that run inside backward and keeps the full values each rank writes."""

    def __init__(self):
        self.gathers_in_backward = 0
        self.written: dict[int, torch.Tensor] = {}
        self._gather, self._write = ShardedParams._gather_rows, ShardedParams.write
        probe = self

        def gather(sharded, *args):
            if torch._C._current_graph_task_id() != -1:
                probe.gathers_in_backward += 1
            return probe._gather(sharded, *args)

        def write(sharded, param, value, ok):
            probe.written[id(param)] = value.clone()
            return probe._write(sharded, param, value, ok)

        ShardedParams._gather_rows, ShardedParams.write = gather, write

    def close(self):
        ShardedParams._gather_rows, ShardedParams.write = self._gather, self._write


def _train(case: str, world: int, rank: int | None) -> dict:
    """STEPS steps of ``case``: on rank ``rank``'s shard under FSDP2, or (rank None) as the single process."""
    make, options = CASES[case]
    model = Model()
    if rank is None:
        opt = make(model)
    elif options.get("before"):
        opt = make(model)
        shard(model)
    else:
        shard(model, MixedPrecisionPolicy(param_dtype=torch.bfloat16) if options.get("bf16") else None)
        opt = make(model)
    probe = _Probe() if rank is not None else None
    try:
        _steps(model, opt, 0, STEPS, TOKENS * world, world, rank)
    finally:
        if probe is not None:
            probe.close()
    out = _snapshot(model, opt)
    capture = getattr(opt, "_capture", None)
    out["streaming"] = capture is not None and capture.sink is not None
    out["grad_norm"] = opt.grad_norm
    if probe is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        out["written"] = {names[i]: v for i, v in probe.written.items()}
        out["gathers_in_backward"] = probe.gathers_in_backward
        out["sharded"] = {n: isinstance(p, DTensor) for n, p in model.named_parameters()}
        out["dtypes"] = {n: p.dtype for n, p in model.named_parameters()}
    return out


# ------------------------------------------------------------------------------------------------------
# checkpoints


def _checkpoint_case(case: str, world: int, rank: int | None, root: str) -> dict:
    """R = 2: train SAVE_AT steps, save (DCP sharded + a full state dict), train on; load into a fresh
    model and optimizer and resume. Other R (and the single process, rank None): load R = 2's checkpoint."""
    make, _ = CASES[case]
    sharded_dir, full_file = os.path.join(root, f"{case}.dcp"), os.path.join(root, f"{case}.full.pt")

    def fresh():
        model = Model() if rank is None else shard(Model())
        return model, make(model)

    out = {}
    if world == 2 and rank is not None:
        model, opt = fresh()
        _steps(model, opt, 0, SAVE_AT, GLOBAL_ROWS, world, rank)
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                 checkpoint_id=sharded_dir)
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = {"model": get_model_state_dict(model, options=full),
                 "optim": get_optimizer_state_dict(model, opt, options=full)}
        if rank == 0:
            torch.save(state, full_file)
        out["saved"] = _snapshot(model, opt)
        _steps(model, opt, SAVE_AT, STEPS, GLOBAL_ROWS, world, rank)
        out["continued"] = _snapshot(model, opt)
        dist.barrier()
    for source in _sources(rank):
        model, opt = fresh()
        if source == "sharded":
            state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
            dcp.load(state, checkpoint_id=sharded_dir)
            set_model_state_dict(model, state["model"])
            set_optimizer_state_dict(model, opt, state["optim"])
        elif source == "full":
            state = torch.load(full_file, weights_only=False)
            options = StateDictOptions(full_state_dict=True)
            set_model_state_dict(model, state["model"], options=options)
            set_optimizer_state_dict(model, opt, state["optim"], options=options)
        else:  # only rank 0 reads the file and broadcasts
            state = torch.load(full_file, weights_only=False) if rank == 0 else {"model": {}, "optim": {}}
            options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
            set_model_state_dict(model, state["model"], options=options)
            set_optimizer_state_dict(model, opt, state["optim"], options=options)
        out[f"loaded_{source}"] = _snapshot(model, opt)
        _steps(model, opt, SAVE_AT, STEPS, GLOBAL_ROWS, world, rank)
        out[f"resumed_{source}"] = _snapshot(model, opt)
    return out


def _sources(rank: int | None) -> tuple[str, ...]:
    """DCP's sharded checkpoint; a full state dict loaded by every rank; the same read by rank 0 only."""
    return ("sharded", "full") if rank is None else ("sharded", "full", "full_from_rank0")


def _reference_checkpoint_run(case: str) -> dict:
    """The single process on the global batch, all STEPS steps."""
    model = Model()
    opt = CASES[case][0](model)
    _steps(model, opt, 0, STEPS, GLOBAL_ROWS, 1, None)
    return _snapshot(model, opt)


# ------------------------------------------------------------------------------------------------------
# the spawned ranks


def _rank_main(rank: int, world: int, port: int, out_dir: str, ckpt_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))  # a mismatched collective fails, never hangs
    try:
        results = {case: _train(case, world, rank) for case in CASES if world == 2 or case in ON_3_RANKS}
        results["checkpoints"] = {case: _checkpoint_case(case, world, rank, ckpt_dir)
                                  for case in CHECKPOINTED}
        try:  # a process group of other ranks than the mesh's
            lk.LoRSum(shard(Model()), process_group=dist.new_group([0]))
        except ValueError as e:  # on rank 0 the ranks differ, the others are not in the group
            results["other_ranks_error"] = str(e)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(world: int, out_dir, ckpt_dir) -> list[dict]:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_rank_main, args=(world, _free_port(), str(out_dir), str(ckpt_dir)), nprocs=world, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fsdp_checkpoints")


@pytest.fixture(scope="module")
def run2(ckpt_dir, tmp_path_factory):
    return 2, _spawn(2, tmp_path_factory.mktemp("fsdp2"), ckpt_dir)


@pytest.fixture(scope="module")
def run3(run2, ckpt_dir, tmp_path_factory):  # loads run2's checkpoints
    return 3, _spawn(3, tmp_path_factory.mktemp("fsdp3"), ckpt_dir)


@pytest.fixture(scope="module", params=[2, 3], ids=["R2", "R3"])
def runs(request):
    return request.getfixturevalue(f"run{request.param}")


def _assert_same(a: dict, b: dict, what: str) -> None:
    for part in ("params", "state"):
        assert a[part].keys() == b[part].keys()
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), f"{what}: {part} {key} differs"


def _assert_close(got: dict, expected: dict, tol_params: float, tol_state: float, initial=None) -> None:
    for name, value in expected["params"].items():
        if initial is not None and ".lora_" in name:
            assert rel_err(value, initial[name]) > 1e-3, f"{name} barely moved: the comparison would be empty"
        assert rel_err(got["params"][name], value) < tol_params, name
    for key, value in expected["state"].items():
        counter = key[-1] in ("step", "skipped_steps", "metric_updates", "step_norm_count")
        if value.dtype.is_floating_point and not counter:  # momentum factors, metrics, moments, step norms
            assert rel_err(got["state"][key], value) < tol_state, key
        else:
            assert torch.equal(got["state"][key], value), key  # step counts, skipped steps


# ------------------------------------------------------------------------------------------------------
# the tests


RUNS = [(2, case) for case in CASES] + [(3, case) for case in ON_3_RANKS]
RUN_IDS = [f"R{world}-{case}" for world, case in RUNS]


@pytest.mark.parametrize("world,case", RUNS, ids=RUN_IDS)
def test_ranks_equal_single_process_on_concatenated_batch(request, world, case):
    results = request.getfixturevalue(f"run{world}")[1]
    expected = _train(case, world, None)
    initial = {n: p.detach() for n, p in Model().named_parameters()}
    got = results[0][case]
    assert all(got["sharded"].values()), "fully_shard left a parameter unsharded"
    if CASES[case][1].get("bf16"):
        # Forward and backward in bf16 (FSDP's cast); the sharded parameters and the optimizer stay fp32.
        assert all(dt == torch.float32 for dt in got["dtypes"].values())
        assert all(v.dtype in (torch.float32, torch.int64) for v in got["state"].values())
        _assert_close(got, expected, 5e-3, 5e-2, initial)
    else:
        _assert_close(got, expected, 2e-5, 5e-5, initial)
    if expected["grad_norm"] is not None:  # the clipped cases: the exact global norm
        assert rel_err(got["grad_norm"], expected["grad_norm"]) < 1e-5


@pytest.mark.parametrize("world,case", RUNS, ids=RUN_IDS)
def test_ranks_compute_identical_factors_and_state(request, world, case):
    """Every rank writes its shard of the same new factors: the full values each rank computed in the last
    step are bit-identical, and so is the replicated method state."""
    results = request.getfixturevalue(f"run{world}")[1]
    first = results[0][case]
    for r, other in enumerate(results[1:], start=1):  # other: rank r's results
        assert first["written"].keys() == other[case]["written"].keys() and first["written"]
        for name, value in first["written"].items():
            assert torch.equal(value, other[case]["written"][name]), f"rank {r}: other values of {name}"
        _assert_same(first, other[case], f"rank {r}")


def test_process_group_of_other_ranks_is_refused(runs):
    _, results = runs
    assert "sharded over ranks" in results[0]["other_ranks_error"]
    for res in results[1:]:
        assert "does not include this rank" in res["other_ranks_error"]


def test_streamed_steps_gather_nothing_in_backward(runs):
    """capture='auto' streams from the second step; in backward FSDP holds the layer's factors unsharded and
    the step reads them (no all-gather) unless a mixed-precision policy casts them."""
    world, results = runs
    for res in results:
        for case in ("lorsum_momentum", "lorsum_k2_stream", "scaled_kfac", "lorsum_built_before_sharding",
                     "lorsum_bf16_mixed_precision"):
            assert case not in res or res[case]["streaming"], case
        assert res["lorsum_momentum"]["gathers_in_backward"] == 0
        assert res["lorsum_k2_stream"]["gathers_in_backward"] == 0
        if world == 2:
            assert not res["lorsum_cached_clipped"]["streaming"]
            assert res["lorsum_bf16_mixed_precision"]["gathers_in_backward"] > 0  # bf16 copies: fp32 gathered


@pytest.mark.parametrize("case", CHECKPOINTED)
def test_checkpoint_resumes_bit_identical_on_same_ranks(run2, case):
    _, results = run2
    for res in results:
        ck = res["checkpoints"][case]
        for source in _sources(0):
            _assert_same(ck[f"loaded_{source}"], ck["saved"], f"{source} checkpoint loaded")
            _assert_same(ck[f"resumed_{source}"], ck["continued"], f"resumed from the {source} checkpoint")


@pytest.mark.parametrize("case", CHECKPOINTED)
def test_checkpoint_of_2_ranks_loads_on_3(run2, run3, case):
    saved = run2[1][0]["checkpoints"][case]
    expected = _reference_checkpoint_run(case)
    for res in run3[1]:
        ck = res["checkpoints"][case]
        for source in _sources(0):
            _assert_same(ck[f"loaded_{source}"], saved["saved"], f"{source} checkpoint loaded on 3 ranks")
            _assert_close(ck[f"resumed_{source}"], expected, 2e-5, 5e-5)
            _assert_close(ck[f"resumed_{source}"], saved["continued"], 2e-5, 5e-5)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP without a process group: intended
@pytest.mark.parametrize("case", CHECKPOINTED)
def test_checkpoint_of_2_ranks_loads_in_one_unsharded_process(run2, ckpt_dir, case):
    assert not dist.is_initialized()
    saved = run2[1][0]["checkpoints"][case]
    ck = _checkpoint_case(case, 1, None, str(ckpt_dir))
    for source in _sources(None):
        _assert_same(ck[f"loaded_{source}"], saved["saved"], f"{source} checkpoint loaded in one process")
        _assert_close(ck[f"resumed_{source}"], _reference_checkpoint_run(case), 2e-5, 5e-5)


# ------------------------------------------------------------------------------------------------------
# bad input, on a one-rank mesh in this process


@pytest.mark.usefixtures("single_rank_group")
def test_unsupported_configurations_raise_before_hooking():
    other = dist.new_group([0])  # a group that is not the mesh's (the same rank, another group object)
    for make, error, match in [
        (lambda m: lk.AdaPreLoRA(m, statistics="exact"), ValueError, "statistics='exact'"),
        (lambda m: lk.ScaledLoRSum(m, metric="shampoo"), ValueError, "metric='shampoo'"),
        (lambda m: lk.LoRSum(m, process_group=7), TypeError, "process_group must be"),
    ]:
        model = shard(Model())
        with pytest.raises(error, match=match):
            make(model)
        assert not any(type(h).__name__ == "_Hook" for h in model.first._forward_hooks.values())
    assert lk.LoRSum(shard(Model()), process_group=other)._sharded is not None  # the mesh's ranks: accepted


def test_fsdp1_is_refused():
    """FSDP1 needs an accelerator to wrap a model; its class is what the optimizer recognises."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    class Wrapped(nn.Module):  # passes for an FSDP1 module, without FSDP1's (accelerator-only) init
        def __init__(self, module):
            super().__init__()
            self.inner = module

        @property
        def __class__(self):
            return FullyShardedDataParallel

    model = Model()
    with pytest.raises(NotImplementedError, match="FSDP1"):
        lk.LoRSum(Wrapped(model))
    assert not any(type(h).__name__ == "_Hook" for h in model.first._forward_hooks.values())


@pytest.mark.usefixtures("single_rank_group")
def test_two_dimensional_mesh_is_refused():
    """HSDP (replicate × shard): the average must span both mesh dimensions; refused for now."""
    from torch.distributed.device_mesh import init_device_mesh

    model = Model()
    fully_shard(model, mesh=init_device_mesh("cpu", (1, 1), mesh_dim_names=("replicate", "shard")))
    with pytest.raises(NotImplementedError, match="2-D device mesh"):
        lk.LoRSum(model)


@pytest.mark.usefixtures("single_rank_group")
def test_one_rank_mesh_equals_no_sharding():
    """The sharded path (gather, rank average, shard writes, AdamW on DTensor shards) on one rank against
    the unsharded single process: the same numbers."""
    for case in ("lorsum_cached_clipped", "scaled_adamw_clipped"):
        _assert_close(_train(case, 1, 0), _train(case, 1, None), 1e-6, 1e-6)


@pytest.mark.usefixtures("single_rank_group")
def test_gather_and_shard_of_match_dtensor():
    """ShardedParams' batched gather and shard selection agree with DTensor's own (full_tensor, placements),
    including shapes with fewer rows than ranks (checked with the chunk arithmetic for 2 to 5 ranks)."""
    model = shard(Model())
    sharded = lk.LoRSum(model)._sharded
    params = [p for p in model.parameters() if p.requires_grad]
    for got, p in zip(sharded.full(params), params):
        assert torch.equal(got, p.full_tensor())
        assert torch.equal(sharded.shard_of(p, got), p.to_local())
    for world in range(2, 6):
        for rows in (1, 2, 3, 5, 37):
            chunk = -(-rows // world)
            pieces = torch.arange(rows).chunk(world)
            held = [max(0, min(chunk, rows - r * chunk)) for r in range(world)]
            assert held[:len(pieces)] == [len(p) for p in pieces] and sum(held) == rows
