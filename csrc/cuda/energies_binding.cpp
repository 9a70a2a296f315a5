// row_col_energies on CUDA: kernel (2) of kernels.h (energies.cu).

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

std::tuple<at::Tensor, at::Tensor> row_col_energies_cuda(const at::Tensor& X, const at::Tensor& S) {
  constexpr const char* op = "row_col_energies";
  check_row_col_energies(X, S, at::kCUDA);
  const auto batch = batch_shape(X, 2);
  const int64_t L = numel_of(batch), T = X.size(-2), n = X.size(-1), m = S.size(-1);
  const auto acc = acc_dtype({X, S});
  const auto opts = X.options().dtype(acc);
  at::Tensor rows = at::empty(with_trailing(batch, {m}), opts);
  at::Tensor cols = at::empty(with_trailing(batch, {n}), opts);
  if (L == 0 || (m == 0 && n == 0)) {
    return {rows, cols};
  }
  const c10::cuda::CUDAGuard guard(X.device());
  const at::Tensor X3 = rows_view(X, L, acc);
  const at::Tensor S3 = rows_view(S, L, acc);
  const size_t elem = acc == at::kDouble ? sizeof(double) : sizeof(float);
  const size_t bytes = kc::row_col_energies_workspace_bytes(L, m, n, elem);
  const at::Tensor ws = workspace(bytes, X);
  dispatch_pair(S3.scalar_type(), X3.scalar_type(), op, [&](auto ts, auto tx) {
    using TS = decltype(ts);
    using TX = decltype(tx);
    using A = kc::acc_t<TX>;
    check_launch(kc::row_col_energies<TS, TX>(cptr<TS>(S3), S3.stride(0), S3.stride(1), cptr<TX>(X3), X3.stride(0),
                                              X3.stride(1), L, T, m, n, mptr<A>(rows), mptr<A>(cols),
                                              bytes ? ws.data_ptr() : nullptr, bytes, current_stream()),
                 op);
  });
  return {rows, cols};
}

}  // namespace

TORCH_LIBRARY_IMPL(lorsum, CUDA, m) {
  m.impl("row_col_energies", &row_col_energies_cuda);
}

}  // namespace lorsum
