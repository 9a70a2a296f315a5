"""Every reference op accepts the dtype mixes its native op accepts (issue #11 item 7).

The native CPU kernels (csrc/cpu/) take each tensor in float32, float64, bfloat16 or float16, independently
(the K-FAC metric state: float32 or float64), compute in fp32 (fp64 when any input is fp64) and return a
documented dtype. The reference must do the same: ``lorsum-bench`` times the reference on the very inputs it
gives the native op (fp32 factors with bf16 X and S), and it raised on them. For each op and mix: the result
has the native op's dtype, fp32/fp64 results are within 1e-5/1e-10 of fp64 arithmetic on the same values,
bf16/fp16 results within twice the rounding of that fp64 result, and, where the native op is built, the
reference agrees with it.
"""

from __future__ import annotations

import pytest
import torch

from lorsum_kernels import _native, ops, reference

from .conftest import rel_err

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16

# (factor dtype, data dtype): the factors, Grams and metrics on one side, the token-sized X and S (or the
# right-hand sides, the gradients) on the other.
MIXES = [(F32, BF16), (BF16, BF16), (F16, F16), (BF16, F16), (F16, F32), (F64, BF16), (F32, F64), (F32, F32)]
MIX_IDS = [f"{str(a).removeprefix('torch.')}-{str(b).removeprefix('torch.')}" for a, b in MIXES]


def _acc(*dtypes):
    return F64 if F64 in dtypes else F32


def _promote(*dtypes):
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


def _gauss(*shape, seed, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * scale


def _positive(*shape, seed):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64) + 0.5


L, M, N, R, T = 2, 37, 23, 3, 19


def _spd_problem():
    Q = torch.linalg.qr(_gauss(L, R, R, seed=1)).Q
    gram = (Q * torch.linspace(1.0, 3.0, R, dtype=F64)) @ Q.mT
    return dict(gram=gram, rhs=_gauss(L, R, 9, seed=2))


def _half_step_problem():
    return dict(A0=_gauss(L, R, N, seed=3), B0=_gauss(L, M, R, seed=4), B_hat=_gauss(L, M, R, seed=5),
                A_hat=_gauss(L, R, N, seed=6), Am=_gauss(L, R, N, seed=7), Bm=_gauss(L, M, R, seed=8),
                m_in=_positive(L, N, seed=9), m_out=_positive(L, M, seed=10),
                X=_gauss(L, T, N, seed=11), S=_gauss(L, T, M, seed=12))


FACTOR_NAMES = {"gram", "A0", "B0", "B_hat", "A_hat", "Am", "Bm", "m_in", "m_out", "A", "B", "E", "F", "W", "V",
                "v_in", "v_out"}


def _cast(problem, factor, data):
    out = {}
    for k, t in problem.items():
        dtype = factor if k in FACTOR_NAMES else data
        if k in ("v_in", "v_out") and dtype not in (F32, F64):
            dtype = F32  # the metric state is fp32 or fp64 (the native op's rule)
        out[k] = t.to(dtype)
    return out


def _half_step(side, metrics):
    def call(p, backend="torch"):
        fn = ops.lorsum_update_in if side == "in" else ops.lorsum_update_out
        hat = p["B_hat"] if side == "in" else p["A_hat"]
        pairs = [(p["X"], p["S"].mT), (p["Am"], p["Bm"])]
        mets = (p["m_in"], p["m_out"]) if metrics else None
        return (fn(hat, (p["A0"], p["B0"]), pairs, [0.9, -0.1, -0.05], 0.1, mets, backend=backend),)

    def dtypes(p):
        return [p["A0"].dtype]  # the native op's contract: A0's dtype, for either side

    return "lorsum_update_" + side, _half_step_problem, call, dtypes


def _spd(left):
    def call(p, backend="torch"):
        rhs = p["rhs"] if left else p["rhs"].mT
        return (ops.spd_solve(p["gram"], rhs, left=left, backend=backend),)

    return "spd_solve", _spd_problem, call, lambda p: [_promote(p["gram"].dtype, p["rhs"].dtype)]


def _adaprelora():
    def problem():
        return dict(A=_gauss(L, R, N, seed=20), B=_gauss(L, M, R, seed=21), g_A=_gauss(L, R, N, seed=22),
                    g_B=_gauss(L, M, R, seed=23), p=_positive(L, M, seed=24), q=_positive(L, N, seed=25))

    def call(p, backend="torch"):
        return ops.adaprelora_solve(p["A"], p["B"], p["g_A"], p["g_B"], p["p"], p["q"], ridge=1e-6, backend=backend)

    return "adaprelora_solve", problem, call, lambda p: [_promote(*(t.dtype for t in p.values()))] * 2


def _tangent():
    def problem():
        return dict(B=_gauss(L, M, R, seed=30), E=_gauss(L, R, N, seed=31), F=_gauss(L, M, R, seed=32),
                    A=_gauss(L, R, N, seed=33))

    # E (a factor gradient) follows the data dtype here, so that B·E + F·A mixes dtypes.
    def call(p, backend="torch"):
        return ops.tangent_energies(p["B"], p["g"], p["F"], p["A"], backend=backend)

    def problem_named():
        p = problem()
        p["g"] = p.pop("E")
        return p

    return "tangent_energies", problem_named, call, lambda p: [_promote(*(t.dtype for t in p.values()))] * 2


def _col_sq_sums():
    return ("col_sq_sums", lambda: dict(X=_gauss(L, T, N, seed=40)),
            lambda p, backend="torch": (ops.col_sq_sums(p["X"], backend=backend),),
            lambda p: [_acc(p["X"].dtype)])


def _row_col_energies():
    return ("row_col_energies", lambda: dict(X=_gauss(L, T, N, seed=41), S=_gauss(L, T, M, seed=42)),
            lambda p, backend="torch": ops.row_col_energies(p["X"], p["S"], backend=backend),
            lambda p: [_acc(p["X"].dtype, p["S"].dtype)] * 2)


def _pair_products():
    def problem():
        return dict(X=_gauss(L, T, N, seed=43), S=_gauss(L, T, M, seed=44), W=_gauss(L, M, 2 * R, seed=45),
                    V=_gauss(L, 2 * R, N, seed=46))

    return ("pair_products", problem,
            lambda p, backend="torch": ops.pair_products(p["X"], p["S"].mT, p["W"], p["V"], backend=backend),
            lambda p: [_acc(*(t.dtype for t in p.values()))] * 2)


def _kfac():
    def problem():
        return dict(X=_gauss(L, T, N, seed=47), S=_gauss(L, T, M, seed=48), v_in=_positive(L, N, seed=49),
                    v_out=_positive(L, M, seed=50))

    return ("kfac_metric_update", problem,
            lambda p, backend="torch": ops.kfac_metric_update(p["X"], p["S"], p["v_in"], p["v_out"], 0.9, 0.1, 0.5,
                                                              1.0 / T, float(T), backend=backend),
            lambda p: [p["v_in"].dtype, p["v_out"].dtype] * 2)


CASES = {
    "spd_solve-left": _spd(True), "spd_solve-right": _spd(False),
    "update_in": _half_step("in", False), "update_in-scaled": _half_step("in", True),
    "update_out": _half_step("out", False), "update_out-scaled": _half_step("out", True),
    "adaprelora_solve": _adaprelora(), "tangent_energies": _tangent(), "col_sq_sums": _col_sq_sums(),
    "row_col_energies": _row_col_energies(), "pair_products": _pair_products(), "kfac_metric_update": _kfac(),
}


def _bound(out_dtype: torch.dtype, exact: torch.Tensor, math: torch.dtype = F64) -> float:
    if out_dtype == F64 and math == F64:
        return 1e-10
    if out_dtype in (F32, F64):
        return 1e-5
    return 2 * rel_err(exact.to(out_dtype), exact) + 1e-6  # fp32 arithmetic, one rounding of the result


@pytest.mark.parametrize("mix", MIXES, ids=MIX_IDS)
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_reference_accepts_the_native_dtype_mixes(case, mix):
    op, problem, call, dtypes = CASES[case]
    p = _cast(problem(), *mix)
    out = call(p, backend="torch")
    assert [t.dtype for t in out] == dtypes(p)
    # fp64 arithmetic on the same (rounded) values
    exact = call({k: t.to(F64) for k, t in p.items()}, backend="torch")
    # The K-FAC statistics accumulate in fp32 unless X and S are fp64, whatever the state's dtype.
    math = _acc(p["X"].dtype, p["S"].dtype) if op == "kfac_metric_update" else _acc(*(t.dtype for t in p.values()))
    for o, e in zip(out, exact):
        assert o.shape == e.shape
        assert rel_err(o, e) <= _bound(o.dtype, e, math), (op, o.dtype)
    if _native.has_native_op(op, "cpu"):
        native = call(p, backend="native")
        assert [t.dtype for t in native] == [t.dtype for t in out]
        for a, o, e in zip(native, out, exact):
            assert rel_err(a, o) <= 2 * _bound(o.dtype, e, math), (op, o.dtype)


def test_benchmark_inputs_run_on_the_reference():
    # What `lorsum-bench --dtype bfloat16` gives both backends: fp32 factors, bf16 X and S (it raised).
    X = _gauss(1, T, N, seed=60).to(BF16)
    S = _gauss(1, T, M, seed=61).to(BF16)
    A, B = _gauss(1, R, N, seed=62).float(), _gauss(1, M, R, seed=63).float()
    A_new = reference.lorsum_update_in(B, (A, B), [(X, S.mT)], [1.0, -0.1], 1e-3)
    B_new = reference.lorsum_update_out(A, (A, B), [(X, S.mT)], [1.0, -0.1], 1e-3)
    assert A_new.dtype == B_new.dtype == F32
    assert torch.isfinite(A_new).all() and torch.isfinite(B_new).all()


def test_half_precision_inputs_are_computed_in_fp32():
    # All-bf16 inputs: fp32 arithmetic rounded once, not bf16 arithmetic (the native op's accuracy).
    p = _cast(_half_step_problem(), BF16, BF16)
    pairs = [(p["X"], p["S"].mT)]
    out = reference.lorsum_update_in(p["B_hat"], (p["A0"], p["B0"]), pairs, [1.0, -0.1], 0.1)
    f32 = reference.lorsum_update_in(p["B_hat"].float(), (p["A0"].float(), p["B0"].float()),
                                     [(p["X"].float(), p["S"].mT.float())], [1.0, -0.1], 0.1)
    assert out.dtype == BF16
    assert torch.equal(out, f32.to(BF16))
