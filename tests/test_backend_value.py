"""The backend value (``backends.Backend``, ``ops.resolve``): a backend choice resolved once for a device.

An optimizer step resolves its group's backend once and passes the value down to every op; each op is
looked up once per value (not once per call), forced-backend errors are those of ``resolve_backend``, and
a change of ``LORSUM_BACKEND`` takes effect at the next step. The layers above ``ops`` never import
``backends`` or ``_native``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import lorsum_kernels as lk
from lorsum_kernels import backends, ops

from .conftest import TinyLoRAMLP

PACKAGE = Path(lk.__file__).parent


def test_check_name():
    for name in (None, "auto", *backends.BACKENDS):
        backends.check_name(name)
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        backends.check_name("cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        ops.resolve("fast", "cpu")


def test_value_resolves_each_op_once(monkeypatch):
    calls = []
    real = backends.resolve_backend
    monkeypatch.setattr(backends, "resolve_backend", lambda *a: calls.append(a[2]) or real(*a))
    value = ops.resolve("torch", torch.device("cpu"))
    x = torch.randn(7, 5)
    for _ in range(3):
        torch.testing.assert_close(ops.col_sq_sums(x, backend=value), x.square().sum(0))
    assert calls == ["col_sq_sums"]
    assert value.of("col_sq_sums") == "torch" and not value.reads_low_precision("lorsum_update_in")
    assert ops.resolve(value, "cpu") is value


def test_value_forced_backend_errors_are_resolve_backends(monkeypatch):
    monkeypatch.setattr(backends, "_triton_missing_reason", lambda device, op: "not here")
    value = ops.resolve("triton", torch.device("cpu"))  # the name is valid: nothing resolved yet
    with pytest.raises(RuntimeError, match="backend 'triton' is not available for op 'col_sq_sums'"):
        ops.col_sq_sums(torch.ones(3, 2), backend=value)


def test_value_on_another_device_resolves_there(monkeypatch):
    value = ops.resolve(None, torch.device("meta"))
    assert value.of("col_sq_sums") == "torch"  # auto on a device without kernels
    assert value.of("col_sq_sums", torch.device("cpu")) == backends.resolve_backend(None, "cpu", "col_sq_sums")


def test_optimizer_step_resolves_once_per_op_and_step(monkeypatch):
    torch.manual_seed(0)
    model = TinyLoRAMLP()
    opt = lk.ScaledLoRSum(model, lr=0.1, backend="torch")
    calls = []
    real = backends.resolve_backend
    monkeypatch.setattr(backends, "resolve_backend", lambda *a: calls.append(a[2]) or real(*a))
    for _ in range(2):
        model(torch.randn(9, 12)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    # Two buckets per step (two layer shapes), many op calls per bucket: each op resolved once per step.
    per_step = len(calls) // 2
    assert len(calls) == 2 * per_step and len(set(calls)) == per_step, calls


def test_environment_change_takes_effect_at_the_next_step(monkeypatch):
    torch.manual_seed(0)
    model = TinyLoRAMLP()
    opt = lk.LoRSum(model, lr=0.1)
    seen = []
    real = ops.implementation
    monkeypatch.setattr(ops, "implementation", lambda b, d, op: seen.append(real(b, d, op)) or seen[-1])
    monkeypatch.setenv("LORSUM_BACKEND", "torch")
    model(torch.randn(9, 12)).square().mean().backward()
    opt.step()
    opt.zero_grad()
    assert seen and set(seen) == {"torch"}
    monkeypatch.setenv("LORSUM_BACKEND", "bogus")
    with pytest.raises(ValueError, match="LORSUM_BACKEND"):  # in backward (streamed step) or in step()
        model(torch.randn(9, 12)).square().mean().backward()
        opt.step()


def test_upper_layers_reach_backends_only_through_ops():
    for folder in ("optim", "functional"):
        for path in sorted((PACKAGE / folder).glob("*.py")):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom):
                    names = [node.module or ""] + [a.name for a in node.names]
                    assert not any(n.split(".")[-1] in ("backends", "_native") for n in names), (path, names)
                elif isinstance(node, ast.Import):
                    assert not any(a.name.split(".")[-1] in ("backends", "_native") for a in node.names), path
