// pair_products and the LoRSum half-steps (lorsum_update_in / lorsum_update_out) on CUDA: kernel (4) of
// kernels.h (block_power.cu) for every pair's token products, cuBLAS (at::matmul) for the r-wide Grams and
// anchor terms, kernel (3) (spd_solve_cuda) for the r×r solve: reference.lorsum_update_in/out's
// formulation, the anchor plus the solved change from it.

#include "binding.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <utility>
#include <vector>

namespace lorsum {
namespace {

using namespace cuda_ops;

// out (L, w, N), addressed by (o_bs, o_ks, o_js), = (A3·W)ᵀ·B3 for A3 (L, K, M) and B3 (L, K, N) from
// rows_view (unit column stride, both fp64 or neither) and W (L, M, w) contiguous in the accumulation dtype.
void projected_product(const char* op, const at::Tensor& A3, const at::Tensor& W, const at::Tensor& B3,
                       const at::Tensor& out, int64_t o_bs, int64_t o_ks, int64_t o_js) {
  const int64_t L = A3.size(0), K = A3.size(1), M = A3.size(2), w = W.size(2), N = B3.size(2);
  TORCH_INTERNAL_ASSERT(W.is_contiguous() && W.size(0) == L && W.size(1) == M && B3.size(0) == L && B3.size(1) == K);
  const size_t elem = W.scalar_type() == at::kDouble ? sizeof(double) : sizeof(float);
  const size_t bytes = kc::projected_product_workspace_bytes(L, K, M, w, N, elem);
  const at::Tensor ws = workspace(bytes, W);
  dispatch_pair(A3.scalar_type(), B3.scalar_type(), op, [&](auto ta, auto tb) {
    using TA = decltype(ta);
    using TB = decltype(tb);
    using Acc = kc::acc_t<TB>;
    TORCH_INTERNAL_ASSERT(W.scalar_type() == (std::is_same_v<Acc, double> ? at::kDouble : at::kFloat));
    check_launch(kc::projected_product<TA, TB>(cptr<TA>(A3), A3.stride(0), A3.stride(1), cptr<Acc>(W), M * w,
                                               cptr<TB>(B3), B3.stride(0), B3.stride(1), L, K, M, w, N,
                                               mptr<Acc>(out), o_bs, o_ks, o_js, bytes ? ws.data_ptr() : nullptr,
                                               bytes, current_stream()),
                 op);
  });
}

// (Wᵀ·f_out·f_in (L, w, n), f_out·f_in·Vᵀ (L, m, v)) for the pair f_in (L, q, n), f_out (L, m, q); W (L, m, w) and
// V (L, v, n) optional, all in any dtype; results in acc.
std::pair<at::Tensor, at::Tensor> pair_products_flat(const char* op, const at::Tensor& f_in, const at::Tensor& f_out,
                                                     const at::Tensor& W, const at::Tensor& V, at::ScalarType acc) {
  const int64_t L = f_in.size(0), n = f_in.size(2), m = f_out.size(1);
  const auto opts = f_in.options().dtype(acc);
  const at::Tensor X3 = rows_view(f_in, L, acc);         // tokens × n
  const at::Tensor S3 = rows_view(f_out.mT(), L, acc);   // tokens × m
  at::Tensor P, Q;
  if (W.defined()) {
    const int64_t w = W.size(2);
    P = at::empty({L, w, n}, opts);
    projected_product(op, S3, W.to(acc).contiguous(), X3, P, w * n, n, 1);
  }
  if (V.defined()) {
    const int64_t v = V.size(1);
    Q = at::empty({L, m, v}, opts);
    // Qᵀ = (f_in·Vᵀ)ᵀ·f_outᵀ, written transposed into Q.
    projected_product(op, X3, V.to(acc).mT().contiguous(), S3, Q, m * v, 1, v);
  }
  return {P, Q};
}

std::tuple<at::Tensor, at::Tensor> pair_products_cuda(const at::Tensor& f_in, const at::Tensor& f_out,
                                                      const std::optional<at::Tensor>& W,
                                                      const std::optional<at::Tensor>& V) {
  constexpr const char* op = "pair_products";
  check_pair_products(f_in, f_out, W, V, at::kCUDA);
  const auto device = f_in.device();
  const int64_t q = f_in.size(-2), n = f_in.size(-1), m = f_out.size(-2);
  const auto batch = batch_shape(f_in, 2);
  const at::Tensor Wt = W.value_or(at::Tensor());
  const at::Tensor Vt = V.value_or(at::Tensor());
  const auto acc = acc_dtype({f_in, f_out, Wt, Vt});
  const int64_t L = numel_of(batch);
  const int64_t w = Wt.defined() ? Wt.size(-1) : 0;
  const int64_t v = Vt.defined() ? Vt.size(-2) : 0;
  const auto opts = f_in.options().dtype(acc);
  if (L == 0 || (w == 0 && v == 0)) {
    return {at::zeros(with_trailing(batch, {w, n}), opts), at::zeros(with_trailing(batch, {m, v}), opts)};
  }
  const c10::cuda::CUDAGuard guard(device);
  auto [P, Q] = pair_products_flat(op, f_in.reshape({L, q, n}), f_out.reshape({L, m, q}),
                                   Wt.defined() ? Wt.reshape({L, m, w}) : at::Tensor(),
                                   Vt.defined() ? Vt.reshape({L, v, n}) : at::Tensor(), acc);
  return {P.defined() ? P.view(with_trailing(batch, {w, n})) : at::empty(with_trailing(batch, {0, n}), opts),
          Q.defined() ? Q.view(with_trailing(batch, {m, v})) : at::empty(with_trailing(batch, {m, 0}), opts)};
}

// ---- LoRSum half-steps -----------------------------------------------------------------------------------

// One coefficient per layer: a host number when it is shared and given on the CPU (no copy at all, so the
// op can be captured in a CUDA graph), else an (L, 1, 1) device tensor (a per-layer CPU row is copied with
// non_blocking=true: no stream synchronisation; pass coefficients on the device to capture such a step).
struct Coef {
  bool is_scalar = true;
  double value = 0.0;
  at::Tensor tensor;
  at::Tensor mul(const at::Tensor& x) const { return is_scalar ? x.mul(value) : x.mul(tensor); }
};

Coef make_coef(const at::Tensor& row, int64_t L, at::ScalarType acc, const at::Device& device) {
  Coef c;
  if (row.dim() == 0 && row.device().is_cpu()) {
    c.value = row.item<double>();  // host memory: no device synchronisation
    return c;
  }
  c.is_scalar = false;
  c.tensor = row.to(at::TensorOptions().device(device).dtype(acc), /*non_blocking=*/true)
                 .reshape({row.dim() == 0 ? 1 : L, 1, 1});
  return c;
}

struct HalfStep {
  int64_t L = 0, m = 0, n = 0, r = 0;
  std::vector<int64_t> batch;
  at::ScalarType acc = at::kFloat;
  at::Tensor hat, A0, B0, m_in, m_out;   // (L, ...) in acc
  std::vector<at::Tensor> f_in, f_out;   // (L, q_j, n), (L, m, q_j) in their own dtypes
  std::vector<Coef> coef;                // c0, c1, ..., cJ
  Coef lmbd;
};

HalfStep parse_half_step(const char* op, bool in_side, const at::Tensor& hat, const at::Tensor& A0,
                         const at::Tensor& B0, at::TensorList f_in, at::TensorList f_out, const at::Tensor& coeffs,
                         const at::Tensor& lmbd, const std::optional<at::Tensor>& m_in,
                         const std::optional<at::Tensor>& m_out) {
  const HalfStepSizes sz = check_half_step(op, in_side, hat, A0, B0, f_in, f_out, coeffs, lmbd, m_in, m_out, at::kCUDA);
  const auto device = A0.device();
  HalfStep h;
  h.L = sz.L;
  h.m = sz.m;
  h.n = sz.n;
  h.r = sz.r;
  h.batch = sz.batch;
  h.acc = sz.any_fp64 ? at::kDouble : at::kFloat;
  for (int64_t j = 0; j < sz.J; ++j) {
    h.f_in.push_back(f_in[j].reshape({h.L, f_in[j].size(-2), h.n}));
    h.f_out.push_back(f_out[j].reshape({h.L, h.m, f_out[j].size(-1)}));
  }
  // One device copy of a per-layer coefficient table (not one per row).
  const at::Tensor table = coeffs.dim() == 2 && coeffs.device().is_cpu()
                               ? coeffs.to(at::TensorOptions().device(device).dtype(h.acc), /*non_blocking=*/true)
                               : coeffs;
  for (int64_t j = 0; j <= sz.J; ++j) {
    h.coef.push_back(make_coef(table[j], h.L, h.acc, device));
  }
  h.lmbd = make_coef(lmbd, h.L, h.acc, device);

  if (m_in.has_value()) {
    h.m_in = m_in->reshape({h.L, h.n}).to(h.acc);
    h.m_out = m_out->reshape({h.L, h.m}).to(h.acc);
  }
  h.hat = hat.reshape({h.L, hat.size(-2), hat.size(-1)}).to(h.acc);
  h.A0 = A0.reshape({h.L, h.r, h.n}).to(h.acc);
  h.B0 = B0.reshape({h.L, h.m, h.r}).to(h.acc);
  return h;
}

// Â = A0 + (B̂ᵀM_outB̂ + λI)⁻¹ [B̂ᵀM_out(c0·B0 − B̂)·A0 + (Σ_j c_j (B̂ᵀF_out_j)F_in_j)·M_in⁻¹]  (reference.lorsum_update_in)
at::Tensor lorsum_update_in_cuda(const at::Tensor& B_hat, const at::Tensor& A0, const at::Tensor& B0,
                                 at::TensorList f_in, at::TensorList f_out, const at::Tensor& coeffs,
                                 const at::Tensor& lmbd, const std::optional<at::Tensor>& m_in,
                                 const std::optional<at::Tensor>& m_out) {
  constexpr const char* op = "lorsum_update_in";
  const HalfStep h = parse_half_step(op, true, B_hat, A0, B0, f_in, f_out, coeffs, lmbd, m_in, m_out);
  const c10::cuda::CUDAGuard guard(A0.device());
  const auto opts = h.A0.options();
  const at::Tensor out = at::empty(with_trailing(h.batch, {h.r, h.n}), A0.options());
  if (out.numel() == 0) {
    return out;
  }
  const at::Tensor BwT = (h.m_out.defined() ? h.hat * h.m_out.unsqueeze(-1) : h.hat).mT();
  const at::Tensor gram = at::matmul(BwT, h.hat) + h.lmbd.mul(at::eye(h.r, opts));
  at::Tensor residual = at::matmul(at::matmul(BwT, h.coef[0].mul(h.B0) - h.hat), h.A0);
  if (!h.f_in.empty()) {
    at::Tensor data;
    for (size_t j = 0; j < h.f_in.size(); ++j) {
      const at::Tensor P = pair_products_flat(op, h.f_in[j], h.f_out[j], h.hat, at::Tensor(), h.acc).first;
      const at::Tensor term = h.coef[j + 1].mul(P);
      data = data.defined() ? data + term : term;
    }
    residual = residual + (h.m_in.defined() ? data / h.m_in.unsqueeze(-2) : data);
  }
  const at::Tensor delta = spd_solve_cuda(gram, residual, /*left=*/true);
  out.view({h.L, h.r, h.n}).copy_(h.A0 + delta);
  return out;
}

// B̂ = B0 + [B0·(c0·A0 − Â)·M_inÂᵀ + M_out⁻¹·Σ_j c_j F_out_j(F_in_jÂᵀ)] (ÂM_inÂᵀ + λI)⁻¹  (reference.lorsum_update_out)
at::Tensor lorsum_update_out_cuda(const at::Tensor& A_hat, const at::Tensor& A0, const at::Tensor& B0,
                                  at::TensorList f_in, at::TensorList f_out, const at::Tensor& coeffs,
                                  const at::Tensor& lmbd, const std::optional<at::Tensor>& m_in,
                                  const std::optional<at::Tensor>& m_out) {
  constexpr const char* op = "lorsum_update_out";
  const HalfStep h = parse_half_step(op, false, A_hat, A0, B0, f_in, f_out, coeffs, lmbd, m_in, m_out);
  const c10::cuda::CUDAGuard guard(A0.device());
  const auto opts = h.A0.options();
  const at::Tensor out = at::empty(with_trailing(h.batch, {h.m, h.r}), A0.options());
  if (out.numel() == 0) {
    return out;
  }
  const at::Tensor Aw = h.m_in.defined() ? h.hat * h.m_in.unsqueeze(-2) : h.hat;
  const at::Tensor gram = at::matmul(Aw, h.hat.mT()) + h.lmbd.mul(at::eye(h.r, opts));
  at::Tensor residual = at::matmul(h.B0, at::matmul(h.coef[0].mul(h.A0) - h.hat, Aw.mT()));
  if (!h.f_in.empty()) {
    at::Tensor data;
    for (size_t j = 0; j < h.f_in.size(); ++j) {
      const at::Tensor Q = pair_products_flat(op, h.f_in[j], h.f_out[j], at::Tensor(), h.hat, h.acc).second;
      const at::Tensor term = h.coef[j + 1].mul(Q);
      data = data.defined() ? data + term : term;
    }
    residual = residual + (h.m_out.defined() ? data / h.m_out.unsqueeze(-1) : data);
  }
  const at::Tensor delta = spd_solve_cuda(gram, residual, /*left=*/false);
  out.view({h.L, h.m, h.r}).copy_(h.B0 + delta);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lorsum, CUDA, m) {
  m.impl("pair_products", &pair_products_cuda);
  m.impl("lorsum_update_in", &lorsum_update_in_cuda);
  m.impl("lorsum_update_out", &lorsum_update_out_cuda);
}

}  // namespace lorsum
