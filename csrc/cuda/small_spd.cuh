// The blocked Cholesky factor of a small SPD matrix in shared memory, shared by spd_solve (spd_solve.cu)
// and adaprelora_solve (adaprelora_solve.cu): the same factor, pivots and failure rule in both, as
// reference.ridged_cholesky. Plain CUDA, internal to the kernels.

#pragma once

#include "common.cuh"

namespace lorsum::cuda::detail {

// Threads of a block that factors (spd_solve_kernel, ada_factor_kernel): factor_packed's stride.
constexpr int kSolveThreads = 128;

__device__ __forceinline__ int tri(int i, int k) { return i * (i + 1) / 2 + k; }

// Cholesky factor of gram + shift·I into the packed lower triangle Lp (row i at tri(i, 0)), by all threads
// of the block, right-looking: pivot, scale the column, update the trailing lower triangle. Returns false
// (the same value in every thread) when a pivot is not > 0 (NaN included), as LAPACK's potrf reports.
template <typename A>
__device__ bool factor_packed(const A* __restrict__ g, int64_t g_rs, int64_t g_cs, int r, A shift, A* Lp,
                              int* s_fail) {
  const int tid = threadIdx.x;
  // Every thread is done with Lp and *s_fail from a previous attempt.
  __syncthreads();
  for (int i = 0; i < r; ++i) {
    for (int k = tid; k <= i; k += kSolveThreads) {
      const A v = g[i * g_rs + k * g_cs];
      Lp[tri(i, k)] = i == k ? v + shift : v;
    }
  }
  if (tid == 0) {
    *s_fail = 0;
  }
  __syncthreads();
  for (int j = 0; j < r; ++j) {
    if (tid == 0) {
      const A d = Lp[tri(j, j)];
      if (!(d > A(0))) {
        *s_fail = 1;
      }
      Lp[tri(j, j)] = sqrt(d);
    }
    __syncthreads();
    // Uniform: read by every thread after the barrier, written again only after the next one.
    if (*s_fail) {
      return false;
    }
    const A djj = Lp[tri(j, j)];
    for (int i = j + 1 + tid; i < r; i += kSolveThreads) {
      Lp[tri(i, j)] /= djj;
    }
    __syncthreads();
    const int rem = r - j - 1;
    for (int e = tid; e < rem * rem; e += kSolveThreads) {
      const int i = j + 1 + e / rem;
      const int k = j + 1 + e % rem;
      if (k <= i) {
        Lp[tri(i, k)] -= Lp[tri(i, j)] * Lp[tri(k, j)];
      }
    }
    __syncthreads();
  }
  return true;
}

}  // namespace lorsum::cuda::detail
