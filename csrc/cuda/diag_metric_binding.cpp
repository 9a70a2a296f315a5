// col_sq_sums and kfac_metric_update on CUDA: kernel (1) of kernels.h (diag_metric.cu) for both statistics,
// then the EMA, damping and power as ATen element-wise ops, in the reference's order.

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

at::Tensor col_sq_sums_cuda(const at::Tensor& x) {
  constexpr const char* op = "col_sq_sums";
  check_col_sq_sums(x, at::kCUDA);
  const int64_t T = x.size(-2);
  const int64_t n = x.size(-1);
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty(with_trailing(batch_shape(x, 2), {n}), x.options().dtype(acc));
  if (out.numel() == 0) {
    return out;
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = out.numel() / n;
  const at::Tensor x3 = rows_view(x, B, x.scalar_type());
  const size_t elem = acc == at::kDouble ? sizeof(double) : sizeof(float);
  const size_t bytes = kc::col_sq_sums_workspace_bytes(B, T, n, elem);
  const at::Tensor ws = workspace(bytes, x);
  dispatch_input(x.scalar_type(), op, [&](auto tag) {
    using T_ = decltype(tag);
    check_launch(kc::col_sq_sums<T_>(cptr<T_>(x3), B, T, n, x3.stride(0), x3.stride(1), mptr<kc::acc_t<T_>>(out),
                                     bytes ? ws.data_ptr() : nullptr, bytes, current_stream()),
                 op);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kfac_metric_update_cuda(
    const at::Tensor& X, const at::Tensor& S, const at::Tensor& v_in, const at::Tensor& v_out, double beta,
    double damping, double power, double scale_in, double scale_out) {
  check_kfac_metric_update(X, S, v_in, v_out, at::kCUDA);
  const c10::cuda::CUDAGuard guard(X.device());
  // reference.kfac_metric_update, operation for operation: stat·scale in the statistic's dtype, then the
  // EMA and the power in v's dtype. v contiguous first: element-wise ops keep a transposed input's strides,
  // and the results must be contiguous whatever v's layout.
  auto step = [&](const at::Tensor& v, const at::Tensor& data, double scale) {
    const at::Tensor stat = col_sq_sums_cuda(data).mul(scale).to(v.scalar_type());
    at::Tensor new_v = v.contiguous().mul(beta).add(stat.mul(1.0 - beta));
    at::Tensor metric = new_v.add(damping).pow(power);
    return std::pair{new_v, metric};
  };
  auto [new_in, m_in] = step(v_in, X, scale_in);
  auto [new_out, m_out] = step(v_out, S, scale_out);
  return {new_in, new_out, m_in, m_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(lorsum, CUDA, m) {
  m.impl("col_sq_sums", &col_sq_sums_cuda);
  m.impl("kfac_metric_update", &kfac_metric_update_cuda);
}

}  // namespace lorsum
