// Kernel (2) of kernels.h: the row and column energies of G = Sᵀ·X without writing G (AdaPreLoRA's exact
// Adafactor statistics; row_col_energies in energies_binding.cpp). Reference: reference.row_col_energies.

#include "common.cuh"
#include "tile.cuh"

#include <algorithm>
#include <cstdint>

namespace lorsum::cuda {

using namespace detail;

namespace {

constexpr int kEnBM = 64;
constexpr int kEnBN = 64;
constexpr int kEnTM = 4;
constexpr int kEnTN = 4;

// One block: the 64×64 tile (rt, ct) of G[b] = S[b]ᵀ·X[b], summed over all tokens, then squared.
// rows_part (L, col_tiles, m) gets the tile's row sums, cols_part (L, row_tiles, n) its column sums (the
// outputs themselves when there is a single tile along that direction).
template <typename TS, typename TX>
__global__ void __launch_bounds__(kTileThreads, 2)
    energies_kernel(const TS* __restrict__ S, int64_t s_bs, int64_t s_rs, const TX* __restrict__ X, int64_t x_bs,
                    int64_t x_rs, int64_t T_rows, int64_t m, int64_t n, int64_t b0, int64_t row_tiles,
                    int64_t col_tiles, acc_t<TX>* __restrict__ rows_part, acc_t<TX>* __restrict__ cols_part) {
  using A = acc_t<TX>;
  using Shape = TileShape<kEnBM, kEnBN, kEnTM, kEnTN>;
  __shared__ A As[kBK][kEnBM];
  __shared__ A Bs[kBK][kEnBN + 1];
  __shared__ A col_red[Shape::TY][kEnBN];
  const int64_t b = b0 + blockIdx.z;
  const int64_t ct = blockIdx.x;
  const int64_t rt = blockIdx.y;
  const int64_t i0 = rt * kEnBM;
  const int64_t j0 = ct * kEnBN;

  A acc[kEnTM][kEnTN];
#pragma unroll
  for (int u = 0; u < kEnTM; ++u) {
#pragma unroll
    for (int v = 0; v < kEnTN; ++v) {
      acc[u][v] = A(0);
    }
  }
  atb_mainloop<kEnBM, kEnBN, kEnTM, kEnTN, false>(S + b * s_bs, s_rs, X + b * x_bs, x_rs, m, n, i0, j0, 0, T_rows,
                                                  As, Bs, acc);

  // Epilogue: square, and reduce within the tile. Elements outside G are left out (not just zero: a
  // padded row times an infinite X would be NaN).
  const int tid = threadIdx.x;
  const int tx = tid % Shape::TX;
  const int ty = tid / Shape::TX;
  A row_sum[kEnTM];
  A col_sum[kEnTN];
#pragma unroll
  for (int v = 0; v < kEnTN; ++v) {
    col_sum[v] = A(0);
  }
#pragma unroll
  for (int u = 0; u < kEnTM; ++u) {
    row_sum[u] = A(0);
    const bool row_ok = i0 + ty + u * Shape::TY < m;
#pragma unroll
    for (int v = 0; v < kEnTN; ++v) {
      if (row_ok && j0 + tx + v * Shape::TX < n) {
        const A g2 = acc[u][v] * acc[u][v];
        row_sum[u] += g2;
        col_sum[v] += g2;
      }
    }
  }
  // Row sums: across the 16 threads of equal ty (16 consecutive lanes of one warp), a fixed butterfly.
#pragma unroll
  for (int u = 0; u < kEnTM; ++u) {
#pragma unroll
    for (int off = Shape::TX / 2; off > 0; off /= 2) {
      row_sum[u] += __shfl_xor_sync(0xffffffffu, row_sum[u], off, Shape::TX);
    }
  }
  if (tx == 0) {
#pragma unroll
    for (int u = 0; u < kEnTM; ++u) {
      const int64_t i = i0 + ty + u * Shape::TY;
      if (i < m) {
        rows_part[(b * col_tiles + ct) * m + i] = row_sum[u];
      }
    }
  }
  // Column sums: across the 16 values of ty, through shared memory, added in order of ty.
#pragma unroll
  for (int v = 0; v < kEnTN; ++v) {
    col_red[ty][tx + v * Shape::TX] = col_sum[v];
  }
  __syncthreads();
  if (tid < kEnBN && j0 + tid < n) {
    A s = col_red[0][tid];
#pragma unroll
    for (int y = 1; y < Shape::TY; ++y) {
      s += col_red[y][tid];
    }
    cols_part[(b * row_tiles + rt) * n + j0 + tid] = s;
  }
}

}  // namespace

size_t row_col_energies_workspace_bytes(int64_t L, int64_t m, int64_t n, size_t acc_size) {
  if (L <= 0 || m <= 0 || n <= 0) {
    return 0;
  }
  const int64_t row_tiles = ceil_div(m, kEnBM);
  const int64_t col_tiles = ceil_div(n, kEnBN);
  size_t bytes = 0;
  if (col_tiles > 1) {
    bytes += align_bytes(static_cast<size_t>(L * col_tiles * m) * acc_size);
  }
  if (row_tiles > 1) {
    bytes += align_bytes(static_cast<size_t>(L * row_tiles * n) * acc_size);
  }
  return bytes;
}

template <typename TS, typename TX>
cudaError_t row_col_energies(const TS* S, int64_t s_bs, int64_t s_rs, const TX* X, int64_t x_bs, int64_t x_rs,
                             int64_t L, int64_t T_rows, int64_t m, int64_t n, acc_t<TX>* rows, acc_t<TX>* cols,
                             void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  using A = acc_t<TX>;
  static_assert(sizeof(acc_t<TS>) == sizeof(A), "S and X must share the accumulation type");
  if (L < 0 || T_rows < 0 || m < 0 || n < 0 || s_bs < 0 || s_rs < 0 || x_bs < 0 || x_rs < 0) {
    return cudaErrorInvalidValue;
  }
  if (L == 0 || (m == 0 && n == 0)) {
    return cudaSuccess;
  }
  if ((m > 0 && rows == nullptr) || (n > 0 && cols == nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (m == 0 || n == 0) {
    // G has no entries: every energy is an empty sum.
    if (m > 0) {
      return cudaMemsetAsync(rows, 0, static_cast<size_t>(L * m) * sizeof(A), stream);
    }
    return cudaMemsetAsync(cols, 0, static_cast<size_t>(L * n) * sizeof(A), stream);
  }
  if (T_rows > 0 && (S == nullptr || X == nullptr)) {
    return cudaErrorInvalidValue;
  }
  const size_t need = row_col_energies_workspace_bytes(L, m, n, sizeof(A));
  if (need > 0 && (workspace == nullptr || workspace_bytes < need)) {
    return cudaErrorInvalidValue;
  }
  const int64_t row_tiles = ceil_div(m, kEnBM);
  const int64_t col_tiles = ceil_div(n, kEnBN);
  if (row_tiles > kMaxGridYZ) {
    return cudaErrorInvalidValue;
  }
  char* ws = static_cast<char*>(workspace);
  A* rows_part = rows;
  A* cols_part = cols;
  if (col_tiles > 1) {
    rows_part = reinterpret_cast<A*>(ws);
    ws += align_bytes(static_cast<size_t>(L * col_tiles * m) * sizeof(A));
  }
  if (row_tiles > 1) {
    cols_part = reinterpret_cast<A*>(ws);
  }
  for (int64_t b0 = 0; b0 < L; b0 += kMaxGridYZ) {
    const dim3 grid(static_cast<unsigned>(col_tiles), static_cast<unsigned>(row_tiles),
                    static_cast<unsigned>(std::min(kMaxGridYZ, L - b0)));
    energies_kernel<TS, TX><<<grid, kTileThreads, 0, stream>>>(S, s_bs, s_rs, X, x_bs, x_rs, T_rows, m, n, b0,
                                                               row_tiles, col_tiles, rows_part, cols_part);
    if (const cudaError_t e = launch_status(); e != cudaSuccess) {
      return e;
    }
  }
  if (col_tiles > 1) {
    if (const cudaError_t e = sum_partials<A>(rows_part, L, col_tiles, 1, m, rows, m, 0, 1, stream);
        e != cudaSuccess) {
      return e;
    }
  }
  if (row_tiles > 1) {
    return sum_partials<A>(cols_part, L, row_tiles, 1, n, cols, n, 0, 1, stream);
  }
  return cudaSuccess;
}

#define LORSUM_CUDA_INSTANTIATE(TA, TB)                                                                       \
  template cudaError_t row_col_energies<TA, TB>(const TA*, int64_t, int64_t, const TB*, int64_t, int64_t,       \
                                                int64_t, int64_t, int64_t, int64_t, acc_t<TB>*, acc_t<TB>*,     \
                                                void*, size_t, cudaStream_t);
LORSUM_CUDA_FOR_EACH_PAIR(LORSUM_CUDA_INSTANTIATE)
#undef LORSUM_CUDA_INSTANTIATE

}  // namespace lorsum::cuda
