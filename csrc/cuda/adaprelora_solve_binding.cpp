// adaprelora_solve on CUDA: kernel (5) of kernels.h (adaprelora_solve.cu) for r ≤ kMaxSolveRank; above,
// the reference's ATen calls.

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

// reference.adaprelora_solve, operation for operation, on (L, ...) tensors in acc (the r > 64 case).
std::pair<at::Tensor, at::Tensor> adaprelora_solve_aten(const at::Tensor& A, const at::Tensor& B, const at::Tensor& g_A,
                                                        const at::Tensor& g_B, const at::Tensor& p, const at::Tensor& q,
                                                        const at::Tensor& rho, at::ScalarType acc) {
  const at::Tensor pB = B * p.unsqueeze(-1);
  const at::Tensor L_B = ridged_cholesky_aten(at::matmul(B.mT(), pB), rho, acc);
  const at::Tensor L_A = ridged_cholesky_aten(at::matmul(A * q.unsqueeze(-2), A.mT()), rho, acc);
  const at::Tensor Y = at::cholesky_solve(g_A, L_B);
  const at::Tensor Z = at::cholesky_solve((g_B / p.unsqueeze(-1)).mT(), L_A).mT();
  const at::Tensor cross_A = at::cholesky_solve(at::matmul(Y, A.mT()).mT(), L_A).mT();
  const at::Tensor cross_B = at::cholesky_solve(at::matmul(pB.mT(), Z), L_B);
  return {Y / q.unsqueeze(-2) - at::matmul(cross_A, A).mul(0.5), Z - at::matmul(B, cross_B).mul(0.5)};
}

std::tuple<at::Tensor, at::Tensor> adaprelora_solve_cuda(const at::Tensor& A, const at::Tensor& B,
                                                         const at::Tensor& g_A, const at::Tensor& g_B,
                                                         const at::Tensor& p, const at::Tensor& q,
                                                         const at::Tensor& ridge) {
  constexpr const char* op = "adaprelora_solve";
  const AdaPreLoRASizes sz = check_adaprelora_solve(A, B, g_A, g_B, p, q, ridge, at::kCUDA);
  const auto device = A.device();
  const int64_t L = sz.L, r = sz.r, m = sz.m, n = sz.n;
  const at::IntArrayRef batch = sz.batch;

  const DtypePlan dtypes = dtype_plan({A, B, g_A, g_B, p, q});
  const at::ScalarType acc = dtypes.acc, out_dtype = dtypes.out;
  const bool one_dtype = dtypes.uniform;
  const auto opts = A.options().dtype(acc);
  at::Tensor dA = at::empty(with_trailing(batch, {r, n}), opts);
  at::Tensor dB = at::empty(with_trailing(batch, {m, r}), opts);
  if (dA.numel() == 0 && dB.numel() == 0) {
    return {dA.to(out_dtype), dB.to(out_dtype)};
  }
  const c10::cuda::CUDAGuard guard(device);
  // Mixed input dtypes are unified in the accumulation dtype; otherwise the kernels read the inputs as they
  // are, through their strides.
  auto input = [&](const at::Tensor& t, std::initializer_list<int64_t> shape) {
    const at::Tensor flat = t.reshape(shape);
    return one_dtype ? flat : flat.to(acc);
  };
  const at::Tensor A3 = input(A, {L, r, n}), gA3 = input(g_A, {L, r, n});
  const at::Tensor B3 = input(B, {L, m, r}), gB3 = input(g_B, {L, m, r});
  const at::Tensor p2 = input(p, {L, m}), q2 = input(q, {L, n});

  // A shared ridge given on the CPU is a host number (no copy, so the op can be captured in a CUDA graph);
  // otherwise a device array (a per-layer CPU row is copied with non_blocking=true, no synchronisation).
  double ridge_value = 0.0;
  at::Tensor ridge_dev;
  if (ridge.dim() == 0 && ridge.device().is_cpu()) {
    ridge_value = ridge.item<double>();  // host memory: no device synchronisation
  } else {
    ridge_dev = ridge.to(at::TensorOptions().device(device).dtype(acc), /*non_blocking=*/true).contiguous();
  }

  if (r > kc::kMaxSolveRank) {
    const at::Tensor rho = ridge_dev.defined() ? ridge_dev.reshape({ridge.dim() == 0 ? 1 : L, 1, 1})
                                               : at::full({1, 1, 1}, ridge_value, opts);
    auto [a, b] = adaprelora_solve_aten(A3.to(acc), B3.to(acc), gA3.to(acc), gB3.to(acc), p2.to(acc), q2.to(acc), rho,
                                        acc);
    dA.view({L, r, n}).copy_(a);
    dB.view({L, m, r}).copy_(b);
    return {dA.to(out_dtype), dB.to(out_dtype)};
  }

  const size_t elem = acc == at::kDouble ? sizeof(double) : sizeof(float);
  const size_t bytes = kc::adaprelora_solve_workspace_bytes(L, r, m, n, elem);
  const at::Tensor ws = workspace(bytes, A);
  dispatch_input(one_dtype ? A.scalar_type() : acc, op, [&](auto tag) {
    using T_ = decltype(tag);
    using Acc = kc::acc_t<T_>;
    kc::AdaPreLoRAInputs<T_> in{cptr<T_>(A3), A3.stride(0), A3.stride(1), A3.stride(2),
                                cptr<T_>(B3), B3.stride(0), B3.stride(1), B3.stride(2),
                                cptr<T_>(gA3), gA3.stride(0), gA3.stride(1), gA3.stride(2),
                                cptr<T_>(gB3), gB3.stride(0), gB3.stride(1), gB3.stride(2),
                                cptr<T_>(p2), p2.stride(0), p2.stride(1),
                                cptr<T_>(q2), q2.stride(0), q2.stride(1)};
    const Acc* per_layer = ridge_dev.defined() ? cptr<Acc>(ridge_dev) : nullptr;
    const int64_t ridge_bs = ridge_dev.defined() && ridge_dev.dim() == 1 ? 1 : 0;
    check_launch(kc::adaprelora_solve<T_>(in, L, r, m, n, static_cast<Acc>(ridge_value), per_layer, ridge_bs,
                                          static_cast<Acc>(fallback_ridge(acc)), mptr<Acc>(dA), mptr<Acc>(dB),
                                          bytes ? ws.data_ptr() : nullptr, bytes, current_stream()),
                 op);
  });
  return {dA.to(out_dtype), dB.to(out_dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(lorsum, CUDA, m) {
  m.impl("adaprelora_solve", &adaprelora_solve_cuda);
}

}  // namespace lorsum
