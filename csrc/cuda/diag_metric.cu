// Kernel (1) of kernels.h: column sums of squares over the token dimension (the diagonal K-FAC statistic;
// col_sq_sums and kfac_metric_update in diag_metric_binding.cpp). Reference: reference.col_sq_sums.

#include "common.cuh"

#include <algorithm>
#include <cstdint>

namespace lorsum::cuda {

using namespace detail;

namespace {

constexpr int kCssWarpCols = 32;                           // threads along the columns
constexpr int kCssColsPerThread = 2;                       // columns per thread (kCssWarpCols apart)
constexpr int kCssCols = kCssWarpCols * kCssColsPerThread;  // columns per block
constexpr int kCssRowThreads = 8;                          // threads along the rows
// Rows per chunk: at most 1024 (so a thread sums at most 128 squares before the block's tree and the
// ordered sum over chunks: error ~ 128 + 8 + T/1024 roundings rather than T), at least 64.
constexpr int64_t kCssMinRows = 64;
constexpr int64_t kCssMaxRows = 1024;

struct CssPlan {
  int64_t col_blocks;
  int64_t rows_per_chunk;
  int64_t chunks;
};

CssPlan plan_col_sq_sums(int64_t B, int64_t T, int64_t n) {
  CssPlan p{};
  p.col_blocks = ceil_div(n, kCssCols);
  p.rows_per_chunk = plan_rows_per_chunk(T, B * p.col_blocks, kCssMinRows, kCssMaxRows, kCssRowThreads);
  p.chunks = std::max<int64_t>(1, ceil_div(T, p.rows_per_chunk));
  return p;
}

// One block: kCssCols columns × one chunk of rows of one batch element. Thread (tx, ty) sums the squares
// of rows ty, ty + 8, ... of its chunk in its two columns; the 8 row-thread sums are then added in order.
// part is (B, chunks, n) contiguous (the output itself when chunks == 1).
template <typename T>
__global__ void __launch_bounds__(kCssWarpCols* kCssRowThreads)
    col_sq_sums_kernel(const T* __restrict__ x, int64_t T_rows, int64_t n, int64_t batch_stride, int64_t row_stride,
                       int64_t rows_per_chunk, int64_t chunks, int64_t b0, acc_t<T>* __restrict__ part) {
  using A = acc_t<T>;
  __shared__ A red[kCssRowThreads][kCssCols];
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kCssCols;
  const int64_t chunk = blockIdx.y;
  const int64_t b = b0 + blockIdx.z;
  const int64_t t_begin = chunk * rows_per_chunk;
  const int64_t t_end = min64(T_rows, t_begin + rows_per_chunk);
  const T* base = x + b * batch_stride + c0;

  A acc[kCssColsPerThread];
#pragma unroll
  for (int u = 0; u < kCssColsPerThread; ++u) {
    acc[u] = A(0);
  }
  for (int64_t t = t_begin + ty; t < t_end; t += kCssRowThreads) {
    const T* row = base + t * row_stride;
#pragma unroll
    for (int u = 0; u < kCssColsPerThread; ++u) {
      const int64_t j = tx + u * kCssWarpCols;
      if (c0 + j < n) {
        const A v = to_acc(row[j]);
        acc[u] += v * v;
      }
    }
  }
#pragma unroll
  for (int u = 0; u < kCssColsPerThread; ++u) {
    red[ty][tx + u * kCssWarpCols] = acc[u];
  }
  __syncthreads();
  const int tid = ty * kCssWarpCols + tx;
  if (tid < kCssCols && c0 + tid < n) {
    A s = red[0][tid];
#pragma unroll
    for (int y = 1; y < kCssRowThreads; ++y) {
      s += red[y][tid];
    }
    part[(b * chunks + chunk) * n + c0 + tid] = s;
  }
}

}  // namespace

size_t col_sq_sums_workspace_bytes(int64_t B, int64_t T, int64_t n, size_t acc_size) {
  if (B <= 0 || T <= 0 || n <= 0) {
    return 0;
  }
  const CssPlan p = plan_col_sq_sums(B, T, n);
  return p.chunks > 1 ? align_bytes(static_cast<size_t>(B * p.chunks * n) * acc_size) : 0;
}

template <typename T>
cudaError_t col_sq_sums(const T* x, int64_t B, int64_t T_rows, int64_t n, int64_t batch_stride, int64_t row_stride,
                        acc_t<T>* out, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  using A = acc_t<T>;
  if (B < 0 || T_rows < 0 || n < 0 || batch_stride < 0 || row_stride < 0) {
    return cudaErrorInvalidValue;
  }
  if (B == 0 || n == 0) {
    return cudaSuccess;
  }
  if (out == nullptr) {
    return cudaErrorInvalidValue;
  }
  if (T_rows == 0) {
    return cudaMemsetAsync(out, 0, static_cast<size_t>(B * n) * sizeof(A), stream);  // an empty sum
  }
  if (x == nullptr) {
    return cudaErrorInvalidValue;
  }
  const CssPlan plan = plan_col_sq_sums(B, T_rows, n);
  const size_t need = col_sq_sums_workspace_bytes(B, T_rows, n, sizeof(A));
  if (need > 0 && (workspace == nullptr || workspace_bytes < need)) {
    return cudaErrorInvalidValue;
  }
  A* part = plan.chunks > 1 ? static_cast<A*>(workspace) : out;
  const dim3 block(kCssWarpCols, kCssRowThreads);
  for (int64_t b0 = 0; b0 < B; b0 += kMaxGridYZ) {
    const dim3 grid(static_cast<unsigned>(plan.col_blocks), static_cast<unsigned>(plan.chunks),
                    static_cast<unsigned>(std::min(kMaxGridYZ, B - b0)));
    col_sq_sums_kernel<T><<<grid, block, 0, stream>>>(x, T_rows, n, batch_stride, row_stride, plan.rows_per_chunk,
                                                      plan.chunks, b0, part);
    if (const cudaError_t e = launch_status(); e != cudaSuccess) {
      return e;
    }
  }
  if (plan.chunks > 1) {
    return sum_partials<A>(part, B, plan.chunks, 1, n, out, n, 0, 1, stream);
  }
  return cudaSuccess;
}

#define LORSUM_CUDA_INSTANTIATE(T)                                                                             \
  template cudaError_t col_sq_sums<T>(const T*, int64_t, int64_t, int64_t, int64_t, int64_t, acc_t<T>*, void*, \
                                      size_t, cudaStream_t);
LORSUM_CUDA_FOR_EACH_INPUT(LORSUM_CUDA_INSTANTIATE)
#undef LORSUM_CUDA_INSTANTIATE

}  // namespace lorsum::cuda
