"""Shared test fixtures and helpers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorsum_kernels as lk

from .problems import rel_err  # noqa: F401  (the shared problem builders and checks: tests/problems.py)


class TinyLoRAMLP(nn.Module):
    """Two LoRA layers of the same shape (one bucket), one of another shape, and a trainable head."""

    def __init__(self, d_in=12, d_hidden=20, d_out=5, r=3, alpha=6.0, dtype=torch.float32):
        super().__init__()
        self.l1 = lk.LoRALinear(nn.Linear(d_in, d_hidden, dtype=dtype), r, alpha)
        self.l2 = lk.LoRALinear(nn.Linear(d_hidden, d_hidden, dtype=dtype), r, alpha)
        self.l3 = lk.LoRALinear(nn.Linear(d_hidden, d_hidden, dtype=dtype), r, alpha)
        self.head = nn.Linear(d_hidden, d_out, dtype=dtype)
        for layer in (self.l1, self.l2, self.l3):  # non-zero B so every factor moves from step one
            nn.init.normal_(layer.lora_B.weight, std=0.1)

    def lora_layers(self):
        return [self.l1, self.l2, self.l3]

    def forward(self, x):
        h = torch.tanh(self.l1(x))
        h = torch.tanh(self.l2(h))
        h = torch.tanh(self.l3(h))
        return self.head(h)


# (batch, m, n, r) of one same-shape layer group: every value of r ∈ {1, 3, 16}, m, n ∈ {5, 123, 256} and
# batch ∈ {(), (3,), (2, 2)} appears with r ≤ min(m, n); the last two span several 512-column chunks per side
# and ranks past one 16-row block of the native kernels' blocked loops.
LAYER_SHAPES = [
    ((), 5, 123, 3),
    ((3,), 123, 5, 1),
    ((2, 2), 256, 256, 16),
    ((), 123, 256, 16),
    ((3,), 256, 123, 3),
    ((2, 2), 5, 5, 3),
    ((3,), 123, 123, 1),
    ((2,), 1100, 600, 40),
    ((), 700, 1537, 64),
]
LAYER_SHAPE_IDS = [f"b{'x'.join(map(str, b)) or '0'}_m{m}_n{n}_r{r}" for b, m, n, r in LAYER_SHAPES]


def train_tiny(make_optimizer, steps: int, device="cpu", dtype=torch.float32,
               compile_mode: str | None = None) -> tuple[dict, dict]:
    """``steps`` seeded steps of a TinyLoRAMLP(40→72→72→72→5, r=5) under ``make_optimizer(model)``, the model
    and its data on ``device`` in ``dtype`` (the batches drawn on the CPU); returns the parameters and every
    tensor of the optimizer state, keyed by parameter name, where they live (backend and device
    comparisons). ``compile_mode``: the model runs under ``torch.compile(model, mode=compile_mode)``."""
    torch.manual_seed(0)
    model = TinyLoRAMLP(d_in=40, d_hidden=72, d_out=5, r=5, alpha=10.0).to(device=device, dtype=dtype)
    opt = make_optimizer(model)
    run = model if compile_mode is None else torch.compile(model, mode=compile_mode)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(4, 33, 40, generator=g).to(device=device, dtype=dtype)
        y = torch.randint(0, 5, (4, 33), generator=g).to(device)
        loss = nn.functional.cross_entropy(run(x).flatten(0, 1).float(), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    if compile_mode is not None:
        torch._dynamo.reset()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {(n, k): v.clone() for n, p in model.named_parameters() for k, v in opt.state.get(p, {}).items()
             if isinstance(v, torch.Tensor)}
    return params, state


def merged(params: dict) -> dict:
    """B·A of each LoRA layer, and the other parameters as they are."""
    out = {k: v for k, v in params.items() if ".lora_" not in k}
    for k in params:
        if k.endswith(".lora_A.weight"):
            layer = k[: -len(".lora_A.weight")]
            out[layer + ".BA"] = params[layer + ".lora_B.weight"] @ params[k]
    return out


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return TinyLoRAMLP()


@pytest.fixture
def tiny_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 7, 12, generator=g), torch.randint(0, 5, (2, 7), generator=g)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The test problems are tiny: one intra-op thread is as fast, and it avoids OpenMP spin-waits that
    make each op ~100× slower when the 2 cores are shared with other jobs. Tests of threading set their
    own count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
