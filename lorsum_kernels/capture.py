"""Hooks that give each LoRA layer the inputs X and output-gradients S of the current step.

Contract:

* X is the input of the layer's ``lora_A`` (after LoRA dropout: what the LoRA path saw), S the gradient of
  the module's output, so ``G = SᵀX`` is exactly the gradient the factors' gradients are made of
  (``∂L/∂A = s·BᵀG``, ``∂L/∂B = s·GAᵀ``). With ``x_from="module"`` X is the module's own input instead
  (before LoRA dropout), so ``G`` is the gradient of the base weight W0 (LoRA-One's estimate); the two agree
  when dropout is off or in eval mode. A pair is recorded only when S arrives, so X and S always have the
  same rows. Forwards under ``no_grad``, in eval mode (unless ``training_only=False``), whose output needs
  no gradient, or whose ``lora_B`` input needs none (a frozen ``lora_A`` fed an input that needs none)
  record nothing; a forward without backward records nothing either.
* X travels to backward the way autograd's own saved tensors do: a small identity function on the r-wide
  input of ``lora_B`` saves it with ``save_for_backward``. So activation checkpointing frees and recomputes
  it like any activation (nothing of ours keeps it alive in between), reentrant or not, each token row is
  recorded once, and it is released as soon as the layer's backward has run, even while ``loss`` (and so
  the graph) stays alive. S is held only between the module's output-gradient hook and that function's
  backward, a few nodes later in the same layer's backward. Under ``torch.compile`` (whose graphs cannot
  hold a side-effecting backward) X is held by the output-gradient hook instead, from forward to backward;
  the hooks add no graph break. There the pair is handed over by an opaque op in the compiled backward,
  which takes copies of X and S: Inductor reuses a buffer's memory once its last op has run, so the
  tensors themselves would hold whatever it writes next (one extra pass over X and S per layer).
* What happens to a pair: the ``sink`` (set by the optimizer when it streams, and by LoRA-One's init)
  takes it during backward and nothing is kept; otherwise it is appended to the layer's records, and
  gradient accumulation and modules called several times per step concatenate, which gives exactly
  ``Σ_k S_kᵀ X_k``. ``pairs(layer)`` counts the pairs that arrived since ``clear()`` either way.
* ``get()`` hands the records over; ``clear()`` (called by the optimizer's ``step`` and ``zero_grad``, and
  by LoRA-One's init after each batch) holds nothing afterwards. X is kept without copying (a detached
  view); an in-place change of it before backward is caught by autograd's saved-tensor check, and one
  between backward and ``get()`` (a reused input buffer) through its version counter: either raises,
  never giving a wrong G.
* Records of a backward whose step never ran are dropped when the next backward reaches the layer after
  its factor gradients were reset in any way (``zero_grad`` with or without ``set_to_none``, ``.grad``
  assigned or zeroed by hand): each factor gradient's identity and version are noted after it accumulates
  and compared when the next output gradient arrives. Discarded backwards never reach a step.
* ``received_grad(layer)`` tells whether backward reached the layer's factors since the last ``clear()``
  (a post-accumulate-grad hook), so "gradients but no captured data" is detected exactly.
* Copies of the model (``copy.deepcopy``, ``torch.save``/``pickle``) carry inert hooks: they run and
  train normally and record nothing. ``remove()`` detaches the hooks for good (``removed`` tells).

Layers and modules: every method takes a ``LoRALayer`` or, for the common one-adapter case, its module.
"""

from __future__ import annotations

import inspect
import itertools
import weakref
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from .lora import LoRALayer

__all__ = ["ActivationCapture"]

# sink(layer, X (T×n), S (T×m)) -> True when it consumed the pair (nothing is recorded).
Sink = Callable[[LoRALayer, Tensor, Tensor], bool]


class _InertHook:
    """What a copied or unpickled model gets instead of a capture hook: does nothing."""

    def __call__(self, *args, **kwargs):
        return None


class _Hook:
    """A capture hook that refers to the capture by reference, and turns inert in copies of the model."""

    __slots__ = ("fn",)

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __deepcopy__(self, memo):
        return _InertHook()

    def __reduce__(self):
        return (_InertHook, ())


class _Call:
    """One forward call of one LoRA layer: S is parked here from the output hook to ``_SaveX.backward``."""

    __slots__ = ("S",)

    def __init__(self):
        self.S = None


class _SaveX(torch.autograd.Function):
    """Identity on lora_A's output that saves lora_A's input X as autograd saves activations."""

    @staticmethod
    def forward(ctx, a: Tensor, x: Tensor, call: _Call, tap: "_LayerTap") -> Tensor:
        ctx.save_for_backward(x)
        ctx.call, ctx.tap = call, tap
        return a.clone()  # r wide: a view would forbid in-place use of lora_B's input

    @staticmethod
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors  # autograd raises here if x was modified in place since forward
        S, ctx.call.S = ctx.call.S, None
        if S is not None:
            ctx.tap.record(x, S)
        return grad, None, None, None


class _LayerTap:
    """Capture state of one LoRA layer (one adapter of one module)."""

    def __init__(self, capture: "ActivationCapture", layer: LoRALayer):
        self.capture, self.layer = capture, layer
        self.key = next(_next_key)
        _TAPS[self.key] = self
        self.records: list[tuple[Tensor, Tensor, int]] = []  # (X, S, X's version when recorded)
        self.pairs = 0  # pairs arrived since clear(), recorded or streamed
        self.received = False  # a factor gradient accumulated since clear()
        self.marks: list = [None, None]  # (weakref to .grad, its version) after the last accumulation
        self.module_input: Tensor | None = None  # x_from="module": the module's input, until lora_A runs
        self.x: Tensor | None = None  # X of the forward in progress, from lora_A's call to lora_B's
        self.call: _Call | None = None  # the _SaveX call of the forward in progress
        self.compiled_x: Tensor | None = None  # under torch.compile: X, held until S arrives

    def active(self) -> bool:
        capture = self.capture
        return (
            (self.layer.module.training or not capture.training_only)
            and torch.is_grad_enabled()
            and not capture.removed
        )

    # forward ---------------------------------------------------------------------------------------

    def on_lora_A(self, module, args):
        # X is settled when this adapter's LoRA path runs, whichever X is taken: an inactive PEFT adapter's
        # lora_A is never called, so its layer records nothing.
        if self.capture.x_from == "module":
            x, self.module_input = self.module_input, None
        else:
            x = args[0] if args else None
        self.x = x if isinstance(x, Tensor) and self.active() else None

    def on_lora_B(self, module, args):
        x, self.x = self.x, None
        if x is None or not args or not isinstance(args[0], Tensor) or not args[0].requires_grad:
            return None
        if torch.compiler.is_compiling():
            self.compiled_x = x
            return None
        self.call = _Call()
        return (_SaveX.apply(args[0], x, self.call, self), *args[1:])

    def take_call(self):
        call, x = self.call, self.compiled_x
        self.call = self.compiled_x = self.module_input = None
        return call, x

    # backward --------------------------------------------------------------------------------------

    def on_output_grad(self, call: _Call | None, x: Tensor | None, grad: Tensor) -> None:
        self.drop_if_stale()
        if call is not None:
            call.S = grad
        elif x is not None:  # torch.compile: X came with the hook
            self.record(x, grad)

    def record(self, x: Tensor, S: Tensor) -> None:
        if self.capture.removed:
            return
        X = x.detach().reshape(-1, x.shape[-1])
        S = S.detach().reshape(-1, S.shape[-1])
        self.pairs += 1
        sink = self.capture.sink
        if sink is not None and sink(self.layer, X, S):
            return
        self.records.append((X, S, X._version))

    def on_accumulated(self, side: int, p: Tensor) -> None:
        self.received = True
        self.marks[side] = None if p.grad is None else (weakref.ref(p.grad), p.grad._version)

    def drop_if_stale(self) -> None:
        """A new backward arrives: if the factor gradients were reset since the last one accumulated,
        that backward was discarded, and its records go."""
        if not self.received:
            return
        for side, p in enumerate((self.layer.A, self.layer.B)):
            mark = self.marks[side]
            if mark is None:
                continue
            ref, version = mark
            if p.grad is None or ref() is not p.grad or p.grad._version != version:
                self.reset()
                if self.capture.on_discard is not None:
                    self.capture.on_discard(self.layer)
                return

    def reset(self) -> None:
        self.records.clear()
        self.pairs = 0
        self.received = False
        self.marks = [None, None]


def _deliver_output_grad(pending: list, grad: Tensor) -> None:
    for tap, call, x in pending:
        tap.on_output_grad(call, x, grad)
    pending.clear()  # nothing of this forward outlives its backward, even if the graph does


# Taps by key, for hooks traced by torch.compile (which can only pass constants and tensors along).
_TAPS: "weakref.WeakValueDictionary[int, _LayerTap]" = weakref.WeakValueDictionary()
_next_key = itertools.count()


@torch.library.custom_op("lorsum_capture::tap", mutates_args=())
def _tap_op(out: Tensor, x: Tensor, key: int) -> Tensor:
    """Identity on a module output under torch.compile; its backward records (X, S) for tap ``key``."""
    return out.clone()


@_tap_op.register_fake
def _(out, x, key):
    return torch.empty_like(out)


# The tap's backward runs Python (it records the pair): a CUDA graph would replay its kernels without it, so
# Inductor's CUDA graphs (mode="reduce-overhead") must leave it out (where this torch has the tag, and
# custom_op takes tags).
_CUDAGRAPH_UNSAFE = tuple(tag for tag in (getattr(torch.Tag, "cudagraph_unsafe", None),) if tag is not None)
_TAP_GRAD_TAGS = ({"tags": _CUDAGRAPH_UNSAFE}
                  if _CUDAGRAPH_UNSAFE and "tags" in inspect.signature(torch.library.custom_op).parameters else {})


@torch.library.custom_op("lorsum_capture::tap_grad", mutates_args=(), **_TAP_GRAD_TAGS)
def _tap_grad_op(grad: Tensor, x: Tensor, key: int) -> Tensor:
    tap = _TAPS.get(key)
    if tap is not None:
        # Copies: Inductor's compiled backward reuses the memory of x and grad once this op has run.
        tap.on_output_grad(None, x.clone(), grad.clone())
    return grad.clone()


@_tap_grad_op.register_fake
def _(grad, x, key):
    return torch.empty_like(grad)


def _tap_setup(ctx, inputs, output):
    _, x, key = inputs
    ctx.save_for_backward(x)
    ctx.key = key


def _tap_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return torch.ops.lorsum_capture.tap_grad(grad, x, ctx.key), None, None


_tap_op.register_autograd(_tap_backward, setup_context=_tap_setup)


_X_FROM = ("lora_A", "module")


class ActivationCapture:
    """Records (X, S) for the given LoRA layers until ``clear()``, or hands them to ``sink``.

    Args:
        layers: the LoRA layers to hook (their factors must require grad when the capture is made).
        x_from: ``"lora_A"`` (default): X is lora_A's input, after LoRA dropout, which the factors'
            gradients are made of (the optimizers); ``"module"``: the LoRA module's input, before LoRA
            dropout, which the base weight's gradient is made of (LoRA-One's estimate).
        training_only: True (default): forwards of a module in eval mode record nothing, so validation
            and generation with gradients on leave no data behind; False records them too, for a driver
            that runs its own passes in eval mode (``init.lora_one_init``).
    """

    def __init__(self, layers: Iterable[LoRALayer], *, x_from: str = "lora_A", training_only: bool = True):
        if x_from not in _X_FROM:
            raise ValueError(f"x_from must be one of {_X_FROM}, got {x_from!r}")
        self.x_from = x_from
        self.training_only = bool(training_only)
        self.sink: Sink | None = None
        # on_discard(layer): called when a backward's records are dropped as stale (a streaming sink's
        # results of that backward must go too).
        self.on_discard: Callable[[LoRALayer], None] | None = None
        self.removed = False
        self._taps: dict[int, _LayerTap] = {}  # id(layer) -> tap
        self._by_module: dict[int, list[_LayerTap]] = {}  # id(module) -> its layers' taps
        self._handles = []
        layers = list(layers)
        for layer in layers:
            if layer.merged_in_forward:
                raise NotImplementedError(
                    f"{layer.name}: PEFT applies this LoRA by adding s·B·A to a weight in forward (a LoRA on "
                    "a parameter, target_parameters, or on nn.MultiheadAttention) and runs no LoRA path on an "
                    "input, so there is no input X or output gradient S to capture for the methods that step "
                    "from them (LoRSum, ScaledLoRSum, AdaPreLoRA with exact statistics, SVDLoRA, LoRA-One's "
                    "init): target Linear modules instead, or use a method that steps from .grad "
                    "(ScaledAdamW, ScaledGD, AdaPreLoRA with statistics='surrogate')"
                )
        for layer in layers:
            if layer.A_module is None or layer.B_module is None:
                raise ValueError(f"{layer.name}: the capture needs the lora_A and lora_B modules of the layer")
            tap = _LayerTap(self, layer)
            self._taps[id(layer)] = tap
            self._handles.append(layer.A_module.register_forward_pre_hook(_Hook(tap.on_lora_A)))
            self._handles.append(layer.B_module.register_forward_pre_hook(_Hook(tap.on_lora_B)))
            for side, p in enumerate((layer.A, layer.B)):
                self._handles.append(p.register_post_accumulate_grad_hook(
                    _Hook(lambda param, tap=tap, side=side: tap.on_accumulated(side, param))))
            key = id(layer.module)
            if key not in self._by_module:
                self._by_module[key] = []
                self._handles.append(layer.module.register_forward_hook(_Hook(self._on_forward)))
                if x_from == "module":
                    self._handles.append(layer.module.register_forward_pre_hook(
                        _Hook(self._on_module_input), with_kwargs=True))
            self._by_module[key].append(tap)

    def _on_module_input(self, module: nn.Module, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()), None)  # PEFT and LoRALinear: forward(x, ...)
        for tap in self._by_module.get(id(module), ()):
            tap.module_input = x if isinstance(x, Tensor) else None

    def _on_forward(self, module: nn.Module, args, output):
        pending = [(tap, *tap.take_call()) for tap in self._by_module.get(id(module), ())]
        pending = [(tap, call, x) for tap, call, x in pending if call is not None or x is not None]
        if not pending or not isinstance(output, Tensor) or not output.requires_grad:
            return

        if torch.compiler.is_compiling():
            # torch.compile traces tensor hooks into the graph and cannot hold their side effects: the
            # output goes through an opaque op instead, whose backward records (X, S) at run time.
            for tap, _, x in pending:
                output = torch.ops.lorsum_capture.tap(output, x, tap.key)
            return output
        output.register_hook(lambda grad: _deliver_output_grad(pending, grad))
        return None

    # ----------------------------------------------------------------------------------------------
    # reading

    def _tap(self, key) -> _LayerTap | None:
        if isinstance(key, LoRALayer):
            return self._taps.get(id(key))
        taps = self._by_module.get(id(key))
        return taps[0] if taps else None

    def rows(self, key) -> int:
        """Token rows recorded so far for a layer (or a module's first layer)."""
        tap = self._tap(key)
        return 0 if tap is None else sum(x.shape[0] for x, _, _ in tap.records)

    def has_data(self, key) -> bool:
        tap = self._tap(key)
        return tap is not None and bool(tap.records)

    def pairs(self, key) -> int:
        """(X, S) pairs that arrived since ``clear()``, recorded or taken by the sink."""
        tap = self._tap(key)
        return 0 if tap is None else tap.pairs

    def received_grad(self, key) -> bool:
        """Whether backward accumulated a gradient into the layer's factors since ``clear()``."""
        tap = self._tap(key)
        return tap is not None and tap.received

    def get(self, key) -> tuple[Tensor, Tensor] | None:
        """The concatenated (X (T×n), S (T×m)) recorded so far, or None; keeps the records.

        Raises if an input was modified in place since it was recorded (e.g. a reused input buffer).
        """
        tap = self._tap(key)
        if tap is None or not tap.records:
            return None
        pairs = tap.records
        for x, _, version in pairs:
            if x._version != version:
                raise RuntimeError(
                    f"the input of {tap.layer.name} was modified in place after its backward; the LoRA "
                    "optimizer reads it at step(), so it must stay unchanged until then (clone a reused "
                    "input buffer before the forward)"
                )
        if len(pairs) == 1:
            return pairs[0][0], pairs[0][1]
        return torch.cat([x for x, _, _ in pairs]), torch.cat([s for _, s, _ in pairs])

    def clear(self) -> None:
        for tap in self._taps.values():
            tap.reset()

    def remove(self) -> None:
        """Detach the hooks from the model and drop everything recorded."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.removed = True
        self.sink = None
        self.clear()
