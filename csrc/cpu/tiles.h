// Register-tiled AVX-512 micro-kernels shared by the CPU ops: fp32 accumulation over inputs stored in
// fp32, bf16 or fp16, converted 16 values at a time as they are loaded (never a converted copy of X or S).
//
// Two products cover every token-dimension product of the package (q = tokens, K and N = m or n, w = r):
//
//   row_dots        out[t][j]  = scale · Σ_k Y[t][k] · Z[j][k]     (q×w)   e.g. S·B̂ or X·Âᵀ
//                   (fp32 Y and w ≥ 16: in broadcast form, from Zᵀ, no horizontal sums)
//   outer_accumulate P[i][c]  += Σ_t U[t][i] · Y[t][c]              (w×N)   e.g. (S·B̂)ᵀ·X or (X·Âᵀ)ᵀ·S
//
// Y is the big operand (rows of X or S, any row stride, unit column stride); Z, U and the outputs are
// small fp32 arrays. Both read each element of Y once from memory and keep the r-wide operand in L1/L2.
//
// The kernels are compiled for AVX-512 through function attributes, not a global -march flag, so the
// extension still loads on any x86-64 CPU: callers check avx512_enabled() and otherwise take their
// generic (ATen) path. Helpers here are inline with the same target, so they inline into the kernels.

#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string_view>
#include <type_traits>
#include <vector>

#define LORSUM_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")))

namespace lorsum::cpu {

// Whether the AVX-512 kernels may run: the CPU has AVX-512 F/BW/VL/DQ, and the environment variable
// LORSUM_CPU_KERNELS is not "generic" (which forces the portable ATen path everywhere, e.g. to test it).
// The variable is read at every call, so a process can switch paths (tests do).
inline bool avx512_enabled() {
  static const bool cpu_ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (!cpu_ok) {
    return false;
  }
  const char* env = std::getenv("LORSUM_CPU_KERNELS");
  return env == nullptr || std::string_view(env) != "generic";
}

namespace avx512 {

inline __mmask16 tail_mask(int64_t count) {
  return count >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << count) - 1u);
}

// out[j] = column j of the 16×16 block whose rows are in[0..16): pairs of rows interleaved, then quadruples
// within 128-bit blocks, then across blocks. (The zero-masking forms with every lane set: see below.)
LORSUM_AVX512 inline __m512 unpack_lo64(__m512 a, __m512 b) {
  return _mm512_castpd_ps(_mm512_maskz_unpacklo_pd(0xFF, _mm512_castps_pd(a), _mm512_castps_pd(b)));
}
LORSUM_AVX512 inline __m512 unpack_hi64(__m512 a, __m512 b) {
  return _mm512_castpd_ps(_mm512_maskz_unpackhi_pd(0xFF, _mm512_castps_pd(a), _mm512_castps_pd(b)));
}
LORSUM_AVX512 inline void transpose16(const __m512* in, __m512* out) {
  constexpr __mmask16 all = 0xFFFF;
  __m512 t[16], u[16];
  for (int p = 0; p < 8; ++p) {
    t[2 * p] = _mm512_maskz_unpacklo_ps(all, in[2 * p], in[2 * p + 1]);
    t[2 * p + 1] = _mm512_maskz_unpackhi_ps(all, in[2 * p], in[2 * p + 1]);
  }
  for (int g = 0; g < 4; ++g) {
    for (int h = 0; h < 2; ++h) {
      u[4 * g + 2 * h] = unpack_lo64(t[4 * g + h], t[4 * g + 2 + h]);
      u[4 * g + 2 * h + 1] = unpack_hi64(t[4 * g + h], t[4 * g + 2 + h]);
    }
  }
  // u[4g + c]'s 128-bit block b holds rows 4g..4g+3 of column 4b + c.
  for (int c = 0; c < 4; ++c) {
    const __m512 v0 = _mm512_maskz_shuffle_f32x4(all, u[c], u[4 + c], 0x88);
    const __m512 w0 = _mm512_maskz_shuffle_f32x4(all, u[8 + c], u[12 + c], 0x88);
    const __m512 v1 = _mm512_maskz_shuffle_f32x4(all, u[c], u[4 + c], 0xDD);
    const __m512 w1 = _mm512_maskz_shuffle_f32x4(all, u[8 + c], u[12 + c], 0xDD);
    out[c] = _mm512_maskz_shuffle_f32x4(all, v0, w0, 0x88);
    out[8 + c] = _mm512_maskz_shuffle_f32x4(all, v0, w0, 0xDD);
    out[4 + c] = _mm512_maskz_shuffle_f32x4(all, v1, w1, 0x88);
    out[12 + c] = _mm512_maskz_shuffle_f32x4(all, v1, w1, 0xDD);
  }
}

// 16 values as fp32; the masked forms read only the lanes set in k (the others are 0 and never touched,
// so a row's tail may end at the edge of an allocation).
LORSUM_AVX512 inline __m512 load(const float* p) { return _mm512_loadu_ps(p); }
LORSUM_AVX512 inline __m512 load(const float* p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }

// (The zero-masking forms of the conversions cost nothing extra and, unlike the plain forms, do not make
// GCC 12 warn about the undefined pass-through operand inside its own intrinsics.)
constexpr __mmask16 kAll = 0xFFFF;

LORSUM_AVX512 inline __m512 bf16_to_fp32(__m256i v) {
  return _mm512_castsi512_ps(_mm512_maskz_slli_epi32(kAll, _mm512_maskz_cvtepu16_epi32(kAll, v), 16));  // exact
}
LORSUM_AVX512 inline __m512 load(const c10::BFloat16* p) {
  return bf16_to_fp32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
LORSUM_AVX512 inline __m512 load(const c10::BFloat16* p, __mmask16 k) {
  return bf16_to_fp32(_mm256_maskz_loadu_epi16(k, p));
}
LORSUM_AVX512 inline __m512 load(const c10::Half* p) {
  return _mm512_maskz_cvtph_ps(kAll, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
LORSUM_AVX512 inline __m512 load(const c10::Half* p, __mmask16 k) {
  return _mm512_maskz_cvtph_ps(kAll, _mm256_maskz_loadu_epi16(k, p));
}

// The sum of the 16 lanes.
LORSUM_AVX512 inline float sum16(__m512 a) {
  const __m256 h = _mm256_add_ps(_mm512_maskz_extractf32x8_ps(0xFF, a, 0), _mm512_maskz_extractf32x8_ps(0xFF, a, 1));
  const __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  const __m128 d = _mm_add_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_add_ss(d, _mm_movehdup_ps(d)));
}

// ---- column sums of squares ----------------------------------------------------------------------------

// sq[c] += Σ_{t<rows} Y[t][c]² for c < N (Y of type T, row stride ldy, unit column stride): each column's rows
// summed in registers in order, then added to sq, so a caller passing blocks of rows sums in two levels (as
// col_sq_sums does). Four 16-column accumulators at a time hide the FMA latency of the chain over t. Called on
// rows a token pass has just read (in L1/L2), to fold the K-FAC statistics into that pass.
template <typename T>
LORSUM_AVX512 inline void add_col_sq_sums(int64_t rows, int64_t N, const T* Y, int64_t ldy, float* sq) {
  int64_t c = 0;
  for (; c + 64 <= N; c += 64) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t t = 0; t < rows; ++t) {
      const T* yt = Y + t * ldy + c;
#pragma GCC unroll 4
      for (int v = 0; v < 4; ++v) {
        const __m512 y = load(yt + 16 * v);
        acc[v] = _mm512_fmadd_ps(y, y, acc[v]);
      }
    }
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) {
      _mm512_storeu_ps(sq + c + 16 * v, _mm512_add_ps(_mm512_loadu_ps(sq + c + 16 * v), acc[v]));
    }
  }
  for (; c < N; c += 16) {
    const __mmask16 m = tail_mask(N - c);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t t = 0; t < rows; ++t) {
      const __m512 y = load(Y + t * ldy + c, m);
      acc = _mm512_fmadd_ps(y, y, acc);
    }
    _mm512_mask_storeu_ps(sq + c, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, sq + c), acc));
  }
}

// ---- outer_accumulate -------------------------------------------------------------------------------

// One MR × (16·NV) tile of P, summed over tb rows in registers and then added to P (so P holds a
// two-level sum: blocks of tb rows, then the blocks). The last 16-wide vector is masked by `last`.
template <int MR, int NV, typename T>
LORSUM_AVX512 inline void outer_tile(int64_t tb, const float* u, int64_t ldu, const T* y, int64_t ldy,
                                     float* p, int64_t ldp, __mmask16 last, const T* prefetch,
                                     const float* colscale) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      acc[i][v] = _mm512_setzero_ps();
    }
  }
  for (int64_t t = 0; t < tb; ++t) {
    const T* yt = y + t * ldy;
    if (prefetch != nullptr) {
      // The same row's next slab, into L2 (prefetches never fault, even past the end of the data).
      const char* pf = reinterpret_cast<const char*>(prefetch + t * ldy);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        _mm_prefetch(pf + 64 * v * sizeof(T) / 4, _MM_HINT_T1);
      }
    }
    __m512 yv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      yv[v] = v == NV - 1 ? load(yt + 16 * v, last) : load(yt + 16 * v);
    }
    const float* ut = u + t * ldu;
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512 b = _mm512_set1_ps(ut[i]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        acc[i][v] = _mm512_fmadd_ps(b, yv[v], acc[i][v]);
      }
    }
  }
  if (colscale != nullptr) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const __m512 sv = v == NV - 1 ? _mm512_maskz_loadu_ps(last, colscale + 16 * v) : _mm512_loadu_ps(colscale + 16 * v);
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        acc[i][v] = _mm512_mul_ps(acc[i][v], sv);
      }
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      float* pi = p + i * ldp + 16 * v;
      if (v == NV - 1) {
        _mm512_mask_storeu_ps(pi, last, _mm512_add_ps(_mm512_maskz_loadu_ps(last, pi), acc[i][v]));
      } else {
        _mm512_storeu_ps(pi, _mm512_add_ps(_mm512_loadu_ps(pi), acc[i][v]));
      }
    }
  }
}

template <int NV, typename T>
LORSUM_AVX512 inline void outer_tile_rows(int mr, int64_t tb, const float* u, int64_t ldu, const T* y,
                                          int64_t ldy, float* p, int64_t ldp, __mmask16 last, const T* pf,
                                          const float* cs) {
  switch (mr) {
    case 8: outer_tile<8, NV, T>(tb, u, ldu, y, ldy, p, ldp, last, pf, cs); break;
    case 7: outer_tile<7, NV, T>(tb, u, ldu, y, ldy, p, ldp, last, pf, cs); break;
    case 6: outer_tile<6, NV, T>(tb, u, ldu, y, ldy, p, ldp, last, pf, cs); break;
    case 5: outer_tile<5, NV, T>(tb, u, ldu, y, ldy, p, ldp, last, pf, cs); break;
    case 4: outer_tile<4, NV, T>(tb, u, ldu, y, ldy, p, ldp, last, pf, cs); break;
    case 3: outer_tile<3, NV, T>(tb, u, ldu, y, ldy, p, ldp, last, pf, cs); break;
    case 2: outer_tile<2, NV, T>(tb, u, ldu, y, ldy, p, ldp, last, pf, cs); break;
    default: outer_tile<1, NV, T>(tb, u, ldu, y, ldy, p, ldp, last, pf, cs); break;
  }
}


constexpr int kOuterRows = 8;   // MR: rows of P per tile (broadcasts of U per token)
constexpr int kOuterCols = 48;  // 16·NV: columns of P per tile (vectors of Y per token)

// P[i][c] += s[c] · Σ_{t<T} U[t][i] · Y[t][c] for i < w, c < N, where s = colscale (1 when null). U is
// fp32 (row stride ldu), Y is T×N of type T (row stride ldy, unit column stride), P is fp32 (row stride
// ldp). Rows of Y are taken tb at a time; inside a block each 48-column slab of Y stays in L1 while all of
// P's row tiles use it, and the next slab is prefetched into L2. With col_sq, also col_sq[c] += Σ_t Y[t][c]²
// (in blocks of tb rows, from the slab in L1).
template <typename T>
LORSUM_AVX512 void outer_accumulate(int64_t T_rows, int64_t w, int64_t N, const float* U, int64_t ldu,
                                    const T* Y, int64_t ldy, float* P, int64_t ldp, int64_t tb,
                                    const float* colscale = nullptr, float* col_sq = nullptr) {
  for (int64_t t0 = 0; t0 < T_rows; t0 += tb) {
    const int64_t nt = std::min(tb, T_rows - t0);
    const float* u = U + t0 * ldu;
    const T* y = Y + t0 * ldy;
    for (int64_t c = 0; c < N; c += kOuterCols) {
      const int64_t nc = std::min<int64_t>(kOuterCols, N - c);
      const int nv = static_cast<int>((nc + 15) / 16);
      const __mmask16 last = tail_mask(nc - 16 * (nv - 1));
      // While the first row tile runs, prefetch the next slab (or the next block's first slab).
      const T* next = c + kOuterCols < N ? y + c + kOuterCols : (t0 + tb < T_rows ? y + tb * ldy : nullptr);
      for (int64_t i = 0; i < w; i += kOuterRows) {
        const int mr = static_cast<int>(std::min<int64_t>(kOuterRows, w - i));
        float* p = P + i * ldp + c;
        const T* pf = i == 0 ? next : nullptr;
        const float* cs = colscale == nullptr ? nullptr : colscale + c;
        if (nv == 3) {
          outer_tile_rows<3, T>(mr, nt, u + i, ldu, y + c, ldy, p, ldp, last, pf, cs);
        } else if (nv == 2) {
          outer_tile_rows<2, T>(mr, nt, u + i, ldu, y + c, ldy, p, ldp, last, pf, cs);
        } else {
          outer_tile_rows<1, T>(mr, nt, u + i, ldu, y + c, ldy, p, ldp, last, pf, cs);
        }
      }
      if (col_sq != nullptr) {  // the slab is still in L1
        add_col_sq_sums<T>(nt, nc, y + c, ldy, col_sq + c);
      }
    }
  }
}

// ---- row_dots, broadcast form (w ≥ kBroadcastMinWidth) --------------------------------------------------

// From this width of the r-wide operand on, row_dots of fp32 rows runs in broadcast form: each Y[t][k]
// broadcast against the k-th row of Zᵀ (w values, one or two vectors), so every output lane is a chain of
// FMAs over k and no horizontal sums are needed. (The dot form below reduces 16 lanes per output: at K = 576
// it took 1.1–1.5× the broadcast form's time, tools/row_dots_forms.py; below 16 columns, where a vector of w
// values is mostly empty, it is the faster one.)
constexpr int64_t kBroadcastMinWidth = 16;
// Columns of Y per span of the broadcast form: each output sums its spans in registers, then adds them in
// order (a two-level sum, as outer_accumulate's token blocks). (bf16 and fp16 rows stay in the dot form,
// which converts 16 values per load; a scalar broadcast of them costs a conversion per value.)
constexpr int64_t kBroadcastSpan = 256;
constexpr int kBroadcastRows = 8;  // rows per block: 8 + 8 accumulators of one vector, or 2 tiles of 4 × 2

// out[a][16·j + l] = scale · Σ_k y[a][k] · zt[k][16·j + l] for a < MT, j < NJ (the last vector masked by
// `last`): y fp32 with row stride ldy, zt fp32 K×w with row stride ldz.
template <int MT, int NJ>
LORSUM_AVX512 inline void broadcast_tile(int64_t k0, int64_t k1, bool first, const float* y, int64_t ldy,
                                         const float* zt, int64_t ldz, __m512 (&total)[MT][NJ], __mmask16 last) {
  __m512 acc[MT][NJ];
#pragma GCC unroll 8
  for (int a = 0; a < MT; ++a) {
#pragma GCC unroll 2
    for (int j = 0; j < NJ; ++j) {
      acc[a][j] = _mm512_setzero_ps();
    }
  }
  for (int64_t k = k0; k < k1; ++k) {
    __m512 zv[NJ];
#pragma GCC unroll 2
    for (int j = 0; j < NJ; ++j) {
      const float* z = zt + k * ldz + 16 * j;
      zv[j] = j == NJ - 1 ? _mm512_maskz_loadu_ps(last, z) : _mm512_loadu_ps(z);
    }
#pragma GCC unroll 8
    for (int a = 0; a < MT; ++a) {
      const __m512 b = _mm512_set1_ps(y[a * ldy + (k - k0)]);
#pragma GCC unroll 2
      for (int j = 0; j < NJ; ++j) {
        acc[a][j] = _mm512_fmadd_ps(b, zv[j], acc[a][j]);
      }
    }
  }
#pragma GCC unroll 8
  for (int a = 0; a < MT; ++a) {
#pragma GCC unroll 2
    for (int j = 0; j < NJ; ++j) {
      total[a][j] = first ? acc[a][j] : _mm512_add_ps(total[a][j], acc[a][j]);
    }
  }
}

// One MT-row tile of out over the NJ vectors of columns from j0 of the broadcast form, by spans of K.
template <int MT, int NJ>
LORSUM_AVX512 inline void broadcast_rows(int64_t K, const float* y, int64_t ldy, const float* zt, int64_t ldz,
                                         float* out, int64_t ldo, float scale, __mmask16 last) {
  __m512 total[MT][NJ];
  for (int64_t k0 = 0; k0 < K; k0 += kBroadcastSpan) {
    broadcast_tile<MT, NJ>(k0, std::min(K, k0 + kBroadcastSpan), k0 == 0, y + k0, ldy, zt, ldz, total, last);
  }
  const __m512 s = _mm512_set1_ps(scale);
#pragma GCC unroll 8
  for (int a = 0; a < MT; ++a) {
#pragma GCC unroll 2
    for (int j = 0; j < NJ; ++j) {
      float* o = out + a * ldo + 16 * j;
      const __m512 v = _mm512_mul_ps(s, total[a][j]);
      if (j == NJ - 1) {
        _mm512_mask_storeu_ps(o, last, v);
      } else {
        _mm512_storeu_ps(o, v);
      }
    }
  }
}

template <int NJ>
LORSUM_AVX512 inline void broadcast_rows_n(int mt, int64_t K, const float* y, int64_t ldy, const float* zt,
                                           int64_t ldz, float* out, int64_t ldo, float scale, __mmask16 last) {
  switch (mt) {
    case 8: broadcast_rows<8, NJ>(K, y, ldy, zt, ldz, out, ldo, scale, last); break;
    case 7: broadcast_rows<7, NJ>(K, y, ldy, zt, ldz, out, ldo, scale, last); break;
    case 6: broadcast_rows<6, NJ>(K, y, ldy, zt, ldz, out, ldo, scale, last); break;
    case 5: broadcast_rows<5, NJ>(K, y, ldy, zt, ldz, out, ldo, scale, last); break;
    case 4: broadcast_rows<4, NJ>(K, y, ldy, zt, ldz, out, ldo, scale, last); break;
    case 3: broadcast_rows<3, NJ>(K, y, ldy, zt, ldz, out, ldo, scale, last); break;
    case 2: broadcast_rows<2, NJ>(K, y, ldy, zt, ldz, out, ldo, scale, last); break;
    default: broadcast_rows<1, NJ>(K, y, ldy, zt, ldz, out, ldo, scale, last); break;
  }
}

// row_dots in broadcast form, fp32 Y: zt is Zᵀ (K×w fp32, row stride ldz). Rows of Y in blocks of 8, w in
// chunks of 32 columns (a chunk of two vectors in tiles of 4 rows); with col_sq the block's squares after its
// dot products (its rows still in L1/L2).
LORSUM_AVX512 inline void row_dots_broadcast(int64_t rows, int64_t w, int64_t K, const float* Y, int64_t ldy,
                                             const float* zt, int64_t ldz, float* out, int64_t ldo, float scale,
                                             float* col_sq) {
  for (int64_t t = 0; t < rows; t += kBroadcastRows) {
    const int mt = static_cast<int>(std::min<int64_t>(kBroadcastRows, rows - t));
    const float* y = Y + t * ldy;
    for (int64_t j0 = 0; j0 < w; j0 += 32) {
      const int64_t nw = std::min<int64_t>(32, w - j0);
      const __mmask16 last = tail_mask(nw > 16 ? nw - 16 : nw);
      float* o = out + t * ldo + j0;
      if (nw > 16) {  // two vectors: the rows in tiles of four (8 + 8 accumulators)
        for (int a = 0; a < mt; a += 4) {
          broadcast_rows_n<2>(std::min(4, mt - a), K, y + a * ldy, ldy, zt + j0, ldz, o + a * ldo, ldo, scale, last);
        }
      } else {
        broadcast_rows_n<1>(mt, K, y, ldy, zt + j0, ldz, o, ldo, scale, last);
      }
    }
    if (col_sq != nullptr) {
      add_col_sq_sums<float>(mt, K, y, ldy, col_sq);
    }
  }
}

// ---- row_dots, dot form (w < kBroadcastMinWidth) ----------------------------------------------------------

// One MT × NJ block of dot products over the columns [k0, k1) of Y and Z, 16 lanes of partial sums per
// dot product. The lanes start at 0 (first) or from `partial`; they are reduced into out (last) or
// saved back to `partial` for the next span of columns.
template <int MT, int NJ, typename T>
LORSUM_AVX512 inline void dot_tile(int64_t k0, int64_t k1, bool first, bool last, const T* y, int64_t ldy,
                                   const float* z, int64_t ldz, float* partial, float* out, int64_t ldo,
                                   float scale, const T* prefetch, int pf_rows) {
  __m512 acc[MT][NJ];
#pragma GCC unroll 4
  for (int a = 0; a < MT; ++a) {
#pragma GCC unroll 4
    for (int j = 0; j < NJ; ++j) {
      acc[a][j] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(partial + 16 * (a * NJ + j));
    }
  }
  int64_t k = k0;
  for (; k + 16 <= k1; k += 16) {
    for (int a = 0; a < pf_rows; ++a) {
      _mm_prefetch(reinterpret_cast<const char*>(prefetch + a * ldy + k), _MM_HINT_T1);
    }
    __m512 yv[MT];
    __m512 zv[NJ];
#pragma GCC unroll 4
    for (int a = 0; a < MT; ++a) {
      yv[a] = load(y + a * ldy + k);
    }
#pragma GCC unroll 4
    for (int j = 0; j < NJ; ++j) {
      zv[j] = _mm512_loadu_ps(z + j * ldz + k);
    }
#pragma GCC unroll 4
    for (int a = 0; a < MT; ++a) {
#pragma GCC unroll 4
      for (int j = 0; j < NJ; ++j) {
        acc[a][j] = _mm512_fmadd_ps(yv[a], zv[j], acc[a][j]);
      }
    }
  }
  if (k < k1) {
    const __mmask16 m = tail_mask(k1 - k);
    __m512 yv[MT];
    __m512 zv[NJ];
#pragma GCC unroll 4
    for (int a = 0; a < MT; ++a) {
      yv[a] = load(y + a * ldy + k, m);
    }
#pragma GCC unroll 4
    for (int j = 0; j < NJ; ++j) {
      zv[j] = _mm512_maskz_loadu_ps(m, z + j * ldz + k);
    }
#pragma GCC unroll 4
    for (int a = 0; a < MT; ++a) {
#pragma GCC unroll 4
      for (int j = 0; j < NJ; ++j) {
        acc[a][j] = _mm512_fmadd_ps(yv[a], zv[j], acc[a][j]);
      }
    }
  }
#pragma GCC unroll 4
  for (int a = 0; a < MT; ++a) {
#pragma GCC unroll 4
    for (int j = 0; j < NJ; ++j) {
      if (last) {
        out[a * ldo + j] = scale * sum16(acc[a][j]);
      } else {
        _mm512_storeu_ps(partial + 16 * (a * NJ + j), acc[a][j]);
      }
    }
  }
}

template <int MT, typename T>
LORSUM_AVX512 inline void dot_tile_cols(int nj, int64_t k0, int64_t k1, bool first, bool last, const T* y,
                                        int64_t ldy, const float* z, int64_t ldz, float* partial, float* out,
                                        int64_t ldo, float scale, const T* pf, int pf_rows) {
  switch (nj) {
    case 4: dot_tile<MT, 4, T>(k0, k1, first, last, y, ldy, z, ldz, partial, out, ldo, scale, pf, pf_rows); break;
    case 3: dot_tile<MT, 3, T>(k0, k1, first, last, y, ldy, z, ldz, partial, out, ldo, scale, pf, pf_rows); break;
    case 2: dot_tile<MT, 2, T>(k0, k1, first, last, y, ldy, z, ldz, partial, out, ldo, scale, pf, pf_rows); break;
    default: dot_tile<MT, 1, T>(k0, k1, first, last, y, ldy, z, ldz, partial, out, ldo, scale, pf, pf_rows); break;
  }
}

constexpr int kDotRows = 4;        // MT: rows of Y per tile
constexpr int kDotCols = 4;        // NJ: rows of Z per tile
constexpr int64_t kDotSpan = 512;  // columns per pass: a tile's 4 + 4 rows (16 KiB in fp32) stay in L1

// row_dots in dot form (see row_dots): four rows of Y at a time meet every row of Z, kDotSpan columns at a
// time, while the next four rows are prefetched into L2; each dot product sums 16 interleaved lanes, reduced
// at the end.
template <typename T>
LORSUM_AVX512 void row_dots_dot(int64_t rows, int64_t w, int64_t K, const T* Y, int64_t ldy, const float* Z,
                                int64_t ldz, float* out, int64_t ldo, float scale, float* col_sq) {
  const int64_t col_tiles = (w + kDotCols - 1) / kDotCols;
  std::vector<float> partial(K > kDotSpan ? col_tiles * kDotRows * kDotCols * 16 : 0);
  for (int64_t t = 0; t < rows; t += kDotRows) {
    const int mt = static_cast<int>(std::min<int64_t>(kDotRows, rows - t));
    const T* y = Y + t * ldy;
    // The next four rows (past the block's end too: a prefetch never faults, and the same thread usually
    // takes the next block).
    const T* next = y + kDotRows * ldy;
    for (int64_t k0 = 0; k0 < K; k0 += kDotSpan) {
      const int64_t k1 = std::min(K, k0 + kDotSpan);
      const bool first = k0 == 0, last = k1 == K;
      for (int64_t jt = 0; jt < col_tiles; ++jt) {
        const int64_t j = jt * kDotCols;
        const int nj = static_cast<int>(std::min<int64_t>(kDotCols, w - j));
        const float* z = Z + j * ldz;
        float* o = out + t * ldo + j;
        float* part = partial.data() + jt * kDotRows * kDotCols * 16;
        // Column tile jt prefetches its share of the next rows, so the requests spread over the block.
        const int64_t pf0 = jt * kDotRows / col_tiles;
        const int64_t pf1 = (jt + 1) * kDotRows / col_tiles;
        const T* pf = next + pf0 * ldy;
        const int pf_rows = static_cast<int>(pf1 - pf0);
        switch (mt) {
          case 4: dot_tile_cols<4, T>(nj, k0, k1, first, last, y, ldy, z, ldz, part, o, ldo, scale, pf, pf_rows); break;
          case 3: dot_tile_cols<3, T>(nj, k0, k1, first, last, y, ldy, z, ldz, part, o, ldo, scale, pf, pf_rows); break;
          case 2: dot_tile_cols<2, T>(nj, k0, k1, first, last, y, ldy, z, ldz, part, o, ldo, scale, pf, pf_rows); break;
          default: dot_tile_cols<1, T>(nj, k0, k1, first, last, y, ldy, z, ldz, part, o, ldo, scale, pf, pf_rows); break;
        }
      }
    }
    if (col_sq != nullptr) {  // the four rows just read, still in L1/L2 however wide (K·16 bytes)
      add_col_sq_sums<T>(mt, K, y, ldy, col_sq);
    }
  }
}

// out[t][j] = scale · Σ_{k<K} Y[t][k] · Z[j][k] for t < rows, j < w. Y is of type T (row stride ldy, unit
// column stride), Z is fp32 (row stride ldz), out is fp32 (row stride ldo). For fp32 Y and w ≥
// kBroadcastMinWidth in broadcast form, from zt = Zᵀ (K×w, row stride ldzt); otherwise (zt may then be null)
// in dot form. Either way each output's sum runs in an order set by K alone (not by w, the row block or the
// thread). With col_sq, also col_sq[k] += Σ_t Y[t][k]² (by the blocks of rows each form reads, right after
// their dot products).
template <typename T>
LORSUM_AVX512 void row_dots(int64_t rows, int64_t w, int64_t K, const T* Y, int64_t ldy, const float* Z,
                            int64_t ldz, const float* zt, int64_t ldzt, float* out, int64_t ldo, float scale,
                            float* col_sq = nullptr) {
  if constexpr (std::is_same_v<T, float>) {
    if (w >= kBroadcastMinWidth) {
      row_dots_broadcast(rows, w, K, Y, ldy, zt, ldzt, out, ldo, scale, col_sq);
      return;
    }
  }
  row_dots_dot<T>(rows, w, K, Y, ldy, Z, ldz, out, ldo, scale, col_sq);
}

// ---- conversion ---------------------------------------------------------------------------------------

// dst[i] = float(src[i]) for i < n.
template <typename T>
LORSUM_AVX512 inline void to_fp32(const T* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    _mm512_storeu_ps(dst + i, load(src + i));
  }
  if (i < n) {
    const __mmask16 m = tail_mask(n - i);
    _mm512_mask_storeu_ps(dst + i, m, load(src + i, m));
  }
}

}  // namespace avx512
}  // namespace lorsum::cpu
