"""lorsum_update_in / lorsum_update_out (LoRSum's ALS half-steps over a batch of same-shape layers) on every
backend against reference.lorsum_update_in / lorsum_update_out; the two mirror-image ops share this file as
they share their kernels.

Contract: for the iterate B̂ (in) or Â (out), the anchor (A0, B0), pairs [(F_in, F_out)] standing for
Σ_j c_j·F_out·F_in (the gradient pair (X, Sᵀ) and factor pairs), coefficients (shared or per layer), the ridge
λ (shared or per layer) and optional diagonal metrics (m_in, m_out): the least-squares half-step of
PSI-LoRA, in the factors' dtype (fp32 accuracy for bf16 X and S with fp32 factors: within 1e-5 of the fp64
reference on the same values; fp64: 1e-11; everything bf16 within twice the error of plain PyTorch in bf16);
batch dimensions broadcast (metrics shared by the layers, unbatched inputs); no pairs or no tokens allowed;
a singular Gram (B = 0 at the standard init) with λ = 0 leaves the anchor unchanged; a NaN poisons its own
layer only; run-to-run deterministic. Native: both CPU code paths, views, thread-count independence, the
input checks, opcheck, FakeTensor and compile, low_rank_sum and the optimizers (LoRSum, ScaledLoRSum)
stepped with backend="native" against "torch"; CUDA: the scalars on the device; Triton: per-layer
coefficients and λ, and dispatch.
"""

from __future__ import annotations

import pytest
import torch

from lorsum_kernels import ops, reference

from ..conftest import train_tiny
from ..problems import (NATIVE_CPU, NATIVE_CUDA, TRITON, assert_deterministic, assert_independent_of_thread_count,
                        assert_same_training, cast_problem, half_step, lorsum_problem, over_backends, rel_err,
                        spy_on_launcher)

OP = "lorsum_update_in"  # and lorsum_update_out: one kernel file, registered together
# (L, T, m, n, r): every value of r ∈ {1, 3, 16, 20}, m, n ∈ {5, 123, 256}, T ∈ {1, 37, 512} and L ∈ {1, 2, 3}
# appears, with r ≤ min(m, n) as for any LoRA layer (the optimizers reject a larger rank).
SHAPES = [
    (1, 37, 5, 123, 3),
    (3, 37, 123, 5, 1),
    (1, 512, 123, 256, 16),
    (3, 1, 256, 123, 3),
    (3, 512, 5, 5, 3),
    (1, 37, 256, 256, 16),
    (3, 37, 123, 123, 16),
    (2, 37, 67, 123, 20),  # r > 16: the fp32 r-wide kernels' tiles and fallbacks
    (1, 45, 300, 290, 20),  # row_dots' broadcast form: two vectors (the second masked), two spans of K
]
SHAPE_IDS = [f"L{L}_T{T}_m{m}_n{n}_r{r}" for L, T, m, n, r in SHAPES]


# ---- native CPU: accuracy ----------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["in", "out"])
@pytest.mark.parametrize("metrics", [False, True], ids=["plain", "scaled"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@over_backends(OP, NATIVE_CPU)
def test_native_fp32_and_fp64(be, shape, metrics, side):
    p64 = lorsum_problem(*shape, metrics=metrics, per_layer=metrics)
    p32 = cast_problem(p64, torch.float32)
    exact = half_step(side, cast_problem(p32, torch.float64), "torch")  # fp64 reference on the fp32 values
    # fp64 through the native op: the same math, to rounding.
    assert rel_err(half_step(side, p64, "native"), half_step(side, p64, "torch")) < 1e-11
    out = half_step(side, p32, "native")
    assert out.dtype == torch.float32 and out.shape == exact.shape
    assert rel_err(out, exact) < 1e-5


@pytest.mark.parametrize("side", ["in", "out"])
@over_backends(OP, NATIVE_CPU)
def test_native_intermediate_past_the_thread_buffer(be, side):
    # T·r past the 2^21 numbers the CPU half-steps keep per thread for their T×r intermediate: allocated per
    # call instead, the same numbers: within twice the error of the torch reference in fp32 (sums over 2^17
    # tokens).
    p32 = cast_problem(lorsum_problem(1, 2**17 + 3, 17, 19, 16), torch.float32)
    exact = half_step(side, cast_problem(p32, torch.float64), "torch")
    torch_err = rel_err(half_step(side, p32, "torch"), exact)
    assert rel_err(half_step(side, p32, "native"), exact) <= max(2 * torch_err, 1e-5)


@pytest.mark.parametrize("side", ["in", "out"])
@pytest.mark.parametrize("shape", SHAPES[:4], ids=SHAPE_IDS[:4])
@over_backends(OP, NATIVE_CPU)
def test_native_generic_path(be, shape, side, cpu_path):
    p32 = cast_problem(lorsum_problem(*shape, metrics=True), torch.float32, big_dtype=torch.bfloat16)
    exact = half_step(side, cast_problem(p32, torch.float64), "torch")
    assert rel_err(half_step(side, p32, "native"), exact) < 1e-5


def _torch_bf16_half_step(side, p, monkeypatch):
    """Plain PyTorch in bf16: the reference with every tensor in bf16, except the r×r Cholesky solve, which
    torch does not implement in bf16 on the CPU (it runs in fp32 and is rounded back)."""
    solve = reference.spd_solve
    monkeypatch.setattr(reference, "spd_solve",
                        lambda gram, rhs, left=True: solve(gram.float(), rhs.float(), left=left).to(gram.dtype))
    try:
        return half_step(side, p, "torch")
    finally:
        monkeypatch.setattr(reference, "spd_solve", solve)


@pytest.mark.parametrize("side", ["in", "out"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@over_backends(OP, NATIVE_CPU)
def test_native_bf16(be, shape, side, monkeypatch):
    # Everything bf16 (the result too): within twice the error plain PyTorch makes in bf16.
    p16 = cast_problem(lorsum_problem(*shape, metrics=True), torch.bfloat16)
    exact = half_step(side, cast_problem(p16, torch.float64), "torch")
    out = half_step(side, p16, "native")
    assert out.dtype == torch.bfloat16
    torch_err = rel_err(_torch_bf16_half_step(side, p16, monkeypatch), exact)
    assert rel_err(out, exact) <= 2 * torch_err
    # bf16 X and S with fp32 factors (what the optimizers pass): fp32 accuracy on the bf16 values.
    mixed = cast_problem(lorsum_problem(*shape, metrics=True), torch.float32, big_dtype=torch.bfloat16)
    assert rel_err(half_step(side, mixed, "native"), half_step(side, cast_problem(mixed, torch.float64), "torch")) < 1e-5


@pytest.mark.parametrize("first_A", [False, True])
@pytest.mark.parametrize("iters", [0, 1, 3])
@over_backends(OP)
def test_rounds_are_the_half_steps_in_turn(be, iters, first_A):
    # ops.lorsum_rounds builds the native ops' arguments once for all its calls: the same calls, bit for bit,
    # as lorsum_update_in / _out in turn (per-layer coefficients, metrics, a broadcast anchor's batch).
    p = {k: be.to(v) if isinstance(v, torch.Tensor) else v for k, v in
         cast_problem(lorsum_problem(3, 37, 123, 5, 3, metrics=True, per_layer=True), torch.float32).items()}
    p["pairs"] = [(be.to(a), be.to(b)) for a, b in p["pairs"]]
    p["coeffs"] = [be.to(c) if isinstance(c, torch.Tensor) else c for c in p["coeffs"]]
    p["metrics"] = tuple(be.to(t) for t in p["metrics"])
    anchor, args = (p["A0"], p["B0"]), (p["pairs"], p["coeffs"], p["lmbd"], p["metrics"])
    given = p["A0"] * 0.9 + 0.01 if first_A else None  # an A-step's result computed elsewhere
    A_new = given if first_A else be.run("lorsum_update_in", p["B0"], anchor, *args)
    if iters == 0:
        expected = (A_new, be.run("lorsum_update_out", p["A0"], anchor, *args))
    else:
        B_new = be.run("lorsum_update_out", A_new, anchor, *args)
        for _ in range(iters - 1):
            A_new = be.run("lorsum_update_in", B_new, anchor, *args)
            B_new = be.run("lorsum_update_out", A_new, anchor, *args)
        expected = (A_new, B_new)
    out = ops.lorsum_rounds(anchor, *args[:3], iters, p["metrics"], backend=be.name, first_A=given)
    assert all(torch.equal(a, b) for a, b in zip(out, expected))


@pytest.mark.parametrize("iters", [0, 1, 3])
@over_backends(OP, NATIVE_CPU)
def test_native_low_rank_sum_matches_torch(be, iters):
    from lorsum_kernels.functional import low_rank_sum, scaled_low_rank_sum

    p = cast_problem(lorsum_problem(3, 37, 123, 256, 16, metrics=True), torch.float32)
    pairs = [(p["A0"], p["B0"]), *p["pairs"]]
    for backend_args in [dict(), dict(metrics=p["metrics"])]:
        fn = scaled_low_rank_sum if backend_args else low_rank_sum
        nat = fn(pairs, p["coeffs"], **backend_args, lmbd=1e-2, iters=iters, backend="native")
        ref = fn(pairs, p["coeffs"], **backend_args, lmbd=1e-2, iters=iters, backend="torch")
        for a, b in zip(nat, ref):
            assert rel_err(a, b) < 1e-5


# ---- native CPU: layouts, broadcasting, edge cases ---------------------------------------------------------


@pytest.mark.parametrize("side", ["in", "out"])
@over_backends(OP, NATIVE_CPU)
def test_native_non_contiguous(be, side):
    p = cast_problem(lorsum_problem(3, 37, 123, 5, 3, metrics=True), torch.float32)
    X, St = p["pairs"][0]
    A_m, B_m = p["pairs"][1]
    wide_X = torch.randn(3, 37, 9)
    wide_X[..., 2:7] = X
    views = dict(
        A0=p["A0"].mT.contiguous().mT,  # column-major
        B0=p["B0"].transpose(0, 1).contiguous().transpose(0, 1),  # permuted batch
        pairs=[
            (wide_X[..., 2:7], St.contiguous()),  # sliced columns; F_out a contiguous m×T (not S.mT)
            (A_m.mT.contiguous().mT, B_m.mT.contiguous().mT),
        ],
        coeffs=p["coeffs"], lmbd=torch.tensor(1e-2),
        metrics=(p["metrics"][0][:1].expand(3, -1), p["metrics"][1][:, None, :].squeeze(1)),
    )
    plain = dict(p, metrics=(p["metrics"][0][:1].expand(3, -1).contiguous(), p["metrics"][1]))
    expected = half_step(side, cast_problem(plain, torch.float64), "torch")
    assert rel_err(half_step(side, views, "native"), expected) < 1e-5


@over_backends(OP, NATIVE_CPU)
def test_native_broadcasts_shared_metric_and_2d(be):
    # Unbatched (2-D) inputs, and metrics shared by every layer of a batch.
    p = cast_problem(lorsum_problem(1, 37, 123, 5, 3, metrics=True), torch.float32)
    flat = {k: (v[0] if isinstance(v, torch.Tensor) else v) for k, v in p.items()}
    flat["pairs"] = [tuple(t[0] for t in pair) for pair in p["pairs"]]
    flat["metrics"] = tuple(t[0] for t in p["metrics"])
    for side in ["in", "out"]:
        out = half_step(side, flat, "native")
        assert out.dim() == 2
        assert rel_err(out, half_step(side, cast_problem(flat, torch.float64), "torch")) < 1e-5
    batched = cast_problem(lorsum_problem(3, 37, 123, 5, 3), torch.float32)
    batched["metrics"] = (torch.rand(5) + 0.5, torch.rand(123) + 0.5)  # shared by the 3 layers
    assert rel_err(half_step("in", batched, "native"), half_step("in", cast_problem(batched, torch.float64), "torch")) < 1e-5


@over_backends(OP, NATIVE_CPU)
def test_native_no_pairs_and_zero_tokens(be):
    p = cast_problem(lorsum_problem(3, 0, 123, 5, 3), torch.float32)
    for side in ["in", "out"]:
        exact = half_step(side, cast_problem(p, torch.float64), "torch")
        assert rel_err(half_step(side, p, "native"), exact) < 1e-5
        anchor_only = dict(p, pairs=[], coeffs=[0.7])
        assert rel_err(half_step(side, anchor_only, "native"),
                       half_step(side, cast_problem(anchor_only, torch.float64), "torch")) < 1e-5


@pytest.mark.parametrize("side", ["in", "out"])
@over_backends(OP, NATIVE_CPU)
def test_native_singular_gram(be, side, cpu_path):
    # B = 0 (the standard LoRA init): the Gram B̂ᵀB̂ is exactly zero.
    p = cast_problem(lorsum_problem(3, 37, 123, 256, 16), torch.float32)
    p = dict(p, B0=torch.zeros_like(p["B0"]))
    if side == "out":
        p["A0"] = torch.zeros_like(p["A0"])
    # With λ > 0 the system is λ·I; with λ = 0 the Gram is zero, and so is the residual: the floored
    # relative ridge makes it factorisable and the half-step leaves the anchor unchanged.
    for lmbd in (1e-2, 0.0):
        out = half_step(side, dict(p, lmbd=lmbd), "native")
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, half_step(side, dict(p, lmbd=lmbd), "torch"), rtol=1e-5, atol=1e-7)
    out = half_step(side, dict(p, lmbd=0.0), "native")
    assert torch.equal(out, p["A0"] if side == "in" else p["B0"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@over_backends(OP, NATIVE_CPU)
def test_native_first_A_step_from_the_anchor(be, shape, dtype, cpu_path):
    # B̂ = B0 (the same tensor) with c0 = 1, a round's first A-step: the CPU op skips the anchor term, which
    # is 0 there. The same numbers as from a copy of B0, which takes the full path, and NaN where A0
    # poisons it.
    p = cast_problem(lorsum_problem(*shape, metrics=True), dtype)
    for poisoned in (False, True):
        if poisoned:
            p["A0"] = p["A0"].clone()
            p["A0"][..., 0, -1] = float("inf")
        shortcut = half_step("in", p, "native")
        full = half_step("in", p, "native", hat=p["B0"].clone())
        assert torch.equal(torch.isfinite(shortcut), torch.isfinite(full))
        assert torch.equal(shortcut.nan_to_num(), full.nan_to_num())


@pytest.mark.parametrize("where", ["X", "S", "anchor"])
@pytest.mark.parametrize("side", ["in", "out"])
@over_backends(OP, NATIVE_CPU)
def test_native_nan_propagates(be, side, where, cpu_path):
    p = cast_problem(lorsum_problem(3, 37, 123, 5, 3), torch.float32)
    X, St = p["pairs"][0]
    X, S = X.clone(), St.mT.clone()
    if where == "X":
        X[1, 5, 2] = float("nan")
    elif where == "S":
        S[1, 5, 7] = float("nan")
    else:
        p["A0"] = p["A0"].clone()
        p["A0"][1, 0, 0] = float("nan")
    p["pairs"] = [(X, S.mT), p["pairs"][1]]
    out = half_step(side, p, "native")
    ref = half_step(side, p, "torch")
    assert not torch.isfinite(out[1]).all()  # the poisoned layer is not silently finite
    assert torch.equal(torch.isfinite(out), torch.isfinite(ref))
    torch.testing.assert_close(out[0], ref[0], rtol=1e-5, atol=1e-6)  # the others are untouched


# (L, T, m, n, r): several layers; and one layer whose token products split their columns into blocks that
# depend on the thread count (one thread: 2 per row; two: 2 of n = 200 and 4 of m = 400, the last narrower).
@pytest.mark.parametrize("shape", [(3, 512, 256, 123, 16), (1, 300, 400, 200, 16)])
@over_backends(OP, NATIVE_CPU)
def test_native_independent_of_thread_count(be, shape):
    p = cast_problem(lorsum_problem(*shape, metrics=True), torch.float32)
    assert_independent_of_thread_count(lambda: (half_step("in", p, "native"), half_step("out", p, "native")))
    for side in ("in", "out"):  # and the column blocks add up to the reference's product
        assert rel_err(half_step(side, p, "native"), half_step(side, p, "torch")) < 1e-4


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: a.update(B0=a["B0"][..., :2]), r"A0 .* is \(\.\.\., r, n\) and B0 .* their ranks r differ"),
        (lambda a: a.update(f_in=a["f_in"][:1]), r"got 1 f_in factors but 2 f_out factors"),
        (lambda a: a.update(coeffs=a["coeffs"][:2]), r"coeffs must be \(J\+1,\) or \(J\+1, L\)"),
        (lambda a: a.update(lmbd=torch.ones(2, 2)), r"lmbd must be a 0-d tensor or one value per layer"),
        (lambda a: a.update(f_out=[a["f_out"][0][:, :-1], a["f_out"][1]]), r"pair 0 .* does not stand for"),
        (lambda a: a.update(m_in=a["m_in"][:2]), r"m_in must be \(\.\.\., n\)"),
        (lambda a: a.update(m_out=None), r"give both metrics"),
        (lambda a: a.update(B_hat=a["B_hat"][:2]), r"B_hat has batch shape"),
        (lambda a: a.update(A0=a["A0"].int()), r"A0 must be float32, float64, bfloat16 or float16"),
    ],
)
@over_backends(OP, NATIVE_CPU)
def test_native_rejects_bad_input(be, mutate, match):
    p = cast_problem(lorsum_problem(3, 37, 123, 5, 3, metrics=True), torch.float32)
    args = dict(B_hat=p["B0"], A0=p["A0"], B0=p["B0"], f_in=[q[0] for q in p["pairs"]],
                f_out=[q[1] for q in p["pairs"]], coeffs=torch.tensor(p["coeffs"], dtype=torch.float64),
                lmbd=torch.tensor(1e-2), m_in=p["metrics"][0], m_out=p["metrics"][1])
    mutate(args)
    with pytest.raises(RuntimeError, match=rf"lorsum_update_in: {match}"):
        torch.ops.lorsum.lorsum_update_in(**args)


# ---- native CPU: opcheck, fake tensors, compile ------------------------------------------------------------


def _opcheck_cases():
    p = cast_problem(lorsum_problem(2, 9, 7, 5, 3, metrics=True), torch.float32)
    X, St = p["pairs"][0]
    common = ([q[0] for q in p["pairs"]], [q[1] for q in p["pairs"]],
              torch.tensor(p["coeffs"], dtype=torch.float64), torch.tensor(1e-2, dtype=torch.float64))
    per_layer = torch.tensor([[1.0, 1.0], [-0.5, -0.4], [-0.05, -0.05]], dtype=torch.float64)
    return [
        ("lorsum_update_in", (p["B0"], p["A0"], p["B0"], *common, *p["metrics"])),
        ("lorsum_update_in", (p["B0"], p["A0"], p["B0"], common[0], common[1], per_layer,
                              torch.tensor([1e-2, 2e-2], dtype=torch.float64), None, None)),
        ("lorsum_update_out", (p["A0"], p["A0"], p["B0"], *common, *p["metrics"])),
        ("lorsum_update_out", (p["A0"].double(), p["A0"].double(), p["B0"].double(), [X.bfloat16()],
                               [St.bfloat16()], torch.tensor([1.0, -0.5], dtype=torch.float64),
                               torch.tensor(0.0, dtype=torch.float64), None, None)),
    ]


@pytest.mark.parametrize("case", range(4), ids=["in-metrics", "in-per-layer", "out-metrics", "out-fp64-bf16-pair"])
@over_backends(OP, NATIVE_CPU)
def test_native_opcheck(be, case):
    name, args = _opcheck_cases()[case]
    torch.library.opcheck(getattr(torch.ops.lorsum, name).default, args)


@over_backends(OP, NATIVE_CPU)
def test_native_fake_tensor_and_compile(be):
    from torch._subclasses.fake_tensor import FakeTensorMode

    p = cast_problem(lorsum_problem(2, 9, 7, 5, 3), torch.float32)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = {k: mode.from_tensor(v) for k, v in (("A0", p["A0"]), ("B0", p["B0"]))}
        out = torch.ops.lorsum.lorsum_update_out(
            fake["A0"], fake["A0"], fake["B0"], [], [], torch.tensor([1.0], dtype=torch.float64),
            torch.tensor(0.1, dtype=torch.float64))
    assert out.shape == p["B0"].shape and out.dtype == torch.float32

    X, St = p["pairs"][0]
    coeffs, lmbd = torch.tensor([1.0, -0.5], dtype=torch.float64), torch.tensor(1e-2, dtype=torch.float64)

    def step(A0, B0, X, S):  # the ops themselves (ops.py's backend lookup is not traceable)
        A = torch.ops.lorsum.lorsum_update_in(B0, A0, B0, [X], [S.mT], coeffs, lmbd)
        return torch.ops.lorsum.lorsum_update_out(A, A0, B0, [X], [S.mT], coeffs, lmbd)

    compiled = torch.compile(step, backend="eager", fullgraph=True)
    expected = ops.lorsum_update_out(
        ops.lorsum_update_in(p["B0"], (p["A0"], p["B0"]), [(X, St)], [1.0, -0.5], 1e-2, backend="torch"),
        (p["A0"], p["B0"]), [(X, St)], [1.0, -0.5], 1e-2, backend="torch")
    assert rel_err(compiled(p["A0"], p["B0"], X, St.mT), expected) < 1e-5


# ---- native CPU: the optimizers, native against torch ------------------------------------------------------


@pytest.mark.parametrize(
    "opt_name, kw",
    [
        ("LoRSum", dict(lr=0.05, momentum=0.9, iters=1)),
        ("LoRSum", dict(lr=0.05, momentum=0.9, iters=0, dampening=0.1)),
        ("ScaledLoRSum", dict(lr=0.05, metric="kfac", iters=1)),
        ("ScaledLoRSum", dict(lr=0.05, metric="shampoo", iters=2, metric_power=0.25)),
    ],
    ids=["lorsum-momentum-k1", "lorsum-momentum-k0", "scaled-kfac", "scaled-shampoo"],
)
@over_backends(OP, NATIVE_CPU)
def test_native_optimizer_equals_torch(be, opt_name, kw):
    from lorsum_kernels import optim

    opt_cls = getattr(optim, opt_name)
    state = train_tiny(lambda model: opt_cls(model, backend=be.name, **kw), 7)
    assert_same_training(state, train_tiny(lambda model: opt_cls(model, backend="torch", **kw), 7))
    assert any("momentum" in k[1] or "metric" in k[1] for k in state[1])


# ---- CUDA --------------------------------------------------------------------------------------------------


def _cuda_problem(L, T, m, n, r, *, dtype=torch.float32, **kw):
    """The half-step problem (tests/problems.py) on the GPU, with current iterates off the anchor."""
    return lorsum_problem(L, T, m, n, r, dtype=dtype, hats=True, device=NATIVE_CUDA.device, **kw)


def _coeff_table(coeffs, L):
    """The schema's coeffs: (J+1,) when shared, else (J+1, L); float64 on the CPU."""
    ts = [torch.as_tensor(c, dtype=torch.float64).cpu() for c in coeffs]
    if all(t.ndim == 0 for t in ts):
        return torch.stack(ts)
    return torch.stack([t.expand(L) for t in ts])


def _native_half_step(side, p, *, scalars_on=None):
    op = torch.ops.lorsum.lorsum_update_in if side == "in" else torch.ops.lorsum.lorsum_update_out
    hat = p["B_hat"] if side == "in" else p["A_hat"]
    L = p["A0"].shape[0] if p["A0"].dim() > 2 else 1
    coeffs = _coeff_table(p["coeffs"], L)
    lmbd = torch.as_tensor(p["lmbd"], dtype=torch.float64).cpu()
    if scalars_on is not None:
        coeffs, lmbd = coeffs.to(scalars_on), lmbd.to(scalars_on)
    m_in, m_out = p["metrics"] if p["metrics"] is not None else (None, None)
    return op(hat, p["A0"], p["B0"], [f for f, _ in p["pairs"]], [f for _, f in p["pairs"]], coeffs, lmbd, m_in, m_out)


def _reference_half_step(side, p, *, dtype=torch.float64, device="cpu"):
    """reference.lorsum_update_in/out on copies of the problem in `dtype` on `device`."""
    def c(t):
        return t.detach().to(device=device, dtype=dtype)
    fn = reference.lorsum_update_in if side == "in" else reference.lorsum_update_out
    hat = p["B_hat"] if side == "in" else p["A_hat"]
    coeffs = [c(v) if isinstance(v, torch.Tensor) else v for v in p["coeffs"]]
    metrics = None if p["metrics"] is None else tuple(c(t) for t in p["metrics"])
    return fn(c(hat), (c(p["A0"]), c(p["B0"])), [(c(a), c(b)) for a, b in p["pairs"]], coeffs, p["lmbd"], metrics)


@pytest.mark.parametrize("side", ["in", "out"])
@pytest.mark.parametrize("metrics", [False, True], ids=["plain", "scaled"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@over_backends(OP, NATIVE_CUDA)
def test_cuda_fp32_and_fp64(be, shape, metrics, side):
    p64 = _cuda_problem(*shape, dtype=torch.float64, metrics=metrics, per_layer=metrics)
    out64 = _native_half_step(side, p64)
    assert out64.dtype == torch.float64 and rel_err(out64, _reference_half_step(side, p64)) < 1e-11
    p32 = _cuda_problem(*shape, dtype=torch.float32, metrics=metrics, per_layer=metrics)
    out = _native_half_step(side, p32)
    exact = _reference_half_step(side, p32)  # fp64 on the fp32 values
    assert out.dtype == torch.float32 and out.shape == exact.shape and out.device.type == torch.device(NATIVE_CUDA.device).type
    assert rel_err(out, exact) < 1e-5
    assert_deterministic(lambda: _native_half_step(side, p32))


@pytest.mark.parametrize("side", ["in", "out"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@over_backends(OP, NATIVE_CUDA)
def test_cuda_bf16(be, shape, side, monkeypatch):
    # bf16 X and S with fp32 factors (what the optimizers pass): fp32 accuracy on the bf16 values.
    mixed = _cuda_problem(*shape, dtype=torch.float32, big_dtype=torch.bfloat16, metrics=True)
    assert rel_err(_native_half_step(side, mixed), _reference_half_step(side, mixed)) < 1e-5
    # Everything bf16, the result too: within twice the error plain PyTorch makes in bf16 (its r×r solve in
    # fp32, rounded back: torch has no bf16 Cholesky).
    p16 = _cuda_problem(*shape, dtype=torch.bfloat16, metrics=True)
    out = _native_half_step(side, p16)
    assert out.dtype == torch.bfloat16
    solve = reference.spd_solve
    monkeypatch.setattr(reference, "spd_solve",
                        lambda gram, rhs, left=True: solve(gram.float(), rhs.float(), left=left).to(gram.dtype))
    torch_bf16 = _reference_half_step(side, p16, dtype=torch.bfloat16, device=NATIVE_CUDA.device)
    exact = _reference_half_step(side, p16)
    assert rel_err(out, exact) <= 2 * rel_err(torch_bf16, exact)


@pytest.mark.parametrize("side", ["in", "out"])
@over_backends(OP, NATIVE_CUDA)
def test_cuda_scalars_on_device_and_views(be, side):
    p = _cuda_problem(3, 37, 123, 5, 3, metrics=True, per_layer=True)
    on_cpu = _native_half_step(side, p)
    on_device = _native_half_step(side, p, scalars_on=NATIVE_CUDA.device)
    assert rel_err(on_device, on_cpu) < 1e-6
    # Non-contiguous factors and metrics, F_out of the gradient pair as a contiguous m×T matrix.
    X, St = p["pairs"][0]
    wide_X = torch.zeros(3, 37, 9, device=NATIVE_CUDA.device)
    wide_X[..., 2:7] = X
    views = dict(p, A0=p["A0"].mT.contiguous().mT, B0=p["B0"].transpose(0, 1).contiguous().transpose(0, 1),
                 pairs=[(wide_X[..., 2:7], St.contiguous()), p["pairs"][1]],
                 metrics=(p["metrics"][0].mT.contiguous().mT, p["metrics"][1][:, None, :].squeeze(1)))
    assert rel_err(_native_half_step(side, views), _reference_half_step(side, p)) < 1e-5


@over_backends(OP, NATIVE_CUDA)
def test_cuda_zero_gram_no_pairs_and_nan(be):
    # Standard LoRA init (B = 0) with λ = 0: the A-step's Gram is exactly zero and its right side too, so
    # Â = A0, finite; the B-step from A = 0 likewise keeps B0.
    p = _cuda_problem(3, 37, 123, 5, 3)
    zero_B = dict(p, B0=torch.zeros_like(p["B0"]), B_hat=torch.zeros_like(p["B0"]), lmbd=0.0)
    out = _native_half_step("in", zero_B)
    assert out.isfinite().all() and torch.equal(out, p["A0"])
    zero_A = dict(p, A0=torch.zeros_like(p["A0"]), A_hat=torch.zeros_like(p["A0"]), lmbd=0.0)
    out = _native_half_step("out", zero_A)
    assert out.isfinite().all() and torch.equal(out, p["B0"])
    # No pairs (anchor only), and no tokens.
    for side in ["in", "out"]:
        anchor_only = dict(p, pairs=[], coeffs=[0.7])
        assert rel_err(_native_half_step(side, anchor_only), _reference_half_step(side, anchor_only)) < 1e-5
        no_tokens = _cuda_problem(3, 0, 123, 5, 3)
        assert rel_err(_native_half_step(side, no_tokens), _reference_half_step(side, no_tokens)) < 1e-5
    # A NaN or an inf anywhere in X or S never gives a finite result for its layer, and leaves the others
    # finite (what _results_carry_bad_data would need of these kernels to skip the data's own check).
    for where, value in [("X", float("nan")), ("S", float("nan")), ("X", float("inf")), ("S", float("-inf"))]:
        X, St = (t.clone() for t in p["pairs"][0])
        (X if where == "X" else St)[1, 3, 2] = value
        bad = dict(p, pairs=[(X, St), p["pairs"][1]])
        for side in ["in", "out"]:
            out = _native_half_step(side, bad)
            assert not out[1].isfinite().all() and out[0].isfinite().all() and out[2].isfinite().all(), \
                (where, value, side)


@over_backends(OP, NATIVE_CUDA)
@pytest.mark.parametrize("side", ["in", "out"])
def test_cuda_opcheck(be, side):
    # Schema, fake (meta) implementation, autograd registration and AOT dispatch on CUDA tensors.
    p = _cuda_problem(2, 37, 7, 5, 3, metrics=side == "in")
    X, St = p["pairs"][0]
    coeffs = torch.tensor([1.0, -0.5], dtype=torch.float64, device=be.device)
    lmbd = torch.tensor(1e-2, dtype=torch.float64, device=be.device)
    m_in, m_out = p["metrics"] if p["metrics"] is not None else (None, None)
    hat = p["B0"] if side == "in" else p["A0"]
    torch.library.opcheck(getattr(torch.ops.lorsum, f"lorsum_update_{side}"),
                          (hat, p["A0"], p["B0"], [X], [St], coeffs, lmbd, m_in, m_out))


# ---- Triton (torch products, Triton spd_solve) -------------------------------------------------------------



def _half_steps():
    from lorsum_kernels.triton_kernels import half_steps

    return half_steps


def _triton_problem(L, T, m, n, r, dtype, *, metrics=False, per_layer=False, seed=0):
    """The half-step problem (tests/problems.py) on Triton's device; per layer, λ too."""
    p = lorsum_problem(L, T, m, n, r, dtype=dtype, metrics=metrics, per_layer=per_layer, seed=seed,
                       device=TRITON.device)
    if per_layer:
        p["coeffs"][1] = p["coeffs"][1].to(TRITON.device)
        p["lmbd"] = torch.linspace(1e-2, 2e-2, L, dtype=dtype, device=TRITON.device)
    return p


def _args(p, side):
    hat = p["B0"] * 1.1 if side == "in" else p["A0"] * 0.9  # B̂ / Â off the anchor
    return hat, (p["A0"], p["B0"]), p["pairs"], p["coeffs"], p["lmbd"], p["metrics"]


TRITON_SHAPES = [(1, 37, 5, 33, 3), (3, 1, 33, 5, 1), (1, 37, 33, 17, 16), (0, 37, 5, 5, 3)]  # (L, T, m, n, r)


@pytest.mark.parametrize("side", ["in", "out"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=lambda s: "L{}_T{}_m{}_n{}_r{}".format(*s))
@pytest.mark.parametrize("metrics", [False, True], ids=["plain", "metrics"])
@over_backends(OP, TRITON)
def test_matches_reference(be, side, dtype, shape, metrics):
    p = _triton_problem(*shape, dtype, metrics=metrics)
    fn = getattr(_half_steps(), f"lorsum_update_{side}")
    out = fn(*_args(p, side))
    expected = getattr(reference, f"lorsum_update_{side}")(*_args((lambda p: cast_problem(p, torch.float64))(p), side))
    assert out.dtype == dtype and out.shape == expected.shape and out.device == expected.device
    assert rel_err(out, expected) < (1e-12 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("side", ["in", "out"])
@over_backends(OP, TRITON)
def test_per_layer_coefficients_and_lambda(be, side):
    p = _triton_problem(3, 37, 33, 5, 3, torch.float64, per_layer=True, seed=1)
    out = getattr(_half_steps(), f"lorsum_update_{side}")(*_args(p, side))
    expected = getattr(reference, f"lorsum_update_{side}")(*_args(p, side))
    assert rel_err(out, expected) < 1e-12


@pytest.mark.parametrize("side", ["in", "out"])
@over_backends(OP, TRITON)
def test_nan_in_data_gives_nan_like_reference(be, side):
    p = _triton_problem(2, 37, 5, 33, 3, torch.float32, seed=2)
    p["pairs"][0][0][1, 4, 2] = float("nan")  # X of layer 1
    args = _args(p, side)
    out = getattr(_half_steps(), f"lorsum_update_{side}")(*args)
    expected = getattr(reference, f"lorsum_update_{side}")(*args)
    assert torch.equal(out.isnan(), expected.isnan()) and out[1].isnan().any() and not out[0].isnan().any()


@pytest.mark.parametrize("side", ["in", "out"])
@over_backends(OP, TRITON)
def test_dispatch_reaches_the_triton_launcher(be, side, monkeypatch):
    name = f"lorsum_update_{side}"
    p = _triton_problem(2, 7, 5, 6, 3, torch.float32, seed=3)
    real = getattr(_half_steps(), name)
    calls = spy_on_launcher(monkeypatch, name, real)
    out = getattr(ops, name)(*_args(p, side), backend="triton")
    assert len(calls) == 1
    torch.testing.assert_close(out, real(*_args(p, side)), rtol=0, atol=0)
