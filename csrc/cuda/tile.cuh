// The register-tiled main loop of AᵀB over the token dimension, shared by row_col_energies (energies.cu)
// and projected_product (block_power.cu). Plain CUDA, internal to the kernels.

#pragma once

#include "common.cuh"

namespace lorsum::cuda::detail {

// ---- the tile main loop shared by (2) and (4) ---------------------------------------------------------
//
// acc[u][v] += Σ_{k_begin ≤ t < k_end} A(t, i0 + ty + u·TY) · B(t, j0 + tx + v·TX): a BM×BN tile of AᵀB
// where A is K×M with element (t, i) at a[t·lda + i], and B is K×N with element (t, j) at b[t·ldb + j]
// (B_KFAST = false) or at b[j·ldb + t] (B_KFAST = true: B is the transpose of a row-major matrix).
// 256 threads, thread (ty, tx) = (tid / TX, tid % TX) with TX = BN/TN, TY = BM/TM. Tiles of kBK tokens are
// converted to acc_t while staged in shared memory; out-of-range rows, columns and tokens load as 0.
// Each accumulator adds its tokens one at a time in increasing order.

constexpr int kBK = 16;
// Threads per tile block. The tile kernels are declared __launch_bounds__(kTileThreads, 2): at most 128
// registers a thread, which ptxas uses without spilling (with no minimum it caps itself at 48 and spills
// a few bytes); untuned, no GPU was at hand to time the alternatives.
constexpr int kTileThreads = 256;

template <int BM, int BN, int TM, int TN>
struct TileShape {
  static constexpr int TX = BN / TN;
  static constexpr int TY = BM / TM;
  static_assert(TX * TY == kTileThreads, "a tile is computed by 256 threads");
};

template <int BM, int BN, int TM, int TN, bool B_KFAST, typename A, typename TA, typename TB>
__device__ __forceinline__ void atb_mainloop(const TA* __restrict__ a, int64_t lda, const TB* __restrict__ b,
                                             int64_t ldb, int64_t M, int64_t N, int64_t i0, int64_t j0,
                                             int64_t k_begin, int64_t k_end, A (*As)[BM], A (*Bs)[BN + 1],
                                             A (&acc)[TM][TN]) {
  using Shape = TileShape<BM, BN, TM, TN>;
  const int tid = threadIdx.x;
  const int tx = tid % Shape::TX;
  const int ty = tid / Shape::TX;
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kBK) {
    // A tile: kBK tokens × BM columns, consecutive threads on consecutive columns (coalesced).
    for (int e = tid; e < kBK * BM; e += kTileThreads) {
      const int kk = e / BM;
      const int i = e % BM;
      const int64_t t = k0 + kk;
      As[kk][i] = (t < k_end && i0 + i < M) ? to_acc(a[t * lda + i0 + i]) : A(0);
    }
    // B tile: kBK tokens × BN columns, consecutive threads along whichever index is contiguous.
    for (int e = tid; e < kBK * BN; e += kTileThreads) {
      int kk;
      int j;
      if constexpr (B_KFAST) {
        kk = e % kBK;
        j = e / kBK;
      } else {
        kk = e / BN;
        j = e % BN;
      }
      const int64_t t = k0 + kk;
      const int64_t col = j0 + j;
      A v = A(0);
      if (t < k_end && col < N) {
        v = B_KFAST ? to_acc(b[col * ldb + t]) : to_acc(b[t * ldb + col]);
      }
      Bs[kk][j] = v;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK; ++kk) {
      A av[TM];
      A bv[TN];
#pragma unroll
      for (int u = 0; u < TM; ++u) {
        av[u] = As[kk][ty + u * Shape::TY];
      }
#pragma unroll
      for (int v = 0; v < TN; ++v) {
        bv[v] = Bs[kk][tx + v * Shape::TX];
      }
#pragma unroll
      for (int u = 0; u < TM; ++u) {
#pragma unroll
        for (int v = 0; v < TN; ++v) {
          acc[u][v] = fma(av[u], bv[v], acc[u][v]);
        }
      }
    }
    __syncthreads();
  }
}

}  // namespace lorsum::cuda::detail
