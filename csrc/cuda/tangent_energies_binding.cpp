// tangent_energies on CUDA: kernel (6) of kernels.h (tangent_energies.cu) for r_B + r_F ≤ kMaxTangentRank;
// above, the reference's ATen calls.

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

std::tuple<at::Tensor, at::Tensor> tangent_energies_cuda(const at::Tensor& B, const at::Tensor& E, const at::Tensor& F,
                                                         const at::Tensor& A) {
  constexpr const char* op = "tangent_energies";
  const TangentSizes sz = check_tangent_energies(B, E, F, A, at::kCUDA);
  const auto device = B.device();
  const int64_t L = sz.L, m = sz.m, n = sz.n, r_B = sz.r_B, r_F = sz.r_F;
  const at::IntArrayRef batch = sz.batch;
  const int64_t R = r_B + r_F;

  const DtypePlan dtypes = dtype_plan({B, E, F, A});
  const at::ScalarType acc = dtypes.acc, out_dtype = dtypes.out;
  const bool one_dtype = dtypes.uniform;
  const auto opts = B.options().dtype(acc);
  at::Tensor rows = at::empty(with_trailing(batch, {m}), opts);
  at::Tensor cols = at::empty(with_trailing(batch, {n}), opts);
  if (rows.numel() == 0 && cols.numel() == 0) {
    return {rows.to(out_dtype), cols.to(out_dtype)};
  }
  const c10::cuda::CUDAGuard guard(device);
  // Mixed input dtypes are unified in the accumulation dtype; otherwise the kernels read the inputs as they
  // are, through their strides.
  auto input = [&](const at::Tensor& t) {
    const at::Tensor flat = t.reshape({L, t.size(-2), t.size(-1)});
    return one_dtype ? flat : flat.to(acc);
  };
  const at::Tensor B3 = input(B), E3 = input(E), F3 = input(F), A3 = input(A);

  if (R > kc::kMaxTangentRank) {
    // reference.tangent_energies, operation for operation, in acc.
    const at::Tensor Z = at::cat({B3.to(acc), F3.to(acc)}, -1);
    const at::Tensor W = at::cat({E3.to(acc), A3.to(acc)}, -2);
    rows.view({L, m}).copy_(at::matmul(Z, at::matmul(W, W.mT())).mul(Z).sum(-1).clamp_min(0));
    cols.view({L, n}).copy_(at::matmul(at::matmul(Z.mT(), Z), W).mul(W).sum(-2).clamp_min(0));
    return {rows.to(out_dtype), cols.to(out_dtype)};
  }

  const size_t elem = acc == at::kDouble ? sizeof(double) : sizeof(float);
  const size_t bytes = kc::tangent_energies_workspace_bytes(L, R, m, n, elem);
  const at::Tensor ws = workspace(bytes, B);
  dispatch_input(one_dtype ? B.scalar_type() : acc, op, [&](auto tag) {
    using T_ = decltype(tag);
    using Acc = kc::acc_t<T_>;
    kc::TangentInputs<T_> in{cptr<T_>(B3), B3.stride(0), B3.stride(1), B3.stride(2),
                             cptr<T_>(E3), E3.stride(0), E3.stride(1), E3.stride(2),
                             cptr<T_>(F3), F3.stride(0), F3.stride(1), F3.stride(2),
                             cptr<T_>(A3), A3.stride(0), A3.stride(1), A3.stride(2)};
    check_launch(kc::tangent_energies<T_>(in, L, r_B, r_F, m, n, mptr<Acc>(rows), mptr<Acc>(cols),
                                          bytes ? ws.data_ptr() : nullptr, bytes, current_stream()),
                 op);
  });
  return {rows.to(out_dtype), cols.to(out_dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(lorsum, CUDA, m) {
  m.impl("tangent_energies", &tangent_energies_cuda);
}

}  // namespace lorsum
