"""The HF Trainer with FSDP2 and the package's optimizers (lorsum_kernels.hf; issue #14).

Under FSDP the Trainer refuses a pre-built optimizer and builds it in ``create_optimizer``, which
``LoRAOptimizerMixin`` overrides. accelerate (1.15) enables FSDP only on accelerator backends, so on this
CPU machine ``examples/fsdp_trainer_example.py --cpu-fsdp`` switches accelerate's FSDP2 plugin on for the
gloo ranks; everything else is the real path: the optimizer built on the unsharded PEFT model,
``accelerator.prepare(model, optimizer)`` sharding the model with ``fully_shard`` and swapping the
optimizer's parameters, the optimizer following them, and checkpoints through accelerate's FSDP2 code
(``torch.distributed.checkpoint``, sharded). Checked: 2 ranks equal the single-process Trainer on the same
global batches to fp32 rounding, and a run resumed from a mid-training sharded checkpoint ends bit-identical
to the uninterrupted one. The mixin's own contract (what it passes, what it refuses) is tested in one process.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("peft")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import TrainingArguments  # noqa: E402

import lorsum_kernels as lk  # noqa: E402
from lorsum_kernels.hf import LoRAOptimizerMixin, trainer_optimizer_kwargs  # noqa: E402

from .conftest import rel_err  # noqa: E402
from .test_distributed import _free_port  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fsdp_trainer_example.py"
STEPS = 4


def _example():
    spec = importlib.util.spec_from_file_location("fsdp_trainer_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _lora_params(trainer) -> dict:
    full = {}
    for name, p in trainer.model.named_parameters():
        if p.requires_grad:
            full[name] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
    return full


def _run(example, out: Path, *extra) -> dict:
    trainer = example.main(["--max-steps", str(STEPS), "--output-dir", str(out), *extra])
    params = _lora_params(trainer)
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    return {"params": params, "optimizer": type(opt).__name__, "sharded": opt._sharded is not None,
            "streaming": opt._capture.sink is not None}


def _rank_main(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    example = _example()
    out = Path(out)
    results = {"uninterrupted": _run(example, out / "run", "--cpu-fsdp", "--save-steps", "2")}
    results["resumed"] = _run(example, out / "resumed", "--cpu-fsdp",
                              "--resume", str(out / "run" / "checkpoint-2"))
    torch.save(results, out / f"rank{rank}.pt")
    if dist.is_initialized():
        # Both ranks done before either tears its group down: once rank 0 has exited, its TCP store is
        # gone, and a rank still tearing down aborted the process once (a fresh clone's make test).
        dist.barrier()
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo")
def test_trainer_with_fsdp2_equals_one_process_and_resumes_bit_identical(tmp_path):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    single = _run(_example(), tmp_path / "single")
    initial = {}
    for res in ranks:
        run = res["uninterrupted"]
        assert run["optimizer"] == "LoRSum" and run["sharded"] and run["streaming"]
        assert run["params"].keys() == single["params"].keys() and run["params"]
        for name, value in single["params"].items():
            assert rel_err(run["params"][name], value) < 2e-5, name
            assert torch.equal(res["resumed"]["params"][name], run["params"][name]), name
            initial.setdefault(name, value)
    # PEFT starts B at 0: the step moved it
    assert any(".lora_B." in n and v.abs().max() > 1e-3 for n, v in initial.items())
    for name, value in ranks[0]["uninterrupted"]["params"].items():
        assert torch.equal(ranks[1]["uninterrupted"]["params"][name], value)


# ------------------------------------------------------------------------------------------------------
# the mixin in one process


class _Trainer:
    """What trainer_optimizer_kwargs reads of a Trainer."""

    def __init__(self, **args):
        self.args = TrainingArguments(output_dir="unused", report_to=[], use_cpu=True, **args)
        self.is_deepspeed_enabled = False


def test_mixin_kwargs_and_refusals():
    assert trainer_optimizer_kwargs(_Trainer(max_grad_norm=0.0), "lorsum", {"lr": 1.0}) == {"lr": 1.0}
    assert trainer_optimizer_kwargs(_Trainer(max_grad_norm=0.0, gradient_accumulation_steps=4), "lorsum") \
        == {"accumulation_steps": 4}
    # the Trainer's .grad clipping reaches the factor-gradient methods: allowed there
    assert trainer_optimizer_kwargs(_Trainer(max_grad_norm=1.0), "scaled_adamw") == {}
    assert trainer_optimizer_kwargs(_Trainer(max_grad_norm=1.0), "adaprelora", {"statistics": "surrogate"}) \
        == {"statistics": "surrogate"}
    with pytest.raises(ValueError, match="max_grad_norm=0"):
        trainer_optimizer_kwargs(_Trainer(max_grad_norm=1.0), "lorsum")
    with pytest.raises(ValueError, match="unknown LoRA optimizer"):
        trainer_optimizer_kwargs(_Trainer(), "lion")
    trainer = _Trainer(max_grad_norm=0.0)
    trainer.is_deepspeed_enabled = True
    with pytest.raises(NotImplementedError, match="ZeRO"):
        trainer_optimizer_kwargs(trainer, "lorsum")


def test_mixin_builds_the_optimizer_without_fsdp(tmp_path):
    """The mixin without sharding (one process): the Trainer's create_optimizer builds the package's
    optimizer on the PEFT model with the Trainer's learning rate, and trains."""
    example = _example()
    trainer = example.main(["--max-steps", "2", "--output-dir", str(tmp_path), "--optimizer", "scaled_lorsum",
                            "--lr", "0.03"])
    assert isinstance(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer")
                      else trainer.optimizer, lk.ScaledLoRSum)
    assert trainer.optimizer.param_groups[0]["initial_lr"] == 0.03
    with pytest.raises(ValueError, match="unknown LoRA optimizer"):
        type("T", (LoRAOptimizerMixin, object), {})(lora_optimizer="sgd")
