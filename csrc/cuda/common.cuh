// Device and launch helpers shared by the CUDA kernel files csrc/cuda/*.cu: conversions, the token-split
// planner and the ordered second-stage sum of partials. Plain CUDA, no torch headers; internal to the
// kernels (the public contract is kernels.h).
//
// Determinism: every sum in the kernels has an order fixed by the problem's shapes. Work splits (T chunks,
// tiles) are planned from the shapes and fixed constants only, never from the device (SM count, free
// memory), each partial sum is produced by one thread in a fixed order, and partials are combined by a
// separate kernel in index order. No floating-point atomics anywhere.
//
// bf16 / fp16 values are converted with the explicit intrinsics (__bfloat162float, __float2half, ...):
// torch builds CUDA sources with -D__CUDA_NO_HALF_CONVERSIONS__ / -D__CUDA_NO_BFLOAT16_CONVERSIONS__,
// which remove the implicit conversions.

#pragma once

#include "kernels.h"

#include <algorithm>
#include <cstdint>

namespace lorsum::cuda::detail {

// ---- conversions ------------------------------------------------------------------------------------

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half(v); }

// sqrt of the smallest normal number, exactly (2^-63 and 2^-511): reference.ridged_cholesky's floor of the
// mean diagonal, `finfo.tiny ** 0.5`.
__device__ __forceinline__ float sqrt_tiny(float) { return 0x1p-63f; }
__device__ __forceinline__ double sqrt_tiny(double) { return 0x1p-511; }

__device__ __forceinline__ bool is_finite(float v) { return isfinite(v); }
__device__ __forceinline__ bool is_finite(double v) { return isfinite(v); }

// ---- launch helpers ---------------------------------------------------------------------------------

// Blocks a kernel's split over the token dimension aims at, with the tiles it already has. A fixed
// number, not the device's SM count, so that the split (hence the rounding) is a function of the shapes.
constexpr int64_t kTargetBlocks = 1024;
// Largest grid y / z dimension.
constexpr int64_t kMaxGridYZ = 65535;

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
// std::min is a host constexpr function; device code uses this one.
__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
constexpr int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }
constexpr size_t kWorkspaceAlign = 256;
constexpr size_t align_bytes(size_t b) { return (b + kWorkspaceAlign - 1) / kWorkspaceAlign * kWorkspaceAlign; }

// Rows per chunk when the token dimension (length K) is split into chunks of [min_rows, max_rows] rows
// (multiples of `multiple`), enough of them to bring `base_blocks` up to kTargetBlocks where K allows.
inline int64_t plan_rows_per_chunk(int64_t K, int64_t base_blocks, int64_t min_rows, int64_t max_rows,
                                   int64_t multiple) {
  if (K <= 0) {
    return multiple;
  }
  const int64_t want = ceil_div(kTargetBlocks, std::max<int64_t>(1, base_blocks));
  const int64_t most = std::max<int64_t>(1, ceil_div(K, min_rows));
  const int64_t least = ceil_div(K, max_rows);
  const int64_t chunks = std::max(least, std::min(want, most));
  int64_t rows = round_up(ceil_div(K, chunks), multiple);
  // Keep the chunk count within a grid dimension.
  rows = std::max(rows, round_up(ceil_div(K, kMaxGridYZ), multiple));
  return rows;
}

inline cudaError_t launch_status() { return cudaGetLastError(); }

// ---- second stage: ordered sum of partials ----------------------------------------------------------

// out[b, k, j] = Σ_{p < P} part[b, p, k, j] (p in increasing order); part is contiguous (B, P, rows, cols),
// out is addressed by (o_bs, o_ks, o_js). Defined once, in common.cu (float and double), so that one kernel
// serves every op rather than a copy per translation unit.
template <typename A>
cudaError_t sum_partials(const A* part, int64_t B, int64_t P, int64_t rows, int64_t cols, A* out, int64_t o_bs,
                         int64_t o_ks, int64_t o_js, cudaStream_t stream);

extern template cudaError_t sum_partials<float>(const float*, int64_t, int64_t, int64_t, int64_t, float*, int64_t,
                                                int64_t, int64_t, cudaStream_t);
extern template cudaError_t sum_partials<double>(const double*, int64_t, int64_t, int64_t, int64_t, double*,
                                                 int64_t, int64_t, int64_t, cudaStream_t);

}  // namespace lorsum::cuda::detail
