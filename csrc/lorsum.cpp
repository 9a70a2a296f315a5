// The op schemas of lorsum_kernels: the contract between Python and the native kernels.
//
// Every hot-path op is declared here, once, with its schema. The per-device implementations live in
// csrc/cpu/ (TORCH_LIBRARY_IMPL(lorsum, CPU, m)) and csrc/cuda/ (TORCH_LIBRARY_IMPL(lorsum, CUDA, m));
// the fake (meta) implementations used by torch.compile and FakeTensor are registered from Python in
// lorsum_kernels/_native.py. The pure-PyTorch definition of each op is in lorsum_kernels/reference.py,
// and the native kernels are tested against it.
//
// The extension is built with Py_LIMITED_API (see setup.py): this file uses only the stable Python C
// API, and no pybind11, so one `_C.abi3.so` serves every CPython >= 3.10 for a given torch.

#include <Python.h>

#include <torch/library.h>

extern "C" {
// `import lorsum_kernels._C` loads this shared library, which runs the TORCH_LIBRARY /
// TORCH_LIBRARY_IMPL static initialisers below and in the other translation units, registering the ops
// as torch.ops.lorsum.*. The module itself is empty: the ops are reached through torch.ops, which is
// what makes them visible to torch.compile, FakeTensor and opcheck (pytorch/extension-cpp pattern).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name of module
      nullptr,  // no docstring
      -1,  // no per-interpreter state
      nullptr,  // no methods: the ops live in torch.ops.lorsum
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(lorsum, m) {
  // Column sums of squares over the token dimension: x (..., T, n) -> (..., n), accumulated and
  // returned in fp32 (fp64 for fp64 input). The diagonal K-FAC statistic of spec/lorsum.md §6.1.
  m.def("col_sq_sums(Tensor x) -> Tensor");

  // Diagonal K-FAC metric step (spec/lorsum.md §6.1), one read of X (..., T, n) and S (..., T, m):
  // v ← beta·v + (1−beta)·scale·Σ_t x_t² for (v_in, X, scale_in) and (v_out, S, scale_out), and the
  // effective metrics M = (v + damping)^power. Returns (v_in, v_out, M_in, M_out) in the dtypes of v.
  m.def(
      "kfac_metric_update(Tensor X, Tensor S, Tensor v_in, Tensor v_out, float beta, float damping, "
      "float power, float scale_in, float scale_out) -> (Tensor, Tensor, Tensor, Tensor)");

  // Row and column energies of G = Sᵀ·X without writing G: X (..., T, n), S (..., T, m) ->
  // (rows (..., m) = diag(G·Gᵀ), cols (..., n) = diag(Gᵀ·G)), fp32 (fp64 if an input is fp64).
  m.def("row_col_energies(Tensor X, Tensor S) -> (Tensor, Tensor)");

  // Batched r×r SPD solve gram·Z = rhs (left) or Z·gram = rhs, with the ridge relative to the mean
  // diagonal and the on-device fallback of reference.spd_solve. gram (..., r, r); rhs (..., r, N) or
  // (..., N, r); batch dimensions broadcast. Result in the promoted dtype of gram and rhs.
  m.def("spd_solve(Tensor gram, Tensor rhs, bool left=True) -> Tensor");

  // LoRSum's ALS half-steps (spec/lorsum.md §3.3, §6.2) for a batch of L same-shape layers: the A-step
  // returns Â (..., r, n) from B_hat (..., m, r); the B-step returns B̂ (..., m, r) from A_hat (..., r, n).
  // (A0, B0) is pair 0 (anchor and warm start); f_in[j] (..., q_j, n) and f_out[j] (..., m, q_j) are the
  // other pairs (the gradient pair is (X, S.mT)). coeffs is (J+1,) or (J+1, L): c0 for the anchor, then
  // one per pair, shared or per layer; lmbd is 0-d or (L,). m_in (..., n) and m_out (..., m) are the
  // effective diagonal metrics, both or neither. All leading batch dimensions are equal. Arithmetic in
  // fp32 (fp64 if any input is fp64), bf16/fp16 inputs read as they are; the result has A0's dtype.
  m.def(
      "lorsum_update_in(Tensor B_hat, Tensor A0, Tensor B0, Tensor[] f_in, Tensor[] f_out, Tensor coeffs, "
      "Tensor lmbd, Tensor? m_in=None, Tensor? m_out=None) -> Tensor");
  m.def(
      "lorsum_update_out(Tensor A_hat, Tensor A0, Tensor B0, Tensor[] f_in, Tensor[] f_out, Tensor coeffs, "
      "Tensor lmbd, Tensor? m_in=None, Tensor? m_out=None) -> Tensor");

  // ScaledLoRSum's first A-step in the diagonal K-FAC metric of this batch: kfac_metric_update of the first
  // pair (X = f_in[0], S = f_out[0]ᵀ) with the state v_in (..., n), v_out (..., m) (fp32 or fp64), then
  // lorsum_update_in (arguments as above) in the new effective metrics. The CPU kernel sums the statistics in
  // the A-step's own passes over S and X. Returns (Â, v_in, v_out, M_in, M_out).
  m.def(
      "kfac_lorsum_update_in(Tensor B_hat, Tensor A0, Tensor B0, Tensor[] f_in, Tensor[] f_out, Tensor coeffs, "
      "Tensor lmbd, Tensor v_in, Tensor v_out, float beta, float damping, float power, float scale_in, "
      "float scale_out) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");

  // The token products of a factor pair (f_in (..., q, n), f_out (..., m, q)) with wide factors, one read
  // of each operand per product: (Wᵀ·f_out·f_in (..., w, n), f_out·f_in·Vᵀ (..., m, v)). For the gradient
  // pair these are (S·W)ᵀ·X and Sᵀ·(X·Vᵀ); W = [B̂ | B̂_m] serves several half-steps in one pass (spec §9
  // H2). An absent W or V gives an empty (..., 0, n) or (..., m, 0) result.
  m.def("pair_products(Tensor f_in, Tensor f_out, Tensor? W=None, Tensor? V=None) -> (Tensor, Tensor)");

  // AdaPreLoRA's H-weighted factor solve (spec/adaprelora.md §3.3–3.7) for a batch of L same-shape layers:
  // A (..., r, n), B (..., m, r), their gradients g_A, g_B of the same shapes, the metric's positive scales
  // p (..., m) and q (..., n) (positivity is the caller's: not checked); all leading batch dimensions are
  // equal. ridge is the relative ridge of the two r×r Grams, a 0-d tensor or one value per layer (L,), with
  // reference.ridged_cholesky's floor and on-device fallback. Returns (dA (..., r, n), dB (..., m, r)) in
  // the promoted dtype of the six inputs; arithmetic in fp32 (fp64 if any input is fp64).
  m.def(
      "adaprelora_solve(Tensor A, Tensor B, Tensor g_A, Tensor g_B, Tensor p, Tensor q, Tensor ridge) "
      "-> (Tensor, Tensor)");

  // AdaPreLoRA's surrogate statistics (spec/adaprelora.md §3.5 (b)): the row and column energies of the
  // rank-(r_B + r_F) matrix B·E + F·A without forming it, for a batch of L layers: B (..., m, r_B),
  // E (..., r_B, n), F (..., m, r_F), A (..., r_F, n), all leading batch dimensions equal. With Z = [B F]
  // and W = [E; A]: (rows (..., m) = z_iᵀ(W·Wᵀ)z_i, cols (..., n) = w_jᵀ(Zᵀ·Z)w_j), clamped at 0 (NaN
  // stays NaN). Arithmetic in fp32 (fp64 if any input is fp64); results in the inputs' promoted dtype.
  m.def("tangent_energies(Tensor B, Tensor E, Tensor F, Tensor A) -> (Tensor, Tensor)");

  // normalize_step's finish and write (lorsum_kernels/optim/step_normalization.py) for L layers, CPU only,
  // fp32, in place. Per layer l: the parameters A[l] (r, n) and B[l] (m, r); its new factors A_new[l],
  // B_new[l] of those shapes (leading size-1 dimensions allowed), times √s when `balanced` (root[l] = √s);
  // the statistics v[l], t[l], scale[l] (one-element tensors). layer_lr (L,) is the lr each step ran at;
  // lr and beta are the group's η and normalize_beta. A layer is written when allowed[l] holds and its new
  // factors and its `checked` tensors (the other new state: len(checked)/L per layer, layer by layer) are
  // finite: the factors move by α = min(1, η·scale_new/layer_lr) of their step (torch.lerp's formula) and the
  // statistics take their new values, as reference.finish_normalized_step. Returns which layers were
  // written, (L,) bool; the others are left as they were.
  m.def(
      "finish_normalized_step(Tensor(a!)[] A, Tensor(b!)[] B, Tensor[] A_new, Tensor[] B_new, "
      "Tensor[] checked, Tensor(c!)[] v, Tensor(d!)[] t, Tensor(e!)[] scale, Tensor root, Tensor layer_lr, "
      "Tensor allowed, bool balanced, float lr, float beta) -> Tensor");
}
