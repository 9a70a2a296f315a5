// Kernel (6) of kernels.h: AdaPreLoRA's surrogate statistics, the row and column energies of B·E + F·A
// (tangent_energies in tangent_energies_binding.cpp). Reference: reference.tangent_energies.

#include "common.cuh"

#include <algorithm>
#include <cstdint>

namespace lorsum::cuda {

using namespace detail;

namespace {

constexpr int kTanThreads = 256;
constexpr int kTanPanel = 32;           // columns of a chunk staged in shared memory at a time
constexpr int kTanLd = kTanPanel + 1;   // row stride of a staged panel (no bank conflicts along rows)
// Packed lower-triangle entries of an R×R Gram per thread (R ≤ kMaxTangentRank).
constexpr int kTanEntries = (kMaxTangentRank * (kMaxTangentRank + 1) / 2 + kTanThreads - 1) / kTanThreads;
// Columns of a panel per warp in the quadratic forms, and rows of the Gram per lane.
constexpr int kTanWarpCols = kTanPanel / (kTanThreads / 32);
constexpr int kTanLaneRows = kMaxTangentRank / 32;
static_assert(kTanWarpCols * (kTanThreads / 32) == kTanPanel && kTanLaneRows * 32 == kMaxTangentRank,
              "warps must cover a panel and lanes the largest rank exactly");

// One side of layer b as an R×N matrix V: rows [0, r_B) from the first factor, [r_B, R) from the second,
// V(k, c) = p[k·ks + c·cs] of its factor. Side 0: V = Zᵀ (B, F; N = m). Side 1: V = W (E, A; N = n).
template <typename T>
struct TanSide {
  const T* p0;
  int64_t ks0, cs0;
  const T* p1;
  int64_t ks1, cs1;
  int64_t N;
};

template <typename T>
__device__ __forceinline__ TanSide<T> tan_side(const TangentInputs<T>& in, int s, int64_t b, int64_t m, int64_t n) {
  if (s == 0) {
    return {in.B + b * in.b_bs, in.b_cs, in.b_rs, in.F + b * in.f_bs, in.f_cs, in.f_rs, m};
  }
  return {in.E + b * in.e_bs, in.e_rs, in.e_cs, in.A + b * in.a_bs, in.a_rs, in.a_cs, n};
}

// dst[k·kTanLd + c] = V(k, c0 + c) for k < R, c < nc, in acc_t, consecutive threads along the smaller stride
// of each factor (coalesced reads of row-major and column-major factors alike).
template <typename T, typename A>
__device__ __forceinline__ void tan_stage(const TanSide<T>& sd, int r_B, int R, int64_t c0, int nc, A* dst) {
  for (int f = 0; f < 2; ++f) {
    const int k0 = f == 0 ? 0 : r_B;
    const int rf = f == 0 ? r_B : R - r_B;
    const T* p = f == 0 ? sd.p0 : sd.p1;
    const int64_t ks = f == 0 ? sd.ks0 : sd.ks1;
    const int64_t cs = f == 0 ? sd.cs0 : sd.cs1;
    const bool c_fast = cs <= ks;
    for (int e = threadIdx.x; e < rf * nc; e += kTanThreads) {
      const int k = c_fast ? e / nc : e % rf;
      const int c = c_fast ? e % nc : e / rf;
      dst[(k0 + k) * kTanLd + c] = to_acc(p[k * ks + (c0 + c) * cs]);
    }
  }
}

// The (row, column) of packed lower-triangle entry e (row i holds entries i(i+1)/2 .. i(i+1)/2 + i).
__device__ __forceinline__ void tan_unpack(int e, int& i, int& k) {
  i = static_cast<int>((sqrtf(8.0f * static_cast<float>(e) + 1.0f) - 1.0f) * 0.5f);
  while (i * (i + 1) / 2 > e) {
    --i;
  }
  while ((i + 1) * (i + 2) / 2 <= e) {
    ++i;
  }
  k = e - i * (i + 1) / 2;
}

// (i) part[b, s, chunk, e] = Σ_{c in chunk} V(i, c)·V(k, c) for the packed lower-triangle entries e = (i, k)
// of M_s, each summed by one thread in column order. Grid (L, chunks, 2).
template <typename T>
__global__ void __launch_bounds__(kTanThreads)
    tan_gram_kernel(TangentInputs<T> in, int r_B, int R, int64_t m, int64_t n, int64_t max_chunks,
                    acc_t<T>* part) {
  using A = acc_t<T>;
  __shared__ A Vs[kMaxTangentRank * kTanLd];
  const int64_t b = blockIdx.x;
  const int64_t chunk = blockIdx.y;
  const int s = static_cast<int>(blockIdx.z);
  const TanSide<T> sd = tan_side<T>(in, s, b, m, n);
  const int64_t c_begin = chunk * kTangentChunk;
  if (c_begin >= sd.N) {
    return;  // the other side has more chunks
  }
  const int64_t c_end = min64(sd.N, c_begin + kTangentChunk);
  const int P = R * (R + 1) / 2;
  int rows[kTanEntries], cols[kTanEntries];
  A acc[kTanEntries];
#pragma unroll
  for (int j = 0; j < kTanEntries; ++j) {
    tan_unpack(threadIdx.x + j * kTanThreads, rows[j], cols[j]);
    acc[j] = A(0);
  }
  for (int64_t c0 = c_begin; c0 < c_end; c0 += kTanPanel) {
    const int nc = static_cast<int>(min64(kTanPanel, c_end - c0));
    __syncthreads();  // the previous panel is consumed
    tan_stage(sd, r_B, R, c0, nc, Vs);
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kTanEntries; ++j) {
      if (threadIdx.x + j * kTanThreads < P) {
        const A* vi = Vs + rows[j] * kTanLd;
        const A* vk = Vs + cols[j] * kTanLd;
        A v = acc[j];
        for (int c = 0; c < nc; ++c) {
          v += vi[c] * vk[c];
        }
        acc[j] = v;
      }
    }
  }
  A* out = part + ((b * 2 + s) * max_chunks + chunk) * P;
#pragma unroll
  for (int j = 0; j < kTanEntries; ++j) {
    const int e = threadIdx.x + j * kTanThreads;
    if (e < P) {
      out[e] = acc[j];
    }
  }
}

// (ii) gram[b, s] (R×R, both triangles) = Σ_chunk part[b, s, chunk] in chunk order (zero for a side with no
// columns). Grid (L, 2).
template <typename A>
__global__ void __launch_bounds__(kTanThreads)
    tan_sum_kernel(const A* __restrict__ part, int64_t max_chunks, int64_t chunks_0, int64_t chunks_1, int R,
                   A* __restrict__ gram) {
  const int64_t b = blockIdx.x;
  const int s = static_cast<int>(blockIdx.y);
  const int P = R * (R + 1) / 2;
  const int64_t chunks = s == 0 ? chunks_0 : chunks_1;
  const A* pp = part + (b * 2 + s) * max_chunks * P;
  A* g = gram + (b * 2 + s) * R * R;
  for (int e = threadIdx.x; e < P; e += kTanThreads) {
    A v = A(0);
    for (int64_t c = 0; c < chunks; ++c) {
      v += pp[c * P + e];
    }
    int i, k;
    tan_unpack(e, i, k);
    g[i * R + k] = v;
    g[k * R + i] = v;
  }
}

// (iii) out[c] = max(0, V(:, c)ᵀ·M_other·V(:, c)) for the chunk's columns (rows for side 0, cols for side 1).
// Each warp takes kTanWarpCols columns of a panel; lane l forms (M·v)_j for j = l, l + 32, ... (reading
// M_other's rows coalesced), multiplies by v_j, and the warp adds the lanes in a fixed butterfly. Grid
// (L, chunks, 2).
template <typename T>
__global__ void __launch_bounds__(kTanThreads)
    tan_quad_kernel(TangentInputs<T> in, int r_B, int R, int64_t m, int64_t n, const acc_t<T>* __restrict__ gram,
                    acc_t<T>* rows, acc_t<T>* cols) {
  using A = acc_t<T>;
  __shared__ A Vs[kMaxTangentRank * kTanLd];
  const int64_t b = blockIdx.x;
  const int64_t chunk = blockIdx.y;
  const int s = static_cast<int>(blockIdx.z);
  const TanSide<T> sd = tan_side<T>(in, s, b, m, n);
  const int64_t c_begin = chunk * kTangentChunk;
  if (c_begin >= sd.N) {
    return;
  }
  const int64_t c_end = min64(sd.N, c_begin + kTangentChunk);
  const A* M = gram + (b * 2 + (1 - s)) * R * R;
  A* out = s == 0 ? rows + b * m : cols + b * n;
  const int lane = static_cast<int>(threadIdx.x % 32);
  const int warp_col = static_cast<int>(threadIdx.x / 32) * kTanWarpCols;
  for (int64_t c0 = c_begin; c0 < c_end; c0 += kTanPanel) {
    const int nc = static_cast<int>(min64(kTanPanel, c_end - c0));
    __syncthreads();
    tan_stage(sd, r_B, R, c0, nc, Vs);
    __syncthreads();
    A acc[kTanWarpCols][kTanLaneRows];
#pragma unroll
    for (int cc = 0; cc < kTanWarpCols; ++cc) {
#pragma unroll
      for (int q = 0; q < kTanLaneRows; ++q) {
        acc[cc][q] = A(0);
      }
    }
    for (int k = 0; k < R; ++k) {
      A mk[kTanLaneRows];
#pragma unroll
      for (int q = 0; q < kTanLaneRows; ++q) {
        const int j = lane + 32 * q;
        mk[q] = j < R ? M[k * R + j] : A(0);
      }
#pragma unroll
      for (int cc = 0; cc < kTanWarpCols; ++cc) {
        const A vk = Vs[k * kTanLd + warp_col + cc];
#pragma unroll
        for (int q = 0; q < kTanLaneRows; ++q) {
          acc[cc][q] += vk * mk[q];
        }
      }
    }
#pragma unroll
    for (int cc = 0; cc < kTanWarpCols; ++cc) {
      const int c = warp_col + cc;
      A v = A(0);
#pragma unroll
      for (int q = 0; q < kTanLaneRows; ++q) {
        const int j = lane + 32 * q;
        if (j < R) {
          v += acc[cc][q] * Vs[j * kTanLd + c];
        }
      }
      for (int off = 16; off > 0; off /= 2) {
        v += __shfl_xor_sync(0xffffffffu, v, off);
      }
      if (lane == 0 && c < nc) {
        out[c0 + c] = A(0) > v ? A(0) : v;  // a NaN stays NaN, as with clamp_min
      }
    }
  }
}

}  // namespace

size_t tangent_energies_workspace_bytes(int64_t L, int64_t R, int64_t m, int64_t n, size_t acc_size) {
  if (L <= 0 || R <= 0 || (m <= 0 && n <= 0)) {
    return 0;
  }
  const int64_t max_chunks = ceil_div(std::max(m, n), kTangentChunk);
  const size_t packed = static_cast<size_t>(L * 2 * (R * (R + 1) / 2)) * acc_size;
  // Per-chunk partials, then the summed Grams.
  return align_bytes(packed * static_cast<size_t>(max_chunks)) +
         align_bytes(static_cast<size_t>(L * 2 * R * R) * acc_size);
}

template <typename T>
cudaError_t tangent_energies(const TangentInputs<T>& in, int64_t L, int64_t r_B, int64_t r_F, int64_t m, int64_t n,
                             acc_t<T>* rows, acc_t<T>* cols, void* workspace, size_t workspace_bytes,
                             cudaStream_t stream) {
  using A = acc_t<T>;
  const int64_t strides[] = {in.b_bs, in.b_rs, in.b_cs, in.e_bs, in.e_rs, in.e_cs,
                             in.f_bs, in.f_rs, in.f_cs, in.a_bs, in.a_rs, in.a_cs};
  const int64_t R = r_B + r_F;
  if (L < 0 || r_B < 0 || r_F < 0 || m < 0 || n < 0 || R > kMaxTangentRank || L > INT32_MAX) {
    return cudaErrorInvalidValue;
  }
  for (const int64_t st : strides) {
    if (st < 0) {
      return cudaErrorInvalidValue;
    }
  }
  if (L == 0 || (m == 0 && n == 0)) {
    return cudaSuccess;
  }
  if ((m > 0 && rows == nullptr) || (n > 0 && cols == nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (R == 0) {
    // B·E + F·A is an empty sum: every energy is 0.
    if (m > 0) {
      if (const cudaError_t e = cudaMemsetAsync(rows, 0, static_cast<size_t>(L * m) * sizeof(A), stream);
          e != cudaSuccess) {
        return e;
      }
    }
    return n > 0 ? cudaMemsetAsync(cols, 0, static_cast<size_t>(L * n) * sizeof(A), stream) : cudaSuccess;
  }
  if ((r_B > 0 && ((m > 0 && in.B == nullptr) || (n > 0 && in.E == nullptr))) ||
      (r_F > 0 && ((m > 0 && in.F == nullptr) || (n > 0 && in.A == nullptr)))) {
    return cudaErrorInvalidValue;
  }
  const size_t need = tangent_energies_workspace_bytes(L, R, m, n, sizeof(A));
  if (workspace == nullptr || workspace_bytes < need) {
    return cudaErrorInvalidValue;
  }
  const int64_t chunks_0 = ceil_div(m, kTangentChunk);
  const int64_t chunks_1 = ceil_div(n, kTangentChunk);
  const int64_t max_chunks = std::max(chunks_0, chunks_1);
  if (max_chunks > kMaxGridYZ) {
    return cudaErrorInvalidValue;
  }
  const size_t packed = static_cast<size_t>(L * 2 * (R * (R + 1) / 2)) * sizeof(A);
  A* part = static_cast<A*>(workspace);
  A* gram =
      reinterpret_cast<A*>(static_cast<char*>(workspace) + align_bytes(packed * static_cast<size_t>(max_chunks)));
  const int rb = static_cast<int>(r_B);
  const int Ri = static_cast<int>(R);
  const dim3 chunk_grid(static_cast<unsigned>(L), static_cast<unsigned>(max_chunks), 2);

  tan_gram_kernel<T><<<chunk_grid, kTanThreads, 0, stream>>>(in, rb, Ri, m, n, max_chunks, part);
  if (const cudaError_t e = launch_status(); e != cudaSuccess) {
    return e;
  }
  tan_sum_kernel<A><<<dim3(static_cast<unsigned>(L), 2), kTanThreads, 0, stream>>>(part, max_chunks, chunks_0,
                                                                                  chunks_1, Ri, gram);
  if (const cudaError_t e = launch_status(); e != cudaSuccess) {
    return e;
  }
  tan_quad_kernel<T><<<chunk_grid, kTanThreads, 0, stream>>>(in, rb, Ri, m, n, gram, rows, cols);
  return launch_status();
}

#define LORSUM_CUDA_INSTANTIATE(T)                                                                           \
  template cudaError_t tangent_energies<T>(const TangentInputs<T>&, int64_t, int64_t, int64_t, int64_t, int64_t, \
                                           acc_t<T>*, acc_t<T>*, void*, size_t, cudaStream_t);
LORSUM_CUDA_FOR_EACH_INPUT(LORSUM_CUDA_INSTANTIATE)
#undef LORSUM_CUDA_INSTANTIATE

}  // namespace lorsum::cuda
