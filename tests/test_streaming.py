"""The step inside backward (optim/streaming.py; issue #15): streamed == cached, and never silently wrong.

Every capturing method is run twice on the same data, ``capture="stream"`` against ``capture="cache"``,
in fp64 on odd shapes; then the cases the streamed step cannot take (accumulation, a module called twice,
a scheduler stepped before the optimizer, a GradScaler, clipping) must raise or fall back to the cache.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

import lorsum_kernels as lk

CAPTURING = {
    "lorsum_k1_momentum": (lk.LoRSum, dict(lr=0.3, iters=1, momentum=0.9)),
    "lorsum_k0": (lk.LoRSum, dict(lr=0.3, iters=0)),
    "lorsum_normalized_momentum": (lk.LoRSum, dict(lr=1e-2, iters=1, momentum=0.9, normalize_step=True,
                                                   max_update_norm=None)),
    "lorsum_k2_momentum_rank": (lk.LoRSum, dict(lr=0.3, iters=2, momentum=0.8, momentum_rank=2, dampening=0.1)),
    "scaled_kfac_momentum": (lk.ScaledLoRSum, dict(lr=0.3, iters=1, betas=(0.9, 0.9), beta2_warmup=True)),
    "scaled_shampoo": (lk.ScaledLoRSum, dict(lr=0.3, iters=1, metric="shampoo", betas=(0.5, 0.99))),
    "scaled_normalized_momentum": (lk.ScaledLoRSum, dict(lr=1e-2, iters=1, betas=(0.9, 0.9),
                                                         normalize_step=True)),
    "adaprelora_input": (lk.AdaPreLoRA, dict(lr=0.05)),
    "adaprelora_adam": (lk.AdaPreLoRA, dict(lr=0.05, momentum="adam", weight_decay=0.01)),
    "adaprelora_sgd": (lk.AdaPreLoRA, dict(lr=0.05, momentum=None)),
    "svdlora": (lk.SVDLoRA, dict(lr=0.3)),
}


class OddNet(nn.Module):
    """Odd shapes: 13→23 (r=3), 23→23 twice (r=3, one bucket), 23→7 (r=2), a trainable head."""

    def __init__(self, dtype=torch.float64, dropout=0.0):
        super().__init__()
        torch.manual_seed(0)
        kw = dict(dtype=dtype)
        self.l1 = lk.LoRALinear(nn.Linear(13, 23, **kw), 3, 6.0, dropout=dropout)
        self.l2 = lk.LoRALinear(nn.Linear(23, 23, **kw), 3, 6.0, dropout=dropout)
        self.l3 = lk.LoRALinear(nn.Linear(23, 23, **kw), 3, 6.0, dropout=dropout)
        self.l4 = lk.LoRALinear(nn.Linear(23, 7, **kw), 2, 2.0, dropout=dropout)
        self.head = nn.Linear(7, 5, **kw)
        for layer in (self.l1, self.l2, self.l3, self.l4):
            nn.init.normal_(layer.lora_B.weight, std=0.2)
        self.checkpointed: str | None = None

    def block(self, h):
        h = torch.tanh(self.l2(h))
        return torch.tanh(self.l3(h))

    def forward(self, x):
        h = torch.tanh(self.l1(x))
        if self.checkpointed is None:
            h = self.block(h)
        else:
            h = checkpoint(self.block, h, use_reentrant=self.checkpointed == "reentrant")
        return self.head(torch.tanh(self.l4(h)))


def _batches(n, dtype=torch.float64, seed=1, shape=(3, 5)):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, 13, generator=g).to(dtype), torch.randint(0, 5, shape, generator=g))
            for _ in range(n)]


def _loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x).flatten(0, -2), y.flatten())


def _train(cls, kw, capture, steps=3, dtype=torch.float64, checkpointed=None, micro=1):
    model = OddNet(dtype)
    model.checkpointed = checkpointed
    opt = cls(model, capture=capture, **kw)
    data = _batches(steps * micro, dtype)
    for s in range(steps):
        for k in range(micro):
            (_loss(model, data[s * micro + k]) / micro).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _input_refs(model):
    """Weak references to the storage of every input the LoRA layers' lora_A receive from now on."""
    refs = []
    for layer in (model.l1, model.l2, model.l3, model.l4):
        layer.lora_A.register_forward_pre_hook(
            lambda m, args: refs.append(StorageWeakRef(args[0].untyped_storage())))
    return refs


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _state(opt):
    return {(i, k): v.clone() for i, p in enumerate(opt.param_groups[0]["params"])
            for k, v in opt.state.get(p, {}).items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("name", list(CAPTURING))
def test_streamed_equals_cached(name):
    cls, kw = CAPTURING[name]
    (m_s, o_s), (m_c, o_c) = (_train(cls, kw, capture) for capture in ("stream", "cache"))
    for a, b in zip(_params(m_s), _params(m_c)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    s_s, s_c = _state(o_s), _state(o_c)
    assert s_s.keys() == s_c.keys()
    for key in s_s:
        torch.testing.assert_close(s_s[key], s_c[key], rtol=1e-12, atol=1e-13, msg=str(key))
    assert o_s._capture.sink is not None and o_c._capture.sink is None


@pytest.mark.parametrize("name", ["lorsum_k1_momentum", "scaled_kfac_momentum", "adaprelora_input"])
def test_streamed_equals_cached_in_fp32(name):
    cls, kw = CAPTURING[name]
    (m_s, _), (m_c, _) = (_train(cls, kw, capture, dtype=torch.float32) for capture in ("stream", "cache"))
    for a, b in zip(_params(m_s), _params(m_c)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("checkpointed", ["reentrant", "non_reentrant"])
@pytest.mark.parametrize("name", ["lorsum_k1_momentum", "adaprelora_input"])
def test_streamed_under_activation_checkpointing_equals_cached_without(name, checkpointed):
    cls, kw = CAPTURING[name]
    m_s, _ = _train(cls, kw, "stream", checkpointed=checkpointed)
    m_c, _ = _train(cls, kw, "cache")
    for a, b in zip(_params(m_s), _params(m_c)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


def test_streamed_step_keeps_nothing_per_token_after_backward():
    """In the usual loop (``loss`` alive until the next forward) no layer input is referenced after
    backward, and the capture holds no rows: only the per-layer results wait for step()."""
    model = OddNet()
    opt = lk.LoRSum(model, lr=0.3, momentum=0.9, capture="stream")
    refs = _input_refs(model)
    (x, y), = _batches(1)
    loss = _loss(model, (x, y))
    del x
    loss.backward()
    assert all(opt._capture.rows(layer) == 0 for layer in opt._layers)
    assert len(opt._streamed.results) == 4
    assert [r.expired() for r in refs] == [True] * 4
    opt.step()
    assert not opt._streamed.results


def test_auto_caches_the_first_step_and_streams_from_the_second():
    model = OddNet()
    opt = lk.LoRSum(model, lr=0.3, momentum=0.9)  # capture="auto"
    data = _batches(2)
    _loss(model, data[0]).backward()
    assert opt._capture.rows(model.l1) == 15 and opt._capture.sink is None
    opt.step()
    opt.zero_grad()
    assert opt._capture.sink is not None
    _loss(model, data[1]).backward()
    assert opt._capture.rows(model.l1) == 0 and opt._capture.pairs(model.l1) == 1
    opt.step()


@pytest.mark.parametrize("why", ["accumulation_steps", "accumulated_first_step", "max_grad_norm", "cache"])
def test_auto_keeps_caching_when_streaming_would_not_be_exact(why):
    model = OddNet()
    kw = dict(accumulation_steps=2) if why == "accumulation_steps" else \
        dict(max_grad_norm=1.0) if why == "max_grad_norm" else dict(capture="cache") if why == "cache" else {}
    opt = lk.LoRSum(model, lr=0.3, **kw)
    micro = 1 if why in ("max_grad_norm", "cache") else 2
    for step in range(3):
        for batch in _batches(micro, seed=step):
            (_loss(model, batch) / micro).backward()
        opt.step()
        opt.zero_grad()
        assert opt._capture.sink is None


def test_accumulation_after_auto_switched_raises_in_backward_then_caches():
    model = OddNet()
    opt = lk.LoRSum(model, lr=0.3, momentum=0.9)
    data = _batches(4)
    _loss(model, data[0]).backward()
    opt.step()
    opt.zero_grad()
    assert opt._capture.sink is not None
    _loss(model, data[1]).backward()
    before = _params(model), _state(opt)
    with pytest.raises(RuntimeError, match="accumulation_steps"):
        _loss(model, data[2]).backward()
    with pytest.raises(RuntimeError, match="second backward"):
        opt.step()
    for a, b in zip(before[0], _params(model)):
        assert torch.equal(a, b)
    for key, value in before[1].items():
        assert torch.equal(value, _state(opt)[key])
    opt.zero_grad()
    # auto gave up streaming: accumulation now works through the cache
    assert opt._capture.sink is None
    for batch in data[:2]:
        (_loss(model, batch) / 2).backward()
    assert opt._capture.rows(model.l1) == 30
    opt.step()


@pytest.mark.parametrize("case", ["accumulation", "module_called_twice"])
def test_forced_stream_refuses_a_second_backward_clearly(case):
    model = OddNet()
    opt = lk.LoRSum(model, lr=0.3, capture="stream")
    data = _batches(2)
    before = _params(model)
    with pytest.raises(RuntimeError, match="second backward"):
        if case == "accumulation":
            for batch in data:
                _loss(model, batch).backward()
        else:
            x, y = data[0]
            h = torch.tanh(model.l1(x))
            h = torch.tanh(model.l2(torch.tanh(model.l2(h))))  # l2 twice
            F.cross_entropy(model.head(model.l4(h)).flatten(0, -2), y.flatten()).backward()
    with pytest.raises(RuntimeError, match="second backward"):
        opt.step()
    for a, b in zip(before, _params(model)):
        assert torch.equal(a, b)


def test_stream_refuses_clipping_at_construction_and_bad_options():
    model = OddNet()
    with pytest.raises(ValueError, match="clip"):
        lk.LoRSum(model, capture="stream", max_grad_norm=1.0)
    with pytest.raises(ValueError, match="accumulation"):
        lk.LoRSum(model, capture="stream", accumulation_steps=4)
    with pytest.raises(ValueError, match="capture"):
        lk.LoRSum(model, capture="streaming")
    with pytest.raises(ValueError, match="accumulation_steps"):
        lk.LoRSum(model, accumulation_steps=0)
    for bad in (-1, 1.5, True, "64M"):
        with pytest.raises(ValueError, match="stream_batch_bytes"):
            lk.LoRSum(model, stream_batch_bytes=bad)


def _steps_run_during_backward(opt):
    """Per layer in backward order, how many layer steps had run when its (X, S) reached the sink."""
    streamed, runs, seen = opt._streamed, [0], []
    run, take = streamed.run, streamed.take

    def counted_run(*args):
        runs[0] += 1
        return run(*args)

    def noted_take(layer, X, S):
        seen.append(runs[0])
        taken = take(layer, X, S)
        assert streamed.pending_bytes <= max(streamed.batch_bytes, 0)
        return taken

    streamed.run = counted_run
    opt._capture.sink = noted_take
    return seen, runs


@pytest.mark.parametrize("name", ["lorsum_k1_momentum", "lorsum_k0", "scaled_normalized_momentum",
                                  "adaprelora_adam"])
@pytest.mark.parametrize("checkpointed", [None, "reentrant"])
def test_cpu_queue_runs_the_layer_steps_in_a_row_and_none_outlives_backward(name, checkpointed):
    """On the CPU the streamed layer steps wait in a queue of at most ``stream_batch_bytes`` of X and S
    (default 64 MiB) until the next layer would overfill it or backward ends: all four of OddNet's at its end
    by default, each at once with 0 and with 1 byte (each layer is larger), and with room for the last two
    layers' pairs (l4's 15×(23+7) and l3's 15×(23+23) fp64 numbers) those two, then l2, then l1. The steps are
    the same bit for bit, and after each backward nothing is queued and no layer input is referenced."""
    cls, kw = CAPTURING[name]
    two = 15 * (23 + 7) * 8 + 15 * (23 + 23) * 8
    trained, expected_runs = [], {None: [0, 0, 0, 0], 0: [0, 1, 2, 3], 1: [0, 1, 2, 3], two: [0, 0, 0, 2]}
    for batch_bytes in (None, 0, 1, two):
        model = OddNet()
        model.checkpointed = checkpointed
        opt = cls(model, capture="stream", stream_batch_bytes=batch_bytes, **kw)
        refs = _input_refs(model)
        data = _batches(3)
        while data:
            seen, runs = _steps_run_during_backward(opt)
            batch = data.pop(0)
            loss = _loss(model, batch)
            del batch  # the loss (and so the graph) stays alive, as in the usual loop
            loss.backward()
            if checkpointed is None:
                assert seen == expected_runs[batch_bytes]
            assert runs[0] == 4 and not opt._streamed.pending and opt._streamed.pending_bytes == 0
            assert all(r.expired() for r in refs), "a layer input outlived backward"
            opt.step()
            opt.zero_grad()
        trained.append((_params(model), _state(opt)))
    for params, state in trained[1:]:
        assert all(torch.equal(a, b) for a, b in zip(params, trained[0][0]))
        assert state.keys() == trained[0][1].keys()
        assert all(torch.equal(state[k], trained[0][1][k]) for k in state)


ONE_LAYER_PATHS = {
    "lorsum_defaults": (lk.LoRSum, dict()),
    "lorsum_k2": (lk.LoRSum, dict(iters=2, lmbd=0.1)),
    "lorsum_plain": (lk.LoRSum, dict(normalize_step=False, lr=0.3, dampening=0.2)),
    "scaled_defaults": (lk.ScaledLoRSum, dict()),
    "scaled_k2_no_warmup": (lk.ScaledLoRSum, dict(iters=2, beta2_warmup=False, metric_power=0.25)),
    "scaled_plain": (lk.ScaledLoRSum, dict(normalize_step=False, lr=0.1, loss_reduction="sum")),
}


@pytest.mark.parametrize("data_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(ONE_LAYER_PATHS))
def test_one_layer_step_is_the_bucket_path_bit_for_bit(name, data_dtype):
    """LoRSum's and ScaledLoRSum's streamed layer step in the usual configuration
    (``_prepare_one_layer_step``: fp32, CPU, native half-steps, no momentum, the K-FAC metric; prepared for
    a whole queue before any runs) gives what ``_compute_bucket`` gives for the layer, bit for bit: the
    training of OddNet with it and with it turned off, at the defaults, with k = 2, and the
    plain step; in fp32 and in bf16 (factors and data), with a skipped (non-finite) step."""
    cls, kw = ONE_LAYER_PATHS[name]
    trained, used = [], []
    for fast in (True, False):
        model = OddNet(data_dtype)  # bf16: the factors and X, S too (the step's math is fp32)
        opt = cls(model, capture="stream", backend="native", **kw)
        one_layer = opt._prepare_one_layer_step
        calls = []

        def counted(*args, one_layer=one_layer, calls=calls, fast=fast):
            prepared = one_layer(*args) if fast else None
            calls.append(prepared is not None)
            return prepared

        opt._prepare_one_layer_step = counted
        batches = _batches(4, data_dtype)
        batches[2][0][1, 2, 3] = float("nan")  # every layer's data: a skipped step on both paths
        for batch in batches:
            _loss(model, batch).backward()
            opt.step()
            opt.zero_grad()
        trained.append((_params(model), _state(opt)))
        used.append(sum(calls))
    # the normalised step's first step (measured) takes the bucket path, every later one the short path
    assert used[0] == 4 * (3 if kw.get("normalize_step", True) else 4) and used[1] == 0
    (p_fast, s_fast), (p_bucket, s_bucket) = trained
    assert all(torch.equal(a, b) for a, b in zip(p_fast, p_bucket))
    assert s_fast.keys() == s_bucket.keys() and all(torch.equal(s_fast[k], s_bucket[k]) for k in s_fast)
    skipped = [int(v) for (_, k), v in s_fast.items() if k == "skipped_steps"]
    assert len(skipped) == 4 and all(n == 1 for n in skipped)


@pytest.mark.parametrize("cls", [lk.LoRSum, lk.ScaledLoRSum])
def test_a_flush_prepares_every_layer_step_before_running_one(cls):
    """The CPU's queue builds the arguments of all its layer steps first, then runs their native work back to
    back (``StreamedStep.prepare``: Python between two layer steps runs with its data evicted by theirs),
    the last queued first; each layer's result once, from its own prepared step."""
    model = OddNet(torch.float32)
    opt = cls(model, capture="stream", backend="native")
    events, prepare = [], opt._prepare_one_layer_step

    def noted(group, layer, X, S):
        run = prepare(group, layer, X, S)
        events.append(("prepare", layer.name, run is not None))
        if run is None:
            return None

        def noted_run():
            events.append(("run", layer.name, True))
            return run()
        return noted_run

    opt._prepare_one_layer_step = noted
    for i, batch in enumerate(_batches(3, torch.float32)):
        events.clear()
        queued = []
        take = opt._streamed.take
        opt._capture.sink = lambda layer, X, S: queued.append(layer.name) or take(layer, X, S)
        _loss(model, batch).backward()
        if i > 0:  # past the normalised step's first (measured) step, every layer has the short path
            names = [name for _, name, _ in events]
            assert [e[0] for e in events] == ["prepare"] * len(queued) + ["run"] * len(queued)
            assert names[:len(queued)] == queued[::-1] == names[len(queued):] and all(e[2] for e in events)
        opt.step()
        opt.zero_grad()


def test_one_layer_step_declines_what_it_does_not_cover():
    """fp64 factors, momentum, the torch backend, the Shampoo metric and the first normalised step take the
    bucket path."""
    X, S = torch.randn(15, 23), torch.randn(15, 23)
    for cls, dtype, kw in [(lk.LoRSum, torch.float64, {}), (lk.LoRSum, torch.float32, dict(momentum=0.9)),
                           (lk.LoRSum, torch.float32, dict(backend="torch")), (lk.LoRSum, torch.float32, {}),
                           (lk.ScaledLoRSum, torch.float32, dict(betas=(0.9, 0.99))),
                           (lk.ScaledLoRSum, torch.float32, dict(metric="shampoo", normalize_step=False)),
                           (lk.ScaledLoRSum, torch.float32, {})]:
        model = OddNet(dtype)
        opt = cls(model, **kw)
        layer = opt._layers[1]
        assert opt._one_layer_step(opt._group_of(layer), layer, X.to(dtype), S.to(dtype)) is None


@pytest.mark.parametrize("batch_bytes", [None, 0], ids=["queued", "each_at_once"])
def test_a_compiled_model_streams_as_the_eager_one(batch_bytes):
    """Under torch.compile the capture's tap op hands the pairs over in the compiled backward, which autograd's
    engine runs: the queue fills and flushes there as in eager mode, and the steps are the same."""
    trained = []
    for compiled in (False, True):
        model = OddNet()
        opt = lk.LoRSum(model, lr=1e-2, capture="stream", stream_batch_bytes=batch_bytes)
        run = torch.compile(model, fullgraph=True, backend="aot_eager") if compiled else model
        for batch in _batches(3):
            seen, runs = _steps_run_during_backward(opt)
            _loss(run, batch).backward()
            assert seen == ([0, 0, 0, 0] if batch_bytes is None else [0, 1, 2, 3]) and runs[0] == 4
            assert not opt._streamed.pending and len(opt._streamed.results) == 4
            opt.step()
            opt.zero_grad()
        trained.append(_params(model))
    torch._dynamo.reset()
    for a, b in zip(*trained):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


def test_the_queue_counts_a_tensor_it_holds_once():
    """q, k and v (gate and up) share their X: queued together, it is held once."""
    from lorsum_kernels.optim.streaming import _held_bytes

    X, S1, S2 = torch.randn(5, 7), torch.randn(5, 3), torch.randn(5, 3)
    assert _held_bytes(X, S1, []) == (35 + 15) * 4
    assert _held_bytes(X, S2, [(None, None, X, S1)]) == 15 * 4
    assert _held_bytes(X.clone(), S2, [(None, None, X, S1)]) == (35 + 15) * 4
    assert _held_bytes(X[:2], S2[:2], [(None, None, X, S1)]) == (14 + 6) * 4  # a view of another shape


def test_an_error_in_a_queued_layer_step_raises_from_backward_and_the_next_step_trains():
    model = OddNet()
    opt = lk.LoRSum(model, lr=0.3, capture="stream")
    whole_step = opt._streamed._whole_step

    def failing(layer, *args):
        if layer.module is model.l2:
            raise RuntimeError("failed layer step")
        return whole_step(layer, *args)

    opt._streamed._whole_step = failing
    batch, = _batches(1)
    with pytest.raises(RuntimeError, match="failed layer step"):
        _loss(model, batch).backward()
    opt.zero_grad()
    assert not opt._streamed.pending and not opt._streamed.results
    opt._streamed._whole_step = whole_step
    before = _params(model)
    _loss(model, batch).backward()
    opt.step()
    assert not all(torch.equal(a, b) for a, b in zip(_params(model), before))


def test_scheduler_stepped_before_the_optimizer_raises_when_streamed():
    model = OddNet()
    opt = lk.LoRSum(model, lr=0.3, capture="stream")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    _loss(model, _batches(1)[0]).backward()
    before = _params(model)
    with pytest.warns(UserWarning):
        sched.step()  # torch warns too: the scheduler ran before optimizer.step()
    with pytest.raises(RuntimeError, match="scheduler"):
        opt.step()
    for a, b in zip(before, _params(model)):
        assert torch.equal(a, b)


def test_grad_scaler_with_forced_stream_raises_and_auto_caches():
    for capture in ("stream", "auto"):
        model = OddNet(torch.float32)
        opt = lk.LoRSum(model, lr=0.3, capture=capture)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        for step, batch in enumerate(_batches(2, torch.float32)):
            scaler.scale(_loss(model, batch)).backward()
            if capture == "stream":
                with pytest.raises(RuntimeError, match="GradScaler"):
                    scaler.step(opt)
                break
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            assert opt._capture.sink is None  # a scaler was seen: auto keeps the cache


def test_discarded_backward_drops_its_streamed_results():
    data = _batches(2)
    results = []
    for discard_first in (True, False):
        model = OddNet()
        opt = lk.LoRSum(model, lr=0.3, momentum=0.9, capture="stream")
        if discard_first:
            _loss(model, data[0]).backward()
            model.zero_grad(set_to_none=False)  # the HF Trainer zeroes the model, not the optimizer
        _loss(model, data[1]).backward()
        opt.step()
        results.append(_params(model))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_nonfinite_streamed_layer_is_skipped_and_counted():
    """A NaN in the output gradient of l3 (and so of l2 and l1 upstream) skips those layers; l4 steps."""
    model = OddNet()
    opt = lk.LoRSum(model, lr=0.3, capture="stream")
    x, y = _batches(1)[0]
    h = torch.tanh(model.l1(x))
    h = torch.tanh(model.l3(torch.tanh(model.l2(h))))
    h.register_hook(lambda g: torch.where(torch.arange(g.shape[-1]) == 0, float("nan"), g))
    F.cross_entropy(model.head(torch.tanh(model.l4(h))).flatten(0, -2), y.flatten()).backward()
    before = {name: getattr(model, name).lora_A.weight.detach().clone() for name in ("l1", "l2", "l3", "l4")}
    opt.step()
    for name, A0 in before.items():
        A = getattr(model, name).lora_A.weight
        assert torch.equal(A, A0) == (name != "l4"), name
        assert opt.state[A]["skipped_steps"].item() == int(name != "l4"), name
    assert opt.state["skipped_steps"].item() == 1


def test_resume_in_auto_mode_continues_streaming_bit_identically():
    data = _batches(4, torch.float32)
    model = OddNet(torch.float32)
    opt = lk.AdaPreLoRA(model, lr=0.05)
    for batch in data[:2]:
        _loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = opt.state_dict()
    twin = OddNet(torch.float32)
    twin.load_state_dict(saved_model)
    opt2 = lk.AdaPreLoRA(twin, lr=0.05)
    opt2.load_state_dict(saved_opt)
    assert opt2._capture.sink is not None
    for m, o in ((model, opt), (twin, opt2)):
        for batch in data[2:]:
            _loss(m, batch).backward()
            o.step()
            o.zero_grad()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


# Gradient accumulation: the steps that read X and S only through token sums (iters=0; ScaledLoRSum with
# metric="kfac") add those sums over micro-batches in backward, exactly; the others are cached.
TOKEN_SUMS = {
    # the plain step (normalize_step=False): the normalised one measures a layer's first step, a whole step
    "lorsum_k0": (lk.LoRSum, dict(lr=0.3, iters=0, normalize_step=False)),
    "lorsum_k0_momentum_rank": (lk.LoRSum, dict(lr=0.3, iters=0, momentum=0.8, momentum_rank=2, dampening=0.1,
                                                normalize_step=False)),
    "scaled_k0_kfac_momentum_warmup": (lk.ScaledLoRSum, dict(lr=0.3, iters=0, betas=(0.9, 0.9),
                                                              beta2_warmup=True, normalize_step=False)),
    "scaled_k0_kfac_sum_loss": (lk.ScaledLoRSum, dict(lr=0.3, iters=0, betas=(0.0, 0.99),
                                                       loss_reduction="sum", normalize_step=False)),
}


def _assert_same_training(pair_a, pair_b, rtol=1e-12, atol=1e-13):
    (m_a, o_a), (m_b, o_b) = pair_a, pair_b
    for a, b in zip(_params(m_a), _params(m_b)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    s_a, s_b = _state(o_a), _state(o_b)
    assert s_a.keys() == s_b.keys()
    for key in s_a:
        torch.testing.assert_close(s_a[key], s_b[key], rtol=rtol, atol=atol, msg=str(key))


@pytest.mark.parametrize("name", list(TOKEN_SUMS))
def test_accumulation_streams_token_sum_steps_exactly(name):
    cls, kw = TOKEN_SUMS[name]
    streamed = _train(cls, dict(kw, accumulation_steps=3), "stream", micro=3)
    assert streamed[1]._capture.sink is not None
    # fp64 rounding apart: the streamed step solves from the token sums with the composite half-step, the
    # cached one with the native half-step, whose r-wide algebra sums in another order (a few 1e-12
    # relative after several steps of the sum-reduced loss); a lost micro-batch would be off by O(1).
    _assert_same_training(streamed, _train(cls, kw, "cache", micro=3), rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("name", ["lorsum_k0_momentum_rank", "scaled_k0_kfac_momentum_warmup"])
def test_token_sum_steps_stream_a_module_called_twice(name):
    cls, kw = TOKEN_SUMS[name]

    def train(capture):
        model = OddNet()
        opt = cls(model, capture=capture, **kw)
        for x, y in _batches(3):
            h = torch.tanh(model.l1(x))
            h = torch.tanh(model.l3(torch.tanh(model.l2(torch.tanh(model.l2(h))))))  # l2 twice
            F.cross_entropy(model.head(torch.tanh(model.l4(h))).flatten(0, -2), y.flatten()).backward()
            assert opt._capture.pairs(model.l2) == 2
            opt.step()
            opt.zero_grad()
        return model, opt

    _assert_same_training(train("stream"), train("cache"))


def test_accumulated_token_sums_keep_nothing_per_token_after_each_backward():
    model = OddNet()
    opt = lk.ScaledLoRSum(model, lr=0.3, iters=0, betas=(0.9, 0.9), capture="stream", accumulation_steps=2,
                          normalize_step=False)
    refs = _input_refs(model)
    data = _batches(2)
    while data:
        x, y = data.pop(0)
        loss = _loss(model, (x, y)) / 2
        del x
        loss.backward()
        assert all(opt._capture.rows(layer) == 0 for layer in opt._layers)
        assert [r.expired() for r in refs] == [True] * len(refs)
    assert len(refs) == 8 and not opt._streamed.results and len(opt._streamed.sums) == 4
    for entry in opt._streamed.sums.values():  # r-wide products (weight and buffer), K-FAC sums, the count
        m, n, r = entry.layer.out_features, entry.layer.in_features, entry.layer.rank
        kept = sum(t.numel() for call in entry.sums for t in call)
        assert kept == 2 * r * (m + n) + (m + n) + 1, kept
    opt.step()
    assert not opt._streamed.results and not opt._streamed.sums


@pytest.mark.parametrize("declared", [True, False], ids=["accumulation_steps", "detected"])
def test_auto_with_accumulation_streams_token_sum_groups_and_caches_the_others(declared):
    """Mixed groups: l1, l2 at iters=0 (token sums), l3, l4 at iters=1 (cached under accumulation)."""

    def train(capture):
        model = OddNet()
        groups = [{"params": [p for l in (model.l1, model.l2) for p in (l.lora_A.weight, l.lora_B.weight)],
                   "iters": 0},
                  {"params": [p for l in (model.l3, model.l4) for p in (l.lora_A.weight, l.lora_B.weight)]}]
        kw = dict(accumulation_steps=2) if declared else {}
        opt = lk.LoRSum(model, lr=0.3, iters=1, momentum=0.9, param_groups=groups, capture=capture,
                        normalize_step=False, **kw)
        data = _batches(6)
        rows = []
        for step in range(3):
            for batch in data[2 * step:2 * step + 2]:
                (_loss(model, batch) / 2).backward()
            rows.append([opt._capture.rows(layer) for layer in (model.l1, model.l2, model.l3, model.l4)])
            opt.step()
            opt.zero_grad()
        return (model, opt), rows

    streamed, rows = train("auto")
    assert rows[0] == [30] * 4  # auto caches the first step
    assert rows[1] == rows[2] == [0, 0, 30, 30]  # then streams the token-sum layers only
    assert streamed[1]._streamed.saved_mode() == "token_sums"
    cached, _ = train("cache")
    _assert_same_training(streamed, cached)


def test_stream_with_accumulation_needs_token_sum_steps():
    model = OddNet()
    lk.LoRSum(model, iters=0, capture="stream", accumulation_steps=4, normalize_step=False).remove_hooks()
    lk.ScaledLoRSum(model, iters=0, capture="stream", accumulation_steps=4,
                    normalize_step=False).remove_hooks()
    with pytest.raises(ValueError, match="iters=0"):
        lk.ScaledLoRSum(model, iters=0, metric="shampoo", capture="stream", accumulation_steps=4)
    with pytest.raises(ValueError, match="iters=0"):
        lk.SVDLoRA(model, capture="stream", accumulation_steps=2)


def test_discarded_micro_batch_drops_its_token_sums():
    """A backward discarded by zero_grad leaves no trace in the running sums."""
    cls, kw = TOKEN_SUMS["lorsum_k0_momentum_rank"]
    data = _batches(3)

    def train(discard):
        model = OddNet()
        opt = cls(model, capture="stream", accumulation_steps=2, **kw)
        if discard:
            _loss(model, data[2]).backward()
            opt.zero_grad()
        for batch in data[:2]:
            (_loss(model, batch) / 2).backward()
        opt.step()
        return model, opt

    _assert_same_training(train(True), train(False), rtol=0, atol=0)


def test_resume_streaming_token_sums_only():
    groups = lambda m: [{"params": [p for l in (m.l1, m.l2) for p in (l.lora_A.weight, l.lora_B.weight)],
                         "iters": 0},
                        {"params": [p for l in (m.l3, m.l4) for p in (l.lora_A.weight, l.lora_B.weight)]}]
    model = OddNet()
    opt = lk.LoRSum(model, lr=0.3, momentum=0.9, param_groups=groups(model), accumulation_steps=2,
                    normalize_step=False)
    for batch in _batches(2):
        (_loss(model, batch) / 2).backward()
    opt.step()
    opt.zero_grad()
    twin = OddNet()
    twin.load_state_dict(model.state_dict())
    opt2 = lk.LoRSum(twin, lr=0.3, momentum=0.9, param_groups=groups(twin), accumulation_steps=2,
                     normalize_step=False)
    opt2.load_state_dict(opt.state_dict())
    assert opt2._streamed.saved_mode() == "token_sums"
    for batch in _batches(2, seed=5):
        (_loss(twin, batch) / 2).backward()
    assert [opt2._capture.rows(layer) for layer in (twin.l1, twin.l2, twin.l3, twin.l4)] == [0, 0, 30, 30]
    opt2.step()
