// The r-wide algebra of LoRSum's half-steps (the Grams, the anchor terms, transposes) as plain loops over
// raw row-major arrays, for the CPU half-steps of block_power.cpp.
//
// Why not ATen: these products are tiny (r×r results, m·r² multiply-adds), and in the streamed step they run
// inside backward right after the layer's large GEMMs, which have evicted the caches: there each ATen call
// (dispatch, allocation, MKL's small-matrix path) cost 10-100 µs cold, ~20 of them per half-step, more than
// the loops' own work. The loops touch only their operands, vectorise through the AVX-512 target of their
// wrappers (the inner loops run over contiguous columns, no reductions to reorder), and sum in an order
// fixed by the shapes alone.

#pragma once

#include "tiles.h"  // LORSUM_AVX512

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace lorsum::cpu::r_wide {

// G (r×r) = Σ_k w[k] · P[k,:]ᵀ · Q[k,:] over the K rows of P and Q (r numbers each, row strides ldp and ldq),
// w == nullptr meaning unit weights; then diag_add is added to G's diagonal. Summed over k in order.
template <typename acc_t>
inline __attribute__((always_inline)) void weighted_outer_sum_impl(int64_t K, int64_t r, const acc_t* P, int64_t ldp,
                                                                  const acc_t* Q, int64_t ldq, const acc_t* w,
                                                                  acc_t diag_add, acc_t* G) {
  std::fill(G, G + r * r, acc_t(0));
  for (int64_t k = 0; k < K; ++k) {
    const acc_t* p = P + k * ldp;
    const acc_t* q = Q + k * ldq;
    const acc_t wk = w == nullptr ? acc_t(1) : w[k];
    for (int64_t i = 0; i < r; ++i) {
      const acc_t a = p[i] * wk;
      acc_t* g = G + i * r;
      for (int64_t j = 0; j < r; ++j) {
        g[j] += a * q[j];
      }
    }
  }
  for (int64_t i = 0; i < r; ++i) {
    G[i * r + i] += diag_add;
  }
}

// out (M×N, row stride ldo) = lhs (M×r, row stride ldl) · rhs (r×N, row stride ldr).
template <typename acc_t>
inline __attribute__((always_inline)) void rows_times_impl(int64_t M, int64_t r, int64_t N, const acc_t* lhs,
                                                          int64_t ldl, const acc_t* rhs, int64_t ldr, acc_t* out,
                                                          int64_t ldo) {
  for (int64_t a = 0; a < M; ++a) {
    acc_t* o = out + a * ldo;
    std::fill(o, o + N, acc_t(0));
    for (int64_t l = 0; l < r; ++l) {
      const acc_t c = lhs[a * ldl + l];
      const acc_t* row = rhs + l * ldr;
      for (int64_t j = 0; j < N; ++j) {
        o[j] += c * row[j];
      }
    }
  }
}

template <typename acc_t>
LORSUM_AVX512 void weighted_outer_sum_avx512(int64_t K, int64_t r, const acc_t* P, int64_t ldp, const acc_t* Q,
                                             int64_t ldq, const acc_t* w, acc_t diag_add, acc_t* G) {
  weighted_outer_sum_impl(K, r, P, ldp, Q, ldq, w, diag_add, G);
}

// fp32: G in registers, a tile of up to 16 rows × 16 columns at a time, each summed over k in order (the
// same operations as the loops above, contracted to FMAs as the compiler contracts those). The loops above
// load and store a row of G per row of P, a store-to-load chain across k that costs ~5 cycles a row: ~0.1 ms
// for one 1536-row Gram, twice per half-step, in the streamed step's fixed per-layer cost.
template <>
LORSUM_AVX512 inline void weighted_outer_sum_avx512<float>(int64_t K, int64_t r, const float* P, int64_t ldp,
                                                           const float* Q, int64_t ldq, const float* w,
                                                           float diag_add, float* G) {
  for (int64_t i0 = 0; i0 < r; i0 += 16) {
    const int ni = static_cast<int>(std::min<int64_t>(16, r - i0));
    for (int64_t j0 = 0; j0 < r; j0 += 16) {
      const __mmask16 cols = avx512::tail_mask(r - j0);
      __m512 acc[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) {
        acc[i] = _mm512_setzero_ps();
      }
      const __mmask16 rows = avx512::tail_mask(ni);
      alignas(64) float weighted[16];
      for (int64_t k = 0; k < K; ++k) {
        const __m512 q = _mm512_maskz_loadu_ps(cols, Q + k * ldq + j0);
        const float* p = P + k * ldp + i0;
        if (w != nullptr) {  // the row's products with w[k] in one vector multiply, then broadcast from there
          _mm512_store_ps(weighted, _mm512_mul_ps(_mm512_maskz_loadu_ps(rows, p), _mm512_set1_ps(w[k])));
          p = weighted;
        }
#pragma GCC unroll 16
        for (int i = 0; i < 16; ++i) {
          if (i < ni) {
            acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(p[i]), q, acc[i]);
          }
        }
      }
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) {
        if (i < ni) {
          _mm512_mask_storeu_ps(G + (i0 + i) * r + j0, cols, acc[i]);
        }
      }
    }
  }
  for (int64_t i = 0; i < r; ++i) {
    G[i * r + i] += diag_add;
  }
}

template <typename acc_t>
void weighted_outer_sum_generic(int64_t K, int64_t r, const acc_t* P, int64_t ldp, const acc_t* Q, int64_t ldq,
                                const acc_t* w, acc_t diag_add, acc_t* G) {
  weighted_outer_sum_impl(K, r, P, ldp, Q, ldq, w, diag_add, G);
}

template <typename acc_t>
LORSUM_AVX512 void rows_times_avx512(int64_t M, int64_t r, int64_t N, const acc_t* lhs, int64_t ldl, const acc_t* rhs,
                                     int64_t ldr, acc_t* out, int64_t ldo) {
  rows_times_impl(M, r, N, lhs, ldl, rhs, ldr, out, ldo);
}

// fp32 with r ≤ 16: 16 columns at a time, the r rows of rhs held in registers while every row of out is
// summed over l in order (the loops above, without reloading and storing each row of out r times).
template <>
LORSUM_AVX512 inline void rows_times_avx512<float>(int64_t M, int64_t r, int64_t N, const float* lhs, int64_t ldl,
                                                   const float* rhs, int64_t ldr, float* out, int64_t ldo) {
  if (r > 16) {
    rows_times_impl(M, r, N, lhs, ldl, rhs, ldr, out, ldo);
    return;
  }
  for (int64_t c = 0; c < N; c += 16) {
    const __mmask16 cols = avx512::tail_mask(N - c);
    __m512 rows[16];
#pragma GCC unroll 16
    for (int l = 0; l < 16; ++l) {
      rows[l] = l < r ? _mm512_maskz_loadu_ps(cols, rhs + l * ldr + c) : _mm512_setzero_ps();
    }
    for (int64_t a = 0; a < M; ++a) {
      const float* la = lhs + a * ldl;
      __m512 acc = _mm512_setzero_ps();
#pragma GCC unroll 16
      for (int l = 0; l < 16; ++l) {
        if (l < r) {
          acc = _mm512_fmadd_ps(_mm512_set1_ps(la[l]), rows[l], acc);
        }
      }
      _mm512_mask_storeu_ps(out + a * ldo + c, cols, acc);
    }
  }
}

template <typename acc_t>
void rows_times_generic(int64_t M, int64_t r, int64_t N, const acc_t* lhs, int64_t ldl, const acc_t* rhs, int64_t ldr,
                        acc_t* out, int64_t ldo) {
  rows_times_impl(M, r, N, lhs, ldl, rhs, ldr, out, ldo);
}

// The entry points: the AVX-512 build of the loops where the CPU has it (avx512_enabled()), else the
// portable one. Same operations in the same order either way.
template <typename acc_t>
inline void weighted_outer_sum(bool vectorised, int64_t K, int64_t r, const acc_t* P, int64_t ldp, const acc_t* Q,
                               int64_t ldq, const acc_t* w, acc_t diag_add, acc_t* G) {
  (vectorised ? weighted_outer_sum_avx512<acc_t> : weighted_outer_sum_generic<acc_t>)(K, r, P, ldp, Q, ldq, w,
                                                                                      diag_add, G);
}

template <typename acc_t>
inline void rows_times(bool vectorised, int64_t M, int64_t r, int64_t N, const acc_t* lhs, int64_t ldl,
                       const acc_t* rhs, int64_t ldr, acc_t* out, int64_t ldo) {
  (vectorised ? rows_times_avx512<acc_t> : rows_times_generic<acc_t>)(M, r, N, lhs, ldl, rhs, ldr, out, ldo);
}

// rhs[c] += data[c] / metric[c] for c < N, fp32: the scalar loop's divisions and additions, 16 at a time.
LORSUM_AVX512 inline void add_divided(int64_t N, const float* data, const float* metric, float* rhs) {
  for (int64_t c = 0; c < N; c += 16) {
    const __mmask16 m = avx512::tail_mask(N - c);
    const __m512 q = _mm512_div_ps(_mm512_maskz_loadu_ps(m, data + c),
                                   _mm512_mask_loadu_ps(_mm512_set1_ps(1.0f), m, metric + c));
    _mm512_mask_storeu_ps(rhs + c, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, rhs + c), q));
  }
}

// dst (cols×rows, row-major) = srcᵀ for src (rows×cols, row stride lds).
template <typename acc_t>
inline void transpose_generic(int64_t rows, int64_t cols, const acc_t* src, int64_t lds, acc_t* dst) {
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) {
      dst[j * rows + i] = src[i * lds + j];
    }
  }
}

// fp32: 16×16 blocks through registers (masked at the edges). The loop above stores one number at a time
// to `cols` rows of dst: for an m×16 factor (m = 1536) ~8 µs, and the half-steps transposed three such
// operands per layer, a sixth of a small layer step's fixed cost (perf, docs/step_cost.md).
LORSUM_AVX512 inline void transpose_avx512(int64_t rows, int64_t cols, const float* src, int64_t lds,
                                           float* dst) {
  for (int64_t i0 = 0; i0 < rows; i0 += 16) {
    const int ni = static_cast<int>(std::min<int64_t>(16, rows - i0));
    const __mmask16 out_cols = avx512::tail_mask(ni);
    for (int64_t j0 = 0; j0 < cols; j0 += 16) {
      const int nj = static_cast<int>(std::min<int64_t>(16, cols - j0));
      const __mmask16 in_cols = avx512::tail_mask(nj);
      __m512 r[16], t[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) {
        r[i] = i < ni ? _mm512_maskz_loadu_ps(in_cols, src + (i0 + i) * lds + j0) : _mm512_setzero_ps();
      }
      avx512::transpose16(r, t);
#pragma GCC unroll 16
      for (int j = 0; j < 16; ++j) {
        if (j < nj) {
          _mm512_mask_storeu_ps(dst + (j0 + j) * rows + i0, out_cols, t[j]);
        }
      }
    }
  }
}

template <typename acc_t>
inline void transpose(bool vectorised, int64_t rows, int64_t cols, const acc_t* src, int64_t lds,
                      acc_t* dst) {
  if constexpr (std::is_same_v<acc_t, float>) {
    if (vectorised) {
      transpose_avx512(rows, cols, src, lds, dst);
      return;
    }
  }
  transpose_generic(rows, cols, src, lds, dst);
}

}  // namespace lorsum::cpu::r_wide
