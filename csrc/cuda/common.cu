// The ordered second-stage sum of partials declared in common.cuh (used by col_sq_sums, row_col_energies
// and projected_product when they split a sum over the token dimension or over tiles).

#include "common.cuh"

namespace lorsum::cuda::detail {
namespace {

template <typename A>
__global__ void __launch_bounds__(256) sum_partials_kernel(const A* __restrict__ part, int64_t B, int64_t P,
                                                           int64_t rows, int64_t cols, A* __restrict__ out,
                                                           int64_t o_bs, int64_t o_ks, int64_t o_js) {
  const int64_t width = rows * cols;
  const int64_t total = B * width;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = idx / width;
    const int64_t x = idx - b * width;
    const A* p = part + b * P * width + x;
    A s = p[0];
    for (int64_t q = 1; q < P; ++q) {
      s += p[q * width];
    }
    const int64_t k = x / cols;
    const int64_t j = x - k * cols;
    out[b * o_bs + k * o_ks + j * o_js] = s;
  }
}

}  // namespace

template <typename A>
cudaError_t sum_partials(const A* part, int64_t B, int64_t P, int64_t rows, int64_t cols, A* out, int64_t o_bs,
                         int64_t o_ks, int64_t o_js, cudaStream_t stream) {
  const int64_t total = B * rows * cols;
  if (total == 0) {
    return cudaSuccess;
  }
  const int64_t blocks = std::min<int64_t>(ceil_div(total, 256), int64_t(1) << 20);
  sum_partials_kernel<A><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(part, B, P, rows, cols, out, o_bs,
                                                                             o_ks, o_js);
  return launch_status();
}

template cudaError_t sum_partials<float>(const float*, int64_t, int64_t, int64_t, int64_t, float*, int64_t, int64_t,
                                         int64_t, cudaStream_t);
template cudaError_t sum_partials<double>(const double*, int64_t, int64_t, int64_t, int64_t, double*, int64_t,
                                          int64_t, int64_t, cudaStream_t);

}  // namespace lorsum::cuda::detail
