// Small symmetric positive (semi)definite solves: the r×r systems of LoRSum's half-steps (spec/lorsum.md
// §9 H4), factored once per layer with a ridge relative to the mean diagonal and solved for many
// right-hand sides at once.
//
// Semantics of lorsum_kernels.reference.spd_solve / ridged_cholesky: factor gram + ρ·s·I with s the mean
// diagonal floored at sqrt(smallest normal number) and ρ the dtype's relative ridge (fp32 1e-7, fp64
// 1e-14); where that fails, gram + (ρ + φ)·s·I with the fallback ridge φ (fp32 1e-4, fp64 1e-8). The
// choice is made per matrix from the factorisation itself, never by a status read elsewhere. The floor
// keeps the ridge of an all-zero Gram (B = 0 at the standard LoRA init, λ = 0) a normal number, so that
// matrix is factorisable and its solutions are 0. Where both attempts fail (a NaN or infinite Gram) the
// factor is NaN, so the solution is NaN: a non-finite input never yields a finite result.

#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace lorsum::cpu {

// Must equal reference.RELATIVE_RIDGE and reference.FALLBACK_RIDGE (fp32 values for fp32 arithmetic,
// fp64 values for fp64).
template <typename acc_t>
constexpr double kRelativeRidge = sizeof(acc_t) == 8 ? 1e-14 : 1e-7;
template <typename acc_t>
constexpr double kFallbackRidge = sizeof(acc_t) == 8 ? 1e-8 : 1e-4;

// Columns of the right-hand side solved together: r rows of this many numbers stay in L1/L2 through the
// forward and the backward substitution.
constexpr int64_t kSolveColBlock = 256;

// Lower Cholesky factor of gram + ridge·I (reads the lower triangle of gram, row stride ldg) into chol
// (r×r row-major, strict upper triangle zeroed). False when a pivot is not > 0 (NaN included), as
// LAPACK's potrf reports.
template <typename acc_t>
inline bool cholesky_with_ridge(const acc_t* gram, int64_t ldg, int64_t r, acc_t ridge, acc_t* chol) {
  for (int64_t j = 0; j < r; ++j) {
    acc_t* lj = chol + j * r;
    for (int64_t i = j; i < r; ++i) {
      acc_t* li = chol + i * r;
      acc_t v = gram[i * ldg + j] + (i == j ? ridge : acc_t(0));
      for (int64_t k = 0; k < j; ++k) {
        v -= li[k] * lj[k];
      }
      if (i == j) {
        if (!(v > acc_t(0))) {
          return false;
        }
        lj[j] = std::sqrt(v);
      } else {
        li[j] = v / lj[j];
      }
    }
    std::fill(lj + j + 1, lj + r, acc_t(0));
  }
  return true;
}

// The ridged factor of one r×r Gram, with the larger ridge where the first attempt fails; NaN where both
// fail.
template <typename acc_t>
inline void ridged_cholesky(const acc_t* gram, int64_t ldg, int64_t r, acc_t* chol) {
  acc_t trace = 0;
  for (int64_t i = 0; i < r; ++i) {
    trace += gram[i * ldg + i];
  }
  acc_t scale = trace / static_cast<acc_t>(r);
  // A NaN scale stays NaN (NaN < floor is false), as with torch.clamp_min.
  const acc_t floor = std::sqrt(std::numeric_limits<acc_t>::min());
  scale = scale < floor ? floor : scale;
  constexpr double ridge = kRelativeRidge<acc_t>;
  if (cholesky_with_ridge(gram, ldg, r, static_cast<acc_t>(ridge) * scale, chol)) {
    return;
  }
  if (cholesky_with_ridge(gram, ldg, r, static_cast<acc_t>(ridge + kFallbackRidge<acc_t>) * scale, chol)) {
    return;
  }
  std::fill(chol, chol + r * r, std::numeric_limits<acc_t>::quiet_NaN());
}

// Solves (L·Lᵀ)·Z = B in place for the columns [0, nc) of B (r rows, row stride ldb): forward then backward
// substitution, each row update a contiguous axpy over the columns.
template <typename acc_t>
inline __attribute__((always_inline)) void cholesky_solve_block(const acc_t* chol, int64_t r, acc_t* b,
                                                                int64_t ldb, int64_t nc) {
  for (int64_t i = 0; i < r; ++i) {
    acc_t* bi = b + i * ldb;
    const acc_t* li = chol + i * r;
    for (int64_t k = 0; k < i; ++k) {
      const acc_t lik = li[k];
      const acc_t* bk = b + k * ldb;
      for (int64_t c = 0; c < nc; ++c) {
        bi[c] -= lik * bk[c];
      }
    }
    const acc_t d = li[i];
    for (int64_t c = 0; c < nc; ++c) {
      bi[c] /= d;
    }
  }
  for (int64_t i = r - 1; i >= 0; --i) {
    acc_t* bi = b + i * ldb;
    for (int64_t k = i + 1; k < r; ++k) {
      const acc_t lki = chol[k * r + i];
      const acc_t* bk = b + k * ldb;
      for (int64_t c = 0; c < nc; ++c) {
        bi[c] -= lki * bk[c];
      }
    }
    const acc_t d = chol[i * r + i];
    for (int64_t c = 0; c < nc; ++c) {
      bi[c] /= d;
    }
  }
}

// The same, compiled for AVX-512 (the loops over columns vectorise 16 floats / 8 doubles wide).
template <typename acc_t>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma"))) void cholesky_solve_block_avx512(
    const acc_t* chol, int64_t r, acc_t* b, int64_t ldb, int64_t nc) {
  cholesky_solve_block<acc_t>(chol, r, b, ldb, nc);
}

// fp32 with r ≤ 16: G vectors of 16 columns at a time (G·r ≤ 32 registers), all r rows of them in registers
// through both substitutions (the same operations in the same order as the loops above, which reload and
// store a row per update). Each substitution is a chain of r divisions, each waiting on the row before it:
// one vector at a time leaves the FMA units idle most of that chain, two interleaved fill them (perf: the
// solve was the largest part of a small layer step's r-wide work, docs/step_cost.md).
template <int G>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma"))) inline void cholesky_solve_vectors(
    const float* chol, int64_t r, float* b, int64_t ldb, const __mmask16 (&cols)[G]) {
  __m512 x[G][16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) {
#pragma GCC unroll 2
    for (int g = 0; g < G; ++g) {
      x[g][i] = i < r ? _mm512_maskz_loadu_ps(cols[g], b + i * ldb + 16 * g) : _mm512_setzero_ps();
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) {
    if (i < r) {
      const float* li = chol + i * r;
#pragma GCC unroll 16
      for (int k = 0; k < 16; ++k) {
        if (k < i) {
          const __m512 l = _mm512_set1_ps(li[k]);
#pragma GCC unroll 2
          for (int g = 0; g < G; ++g) {
            x[g][i] = _mm512_fnmadd_ps(l, x[g][k], x[g][i]);
          }
        }
      }
      const __m512 d = _mm512_set1_ps(li[i]);
#pragma GCC unroll 2
      for (int g = 0; g < G; ++g) {
        x[g][i] = _mm512_div_ps(x[g][i], d);
      }
    }
  }
#pragma GCC unroll 16
  for (int i = 15; i >= 0; --i) {
    if (i < r) {
#pragma GCC unroll 16
      for (int k = 0; k < 16; ++k) {
        if (k > i && k < r) {
          const __m512 l = _mm512_set1_ps(chol[k * r + i]);
#pragma GCC unroll 2
          for (int g = 0; g < G; ++g) {
            x[g][i] = _mm512_fnmadd_ps(l, x[g][k], x[g][i]);
          }
        }
      }
      const __m512 d = _mm512_set1_ps(chol[i * r + i]);
#pragma GCC unroll 2
      for (int g = 0; g < G; ++g) {
        x[g][i] = _mm512_div_ps(x[g][i], d);
      }
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) {
    if (i < r) {
#pragma GCC unroll 2
      for (int g = 0; g < G; ++g) {
        _mm512_mask_storeu_ps(b + i * ldb + 16 * g, cols[g], x[g][i]);
      }
    }
  }
}

template <>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma"))) inline void cholesky_solve_block_avx512<float>(
    const float* chol, int64_t r, float* b, int64_t ldb, int64_t nc) {
  if (r > 16) {
    cholesky_solve_block<float>(chol, r, b, ldb, nc);
    return;
  }
  const auto mask = [](int64_t count) {
    return count >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << count) - 1u);
  };
  int64_t c = 0;
  for (; nc - c > 16; c += 32) {
    const __mmask16 cols[2] = {__mmask16(0xFFFF), mask(nc - c - 16)};
    cholesky_solve_vectors<2>(chol, r, b + c, ldb, cols);
  }
  if (c < nc) {
    const __mmask16 cols[1] = {mask(nc - c)};
    cholesky_solve_vectors<1>(chol, r, b + c, ldb, cols);
  }
}

template <typename acc_t>
void cholesky_solve_block_generic(const acc_t* chol, int64_t r, acc_t* b, int64_t ldb, int64_t nc) {
  cholesky_solve_block<acc_t>(chol, r, b, ldb, nc);
}

}  // namespace lorsum::cpu
