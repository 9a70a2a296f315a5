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

// dst (cols×rows, row-major) = srcᵀ for src (rows×cols, row stride lds).
template <typename acc_t>
inline void transpose(int64_t rows, int64_t cols, const acc_t* src, int64_t lds, acc_t* dst) {
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) {
      dst[j * rows + i] = src[i * lds + j];
    }
  }
}

}  // namespace lorsum::cpu::r_wide
