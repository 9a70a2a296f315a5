"""Each optimizer trains on a CUDA GPU as it does on the CPU: the same seeded steps of a small LoRA model
with the default backend on the GPU (the native CUDA kernels or Triton, whichever ``auto`` resolves to) and
with the torch reference on the CPU end within a tolerance, in every capture mode. The op tests check each
kernel alone; these check what a user runs, the bucketing, streaming, state placement and device handling
of the whole step. Marked ``cuda`` and skipped without a GPU (tools/gpu_check.sh runs them)."""

from __future__ import annotations

import inspect

import pytest
import torch

import lorsum_kernels as lk

from .conftest import TinyLoRAMLP, merged, train_tiny
from .problems import rel_err

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# (class, options, capture modes it takes): the defaults a user starts from, and the momentum, metric and
# statistics variants with their own code paths.
METHODS = {
    "lorsum": (lk.LoRSum, dict(lr=0.05), ("auto", "cache", "stream")),
    "lorsum_momentum": (lk.LoRSum, dict(lr=0.05, momentum=0.9, normalize_step=False), ("auto", "cache")),
    "scaled_lorsum": (lk.ScaledLoRSum, dict(lr=0.01), ("auto", "cache", "stream")),
    "scaled_lorsum_shampoo": (lk.ScaledLoRSum, dict(lr=0.01, metric="shampoo"), ("auto",)),
    "adaprelora": (lk.AdaPreLoRA, dict(lr=1e-2), ("auto", "cache")),
    "adaprelora_surrogate": (lk.AdaPreLoRA, dict(lr=1e-2, statistics="surrogate"), ("auto",)),
    "scaled_gd": (lk.ScaledGD, dict(lr=1e-2), ("auto",)),
    "scaled_adamw": (lk.ScaledAdamW, dict(lr=1e-2), ("auto",)),
    "svdlora": (lk.SVDLoRA, dict(lr=0.1), ("auto",)),
}
CASES = [(name, capture) for name, (_, _, captures) in METHODS.items() for capture in captures]


def train(name: str, capture: str, device: str, backend: str, steps: int = 4, dtype=torch.float32,
          compile_mode: str | None = None):
    """conftest.train_tiny under the method: the parameters and state on the CPU, and the device type of each
    state tensor of one dimension or more."""
    cls, kw, _ = METHODS[name]
    if "backend" in inspect.signature(cls).parameters:  # SVDLoRA has no kernels to choose
        kw = dict(kw, backend=backend)
    params, state = train_tiny(lambda model: cls(model, **kw, capture=capture), steps, device=device,
                               dtype=dtype, compile_mode=compile_mode)
    devices = {key: v.device.type for key, v in state.items() if v.dim() > 0}
    return {k: v.cpu() for k, v in params.items()}, {k: v.cpu() for k, v in state.items()}, devices


@pytest.mark.parametrize("name,capture", CASES, ids=[f"{n}-{c}" for n, c in CASES])
def test_trains_on_cuda_as_on_cpu(name, capture):
    p_cpu, s_cpu, _ = train(name, capture, "cpu", "torch")
    p_gpu, s_gpu, devices = train(name, capture, "cuda", "auto")
    assert p_cpu.keys() == p_gpu.keys() and s_cpu.keys() == s_gpu.keys()
    for key, device in devices.items():  # the state lives on the parameters' device
        assert device == "cuda", (key, device)
    if name == "svdlora":  # the SVD's singular vectors are defined up to sign: compare the merged products
        p_cpu, p_gpu = merged(p_cpu), merged(p_gpu)
    for key in p_cpu:
        assert torch.isfinite(p_gpu[key]).all(), key
        assert rel_err(p_gpu[key], p_cpu[key]) < 1e-4, (key, rel_err(p_gpu[key], p_cpu[key]))
    for key in s_cpu:
        if s_cpu[key].is_floating_point():
            assert rel_err(s_gpu[key], s_cpu[key]) < 1e-4, (key, rel_err(s_gpu[key], s_cpu[key]))
        else:
            assert torch.equal(s_gpu[key], s_cpu[key]), key
    # the LoRA factors moved: a step that did nothing on both devices would pass the comparison
    torch.manual_seed(0)
    init = TinyLoRAMLP(d_in=40, d_hidden=72, d_out=5, r=5, alpha=10.0)
    assert not torch.equal(init.l2.lora_A.weight.detach(), p_gpu["l2.lora_A.weight"])


def test_auto_backend_runs_a_gpu_kernel(monkeypatch):
    """On a GPU, ``auto`` reaches the native CUDA or Triton kernels, not only the torch reference."""
    from lorsum_kernels import backends

    seen = []
    real = backends.resolve_backend

    def spy(backend, device, op, *args, **kwargs):
        out = real(backend, device, op, *args, **kwargs)
        seen.append((torch.device(device).type, op, out))
        return out

    monkeypatch.setattr(backends, "resolve_backend", spy)
    train("lorsum", "cache", "cuda", "auto", steps=2)
    on_gpu = {out for dev, _, out in seen if dev == "cuda"}
    assert on_gpu - {"torch"}, seen


@pytest.mark.parametrize("name", ["lorsum", "scaled_lorsum", "adaprelora"])
def test_trains_a_bf16_model_on_cuda_as_on_cpu(name):
    """The model and its LoRA factors in bf16 (as PEFT loads a bf16 model): the GPU's training stays within
    bf16 rounding of the CPU's over four steps (each device rounds its own products and sums)."""
    p_cpu, _, _ = train(name, "auto", "cpu", "torch", dtype=torch.bfloat16)
    p_gpu, _, _ = train(name, "auto", "cuda", "auto", dtype=torch.bfloat16)
    torch.manual_seed(0)
    init = TinyLoRAMLP(d_in=40, d_hidden=72, d_out=5, r=5, alpha=10.0).bfloat16()
    for key in p_cpu:
        assert p_gpu[key].dtype == torch.bfloat16 and torch.isfinite(p_gpu[key]).all(), key
        assert rel_err(p_gpu[key].float(), p_cpu[key].float()) < 3e-2, (key, rel_err(p_gpu[key].float(),
                                                                                     p_cpu[key].float()))
    # the steps moved the factors by far more than the tolerance (0.2 to 0.8 of their norm here)
    assert rel_err(init.l2.lora_A.weight.detach().float(), p_gpu["l2.lora_A.weight"].float()) > 0.1


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
@pytest.mark.parametrize("name", ["lorsum"])  # the capture is the methods' common path; each compile costs
def test_a_compiled_model_trains_on_cuda_as_the_eager_one(name, mode):  # ~half a minute of GPU time
    """``torch.compile(model)`` on the GPU (Inductor), and with its CUDA graphs (``mode="reduce-overhead"``,
    which must leave the capture's tap op out: its backward records the pair in Python, which a graph's
    replay would skip): the same steps as the eager model, within the GPU's rounding."""
    p_eager, _, _ = train(name, "auto", "cuda", "auto")
    p_compiled, _, _ = train(name, "auto", "cuda", "auto", compile_mode=mode)
    for key in p_eager:
        assert rel_err(p_compiled[key], p_eager[key]) < 1e-4, (key, rel_err(p_compiled[key], p_eager[key]))
