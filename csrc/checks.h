// Input checks of the lorsum ops, shared by the CPU (csrc/cpu/) and CUDA (csrc/cuda/*_binding.cpp)
// implementations, so that an op rejects the same inputs with the same message on every device.
//
// Each check_<op> validates every argument of one op against its schema (csrc/lorsum.cpp) before any work
// or allocation: definedness, device, layout, rank, dtype, then the shapes that must agree. Messages start
// with the op's name and name the argument and the expected shape, as FlashAttention's and ATen's checks
// do. `type` is the device type of the implementation (kCPU or kCUDA: the dispatch key it is registered
// for); the op runs on its first tensor argument's device, which must be of that type, and every tensor
// must be on it, except the small per-layer coefficients (coeffs, lmbd, ridge), which may
// also be CPU tensors so that a CUDA caller can pass Python numbers as host scalars (see the CUDA
// bindings: a 0-d CPU coefficient is read without a device synchronisation).
//
// Only ATen's public headers: this file is compiled by the host compiler in both builds, never by nvcc.

#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <utility>
#include <vector>

namespace lorsum {

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

// A dense floating tensor on `device` with at least min_dim dimensions.
inline void check_input(const at::Tensor& t, const char* op, const char* name, int64_t min_dim,
                        const at::Device& device) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.device().type() == device.type(), op, ": ", name, " must be a ",
              device.is_cpu() ? "CPU" : "CUDA", " tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == device, op, ": ", name, " is on ", t.device(), " but the first input is on ", device,
              " (all tensor inputs must be on one device)");
  TORCH_CHECK(t.layout() == at::kStrided, op, ": ", name, " must be a dense (strided) tensor, got layout ",
              t.layout());
  TORCH_CHECK(t.dim() >= min_dim, op, ": ", name, " must have at least ", min_dim, " dimensions, got shape ",
              t.sizes());
  TORCH_CHECK(is_float_dtype(t.scalar_type()), op, ": ", name, " must be float32, float64, bfloat16 or float16, got ",
              t.scalar_type());
}

// A floating coefficient tensor on the CPU or on `device`, with a shape the caller checks.
inline void check_coefficient(const at::Tensor& t, const char* op, const char* name, const at::Device& device) {
  const bool ok = t.defined() && is_float_dtype(t.scalar_type()) && (t.device().is_cpu() || t.device() == device);
  if (device.is_cpu()) {
    TORCH_CHECK(ok, op, ": ", name, " must be a floating CPU tensor, got ",
                t.defined() ? c10::str(t.scalar_type(), " on ", t.device()) : std::string("an undefined tensor"));
  } else {
    TORCH_CHECK(ok, op, ": ", name, " must be a floating tensor on the CPU or on ", device, ", got ",
                t.defined() ? c10::str(t.scalar_type(), " on ", t.device()) : std::string("an undefined tensor"));
  }
}

// The device an op runs on: its first tensor argument's, when that has the implementation's device type.
// Otherwise a device of that type, so that check_input(first, ...) rejects the first argument itself (a CPU
// tensor reaches the CUDA kernel when a later argument is a CUDA tensor).
inline at::Device op_device(const at::Tensor& first, c10::DeviceType type) {
  return first.defined() && first.device().type() == type ? first.device() : at::Device(type);
}

// The leading (batch) dimensions of t, before its last `trailing` ones.
inline at::IntArrayRef batch_shape(const at::Tensor& t, int64_t trailing) {
  return t.sizes().slice(0, t.dim() - trailing);
}

inline int64_t numel_of(at::IntArrayRef shape) {
  int64_t n = 1;
  for (const int64_t s : shape) {
    n *= s;
  }
  return n;
}

inline std::vector<int64_t> with_trailing(at::IntArrayRef batch, std::initializer_list<int64_t> trailing) {
  std::vector<int64_t> shape(batch.begin(), batch.end());
  shape.insert(shape.end(), trailing);
  return shape;
}

// fp64 when any defined tensor is fp64, else fp32: the dtype all arithmetic runs in (DESIGN.md "Numerical
// policy"); bf16 and fp16 inputs are read as they are and accumulated in fp32.
inline at::ScalarType acc_dtype(std::initializer_list<at::Tensor> tensors) {
  for (const auto& t : tensors) {
    if (t.defined() && t.scalar_type() == at::kDouble) {
      return at::kDouble;
    }
  }
  return at::kFloat;
}

// The dtypes of an op over its tensor inputs: `acc` the arithmetic (acc_dtype), `out` the results' (the
// inputs' promoted dtype), and whether the inputs share one dtype (`uniform`: the kernels read them as they
// are; mixed inputs are first converted to acc, not what the optimizers pass).
struct DtypePlan {
  at::ScalarType acc = at::kFloat;
  at::ScalarType out = at::kFloat;
  bool uniform = true;
};

inline DtypePlan dtype_plan(std::initializer_list<at::Tensor> tensors) {
  DtypePlan plan;
  plan.acc = acc_dtype(tensors);
  plan.out = tensors.begin()->scalar_type();
  for (const auto& t : tensors) {
    plan.out = at::promote_types(plan.out, t.scalar_type());
    plan.uniform = plan.uniform && t.scalar_type() == tensors.begin()->scalar_type();
  }
  return plan;
}

// ---- per-op checks -----------------------------------------------------------------------------------

inline void check_col_sq_sums(const at::Tensor& x, c10::DeviceType type) {
  check_input(x, "col_sq_sums", "x", 2, op_device(x, type));
}

inline void check_kfac_metric_update(const at::Tensor& X, const at::Tensor& S, const at::Tensor& v_in,
                                     const at::Tensor& v_out, c10::DeviceType type) {
  constexpr const char* op = "kfac_metric_update";
  const at::Device device = op_device(X, type);
  check_input(X, op, "X", 2, device);
  check_input(S, op, "S", 2, device);
  check_input(v_in, op, "v_in", 1, device);
  check_input(v_out, op, "v_out", 1, device);
  for (const auto* v : {&v_in, &v_out}) {
    TORCH_CHECK(v->scalar_type() == at::kFloat || v->scalar_type() == at::kDouble, op,
                ": the metric state must be float32 or float64, got ", v->scalar_type());
  }
  const auto batch = batch_shape(X, 2);
  TORCH_CHECK(batch_shape(S, 2) == batch && S.size(-2) == X.size(-2), op, ": X ", X.sizes(),
              " is (..., T, n) and S ", S.sizes(), " must be (..., T, m) with the same batch shape and T");
  TORCH_CHECK(batch_shape(v_in, 1) == batch && v_in.size(-1) == X.size(-1), op, ": v_in must be (..., n) = ", batch,
              " + (", X.size(-1), ",), got shape ", v_in.sizes());
  TORCH_CHECK(batch_shape(v_out, 1) == batch && v_out.size(-1) == S.size(-1), op, ": v_out must be (..., m) = ",
              batch, " + (", S.size(-1), ",), got shape ", v_out.sizes());
}

inline void check_row_col_energies(const at::Tensor& X, const at::Tensor& S, c10::DeviceType type) {
  constexpr const char* op = "row_col_energies";
  const at::Device device = op_device(X, type);
  check_input(X, op, "X", 2, device);
  check_input(S, op, "S", 2, device);
  TORCH_CHECK(batch_shape(S, 2) == batch_shape(X, 2) && S.size(-2) == X.size(-2), op, ": X ", X.sizes(),
              " is (..., T, n) and S ", S.sizes(), " must be (..., T, m) with the same batch shape and T");
}

// The batch shape of spd_solve's result: those of gram and rhs broadcast, as torch.cholesky_solve does.
inline std::vector<int64_t> check_spd_solve(const at::Tensor& gram, const at::Tensor& rhs, bool left,
                                            c10::DeviceType type) {
  constexpr const char* op = "spd_solve";
  const at::Device device = op_device(gram, type);
  check_input(gram, op, "gram", 2, device);
  check_input(rhs, op, "rhs", 2, device);
  const int64_t r = gram.size(-1);
  TORCH_CHECK(gram.size(-2) == r, op, ": gram must be square (..., r, r), got shape ", gram.sizes());
  TORCH_CHECK((left ? rhs.size(-2) : rhs.size(-1)) == r, op, ": rhs must be ",
              left ? "(..., r, N) for left=True" : "(..., N, r) for left=False", " with r = ", r,
              " (the size of gram), got shape ", rhs.sizes());
  const auto gb = batch_shape(gram, 2);
  const auto rb = batch_shape(rhs, 2);
  const int64_t nb = std::max<int64_t>(gb.size(), rb.size());
  std::vector<int64_t> batch(nb);
  for (int64_t i = 0; i < nb; ++i) {
    const int64_t gi = i - (nb - static_cast<int64_t>(gb.size()));
    const int64_t ri = i - (nb - static_cast<int64_t>(rb.size()));
    const int64_t gs = gi >= 0 ? gb[gi] : 1;
    const int64_t rs = ri >= 0 ? rb[ri] : 1;
    TORCH_CHECK(gs == rs || gs == 1 || rs == 1, op, ": the batch dimensions of gram ", gram.sizes(), " and rhs ",
                rhs.sizes(), " do not broadcast");
    batch[i] = gs == 1 ? rs : gs;
  }
  return batch;
}

// pair_products(f_in (..., q, n), f_out (..., m, q), W? (..., m, w), V? (..., v, n)).
inline void check_pair_products(const at::Tensor& f_in, const at::Tensor& f_out, const std::optional<at::Tensor>& W,
                                const std::optional<at::Tensor>& V, c10::DeviceType type) {
  constexpr const char* op = "pair_products";
  const at::Device device = op_device(f_in, type);
  check_input(f_in, op, "f_in", 2, device);
  check_input(f_out, op, "f_out", 2, device);
  const int64_t q = f_in.size(-2), n = f_in.size(-1), m = f_out.size(-2);
  TORCH_CHECK(f_out.size(-1) == q, op, ": f_in ", f_in.sizes(), " is (..., q, n) and f_out ", f_out.sizes(),
              " must be (..., m, q) with the same q");
  const auto batch = batch_shape(f_in, 2);
  TORCH_CHECK(batch_shape(f_out, 2) == batch, op, ": f_out has batch shape ", batch_shape(f_out, 2),
              " but f_in has ", batch, " (all inputs share the leading batch dimensions)");
  if (W.has_value()) {
    check_input(*W, op, "W", 2, device);
    TORCH_CHECK(W->size(-2) == m && batch_shape(*W, 2) == batch, op, ": W must be (..., m, w) with m = ", m,
                " and batch shape ", batch, ", got shape ", W->sizes());
  }
  if (V.has_value()) {
    check_input(*V, op, "V", 2, device);
    TORCH_CHECK(V->size(-1) == n && batch_shape(*V, 2) == batch, op, ": V must be (..., v, n) with n = ", n,
                " and batch shape ", batch, ", got shape ", V->sizes());
  }
}

// The sizes of a LoRSum half-step (lorsum_update_in when in_side, else lorsum_update_out).
struct HalfStepSizes {
  int64_t L = 0, m = 0, n = 0, r = 0, J = 0;
  std::vector<int64_t> batch;
  bool any_fp64 = false;  // some tensor input is fp64: the step computes in fp64
};

inline HalfStepSizes check_half_step(const char* op, bool in_side, const at::Tensor& hat, const at::Tensor& A0,
                                     const at::Tensor& B0, at::TensorList f_in, at::TensorList f_out,
                                     const at::Tensor& coeffs, const at::Tensor& lmbd,
                                     const std::optional<at::Tensor>& m_in, const std::optional<at::Tensor>& m_out,
                                     c10::DeviceType type) {
  const char* hat_name = in_side ? "B_hat" : "A_hat";
  // A0, not the schema's first argument (the hat), fixes the device: it is the anchor every call has.
  const at::Device device = op_device(A0, type);
  check_input(A0, op, "A0", 2, device);
  check_input(B0, op, "B0", 2, device);
  check_input(hat, op, hat_name, 2, device);
  HalfStepSizes h;
  h.r = A0.size(-2);
  h.n = A0.size(-1);
  h.m = B0.size(-2);
  TORCH_CHECK(B0.size(-1) == h.r, op, ": A0 ", A0.sizes(), " is (..., r, n) and B0 ", B0.sizes(),
              " is (..., m, r): their ranks r differ");
  const auto batch = batch_shape(A0, 2);
  h.batch.assign(batch.begin(), batch.end());
  h.L = numel_of(batch);
  TORCH_CHECK(batch_shape(B0, 2) == batch, op, ": B0 has batch shape ", batch_shape(B0, 2), " but A0 has ", batch,
              " (all inputs share the leading batch dimensions)");
  TORCH_CHECK(batch_shape(hat, 2) == batch, op, ": ", hat_name, " has batch shape ", batch_shape(hat, 2),
              " but A0 has ", batch, " (all inputs share the leading batch dimensions)");
  if (in_side) {
    TORCH_CHECK(hat.size(-2) == h.m && hat.size(-1) == h.r, op, ": B_hat must be (..., m, r) = (..., ", h.m, ", ",
                h.r, ") like B0, got shape ", hat.sizes());
  } else {
    TORCH_CHECK(hat.size(-2) == h.r && hat.size(-1) == h.n, op, ": A_hat must be (..., r, n) = (..., ", h.r, ", ",
                h.n, ") like A0, got shape ", hat.sizes());
  }
  TORCH_CHECK(f_in.size() == f_out.size(), op, ": got ", f_in.size(), " f_in factors but ", f_out.size(),
              " f_out factors (one of each per pair)");
  h.J = static_cast<int64_t>(f_in.size());
  h.any_fp64 = A0.scalar_type() == at::kDouble || B0.scalar_type() == at::kDouble || hat.scalar_type() == at::kDouble;
  for (int64_t j = 0; j < h.J; ++j) {
    const at::Tensor& fi = f_in[j];
    const at::Tensor& fo = f_out[j];
    check_input(fi, op, "f_in[j]", 2, device);
    check_input(fo, op, "f_out[j]", 2, device);
    TORCH_CHECK(fi.size(-1) == h.n && fo.size(-2) == h.m && fi.size(-2) == fo.size(-1), op, ": pair ", j, " (f_in ",
                fi.sizes(), ", f_out ", fo.sizes(), ") does not stand for an ", h.m, "x", h.n,
                " matrix f_out @ f_in: f_in must be (..., q, ", h.n, ") and f_out (..., ", h.m, ", q)");
    TORCH_CHECK(batch_shape(fi, 2) == batch && batch_shape(fo, 2) == batch, op, ": pair ", j, " has batch shapes ",
                batch_shape(fi, 2), " and ", batch_shape(fo, 2), " but A0 has ", batch,
                " (all inputs share the leading batch dimensions)");
    h.any_fp64 = h.any_fp64 || fi.scalar_type() == at::kDouble || fo.scalar_type() == at::kDouble;
  }
  check_coefficient(coeffs, op, "coeffs", device);
  TORCH_CHECK((coeffs.dim() == 1 || (coeffs.dim() == 2 && coeffs.size(1) == h.L)) && coeffs.size(0) == h.J + 1, op,
              ": coeffs must be (J+1,) or (J+1, L) = (", h.J + 1, ",) or (", h.J + 1, ", ", h.L,
              "): one coefficient for the anchor and one per pair, shared or per layer; got shape ", coeffs.sizes());
  check_coefficient(lmbd, op, "lmbd", device);
  TORCH_CHECK(lmbd.dim() == 0 || (lmbd.dim() == 1 && lmbd.size(0) == h.L), op,
              ": lmbd must be a 0-d tensor or one value per layer (L,) = (", h.L, ",), got shape ", lmbd.sizes());
  TORCH_CHECK(m_in.has_value() == m_out.has_value(), op,
              ": give both metrics (m_in and m_out) or neither; got only ", m_in.has_value() ? "m_in" : "m_out");
  if (m_in.has_value()) {
    check_input(*m_in, op, "m_in", 1, device);
    check_input(*m_out, op, "m_out", 1, device);
    TORCH_CHECK(m_in->size(-1) == h.n && batch_shape(*m_in, 1) == batch, op, ": m_in must be (..., n) = ", batch,
                " + (", h.n, ",), got shape ", m_in->sizes());
    TORCH_CHECK(m_out->size(-1) == h.m && batch_shape(*m_out, 1) == batch, op, ": m_out must be (..., m) = ", batch,
                " + (", h.m, ",), got shape ", m_out->sizes());
    h.any_fp64 = h.any_fp64 || m_in->scalar_type() == at::kDouble || m_out->scalar_type() == at::kDouble;
  }
  return h;
}

// The sizes of adaprelora_solve(A (..., r, n), B (..., m, r), g_A, g_B, p (..., m), q (..., n), ridge).
struct AdaPreLoRASizes {
  int64_t L = 0, r = 0, m = 0, n = 0;
  std::vector<int64_t> batch;
};

inline AdaPreLoRASizes check_adaprelora_solve(const at::Tensor& A, const at::Tensor& B, const at::Tensor& g_A,
                                              const at::Tensor& g_B, const at::Tensor& p, const at::Tensor& q,
                                              const at::Tensor& ridge, c10::DeviceType type) {
  constexpr const char* op = "adaprelora_solve";
  const at::Device device = op_device(A, type);
  check_input(A, op, "A", 2, device);
  check_input(B, op, "B", 2, device);
  check_input(g_A, op, "g_A", 2, device);
  check_input(g_B, op, "g_B", 2, device);
  check_input(p, op, "p", 1, device);
  check_input(q, op, "q", 1, device);
  AdaPreLoRASizes s;
  s.r = A.size(-2);
  s.n = A.size(-1);
  s.m = B.size(-2);
  TORCH_CHECK(B.size(-1) == s.r, op, ": A ", A.sizes(), " is (..., r, n) and B ", B.sizes(),
              " must be (..., m, r) with the same r");
  const auto batch = batch_shape(A, 2);
  s.batch.assign(batch.begin(), batch.end());
  TORCH_CHECK(batch_shape(B, 2) == batch, op, ": B has batch shape ", batch_shape(B, 2), " but A has ", batch,
              " (all inputs share the leading batch dimensions)");
  TORCH_CHECK(g_A.sizes() == A.sizes(), op, ": g_A must have the shape of A ", A.sizes(), ", got ", g_A.sizes());
  TORCH_CHECK(g_B.sizes() == B.sizes(), op, ": g_B must have the shape of B ", B.sizes(), ", got ", g_B.sizes());
  TORCH_CHECK(p.size(-1) == s.m && batch_shape(p, 1) == batch, op, ": p must be (..., m) = ", batch, " + (", s.m,
              ",), got shape ", p.sizes());
  TORCH_CHECK(q.size(-1) == s.n && batch_shape(q, 1) == batch, op, ": q must be (..., n) = ", batch, " + (", s.n,
              ",), got shape ", q.sizes());
  s.L = numel_of(batch);
  check_coefficient(ridge, op, "ridge", device);
  TORCH_CHECK(ridge.dim() == 0 || (ridge.dim() == 1 && ridge.size(0) == s.L), op,
              ": ridge must be a 0-d tensor or one value per layer (L,) = (", s.L, ",), got shape ", ridge.sizes());
  return s;
}

// The sizes of tangent_energies(B (..., m, r_B), E (..., r_B, n), F (..., m, r_F), A (..., r_F, n)).
struct TangentSizes {
  int64_t L = 0, m = 0, n = 0, r_B = 0, r_F = 0;
  std::vector<int64_t> batch;
};

inline TangentSizes check_tangent_energies(const at::Tensor& B, const at::Tensor& E, const at::Tensor& F,
                                           const at::Tensor& A, c10::DeviceType type) {
  constexpr const char* op = "tangent_energies";
  const at::Device device = op_device(B, type);
  check_input(B, op, "B", 2, device);
  check_input(E, op, "E", 2, device);
  check_input(F, op, "F", 2, device);
  check_input(A, op, "A", 2, device);
  TangentSizes s;
  s.m = B.size(-2);
  s.r_B = B.size(-1);
  s.n = E.size(-1);
  s.r_F = F.size(-1);
  TORCH_CHECK(E.size(-2) == s.r_B, op, ": B ", B.sizes(), " is (..., m, r) and E ", E.sizes(),
              " must be (..., r, n) with the same r");
  TORCH_CHECK(F.size(-2) == s.m, op, ": F ", F.sizes(), " must be (..., m, r_F) with the m of B ", B.sizes());
  TORCH_CHECK(A.size(-2) == s.r_F && A.size(-1) == s.n, op, ": A must be (..., r_F, n) = (..., ", s.r_F, ", ", s.n,
              ") for F ", F.sizes(), " and E ", E.sizes(), ", got shape ", A.sizes());
  const auto batch = batch_shape(B, 2);
  for (const auto& [t, name] : {std::pair{&E, "E"}, std::pair{&F, "F"}, std::pair{&A, "A"}}) {
    TORCH_CHECK(batch_shape(*t, 2) == batch, op, ": ", name, " has batch shape ", batch_shape(*t, 2), " but B has ",
                batch, " (all inputs share the leading batch dimensions)");
  }
  s.batch.assign(batch.begin(), batch.end());
  s.L = numel_of(batch);
  return s;
}

// kfac_lorsum_update_in's metric state, after check_half_step: v_in (..., n) and v_out (..., m) with the
// factors' batch shape, fp32 or fp64, on the op's device; and a first data pair (the gradient pair (X, Sᵀ)),
// whose statistics the metric takes.
inline void check_kfac_fold(const char* op, const std::vector<int64_t>& batch, int64_t m, int64_t n, int64_t J,
                            const at::Tensor& A0, const at::Tensor& v_in, const at::Tensor& v_out,
                            c10::DeviceType type) {
  TORCH_CHECK(J >= 1, op, ": needs the gradient pair (X, S^T) as f_in[0], f_out[0] (the metric's statistics are "
              "its column sums of squares); got no pairs");
  const at::Device device = op_device(A0, type);
  check_input(v_in, op, "v_in", 1, device);
  check_input(v_out, op, "v_out", 1, device);
  for (const auto* v : {&v_in, &v_out}) {
    TORCH_CHECK(v->scalar_type() == at::kFloat || v->scalar_type() == at::kDouble, op,
                ": the metric state must be float32 or float64, got ", v->scalar_type());
  }
  const at::IntArrayRef b(batch);
  TORCH_CHECK(batch_shape(v_in, 1) == b && v_in.size(-1) == n, op, ": v_in must be (..., n) = ", b, " + (", n,
              ",), got shape ", v_in.sizes());
  TORCH_CHECK(batch_shape(v_out, 1) == b && v_out.size(-1) == m, op, ": v_out must be (..., m) = ", b, " + (", m,
              ",), got shape ", v_out.sizes());
}

}  // namespace lorsum
