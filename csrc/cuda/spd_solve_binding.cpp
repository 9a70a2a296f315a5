// spd_solve on CUDA: kernel (3) of kernels.h (spd_solve.cu) for r ≤ kMaxSolveRank; above, the reference's
// ATen calls (linalg_cholesky_ex with the on-device fallback, cholesky_solve).

#include "binding.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

namespace lorsum {

namespace cuda_ops {
namespace {

// reference.spd_solve through ATen (the r > kMaxSolveRank case).
at::Tensor spd_solve_aten(const at::Tensor& gram, const at::Tensor& rhs, bool left, at::ScalarType acc) {
  const at::Tensor g = gram.to(acc);
  const at::Tensor b = rhs.to(acc);
  const at::Tensor factor = ridged_cholesky_aten(g, at::scalar_tensor(relative_ridge(acc), g.options()), acc);
  return left ? at::cholesky_solve(b, factor) : at::cholesky_solve(b.mT(), factor).mT();
}

}  // namespace

// Declared in binding.h: the LoRSum half-steps (block_power_binding.cpp) call it for their r×r solves.
at::Tensor spd_solve_cuda(const at::Tensor& gram, const at::Tensor& rhs, bool left) {
  constexpr const char* op = "spd_solve";
  const std::vector<int64_t> batch = check_spd_solve(gram, rhs, left, at::kCUDA);
  const int64_t r = gram.size(-1);
  const int64_t L = numel_of(batch);
  const int64_t N = left ? rhs.size(-1) : rhs.size(-2);
  const auto out_dtype = at::promote_types(gram.scalar_type(), rhs.scalar_type());
  const auto acc = out_dtype == at::kDouble ? at::kDouble : at::kFloat;
  const std::vector<int64_t> out_shape = with_trailing(batch, {rhs.size(-2), rhs.size(-1)});
  at::Tensor out = at::empty(out_shape, rhs.options().dtype(out_dtype));
  if (out.numel() == 0) {
    return out;
  }
  const c10::cuda::CUDAGuard guard(gram.device());
  if (r > kc::kMaxSolveRank) {
    out.copy_(spd_solve_aten(gram, rhs, left, acc).expand(out_shape));
    return out;
  }
  // gram (L, r, r) in the accumulation dtype: a stride-0 batch when one matrix serves every right side.
  const at::Tensor g = gram.expand(with_trailing(batch, {r, r})).reshape({L, r, r}).to(acc);
  at::Tensor b = rhs.expand(out_shape).reshape({L, rhs.size(-2), rhs.size(-1)});
  if (b.scalar_type() != out_dtype) {
    b = b.to(out_dtype);
  }
  const at::Tensor o = out.view({L, rhs.size(-2), rhs.size(-1)});
  // A right solve Z·gram = R is gram·Zᵀ = Rᵀ: the same kernel with the row and column strides swapped.
  const int64_t bk = left ? 1 : 2, bc = left ? 2 : 1;
  dispatch_input(out_dtype, op, [&](auto tag) {
    using T_ = decltype(tag);
    using A = kc::acc_t<T_>;
    check_launch(kc::spd_solve<T_>(cptr<A>(g), g.stride(0), g.stride(1), g.stride(2), cptr<T_>(b), b.stride(0),
                                   b.stride(bk), b.stride(bc), mptr<T_>(o), o.stride(0), o.stride(bk), o.stride(bc), L,
                                   r, N, static_cast<A>(relative_ridge(acc)),
                                   static_cast<A>(relative_ridge(acc) + fallback_ridge(acc)), current_stream()),
                 op);
  });
  return out;
}

}  // namespace cuda_ops

TORCH_LIBRARY_IMPL(lorsum, CUDA, m) {
  m.impl("spd_solve", &cuda_ops::spd_solve_cuda);
}

}  // namespace lorsum
