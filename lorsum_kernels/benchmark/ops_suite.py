"""The benchmark cases: one list of (op, shape, dtype, variant) for ``lorsum-bench`` and bench/'s pytest files.

``lorsum-bench`` (``cli.py``) times these cases with ``timing.py``; ``bench/bench_ops.py`` times the same
cases with pytest-benchmark; both write the rows of ``results.py``. A case is one op or whole step at one
size, so a figure from either tool names the same configuration.

* ``OPS``: what is timed, in order: every hot-path op of ``ops`` and the steps built on them
  (``low_rank_sum``: one LoRSum call; ``lorsum_step``: PSI-LoRA's weight and momentum LoRSums, k = 1;
  ``scaled_lorsum_step``: Scaled PSI-LoRA with the diagonal K-FAC metric, k = 1).
* ``SPECS[op]``: how an op is benchmarked: the sizes of each grid, whether X and S take the dtype under
  test, its variants (``spd_solve``'s side, ``low_rank_sum``'s k), how its inputs are built and its
  memory-traffic floor (inputs read once, outputs written once: the achieved bandwidth is floor / time).
* ``case_list(grid, dtypes, ops)`` -> ``[Case]``: descriptions only, nothing allocated (what pytest
  parametrizes over). Grids: ``full`` (each op's sizes from the DESIGN.md targets), ``quick`` (two shapes
  for every op), ``tiny`` (one small shape: tests of the tools). Ops that read no token data (the solves,
  ``tangent_energies``) take fp32 factors only and are listed once, as float32, whatever ``dtypes`` says.
* ``Case.build(device)`` -> ``OpCase``: the inputs on the device (seeded, the same on every device) and a
  call ``OpCase(backend)``; every backend gets the same inputs. ``iter_cases`` builds a list one at a time.
* ``Case.backends(device, compile=False)``: the backends the dispatcher can run for every op the case
  calls on that device (``backends.resolve_backend``), the torch reference first, never Triton on a CPU
  (its interpreter: the speed means nothing); with ``compile=True`` the steps add ``"torch.compile"`` (the
  reference compiled once per case: the bar a native step must clear).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Iterator, NamedTuple

import torch

from .. import ops
from ..backends import BACKENDS, resolve_backend
from ..functional import low_rank_sum, psi_lora_step, scaled_psi_lora_step

__all__ = ["DTYPES", "GRIDS", "OPS", "SPECS", "Case", "OpCase", "OpSpec", "Shape", "available_backends",
           "case_list", "iter_cases"]

DTYPES = (torch.float32, torch.bfloat16)
GRIDS = ("full", "quick", "tiny")
COMMON_SIZES = {  # (m = n, r, T, L) for every op: each op keeps the dimensions it reads
    "quick": [(1024, 16, 512, 1), (1024, 16, 4096, 4)],
    "tiny": [(64, 3, 37, 2)],
}


class Shape(NamedTuple):
    d: int  # m = n (spd_solve: N, the right-hand side's width)
    r: int = 0
    T: int = 0  # token rows
    L: int = 1  # layers batched


@dataclass(frozen=True)
class OpSpec:
    op: str
    dims: str  # the Shape fields the op reads, in the order of its `full` sizes
    label: str  # the config column: formatted with the Shape's fields, w = 2r and `variant`; dtype appended
    build: Callable  # (shape, dtype, device, variant) -> (run(backend), floor_bytes)
    full: tuple  # the full grid's sizes, tuples in `dims` order
    tokens: bool = True  # X and S take the dtype under test
    variants: tuple = ("",)
    needs: tuple = ()  # dispatcher ops it calls (resolve_backend names); default (op,)
    rounds: int = 5  # pytest-benchmark rounds on a CPU
    steps: bool = False  # a whole step: torch.compile of the reference is a backend too

    def sizes(self, grid: str) -> list[Shape]:
        if grid == "full":
            return [Shape(**dict(zip(self.dims, size))) for size in self.full]
        keep = lambda s: Shape(**{k: v for k, v in s._asdict().items() if k in self.dims})  # noqa: E731
        return list(dict.fromkeys(keep(Shape(*s)) for s in COMMON_SIZES[grid]))


SPECS: dict[str, OpSpec] = {}


def _spec(op: str, dims: str, label: str, full, **kw):
    def register(build):
        SPECS[op] = OpSpec(op, dims, label, build, tuple(full), **kw)
        return build

    return register


def _randn(*shape, dtype=torch.float32, device, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device=device, dtype=dtype)


def _bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _tokens(s: Shape, dtype, device):
    """X (L,T,n) and S (L,T,m), the captured inputs and output-gradients, S scaled as a mean loss's."""
    return _randn(s.L, s.T, s.d, dtype=dtype, device=device, seed=1), \
        (_randn(s.L, s.T, s.d, device=device, seed=2) / max(s.T, 1)).to(dtype)


def _factors(s: Shape, device):
    """A (L,r,n), B (L,m,r) at LoRA's scale and a second pair (a momentum buffer, or factor gradients)."""
    A, B = _randn(s.L, s.r, s.d, device=device, seed=3), _randn(s.L, s.d, s.r, device=device, seed=4)
    return A / s.d**0.5, B / s.d**0.5, _randn(s.L, s.r, s.d, device=device, seed=5), \
        _randn(s.L, s.d, s.r, device=device, seed=6)


def _metric(s: Shape, device, seed=7):
    return torch.rand(s.L, s.d, generator=torch.Generator().manual_seed(seed)).to(device) + 0.5


@_spec("col_sq_sums", "dTL", "n={d} T={T} L={L}", rounds=10,
       full=[(1024, 4096, 1), (1024, 512, 24), (4096, 4096, 1), (4096, 2048, 4)])
def _col_sq_sums(s, dtype, device, variant):
    X, _ = _tokens(s, dtype, device)
    return (lambda b: ops.col_sq_sums(X, backend=b)), _bytes(X) + 4 * s.L * s.d


@_spec("row_col_energies", "dTL", "m=n={d} T={T} L={L}", rounds=3,
       full=[(1024, 512, 4), (1024, 4096, 1), (4096, 512, 1)])
def _row_col_energies(s, dtype, device, variant):
    X, S = _tokens(s, dtype, device)
    return (lambda b: ops.row_col_energies(X, S, backend=b)), _bytes(X, S) + 8 * s.L * s.d


@_spec("kfac_metric_update", "dTL", "m=n={d} T={T} L={L}", rounds=10, full=SPECS["col_sq_sums"].full)
def _kfac_metric_update(s, dtype, device, variant):
    (X, S), v = _tokens(s, dtype, device), _metric(s, device)
    return (lambda b: ops.kfac_metric_update(X, S, v, v, 0.999, 0.1, 0.5, 1.0 / s.T, float(s.T), backend=b),
            _bytes(X, S) + 6 * _bytes(v))


def _half_step(side: str):
    """LoRSum's A-step (in) or B-step (out) as PSI-LoRA calls it: the gradient pair and a momentum pair."""
    def build(s, dtype, device, variant):
        (X, S), (A, B, Am, Bm) = _tokens(s, dtype, device), _factors(s, device)
        fn, hat = (ops.lorsum_update_in, B) if side == "in" else (ops.lorsum_update_out, A)
        return (lambda b: fn(hat, (A, B), [(X, S.mT), (Am, Bm)], [1.0, -0.1, -0.09], 1e-3, backend=b),
                _bytes(X, S, A, B, Am, Bm) + _bytes(A if side == "in" else B))

    return build


# (576, 16, 2048, 1): a layer of the real-model benchmark's SmolLM2 (width 576, 4 × 512 tokens), one per call
# as the streamed step runs it.
for _side in ("in", "out"):
    _spec(f"lorsum_update_{_side}", "drTL", "m=n={d} r={r} T={T} L={L}",
          full=[(1024, 16, 4096, 1), (1024, 8, 512, 24), (1024, 64, 2048, 1), (4096, 16, 512, 1),
                (576, 16, 2048, 1)],
          )(_half_step(_side))


@_spec("kfac_lorsum_update_in", "drTL", "m=n={d} r={r} T={T} L={L}",
       needs=("lorsum_update_in", "kfac_metric_update"),
       full=[(1024, 16, 4096, 1), (1024, 8, 512, 24), (4096, 16, 512, 1), (576, 16, 2048, 1)])
def _kfac_lorsum_update_in(s, dtype, device, variant):
    """ScaledLoRSum's first A-step with its K-FAC metric step: fused (the CPU), the statistics are summed in
    the A-step's own passes, one read of S and one of X; elsewhere the two ops in turn read them twice."""
    (X, S), (A, B, _, _), v = _tokens(s, dtype, device), _factors(s, device), _metric(s, device)
    kfac = (0.999, 0.1, -0.5, 1.0 / s.T, float(s.T))
    return (lambda b: ops.kfac_lorsum_update_in(B, (A, B), [(X, S.mT)], [1.0, -0.1], 1e-3, v, v, *kfac, backend=b),
            _bytes(X, S, A, B, A) + 6 * _bytes(v))


@_spec("spd_solve", "rdL", "r={r} N={d} L={L} {variant}", tokens=False, variants=("left", "right"), rounds=20,
       full=[(16, 1024, 24), (64, 4096, 24), (8, 1024, 1)])
def _spd_solve(s, dtype, device, variant):
    F = _randn(s.L, s.r, 4 * s.r, device=device, seed=8)
    gram = F @ F.mT / (4 * s.r)
    left = variant == "left"
    rhs = _randn(*((s.L, s.r, s.d) if left else (s.L, s.d, s.r)), device=device, seed=9)
    return (lambda b: ops.spd_solve(gram, rhs, left=left, backend=b)), _bytes(gram, rhs, rhs)


@_spec("pair_products", "drTL", "m=n={d} w=v={w} T={T} L={L}", rounds=10,
       full=[(1024, 16, 4096, 1), (1024, 8, 512, 24), (4096, 16, 512, 1), (4096, 64, 2048, 4)])
def _pair_products(s, dtype, device, variant):
    """Both token products of one pass, the weight's and the momentum's factors side by side (spec §9 H2)."""
    (X, S), (A, B, Am, Bm) = _tokens(s, dtype, device), _factors(s, device)
    W, V = torch.cat([B, Bm], -1), torch.cat([A, Am], -2)
    return (lambda b: ops.pair_products(X, S.mT, W, V, backend=b)), _bytes(X, S, W, V) + _bytes(W, V)


_FACTOR_SIZES = [(d, r, L) for d in (1024, 4096) for r in (8, 16, 64) for L in (1, 24)]


@_spec("adaprelora_solve", "drL", "m=n={d} r={r} L={L}", tokens=False, full=_FACTOR_SIZES)
def _adaprelora_solve(s, dtype, device, variant):
    """AdaPreLoRA's H-weighted factor solve: two r×r SPD systems per layer, row and column metrics p, q."""
    (A, B, g_A, g_B), p, q = _factors(s, device), _metric(s, device), _metric(s, device, seed=10)
    return (lambda b: ops.adaprelora_solve(A, B, g_A, g_B, p, q, ridge=1e-6, backend=b),
            _bytes(A, B, g_A, g_B, p, q) + _bytes(A, B))


@_spec("tangent_energies", "drL", "m=n={d} r={r} L={L}", tokens=False, full=_FACTOR_SIZES)
def _tangent_energies(s, dtype, device, variant):
    """AdaPreLoRA's surrogate statistics: the row and column energies of B·g_A + g_B·A."""
    A, B, g_A, g_B = _factors(s, device)
    return (lambda b: ops.tangent_energies(B, g_A, g_B, A, backend=b)), _bytes(A, B, g_A, g_B) + 8 * s.L * s.d


@_spec("finish_normalized_step", "drL", "m=n={d} r={r} L={L}", tokens=False,
       full=[(1024, 16, 24), (4096, 16, 24), (576, 16, 210)])
def _finish_normalized_step(s, dtype, device, variant):
    """normalize_step's finish and write of L layers, in place, from balanced results (the streamed step's):
    the merged step's bound from r×r Grams, the statistics, the shrink (half the layers cut), the writes."""
    A, B, noise_A, noise_B = _factors(s, device)
    root = torch.full((s.L,), 1.5, device=device)
    A_new, B_new = (A + 1e-3 * noise_A) * 1.5, (B + 1e-3 * noise_B) * 1.5
    params, new = [list(t.unbind(0)) for t in (A, B)], [list(t.unbind(0)) for t in (A_new, B_new)]
    stats = [[torch.full((), value, device=device) for _ in range(s.L)] for value in (1e-4, 3.0, 1.0)]
    layer_lr = torch.tensor([1e-3, 1e-2] * (s.L // 2) + [1e-3] * (s.L % 2), device=device)
    allowed = torch.ones(s.L, dtype=torch.bool, device=device)
    return (lambda b: ops.finish_normalized_step(*params, *new, [], *stats, root, layer_lr, allowed, True, 1e-3,
                                                 0.999, backend=b),
            3 * _bytes(A, B))


@_spec("finish_normalized_stacked", "drL", "m=n={d} r={r} L={L}", tokens=False,
       full=[(1024, 16, 24), (4096, 16, 24), (576, 16, 210)])
def _finish_normalized_stacked(s, dtype, device, variant):
    """normalize_step's statistics and shrink of L stacked layers, out of place (the accelerators' finish):
    the bound's Grams, the statistics, the move (half the layers cut)."""
    A, B, noise_A, noise_B = _factors(s, device)
    A_new, B_new = A + 1e-3 * noise_A, B + 1e-3 * noise_B
    root = torch.full((s.L,), 1.5, device=device)
    v, t = torch.full((s.L,), 1e-4, device=device), torch.full((s.L,), 3.0, device=device)
    layer_lr = torch.tensor([1e-3, 1e-2] * (s.L // 2) + [1e-3] * (s.L % 2), device=device)
    return (lambda b: ops.finish_normalized_stacked(A, B, A_new, B_new, root, layer_lr, v, t, 1e-3, 0.999,
                                                    backend=b),
            3 * _bytes(A, B))


@_spec("adafactor_ema_scales", "dL", "m=n={d} L={L}", tokens=False,
       full=[(1024, 24), (4096, 24), (576, 210)])
def _adafactor_ema_scales(s, dtype, device, variant):
    """AdaPreLoRA's Adafactor statistics step of L layers: the EMA of the row and column energies at per-layer
    step numbers (Adafactor's schedule), then the scales p, q."""
    g = torch.Generator().manual_seed(0)
    stats = [torch.rand(s.L, s.d, generator=g).to(device) for _ in range(4)]
    t = torch.arange(1, s.L + 1, dtype=torch.float32, device=device)
    return (lambda b: ops.adafactor_ema_scales(*stats, t, None, 0.8, 1e-30, torch.float32, 1e-15, backend=b),
            2 * _bytes(*stats))  # four vectors read, four written


@_spec("low_rank_sum", "drTL", "m=n={d} r={r} T={T} L={L} {variant}", variants=("k=0", "k=1"), rounds=7,
       needs=("lorsum_update_in", "lorsum_update_out", "pair_products"),
       full=[(1024, 16, 512, 1), (1024, 16, 2048, 4), (1024, 64, 2048, 1)])
def _low_rank_sum(s, dtype, device, variant):
    """One LoRSum of [(A,B), (X,Sᵀ), (A_m,B_m)]: k = 0 (both half-steps from the anchors, one pass over X
    and S) or k = 1 (an A-step, then a B-step: two passes)."""
    (X, S), (A, B, Am, Bm) = _tokens(s, dtype, device), _factors(s, device)
    k = int(variant.removeprefix("k="))
    return (lambda b: low_rank_sum([(A, B), (X, S.mT), (Am, Bm)], [1.0, -0.1, -0.09], lmbd=1e-3, iters=k,
                                   backend=b),
            (1 + k) * _bytes(X, S) + 2 * _bytes(A, B, Am, Bm))


_STEP = dict(lr=0.1, lmbd=1e-2, iters=1)


@_spec("lorsum_step", "drTL", "m=n={d} r={r} T={T} L={L} k=1", steps=True, needs=SPECS["low_rank_sum"].needs,
       full=[(1024, 8, 2048, 24), (1024, 16, 2048, 24), (1024, 64, 2048, 24), (1024, 16, 512, 24)])
def _lorsum_step(s, dtype, device, variant):
    """PSI-LoRA's step with momentum (functional.psi_lora_step): the weight's and the buffer's LoRSums share
    each pass over X and S, so the floor is two passes."""
    (X, S), (A, B, Am, Bm) = _tokens(s, dtype, device), _factors(s, device)
    return (lambda b: psi_lora_step(A, B, X, S, (Am, Bm), lmbd_momentum=1e-2, momentum=0.9, dampening=0.0,
                                    backend=b, **_STEP),
            2 * _bytes(X, S) + 2 * _bytes(A, B, Am, Bm))


@_spec("scaled_lorsum_step", "drTL", "m=n={d} r={r} T={T} L={L} k=1", steps=True,
       needs=(*SPECS["low_rank_sum"].needs, "kfac_metric_update"), full=[(1024, 16, 2048, 24)])
def _scaled_lorsum_step(s, dtype, device, variant):
    """Scaled PSI-LoRA's step with the diagonal K-FAC metric (functional.scaled_psi_lora_step, β1 = 0.9):
    the fused metric update reads X and S once more."""
    (X, S), (A, B, Am, Bm) = _tokens(s, dtype, device), _factors(s, device)
    v = torch.ones(s.L, s.d, device=device)
    return (lambda b: scaled_psi_lora_step(A, B, X, S, (v, v.clone()), (Am, Bm), min_lmbd=1e-5,
                                           betas=(0.9, 0.999), damping=0.1, metric="kfac", metric_power=0.5,
                                           loss_reduction="mean", backend=b, **_STEP),
            3 * _bytes(X, S) + 2 * _bytes(A, B, Am, Bm) + 4 * _bytes(v))


OPS = list(SPECS)


def available_backends(op: str, device: torch.device | str) -> list[str]:
    """The backends ``resolve_backend`` runs ``op`` on ``device`` with when forced by name (BACKENDS order)."""
    names = []
    for name in BACKENDS:
        try:
            resolve_backend(name, device, op)
        except RuntimeError:
            continue
        names.append(name)
    return names


@dataclass(frozen=True)
class Case:
    op: str
    shape: Shape
    dtype: torch.dtype = torch.float32
    variant: str = ""

    @property
    def spec(self) -> OpSpec:
        return SPECS[self.op]

    @property
    def dispatch_op(self) -> str:
        return (self.spec.needs or (self.op,))[0]

    @property
    def config(self) -> str:
        s = self.shape
        text = self.spec.label.format(**s._asdict(), w=2 * s.r, variant=self.variant)
        return " ".join(text.split() + [str(self.dtype).removeprefix("torch.")])

    @property
    def id(self) -> str:
        """A pytest id: ``m1024_r16_T512_L1-k=1-bfloat16`` (the dimensions the op reads)."""
        dims = "_".join(f"{'m' if k == 'd' else k}{v}" for k, v in self.shape._asdict().items() if v)
        return "-".join(x for x in (dims, self.variant, str(self.dtype).removeprefix("torch.")) if x)

    def backends(self, device: torch.device | str, compile: bool = False) -> list[str]:
        device = torch.device(device)
        names = [name for name in available_backends(self.dispatch_op, device)
                 if all(name in available_backends(op, device) for op in self.spec.needs)
                 and not (name == "triton" and device.type == "cpu")]
        names.sort(key=lambda name: name != "torch")  # the reference first: the others' speedup is over it
        return names + (["torch.compile"] if compile and self.spec.steps else [])

    def build(self, device: torch.device | str) -> OpCase:
        run, floor = self.spec.build(self.shape, self.dtype, torch.device(device), self.variant)
        return OpCase(self, run, floor)


@dataclass
class OpCase:
    """A built case: ``run(backend)`` calls the op on inputs that live on the device."""

    case: Case
    run: Callable[[str], object]
    floor_bytes: int
    _compiled: Callable | None = field(default=None, repr=False)

    op = property(lambda self: self.case.op)
    config = property(lambda self: self.case.config)
    dispatch_op = property(lambda self: self.case.dispatch_op)

    def __call__(self, backend: str):
        if backend != "torch.compile":
            return self.run(backend)
        if self._compiled is None:  # one compiled reference per case (its own guards, no recompile limit)
            self._compiled = torch.compile(functools.partial(self.run, "torch"))
        return self._compiled()


def case_list(grid: str = "full", dtypes=DTYPES, ops: list[str] | None = None) -> list[Case]:
    out = []
    for op in ops or OPS:
        spec = SPECS[op]
        for dtype in (dtypes if spec.tokens else [torch.float32]):
            out += [Case(op, shape, dtype, variant)
                    for shape in spec.sizes(grid) for variant in spec.variants]
    return out


def iter_cases(device: torch.device | str, dtypes=DTYPES, grid: str = "full",
               ops: list[str] | None = None) -> Iterator[OpCase]:
    """``case_list``'s cases built one at a time (the full grid's inputs are never all alive at once)."""
    for case in case_list(grid, dtypes, ops):
        yield case.build(device)
