// Kernel (3) of kernels.h: batched small SPD solves with the relative ridge and the on-device fallback
// (spd_solve in spd_solve_binding.cpp; the LoRSum half-steps' r×r solves). Reference: reference.spd_solve.

#include "common.cuh"
#include "small_spd.cuh"

#include <algorithm>
#include <cstdint>

namespace lorsum::cuda {

using namespace detail;

namespace {

constexpr size_t kSolveSmemLimit = 48 * 1024;  // static limit: no opt-in attribute needed

size_t solve_smem_bytes(int64_t r, int64_t cb, size_t acc_size) {
  return static_cast<size_t>(r * (r + 1) / 2 + r * (cb + 1)) * acc_size;
}

// Right-hand-side columns per block: the widest of 128, 64, 32 whose packed factor and r×(cb+1) block fit
// in the static shared-memory limit (fp32: 128 for every r ≤ 64; fp64: 32 at r = 64).
int64_t solve_cols_per_block(int64_t r, size_t acc_size) {
  for (int64_t cb = kSolveThreads; cb > 32; cb /= 2) {
    if (solve_smem_bytes(r, cb, acc_size) <= kSolveSmemLimit) {
      return cb;
    }
  }
  return 32;
}

// One block: matrix blockIdx.x, right-hand-side columns [c0, c0 + cb) with c0 = (c_block0 + blockIdx.y)·cb.
template <typename T>
__global__ void __launch_bounds__(kSolveThreads)
    spd_solve_kernel(const acc_t<T>* __restrict__ gram, int64_t g_bs, int64_t g_rs, int64_t g_cs,
                     const T* rhs, int64_t r_bs, int64_t r_ks, int64_t r_cs, T* out, int64_t o_bs, int64_t o_ks,
                     int64_t o_cs, int r, int64_t N, int cb, int64_t c_block0, acc_t<T> ridge,
                     acc_t<T> fallback_ridge) {
  using A = acc_t<T>;
  extern __shared__ __align__(16) unsigned char solve_smem[];
  A* Lp = reinterpret_cast<A*>(solve_smem);  // packed lower triangle, r(r+1)/2
  A* Bm = Lp + r * (r + 1) / 2;              // r × cb block of right-hand sides, row stride cb + 1
  const int ldb = cb + 1;
  __shared__ A s_scale;
  __shared__ int s_fail;

  const int tid = threadIdx.x;
  const int64_t b = blockIdx.x;
  const int64_t c0 = (c_block0 + blockIdx.y) * cb;
  const int nc = static_cast<int>(min64(cb, N - c0));
  const A* g = gram + b * g_bs;

  // Stage the right-hand sides, consecutive threads along whichever index has the smaller stride.
  {
    const T* src = rhs + b * r_bs + c0 * r_cs;
    const bool c_fast = r_cs <= r_ks;
    for (int e = tid; e < r * nc; e += kSolveThreads) {
      const int k = c_fast ? e / nc : e % r;
      const int c = c_fast ? e % nc : e / r;
      Bm[k * ldb + c] = to_acc(src[k * r_ks + c * r_cs]);
    }
  }
  // The mean diagonal, floored at sqrt(tiny) (a NaN stays NaN, as with clamp_min).
  if (tid == 0) {
    A d = A(0);
    for (int i = 0; i < r; ++i) {
      d += g[i * (g_rs + g_cs)];
    }
    d /= static_cast<A>(r);
    const A floor = sqrt_tiny(A(0));
    s_scale = d < floor ? floor : d;
  }
  __syncthreads();
  const A scale = s_scale;
  bool ok = false;
  if (is_finite(scale)) {
    ok = factor_packed(g, g_rs, g_cs, r, ridge * scale, Lp, &s_fail);
    if (!ok) {
      ok = factor_packed(g, g_rs, g_cs, r, fallback_ridge * scale, Lp, &s_fail);
    }
  }
  __syncthreads();
  if (!ok) {
    // Both factorisations failed (a NaN Gram) or the scale is not finite: a NaN factor, so NaN results.
    const A nan = A(0) / A(0);
    for (int e = tid; e < r * (r + 1) / 2; e += kSolveThreads) {
      Lp[e] = nan;
    }
    __syncthreads();
  }

  // Forward then back substitution, one thread per column.
  if (tid < nc) {
    A* col = Bm + tid;
    for (int i = 0; i < r; ++i) {
      A v = col[i * ldb];
      const A* li = Lp + tri(i, 0);
      for (int k = 0; k < i; ++k) {
        v -= li[k] * col[k * ldb];
      }
      col[i * ldb] = v / li[i];
    }
    for (int i = r - 1; i >= 0; --i) {
      A v = col[i * ldb];
      for (int k = i + 1; k < r; ++k) {
        v -= Lp[tri(k, i)] * col[k * ldb];
      }
      col[i * ldb] = v / Lp[tri(i, i)];
    }
  }
  __syncthreads();
  {
    T* dst = out + b * o_bs + c0 * o_cs;
    const bool c_fast = o_cs <= o_ks;
    for (int e = tid; e < r * nc; e += kSolveThreads) {
      const int k = c_fast ? e / nc : e % r;
      const int c = c_fast ? e % nc : e / r;
      store(dst + k * o_ks + c * o_cs, Bm[k * ldb + c]);
    }
  }
}

}  // namespace

template <typename T>
cudaError_t spd_solve(const acc_t<T>* gram, int64_t g_bs, int64_t g_rs, int64_t g_cs, const T* rhs, int64_t rhs_bs,
                      int64_t rhs_ks, int64_t rhs_cs, T* out, int64_t out_bs, int64_t out_ks, int64_t out_cs,
                      int64_t L, int64_t r, int64_t N, acc_t<T> ridge, acc_t<T> fallback_ridge,
                      cudaStream_t stream) {
  using A = acc_t<T>;
  if (L < 0 || r < 0 || N < 0 || r > kMaxSolveRank || g_bs < 0 || g_rs < 0 || g_cs < 0 || rhs_bs < 0 ||
      rhs_ks < 0 || rhs_cs < 0 || out_bs < 0 || out_ks < 0 || out_cs < 0) {
    return cudaErrorInvalidValue;
  }
  if (L == 0 || r == 0 || N == 0) {
    return cudaSuccess;
  }
  if (gram == nullptr || rhs == nullptr || out == nullptr) {
    return cudaErrorInvalidValue;
  }
  const int64_t cb = solve_cols_per_block(r, sizeof(A));
  const size_t smem = solve_smem_bytes(r, cb, sizeof(A));
  const int64_t col_blocks = ceil_div(N, cb);
  for (int64_t c_block0 = 0; c_block0 < col_blocks; c_block0 += kMaxGridYZ) {
    for (int64_t b0 = 0; b0 < L; b0 += INT32_MAX) {
      const int64_t nb = std::min<int64_t>(INT32_MAX, L - b0);
      const dim3 grid(static_cast<unsigned>(nb), static_cast<unsigned>(std::min(kMaxGridYZ, col_blocks - c_block0)));
      spd_solve_kernel<T><<<grid, kSolveThreads, smem, stream>>>(
          gram + b0 * g_bs, g_bs, g_rs, g_cs, rhs + b0 * rhs_bs, rhs_bs, rhs_ks, rhs_cs, out + b0 * out_bs, out_bs,
          out_ks, out_cs, static_cast<int>(r), N, static_cast<int>(cb), c_block0, static_cast<A>(ridge),
          static_cast<A>(fallback_ridge));
      if (const cudaError_t e = launch_status(); e != cudaSuccess) {
        return e;
      }
    }
  }
  return cudaSuccess;
}

#define LORSUM_CUDA_INSTANTIATE(T)                                                                          \
  template cudaError_t spd_solve<T>(const acc_t<T>*, int64_t, int64_t, int64_t, const T*, int64_t, int64_t,    \
                                    int64_t, T*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,         \
                                    acc_t<T>, acc_t<T>, cudaStream_t);
LORSUM_CUDA_FOR_EACH_INPUT(LORSUM_CUDA_INSTANTIATE)
#undef LORSUM_CUDA_INSTANTIATE

}  // namespace lorsum::cuda
