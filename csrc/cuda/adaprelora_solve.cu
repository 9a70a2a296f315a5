// Kernel (5) of kernels.h: AdaPreLoRA's H-weighted factor solve (adaprelora_solve in
// adaprelora_solve_binding.cpp). Reference: reference.adaprelora_solve.

#include "common.cuh"
#include "small_spd.cuh"

#include <algorithm>
#include <cstdint>

namespace lorsum::cuda {

using namespace detail;

namespace {

constexpr int kAdaThreads = 256;
constexpr int kAdaPanel = 32;              // columns of a chunk staged in shared memory at a time
constexpr int kAdaLd = kAdaPanel + 1;      // row stride of a staged panel (no bank conflicts along rows)
// Entries of an r×r matrix per thread (r ≤ kMaxSolveRank), and of an r×kAdaPanel panel.
constexpr int kAdaRR = kMaxSolveRank * kMaxSolveRank / kAdaThreads;
constexpr int kAdaRP = kMaxSolveRank * kAdaPanel / kAdaThreads;
static_assert(kAdaRR * kAdaThreads == kMaxSolveRank * kMaxSolveRank &&
                  kAdaRP * kAdaThreads == kMaxSolveRank * kAdaPanel,
              "per-thread entry counts must cover the largest rank exactly");

// One side of layer b as r×N matrices: F(k, c) = F[k·f_ks + c·f_cs], likewise G, w(c) = w[c·w_cs] and
// out(k, c) = out[k·o_ks + c·o_cs]. Side 0: F = A, G = g_A, w = q, out = dA. Side 1: F = Bᵀ, G = g_Bᵀ,
// w = p, out = dBᵀ.
template <typename T>
struct AdaSide {
  const T* F;
  int64_t f_ks, f_cs;
  const T* G;
  int64_t g_ks, g_cs;
  const T* w;
  int64_t w_cs;
  acc_t<T>* out;
  int64_t o_ks, o_cs;
  int64_t N;
};

template <typename T>
__device__ __forceinline__ AdaSide<T> ada_side(const AdaPreLoRAInputs<T>& in, int s, int64_t b, int r, int64_t m,
                                               int64_t n, acc_t<T>* dA, acc_t<T>* dB) {
  AdaSide<T> sd;
  if (s == 0) {
    sd = {in.A + b * in.a_bs, in.a_rs, in.a_cs, in.g_A + b * in.ga_bs, in.ga_rs, in.ga_cs, in.q + b * in.q_bs,
          in.q_s, dA == nullptr ? nullptr : dA + b * r * n, n, 1, n};
  } else {
    sd = {in.B + b * in.b_bs, in.b_cs, in.b_rs, in.g_B + b * in.gb_bs, in.gb_cs, in.gb_rs, in.p + b * in.p_bs,
          in.p_s, dB == nullptr ? nullptr : dB + b * m * r, 1, r, m};
  }
  return sd;
}

// dst[k·kAdaLd + c] = src[k·ks + c·cs] for k < r, c < nc, consecutive threads along the smaller stride.
template <typename T, typename A>
__device__ __forceinline__ void ada_stage(const T* src, int64_t ks, int64_t cs, int r, int nc, A* dst) {
  const bool c_fast = cs <= ks;
  for (int e = threadIdx.x; e < r * nc; e += kAdaThreads) {
    const int k = c_fast ? e / nc : e % r;
    const int c = c_fast ? e % nc : e / r;
    dst[k * kAdaLd + c] = to_acc(src[k * ks + c * cs]);
  }
}

// The (k, c) entry of an r×nc panel that thread-entry e owns: consecutive e along c when the output's
// columns are contiguous (side A), else along k (side B), so that the output writes coalesce.
__device__ __forceinline__ void ada_entry(int e, int r, int nc, bool c_fast, int& k, int& c) {
  k = c_fast ? e / nc : e % r;
  c = c_fast ? e % nc : e / r;
}

// (i) part[b, s, chunk] = Σ_{c in chunk} w(c)·F(:, c)·F(:, c)ᵀ (r×r, both triangles). Grid (L, chunks, 2).
template <typename T>
__global__ void __launch_bounds__(kAdaThreads)
    ada_gram_kernel(AdaPreLoRAInputs<T> in, int r, int64_t m, int64_t n, int64_t max_chunks, acc_t<T>* part) {
  using A = acc_t<T>;
  __shared__ A Fs[kMaxSolveRank * kAdaLd];
  __shared__ A ws[kAdaPanel];
  const int64_t b = blockIdx.x;
  const int64_t chunk = blockIdx.y;
  const int s = static_cast<int>(blockIdx.z);
  const AdaSide<T> sd = ada_side<T>(in, s, b, r, m, n, nullptr, nullptr);
  const int64_t c_begin = chunk * kAdaChunk;
  if (c_begin >= sd.N) {
    return;  // the other side has more chunks
  }
  const int64_t c_end = min64(sd.N, c_begin + kAdaChunk);
  A acc[kAdaRR];
#pragma unroll
  for (int j = 0; j < kAdaRR; ++j) {
    acc[j] = A(0);
  }
  for (int64_t c0 = c_begin; c0 < c_end; c0 += kAdaPanel) {
    const int nc = static_cast<int>(min64(kAdaPanel, c_end - c0));
    __syncthreads();  // the previous panel is consumed
    ada_stage(sd.F + c0 * sd.f_cs, sd.f_ks, sd.f_cs, r, nc, Fs);
    for (int c = threadIdx.x; c < nc; c += kAdaThreads) {
      ws[c] = to_acc(sd.w[(c0 + c) * sd.w_cs]);
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kAdaRR; ++j) {
      const int e = threadIdx.x + j * kAdaThreads;
      if (e < r * r) {
        const A* fk = Fs + (e / r) * kAdaLd;
        const A* fl = Fs + (e % r) * kAdaLd;
        A v = acc[j];
        for (int c = 0; c < nc; ++c) {
          v += fk[c] * ws[c] * fl[c];
        }
        acc[j] = v;
      }
    }
  }
  A* out = part + ((b * 2 + s) * max_chunks + chunk) * r * r;
#pragma unroll
  for (int j = 0; j < kAdaRR; ++j) {
    const int e = threadIdx.x + j * kAdaThreads;
    if (e < r * r) {
      out[e] = acc[j];
    }
  }
}

// (ii) Per layer and side: gram = Σ_chunk part (in chunk order), its ridged factor, and W = gram⁻¹ =
// L⁻ᵀL⁻¹ from the triangular inverse L⁻¹ (each thread j < r substitutes column j). Grid (L), kSolveThreads
// threads (factor_packed's stride).
template <typename A>
__global__ void __launch_bounds__(kSolveThreads)
    ada_factor_kernel(const A* __restrict__ part, int64_t max_chunks, int64_t chunks_a, int64_t chunks_b, int r,
                      A ridge, const A* __restrict__ ridge_per_layer, int64_t ridge_bs, A fallback_ridge,
                      A* __restrict__ gram, A* __restrict__ W) {
  __shared__ A Lp[kMaxSolveRank * (kMaxSolveRank + 1) / 2];
  __shared__ A Li[kMaxSolveRank * (kMaxSolveRank + 1) / 2];
  __shared__ A s_scale;
  __shared__ int s_fail;
  const int tid = threadIdx.x;
  const int64_t b = blockIdx.x;
  const A rho = ridge_per_layer != nullptr ? ridge_per_layer[b * ridge_bs] : ridge;
  for (int s = 0; s < 2; ++s) {
    const int64_t chunks = s == 0 ? chunks_a : chunks_b;
    const A* pp = part + (b * 2 + s) * max_chunks * r * r;
    A* g = gram + (b * 2 + s) * r * r;
    for (int e = tid; e < r * r; e += kSolveThreads) {
      A v = A(0);
      for (int64_t c = 0; c < chunks; ++c) {
        v += pp[c * r * r + e];
      }
      g[e] = v;
    }
    __syncthreads();  // g (global) is complete and visible to the block
    if (tid == 0) {
      A d = A(0);
      for (int i = 0; i < r; ++i) {
        d += g[i * (r + 1)];
      }
      d /= static_cast<A>(r);
      const A floor = sqrt_tiny(A(0));
      s_scale = d < floor ? floor : d;  // a NaN stays NaN, as with clamp_min
    }
    __syncthreads();
    const A scale = s_scale;
    bool ok = false;
    if (is_finite(scale)) {
      ok = factor_packed(g, r, 1, r, rho * scale, Lp, &s_fail);
      if (!ok) {
        ok = factor_packed(g, r, 1, r, (rho + fallback_ridge) * scale, Lp, &s_fail);
      }
    }
    __syncthreads();
    if (!ok) {
      const A nan = A(0) / A(0);
      for (int e = tid; e < r * (r + 1) / 2; e += kSolveThreads) {
        Lp[e] = nan;
      }
      __syncthreads();
    }
    if (tid < r) {
      const int j = tid;
      Li[tri(j, j)] = A(1) / Lp[tri(j, j)];
      for (int i = j + 1; i < r; ++i) {
        A v = A(0);
        for (int k = j; k < i; ++k) {
          v += Lp[tri(i, k)] * Li[tri(k, j)];
        }
        Li[tri(i, j)] = -v / Lp[tri(i, i)];
      }
    }
    __syncthreads();
    A* w = W + (b * 2 + s) * r * r;
    for (int e = tid; e < r * r; e += kSolveThreads) {
      const int i = e / r;
      const int k = e % r;
      A v = A(0);
      for (int t = i > k ? i : k; t < r; ++t) {
        v += Li[tri(t, i)] * Li[tri(t, k)];
      }
      w[e] = v;
    }
    __syncthreads();  // Lp, Li and s_scale are reused by the next side
  }
}

// (iii) V = W_other·G for the chunk, written to the output, and part[b, s, chunk] = Σ_{c in chunk}
// V(:, c)·F(:, c)ᵀ. Grid (L, chunks, 2).
template <typename T>
__global__ void __launch_bounds__(kAdaThreads)
    ada_solve_kernel(AdaPreLoRAInputs<T> in, int r, int64_t m, int64_t n, int64_t max_chunks,
                     const acc_t<T>* __restrict__ W, acc_t<T>* part, acc_t<T>* dA, acc_t<T>* dB) {
  using A = acc_t<T>;
  __shared__ A Vs[kMaxSolveRank * kAdaLd];
  __shared__ A Fs[kMaxSolveRank * kAdaLd];
  const int64_t b = blockIdx.x;
  const int64_t chunk = blockIdx.y;
  const int s = static_cast<int>(blockIdx.z);
  const AdaSide<T> sd = ada_side<T>(in, s, b, r, m, n, dA, dB);
  const int64_t c_begin = chunk * kAdaChunk;
  if (c_begin >= sd.N) {
    return;
  }
  const int64_t c_end = min64(sd.N, c_begin + kAdaChunk);
  const A* Wo = W + (b * 2 + (1 - s)) * r * r;
  const bool c_fast = sd.o_cs <= sd.o_ks;
  A acc[kAdaRR];
#pragma unroll
  for (int j = 0; j < kAdaRR; ++j) {
    acc[j] = A(0);
  }
  for (int64_t c0 = c_begin; c0 < c_end; c0 += kAdaPanel) {
    const int nc = static_cast<int>(min64(kAdaPanel, c_end - c0));
    __syncthreads();
    ada_stage(sd.G + c0 * sd.g_cs, sd.g_ks, sd.g_cs, r, nc, Vs);
    ada_stage(sd.F + c0 * sd.f_cs, sd.f_ks, sd.f_cs, r, nc, Fs);
    __syncthreads();
    A v[kAdaRP];
#pragma unroll
    for (int j = 0; j < kAdaRP; ++j) {
      const int e = threadIdx.x + j * kAdaThreads;
      v[j] = A(0);
      if (e < r * nc) {
        int k, c;
        ada_entry(e, r, nc, c_fast, k, c);
        for (int t = 0; t < r; ++t) {
          v[j] += Wo[k * r + t] * Vs[t * kAdaLd + c];
        }
      }
    }
    __syncthreads();  // every thread is done reading G from Vs
#pragma unroll
    for (int j = 0; j < kAdaRP; ++j) {
      const int e = threadIdx.x + j * kAdaThreads;
      if (e < r * nc) {
        int k, c;
        ada_entry(e, r, nc, c_fast, k, c);
        Vs[k * kAdaLd + c] = v[j];
        sd.out[k * sd.o_ks + (c0 + c) * sd.o_cs] = v[j];
      }
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kAdaRR; ++j) {
      const int e = threadIdx.x + j * kAdaThreads;
      if (e < r * r) {
        const A* vk = Vs + (e / r) * kAdaLd;
        const A* fl = Fs + (e % r) * kAdaLd;
        A a = acc[j];
        for (int c = 0; c < nc; ++c) {
          a += vk[c] * fl[c];
        }
        acc[j] = a;
      }
    }
  }
  A* out = part + ((b * 2 + s) * max_chunks + chunk) * r * r;
#pragma unroll
  for (int j = 0; j < kAdaRR; ++j) {
    const int e = threadIdx.x + j * kAdaThreads;
    if (e < r * r) {
      out[e] = acc[j];
    }
  }
}

// (iv) Per layer and side: C = K·W_own with K = Σ_chunk part (in chunk order). Grid (L).
template <typename A>
__global__ void __launch_bounds__(kAdaThreads)
    ada_cross_kernel(const A* __restrict__ part, int64_t max_chunks, int64_t chunks_a, int64_t chunks_b, int r,
                     const A* __restrict__ W, A* __restrict__ C) {
  __shared__ A Ks[kMaxSolveRank * kMaxSolveRank];
  const int64_t b = blockIdx.x;
  for (int s = 0; s < 2; ++s) {
    const int64_t chunks = s == 0 ? chunks_a : chunks_b;
    const A* pp = part + (b * 2 + s) * max_chunks * r * r;
    for (int e = threadIdx.x; e < r * r; e += kAdaThreads) {
      A v = A(0);
      for (int64_t c = 0; c < chunks; ++c) {
        v += pp[c * r * r + e];
      }
      Ks[e] = v;
    }
    __syncthreads();
    const A* w = W + (b * 2 + s) * r * r;
    A* out = C + (b * 2 + s) * r * r;
    for (int e = threadIdx.x; e < r * r; e += kAdaThreads) {
      const int k = e / r;
      const int l = e % r;
      A v = A(0);
      for (int t = 0; t < r; ++t) {
        v += Ks[k * r + t] * w[t * r + l];
      }
      out[e] = v;
    }
    __syncthreads();  // Ks is reused by the next side
  }
}

// (v) out = V/w − ½·C·F for the chunk, in place over V. Grid (L, chunks, 2).
template <typename T>
__global__ void __launch_bounds__(kAdaThreads)
    ada_output_kernel(AdaPreLoRAInputs<T> in, int r, int64_t m, int64_t n, const acc_t<T>* __restrict__ C,
                      acc_t<T>* dA, acc_t<T>* dB) {
  using A = acc_t<T>;
  __shared__ A Fs[kMaxSolveRank * kAdaLd];
  __shared__ A ws[kAdaPanel];
  const int64_t b = blockIdx.x;
  const int64_t chunk = blockIdx.y;
  const int s = static_cast<int>(blockIdx.z);
  const AdaSide<T> sd = ada_side<T>(in, s, b, r, m, n, dA, dB);
  const int64_t c_begin = chunk * kAdaChunk;
  if (c_begin >= sd.N) {
    return;
  }
  const int64_t c_end = min64(sd.N, c_begin + kAdaChunk);
  const A* Cs = C + (b * 2 + s) * r * r;
  const bool c_fast = sd.o_cs <= sd.o_ks;
  for (int64_t c0 = c_begin; c0 < c_end; c0 += kAdaPanel) {
    const int nc = static_cast<int>(min64(kAdaPanel, c_end - c0));
    __syncthreads();
    ada_stage(sd.F + c0 * sd.f_cs, sd.f_ks, sd.f_cs, r, nc, Fs);
    for (int c = threadIdx.x; c < nc; c += kAdaThreads) {
      ws[c] = to_acc(sd.w[(c0 + c) * sd.w_cs]);
    }
    __syncthreads();
    for (int e = threadIdx.x; e < r * nc; e += kAdaThreads) {
      int k, c;
      ada_entry(e, r, nc, c_fast, k, c);
      A v = A(0);
      for (int t = 0; t < r; ++t) {
        v += Cs[k * r + t] * Fs[t * kAdaLd + c];
      }
      A* o = sd.out + k * sd.o_ks + (c0 + c) * sd.o_cs;
      *o = *o / ws[c] - A(0.5) * v;
    }
  }
}

}  // namespace

size_t adaprelora_solve_workspace_bytes(int64_t L, int64_t r, int64_t m, int64_t n, size_t acc_size) {
  if (L <= 0 || r <= 0 || (m <= 0 && n <= 0)) {
    return 0;
  }
  const int64_t max_chunks = ceil_div(std::max(m, n), kAdaChunk);
  const size_t rr = static_cast<size_t>(L * 2 * r * r) * acc_size;
  // Per-chunk partials, then the Grams, their inverses and the C matrices.
  return align_bytes(rr * static_cast<size_t>(max_chunks)) + 3 * align_bytes(rr);
}

template <typename T>
cudaError_t adaprelora_solve(const AdaPreLoRAInputs<T>& in, int64_t L, int64_t r, int64_t m, int64_t n,
                             acc_t<T> ridge, const acc_t<T>* ridge_per_layer, int64_t ridge_bs,
                             acc_t<T> fallback_ridge, acc_t<T>* dA, acc_t<T>* dB, void* workspace,
                             size_t workspace_bytes, cudaStream_t stream) {
  using A = acc_t<T>;
  const int64_t strides[] = {in.a_bs, in.a_rs,  in.a_cs,  in.b_bs, in.b_rs, in.b_cs, in.ga_bs, in.ga_rs, in.ga_cs,
                             in.gb_bs, in.gb_rs, in.gb_cs, in.p_bs, in.p_s,  in.q_bs, in.q_s,   ridge_bs};
  if (L < 0 || r < 0 || m < 0 || n < 0 || r > kMaxSolveRank || L > INT32_MAX) {
    return cudaErrorInvalidValue;
  }
  for (const int64_t st : strides) {
    if (st < 0) {
      return cudaErrorInvalidValue;
    }
  }
  if (L == 0 || r == 0 || (m == 0 && n == 0)) {
    return cudaSuccess;
  }
  if ((n > 0 && (in.A == nullptr || in.g_A == nullptr || in.q == nullptr || dA == nullptr)) ||
      (m > 0 && (in.B == nullptr || in.g_B == nullptr || in.p == nullptr || dB == nullptr))) {
    return cudaErrorInvalidValue;
  }
  const size_t need = adaprelora_solve_workspace_bytes(L, r, m, n, sizeof(A));
  if (workspace == nullptr || workspace_bytes < need) {
    return cudaErrorInvalidValue;
  }
  const int64_t chunks_a = ceil_div(n, kAdaChunk);
  const int64_t chunks_b = ceil_div(m, kAdaChunk);
  const int64_t max_chunks = std::max(chunks_a, chunks_b);
  if (max_chunks > kMaxGridYZ) {
    return cudaErrorInvalidValue;
  }
  const size_t rr = static_cast<size_t>(L * 2 * r * r) * sizeof(A);
  char* ws = static_cast<char*>(workspace);
  A* part = reinterpret_cast<A*>(ws);
  A* gram = reinterpret_cast<A*>(ws + align_bytes(rr * static_cast<size_t>(max_chunks)));
  A* W = reinterpret_cast<A*>(reinterpret_cast<char*>(gram) + align_bytes(rr));
  A* C = reinterpret_cast<A*>(reinterpret_cast<char*>(W) + align_bytes(rr));
  const int ri = static_cast<int>(r);
  const dim3 chunk_grid(static_cast<unsigned>(L), static_cast<unsigned>(max_chunks), 2);
  const dim3 layer_grid(static_cast<unsigned>(L));

  ada_gram_kernel<T><<<chunk_grid, kAdaThreads, 0, stream>>>(in, ri, m, n, max_chunks, part);
  if (const cudaError_t e = launch_status(); e != cudaSuccess) {
    return e;
  }
  ada_factor_kernel<A><<<layer_grid, kSolveThreads, 0, stream>>>(part, max_chunks, chunks_a, chunks_b, ri, ridge,
                                                                 ridge_per_layer, ridge_bs, fallback_ridge, gram, W);
  if (const cudaError_t e = launch_status(); e != cudaSuccess) {
    return e;
  }
  ada_solve_kernel<T><<<chunk_grid, kAdaThreads, 0, stream>>>(in, ri, m, n, max_chunks, W, part, dA, dB);
  if (const cudaError_t e = launch_status(); e != cudaSuccess) {
    return e;
  }
  ada_cross_kernel<A><<<layer_grid, kAdaThreads, 0, stream>>>(part, max_chunks, chunks_a, chunks_b, ri, W, C);
  if (const cudaError_t e = launch_status(); e != cudaSuccess) {
    return e;
  }
  ada_output_kernel<T><<<chunk_grid, kAdaThreads, 0, stream>>>(in, ri, m, n, C, dA, dB);
  return launch_status();
}

#define LORSUM_CUDA_INSTANTIATE(T)                                                                           \
  template cudaError_t adaprelora_solve<T>(const AdaPreLoRAInputs<T>&, int64_t, int64_t, int64_t, int64_t,      \
                                           acc_t<T>, const acc_t<T>*, int64_t, acc_t<T>, acc_t<T>*, acc_t<T>*, \
                                           void*, size_t, cudaStream_t);
LORSUM_CUDA_FOR_EACH_INPUT(LORSUM_CUDA_INSTANTIATE)
#undef LORSUM_CUDA_INSTANTIATE

}  // namespace lorsum::cuda
