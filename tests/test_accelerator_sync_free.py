"""On an accelerator a training step must not make the host wait for the device: no value read on the host
(``.item()``, ``bool(t)``, ``float(t)``) and no tensor made from host data on the device (a copy, which
torch makes wait unless pinned and non-blocking). In backward such a wait drains the queue of backward
kernels at every layer; in ``step()`` it forbids CUDA-graph capture. The first H200 run found one of each
(docs/gpu.md). Without a GPU this is checked on the meta device, which has shapes but no values: a host read
raises there, and a copy or a tensor made from host data on it is recorded here. The torch reference runs
there, and the native ops as on a GPU with their fake (shape) implementations (their C++ bindings read
only CPU scalars on the host); the first step, which builds the
optimizer's cached constants and for the normalised step measures each layer's lr, is left out."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

import lorsum_kernels as lk
from lorsum_kernels.benchmark.launches import as_gpu_on_meta

from .conftest import TinyLoRAMLP

METHODS = {
    "lorsum": (lk.LoRSum, {}, ("auto", "cache", "stream")),
    "lorsum_momentum": (lk.LoRSum, dict(momentum=0.9, normalize_step=False), ("auto", "cache")),
    "scaled_lorsum": (lk.ScaledLoRSum, {}, ("auto", "cache", "stream")),
    "scaled_lorsum_shampoo": (lk.ScaledLoRSum, dict(metric="shampoo"), ("auto",)),
    "adaprelora": (lk.AdaPreLoRA, {}, ("auto", "cache")),
    "adaprelora_surrogate": (lk.AdaPreLoRA, dict(statistics="surrogate"), ("auto",)),
    "scaled_gd": (lk.ScaledGD, {}, ("auto",)),
    "scaled_adamw": (lk.ScaledAdamW, {}, ("auto",)),
    "svdlora": (lk.SVDLoRA, {}, ("auto",)),
    # gradient accumulation (two backwards per step; k = 0 steps add over them as token sums) and the
    # global gradient-norm clip
    "lorsum_k0_accumulated": (lk.LoRSum, dict(iters=0, normalize_step=False, accumulation_steps=2),
                              ("stream", "cache")),
    "scaled_lorsum_k0_accumulated": (lk.ScaledLoRSum, dict(iters=0, normalize_step=False,
                                                           accumulation_steps=2), ("stream",)),
    "lorsum_grad_clip": (lk.LoRSum, dict(max_grad_norm=1.0), ("cache",)),
    "scaled_adamw_grad_clip": (lk.ScaledAdamW, dict(max_grad_norm=1.0), ("auto",)),
}
CASES = [(name, capture) for name, (_, _, captures) in METHODS.items() for capture in captures]


def _host_side(func, t: torch.Tensor) -> bool:
    """A CPU argument an op reads on the host, no copy: a 0-d tensor (a scalar), or a native op's shared
    coefficients and λ, float64 of at most one dimension (csrc/cuda/block_power_binding.cpp's make_coef)."""
    return t.dim() == 0 or (func.namespace == "lorsum" and t.dtype == torch.float64 and t.dim() <= 1)


class HostToDevice(TorchDispatchMode):
    """Records every op that takes a CPU tensor (but one read on the host) and gives a tensor on another
    device: a copy to it."""

    def __init__(self):
        super().__init__()
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t for a in args for t in (a if isinstance(a, (list, tuple)) else (a,))
                  if isinstance(t, torch.Tensor)]
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        if any(t.device.type == "cpu" and not _host_side(func, t) for t in inputs) and any(
                isinstance(o, torch.Tensor) and o.device.type != "cpu" for o in outputs):
            self.copies.append(f"{func}{[tuple(t.shape) for t in inputs if t.device.type == 'cpu']}")
        return out


def _made_from_host_data(monkeypatch) -> list:
    """torch.tensor / torch.as_tensor of Python data on another device (made on the CPU, then copied: not
    visible to a dispatch mode)."""
    made = []
    for name in ("tensor", "as_tensor"):
        real = getattr(torch, name)

        def spy(data, *args, real=real, name=name, **kwargs):
            device = kwargs.get("device")
            on_device = device is not None and torch.device(device).type != "cpu"
            if on_device and not isinstance(data, torch.Tensor):
                made.append(f"torch.{name}({data!r})")
            return real(data, *args, **kwargs)

        monkeypatch.setattr(torch, name, spy)
    return made


class CheckpointedMLP(TinyLoRAMLP):
    """TinyLoRAMLP with its two middle layers under activation checkpointing (recomputed in backward)."""

    def forward(self, x):
        h = torch.tanh(self.l1(x))
        h = checkpoint(lambda t: torch.tanh(self.l3(torch.tanh(self.l2(t)))), h, use_reentrant=False)
        return self.head(h)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kernels", ["reference", "native"])
@pytest.mark.parametrize("name,capture", CASES, ids=[f"{n}-{c}" for n, c in CASES])
def test_the_step_makes_the_host_wait_for_nothing(name, capture, kernels, dtype, monkeypatch):
    _check(name, capture, kernels, dtype, TinyLoRAMLP, monkeypatch)


@pytest.mark.parametrize("name", ["lorsum", "scaled_lorsum", "adaprelora"])
def test_a_checkpointed_model_makes_the_host_wait_for_nothing(name, monkeypatch):
    _check(name, "auto", "native", torch.float32, CheckpointedMLP, monkeypatch)


def _check(name, capture, kernels, dtype, model_cls, monkeypatch):
    from lorsum_kernels import _native

    if kernels == "native" and not _native.NATIVE_AVAILABLE:
        pytest.skip("the native extension is not built")
    # native: the meta device as a GPU with the native CUDA kernels (their fake implementations run)
    with as_gpu_on_meta() if kernels == "native" else contextlib.nullcontext():
        _check_on_meta(name, capture, dtype, model_cls, monkeypatch)


def _check_on_meta(name, capture, dtype, model_cls, monkeypatch):
    cls, kw, _ = METHODS[name]
    with torch.device("meta"):
        torch.manual_seed(0)
        model = model_cls(dtype=dtype)  # bf16: the model and its LoRA factors, as PEFT loads them
    opt = cls(model, lr=1e-2, capture=capture, **kw)
    for layer in opt._layers:  # as after a first step on a GPU: the lr measured, the scales known
        scale = opt.state[layer.A].get("step_norm_scale")
        if scale is not None:
            opt._positive_scales[id(layer.A)] = scale
    x = torch.empty(2, 7, 12, device="meta", dtype=dtype)
    y = torch.zeros(2, 7, dtype=torch.long, device="meta")

    def train_step():
        opt.zero_grad()
        for _ in range(kw.get("accumulation_steps", 1)):
            nn.functional.cross_entropy(model(x).flatten(0, 1).float(), y.flatten()).backward()
        opt.step()

    train_step()  # builds the cached constants (a copy each, once)
    made = _made_from_host_data(monkeypatch)
    with HostToDevice() as mode:
        for _ in range(2):
            train_step()  # a read of a value on the host raises on the meta device
    assert not mode.copies and not made, (mode.copies, made)
    # the step ran where the capture mode puts it: in backward when streamed
    streamed = opt._streamed is not None and opt._capture.sink is not None
    assert streamed == (capture == "stream" or (capture == "auto" and opt.needs_capture)), (capture, streamed)
