// CPU implementation of AdaPreLoRA's surrogate statistics (spec/adaprelora.md §3.5 (b)): the row and column
// energies of the rank-R matrix B·E + F·A, never formed.
//
// Reference: lorsum_kernels.reference.tangent_energies. Schema: csrc/lorsum.cpp. For every layer of the
// batch, with Z = [B F] (m×R) and W = [E; A] (R×n), R = r_B + r_F (the reference's concatenations allow
// the two ranks to differ, and so does this kernel):
//
//   rows_i = z_iᵀ (W·Wᵀ) z_i,   cols_j = w_jᵀ (Zᵀ·Z) w_j,   each clamped at 0 (a NaN stays NaN)
//
// Both are one computation on R×N matrices ("sides"): side 0 is V = Zᵀ (N = m, energies = rows), side 1 is
// V = W (N = n, energies = cols); a side's energies are the quadratic forms of its columns in the other
// side's Gram M = V·Vᵀ. Three phases, each parallel over independent tasks, run on one group of layers
// (one per thread) after another:
//
//   1. (layer, side, chunk of kChunk columns)  the chunk staged into the side's panel (below), and its
//                                              share of M_s, lower triangle only
//   2. (layer)                                 the shares summed in chunk order, stored as the upper-
//                                              triangular H_s (diagonal of M_s, twice its strict upper
//                                              part): vᵀ·M_s·v = vᵀ·H_s·v at half the multiply-adds
//   3. (layer, side, chunk)                    the chunk's energies vᵀ·H_other·v, from the staged panel
//
// A side's panel holds V row by row in the arithmetic dtype (V[k·ld + c], rows padded to a multiple of 4
// and columns to the lane count with zeros), so that both products run across columns: one vector of
// columns per multiply-add, outputs written as whole vectors, no per-column horizontal sum. The panel is
// staged once (phase 1) and read again in phase 3, so the inputs are read once, through their strides
// (0 included), converted as they are loaded: a factor whose rows of V are contiguous (E, A) is copied
// row by row; one whose columns are (B, F) is loaded a few columns at a time and transposed in registers.
// No m×n or converted copy of an input is formed (unless the four inputs mix dtypes); the scratch is the
// group's panels (O((m+n)·R) numbers per layer) and one R×R partial per chunk. About R²·(m+n)
// multiply-adds per layer, half the reference's four products.
//
// Arithmetic in fp32, fp64 when an input is fp64; results in the inputs' promoted dtype, as the reference
// returns them. Every sum runs in an order fixed by the shapes, so results do not depend on the number of
// threads. The micro-kernels are compiled once for AVX-512 and once for any x86-64
// (LORSUM_CPU_KERNELS=generic forces the latter, see tiles.h).

#include "common.h"
#include "tiles.h"
#include "vec_ops.h"

#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <tuple>
#include <vector>

namespace lorsum {
namespace {


// Columns per task, a multiple of both lane counts: a chunk's 4×4 Gram tile reads 8 panel rows of kChunk
// numbers (16 KiB in fp32, L1), and the horizontal sums of a tile's 16 accumulators are amortised over
// kChunk/lanes vector multiply-adds each.
constexpr int64_t kChunk = 512;
// Register tiles: the Gram takes 4×4 pairs of rows (16 accumulators, 8 loads per 16 multiply-adds); the
// quadratic forms take 4 columns j of H times kQuadVecs vectors of columns (16 accumulators, 4 + 4 loads
// per 16 multiply-adds), with kQuadVecs running dot products.
constexpr int kTile = 4;
constexpr int kQuadVecs = 4;

int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// ---- vector operations: vec_ops.h, plus the masked loads, shuffles and transposes of this kernel -----------

template <typename acc_t>
struct Avx512Ops;

template <>
struct Avx512Ops<float> : cpu::vec::Avx512Base<float> {
  // Every lane: the zero-masking forms of the shuffles and max cost nothing extra and keep GCC 12 from
  // warning about the undefined pass-through operand of the plain forms.
  static constexpr __mmask16 kAll = 0xFFFF;
  // p[0..n) of an fp32, bf16 or fp16 input as fp32, the lanes from n on 0 (n ≤ 16; nothing past p + n is read).
  template <typename T>
  LORSUM_AVX512 static inline V load_n(const T* p, int64_t n) {
    return n >= kLanes ? cpu::avx512::load(p) : cpu::avx512::load(p, cpu::avx512::tail_mask(n));
  }
  // max(0, v) with a NaN kept (MAXPS returns its second operand when either is NaN).
  LORSUM_AVX512 static inline V clamp0(V v) { return _mm512_maskz_max_ps(kAll, _mm512_setzero_ps(), v); }

  // Shuffles of the two trees below: interleaved 32-bit pairs, 64-bit pairs, and 128-bit blocks
  // (blocks<0x88>: blocks 0, 2 of a then of b; blocks<0xDD>: blocks 1, 3).
  LORSUM_AVX512 static inline V lo32(V a, V b) { return _mm512_maskz_unpacklo_ps(kAll, a, b); }
  LORSUM_AVX512 static inline V hi32(V a, V b) { return _mm512_maskz_unpackhi_ps(kAll, a, b); }
  LORSUM_AVX512 static inline V lo64(V a, V b) {
    return _mm512_castpd_ps(_mm512_maskz_unpacklo_pd(0xFF, _mm512_castps_pd(a), _mm512_castps_pd(b)));
  }
  LORSUM_AVX512 static inline V hi64(V a, V b) {
    return _mm512_castpd_ps(_mm512_maskz_unpackhi_pd(0xFF, _mm512_castps_pd(a), _mm512_castps_pd(b)));
  }
  template <int imm>
  LORSUM_AVX512 static inline V blocks(V a, V b) { return _mm512_maskz_shuffle_f32x4(kAll, a, b, imm); }
  // Sums of adjacent 128-bit blocks: (a0 + a1, a2 + a3, b0 + b1, b2 + b3).
  LORSUM_AVX512 static inline V fold(V a, V b) { return _mm512_add_ps(blocks<0x88>(a, b), blocks<0xDD>(a, b)); }

  // dst[j·ldd + i] = r[i][j] for i < 16 and j < rows: a 16×16 transpose in registers (tiles.h), of which
  // the first `rows` rows are stored.
  LORSUM_AVX512 static inline void transpose(const V* r, float* dst, int64_t ldd, int64_t rows) {
    V out[16];
    cpu::avx512::transpose16(r, out);
    for (int64_t j = 0; j < rows; ++j) _mm512_storeu_ps(dst + j * ldd, out[j]);
  }
  // out[p] = Σ_lanes a[p] for the 16 accumulators of a tile, by a transposing tree (45 shuffles and adds
  // instead of 16 separate reductions): pairs, then quadruples within 128-bit blocks, then across blocks.
  LORSUM_AVX512 static inline void sum_lanes16(const V* a, float* out) {
    V x[8], y[4];
    for (int p = 0; p < 8; ++p) x[p] = _mm512_add_ps(lo32(a[2 * p], a[2 * p + 1]), hi32(a[2 * p], a[2 * p + 1]));
    for (int p = 0; p < 4; ++p) y[p] = _mm512_add_ps(lo64(x[2 * p], x[2 * p + 1]), hi64(x[2 * p], x[2 * p + 1]));
    // y[p]'s 128-bit block b holds the block-b sums of a[4p..4p+3].
    _mm512_storeu_ps(out, fold(fold(y[0], y[1]), fold(y[2], y[3])));
  }
};

template <>
struct Avx512Ops<double> : cpu::vec::Avx512Base<double> {
  static constexpr __mmask8 kAll = 0xFF;
  LORSUM_AVX512 static inline V load_n(const double* p, int64_t n) {
    return _mm512_maskz_loadu_pd(n >= kLanes ? kAll : static_cast<__mmask8>((1u << n) - 1u), p);
  }
  LORSUM_AVX512 static inline V clamp0(V v) { return _mm512_maskz_max_pd(kAll, _mm512_setzero_pd(), v); }

  LORSUM_AVX512 static inline V lo64(V a, V b) { return _mm512_maskz_unpacklo_pd(kAll, a, b); }
  LORSUM_AVX512 static inline V hi64(V a, V b) { return _mm512_maskz_unpackhi_pd(kAll, a, b); }
  template <int imm>
  LORSUM_AVX512 static inline V blocks(V a, V b) { return _mm512_maskz_shuffle_f64x2(kAll, a, b, imm); }
  LORSUM_AVX512 static inline V fold(V a, V b) { return _mm512_add_pd(blocks<0x88>(a, b), blocks<0xDD>(a, b)); }

  // The same transpose on 8×8 blocks.
  LORSUM_AVX512 static inline void transpose(const V* r, double* dst, int64_t ldd, int64_t rows) {
    V t[8], out[8];
    for (int p = 0; p < 4; ++p) {
      t[2 * p] = lo64(r[2 * p], r[2 * p + 1]);
      t[2 * p + 1] = hi64(r[2 * p], r[2 * p + 1]);
    }
    // t[2g + c]'s 128-bit block b holds rows 2g, 2g+1 of column 2b + c.
    for (int c = 0; c < 2; ++c) {
      const V v0 = blocks<0x88>(t[c], t[2 + c]), w0 = blocks<0x88>(t[4 + c], t[6 + c]);
      const V v1 = blocks<0xDD>(t[c], t[2 + c]), w1 = blocks<0xDD>(t[4 + c], t[6 + c]);
      out[c] = blocks<0x88>(v0, w0);
      out[4 + c] = blocks<0xDD>(v0, w0);
      out[2 + c] = blocks<0x88>(v1, w1);
      out[6 + c] = blocks<0xDD>(v1, w1);
    }
    for (int64_t j = 0; j < rows; ++j) _mm512_storeu_pd(dst + j * ldd, out[j]);
  }
  // The same tree on 8 lanes, for each half of the 16 accumulators.
  LORSUM_AVX512 static inline void sum_lanes16(const V* a, double* out) {
    for (int half = 0; half < 2; ++half) {
      const V* h = a + 8 * half;
      V x[4];
      for (int p = 0; p < 4; ++p) x[p] = _mm512_add_pd(lo64(h[2 * p], h[2 * p + 1]), hi64(h[2 * p], h[2 * p + 1]));
      // x[p]'s 128-bit block b holds the block-b sums of h[2p], h[2p+1].
      _mm512_storeu_pd(out + 8 * half, fold(fold(x[0], x[1]), fold(x[2], x[3])));
    }
  }
};

template <typename acc_t>
struct GenericOps : cpu::vec::GenericBase<acc_t> {
  using Base = cpu::vec::GenericBase<acc_t>;
  using typename Base::V;
  using Base::kLanes;
  template <typename T>
  static LORSUM_ALWAYS_INLINE V load_n(const T* p, int64_t n) {
    V v;
    for (int l = 0; l < kLanes; ++l) v.x[l] = l < n ? static_cast<acc_t>(p[l]) : acc_t(0);
    return v;
  }
  static LORSUM_ALWAYS_INLINE V clamp0(V v) {
    for (int l = 0; l < kLanes; ++l) v.x[l] = acc_t(0) > v.x[l] ? acc_t(0) : v.x[l];
    return v;
  }
  static LORSUM_ALWAYS_INLINE void transpose(const V* r, acc_t* dst, int64_t ldd, int64_t rows) {
    for (int64_t j = 0; j < rows; ++j) {
      for (int i = 0; i < kLanes; ++i) dst[j * ldd + i] = r[i].x[j];
    }
  }
  static LORSUM_ALWAYS_INLINE void sum_lanes16(const V* a, acc_t* out) {
    for (int p = 0; p < 16; ++p) {
      acc_t s = a[p].x[0];
      for (int l = 1; l < kLanes; ++l) s += a[p].x[l];
      out[p] = s;
    }
  }
};

// ---- the problem --------------------------------------------------------------------------------------

// One factor as an r×N block of rows of a side: element (k, c) of layer l at p[l·bs + k·ks + c·cs].
template <typename T>
struct Piece {
  const T* p;
  int64_t bs, ks, cs, r;
};

template <typename T, typename acc_t>
struct Side {
  Piece<T> top, bottom;  // rows [0, r_B) and [r_B, R) of V: Bᵀ and Fᵀ (side 0), E and A (side 1)
  int64_t N, ld, chunks;  // ld: N rounded up to the lane count (the panel's row stride)
  acc_t* out;             // (L, N) contiguous
};

template <typename T, typename acc_t>
struct Problem {
  int64_t L, R, R4;  // R4: R rounded up to a multiple of kTile
  Side<T, acc_t> side[2];
  int64_t max_chunks;
  int64_t l0;     // first layer of the group the scratch below belongs to
  acc_t* panel;   // per layer of the group: side 0's R4×ld panel, then side 1's
  acc_t* part;    // (group, 2, max_chunks, R4, R4): per-chunk shares of M_s (lower 4×4 tiles)
  acc_t* H;       // (group, 2, R4, R4): the upper-triangular forms of M_s

  acc_t* panel_at(int64_t l, int s) const {
    return panel + (l - l0) * R4 * (side[0].ld + side[1].ld) + (s == 0 ? 0 : R4 * side[0].ld);
  }
  acc_t* part_at(int64_t l, int s, int64_t c) const {
    return part + (((l - l0) * 2 + s) * max_chunks + c) * R4 * R4;
  }
  acc_t* H_at(int64_t l, int s) const { return H + ((l - l0) * 2 + s) * R4 * R4; }

  // The (layer, side, chunk) of a chunk task of the group: all chunks of side 0 of a layer, then side 1's.
  void decode(int64_t task, int64_t& l, int& s, int64_t& c) const {
    const int64_t per_layer = side[0].chunks + side[1].chunks;
    l = l0 + task / per_layer;
    c = task % per_layer;
    s = c < side[0].chunks ? 0 : 1;
    if (s == 1) c -= side[0].chunks;
  }
};

// The templates below are always inlined into the *_avx512 / *_generic entry points, so an AVX-512 vector
// never crosses a call boundary; GCC still warns about the ABI of the uninlined template bodies.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

// ---- staging -------------------------------------------------------------------------------------------

// Rows [0, r) of dst (row stride ld), columns [0, ncp), from the piece's columns [c0, c0 + nc) of layer l:
// dst[k·ld + t] = piece(k, c0 + t), and 0 for nc ≤ t < ncp (ncp a multiple of the lane count).
template <typename Ops, typename T, typename acc_t>
LORSUM_ALWAYS_INLINE void stage_piece(const Piece<T>& pc, int64_t l, int64_t c0, int64_t nc, int64_t ncp, acc_t* dst,
                                      int64_t ld) {
  using V = typename Ops::V;
  constexpr int64_t W = Ops::kLanes;
  const int64_t r = pc.r;
  if (r == 0) {
    return;  // an empty factor may have no storage at all
  }
  const T* src = pc.p + l * pc.bs + c0 * pc.cs;
  if (pc.cs == 1) {  // rows of V contiguous (E, A): converting copies, the padding loaded as zeros
    for (int64_t k = 0; k < r; ++k) {
      const T* s = src + k * pc.ks;
      acc_t* d = dst + k * ld;
      for (int64_t t = 0; t < ncp; t += W) Ops::store(d + t, Ops::load_n(s + t, std::max<int64_t>(0, nc - t)));
    }
    return;
  }
  // Columns of V: W at a time, as W vectors of up to W rows of V each (zero beyond r and nc), transposed in
  // registers into W-wide pieces of up to W rows of V. Contiguous columns (B, F) are loaded as vectors.
  V cols[W];
  alignas(64) acc_t buf[W];
  for (int64_t t0 = 0; t0 < ncp; t0 += W) {
    const int64_t valid = std::max<int64_t>(0, std::min(W, nc - t0));
    for (int64_t k0 = 0; k0 < r; k0 += W) {
      const int64_t kn = std::min(W, r - k0);
      for (int64_t t = 0; t < W; ++t) {
        const T* s = src + (t0 + t) * pc.cs + k0 * pc.ks;
        if (t >= valid) {
          cols[t] = Ops::zero();
        } else if (pc.ks == 1) {
          cols[t] = Ops::load_n(s, kn);
        } else {
          for (int64_t k = 0; k < kn; ++k) buf[k] = static_cast<acc_t>(s[k * pc.ks]);
          cols[t] = Ops::load_n(buf, kn);
        }
      }
      Ops::transpose(cols, dst + k0 * ld + t0, ld, kn);
    }
  }
}

// ---- phase 1: stage a chunk, its share of the Gram --------------------------------------------------------

// part[(i0 + a)·R4 + j0 + b] = Σ_{t < ncp} V[i0 + a][t] · V[j0 + b][t] for a, b < 4 (Vi, Vj: rows i0, j0).
template <typename Ops, typename acc_t>
LORSUM_ALWAYS_INLINE void gram_tile(const acc_t* Vi, const acc_t* Vj, int64_t ld, int64_t ncp, acc_t* out,
                                    int64_t ldo) {
  using V = typename Ops::V;
  constexpr int W = Ops::kLanes;
  V acc[kTile * kTile];
#pragma GCC unroll 16
  for (int e = 0; e < kTile * kTile; ++e) acc[e] = Ops::zero();
  for (int64_t t = 0; t < ncp; t += W) {
    V a[kTile], b[kTile];
#pragma GCC unroll 4
    for (int i = 0; i < kTile; ++i) a[i] = Ops::load(Vi + i * ld + t);
#pragma GCC unroll 4
    for (int j = 0; j < kTile; ++j) b[j] = Ops::load(Vj + j * ld + t);
#pragma GCC unroll 4
    for (int i = 0; i < kTile; ++i) {
#pragma GCC unroll 4
      for (int j = 0; j < kTile; ++j) acc[i * kTile + j] = Ops::fma(a[i], b[j], acc[i * kTile + j]);
    }
  }
  alignas(64) acc_t sums[kTile * kTile];
  Ops::sum_lanes16(acc, sums);
  for (int i = 0; i < kTile; ++i) std::memcpy(out + i * ldo, sums + i * kTile, kTile * sizeof(acc_t));
}

template <typename Ops, typename T, typename acc_t>
LORSUM_ALWAYS_INLINE void gram_chunk(const Problem<T, acc_t>& pb, int64_t task) {
  int64_t l, chunk;
  int s;
  pb.decode(task, l, s, chunk);
  const Side<T, acc_t>& sd = pb.side[s];
  const int64_t R = pb.R, R4 = pb.R4, ld = sd.ld;
  const int64_t c0 = chunk * kChunk, nc = std::min(kChunk, sd.N - c0);
  const int64_t ncp = std::min(kChunk, ld - c0);  // through the padding of the last chunk
  acc_t* V = pb.panel_at(l, s) + c0;
  stage_piece<Ops>(sd.top, l, c0, nc, ncp, V, ld);
  stage_piece<Ops>(sd.bottom, l, c0, nc, ncp, V + sd.top.r * ld, ld);
  for (int64_t k = R; k < R4; ++k) std::fill(V + k * ld, V + k * ld + ncp, acc_t(0));
  acc_t* part = pb.part_at(l, s, chunk);
  for (int64_t i0 = 0; i0 < R4; i0 += kTile) {
    for (int64_t j0 = 0; j0 <= i0; j0 += kTile) {
      gram_tile<Ops>(V + i0 * ld, V + j0 * ld, ld, ncp, part + i0 * R4 + j0, R4);
    }
  }
}

// ---- phase 3: the energies of a chunk ---------------------------------------------------------------------

// out[t] = max(0, Σ_j V[j][t] · Σ_{k ≤ j} H[k][j]·V[k][t]) for NV vectors of columns from V (row stride ld);
// H is R4×R4 upper triangular, so block j0 of 4 columns of H needs only its first j0 + 4 rows.
template <typename Ops, int NV, typename acc_t>
LORSUM_ALWAYS_INLINE void quad_vectors(int64_t R4, const acc_t* V, int64_t ld, const acc_t* H,
                                       typename Ops::V* dot) {
  using V_ = typename Ops::V;
  constexpr int W = Ops::kLanes;
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) dot[v] = Ops::zero();
  for (int64_t j0 = 0; j0 < R4; j0 += kTile) {
    V_ acc[kTile][NV];
#pragma GCC unroll 4
    for (int j = 0; j < kTile; ++j) {
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[j][v] = Ops::zero();
    }
    for (int64_t k = 0; k < j0 + kTile; ++k) {
      V_ x[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) x[v] = Ops::load(V + k * ld + v * W);
      const acc_t* h = H + k * R4 + j0;
#pragma GCC unroll 4
      for (int j = 0; j < kTile; ++j) {
        const V_ b = Ops::set1(h[j]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[j][v] = Ops::fma(b, x[v], acc[j][v]);
      }
    }
#pragma GCC unroll 4
    for (int j = 0; j < kTile; ++j) {
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) dot[v] = Ops::fma(acc[j][v], Ops::load(V + (j0 + j) * ld + v * W), dot[v]);
    }
  }
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) dot[v] = Ops::clamp0(dot[v]);
}

template <typename Ops, typename T, typename acc_t>
LORSUM_ALWAYS_INLINE void energy_chunk(const Problem<T, acc_t>& pb, int64_t task) {
  using V_ = typename Ops::V;
  constexpr int64_t W = Ops::kLanes;
  int64_t l, chunk;
  int s;
  pb.decode(task, l, s, chunk);
  const Side<T, acc_t>& sd = pb.side[s];
  const int64_t R4 = pb.R4, ld = sd.ld;
  const int64_t c0 = chunk * kChunk, nc = std::min(kChunk, sd.N - c0);
  const acc_t* V = pb.panel_at(l, s) + c0;
  const acc_t* H = pb.H_at(l, 1 - s);
  acc_t* out = sd.out + l * sd.N + c0;
  V_ dot[kQuadVecs];
  for (int64_t t = 0; t < nc; t += kQuadVecs * W) {
    const int nv = static_cast<int>(std::min<int64_t>(kQuadVecs, (nc - t + W - 1) / W));
    static_assert(kQuadVecs == 4, "one case per vector count below");
    switch (nv) {
      case 4: quad_vectors<Ops, 4>(R4, V + t, ld, H, dot); break;
      case 3: quad_vectors<Ops, 3>(R4, V + t, ld, H, dot); break;
      case 2: quad_vectors<Ops, 2>(R4, V + t, ld, H, dot); break;
      default: quad_vectors<Ops, 1>(R4, V + t, ld, H, dot); break;
    }
    for (int v = 0; v < nv; ++v) {
      const int64_t tv = t + v * W;
      if (tv + W <= nc) {
        Ops::store(out + tv, dot[v]);
      } else {  // the padding columns of the last vector are not outputs
        alignas(64) acc_t lanes[W];
        Ops::store(lanes, dot[v]);
        std::memcpy(out + tv, lanes, (nc - tv) * sizeof(acc_t));
      }
    }
  }
}

// Each chunk phase compiled for AVX-512 and for any x86-64.
#define LORSUM_CHUNK_PHASE(name)                                                         \
  template <typename T, typename acc_t>                                                  \
  LORSUM_AVX512 void name##_avx512(const Problem<T, acc_t>& pb, int64_t task) {           \
    name<Avx512Ops<acc_t>, T, acc_t>(pb, task);                                          \
  }                                                                                      \
  template <typename T, typename acc_t>                                                  \
  void name##_generic(const Problem<T, acc_t>& pb, int64_t task) {                       \
    name<GenericOps<acc_t>, T, acc_t>(pb, task);                                         \
  }
LORSUM_CHUNK_PHASE(gram_chunk)
LORSUM_CHUNK_PHASE(energy_chunk)
#undef LORSUM_CHUNK_PHASE
#pragma GCC diagnostic pop

// ---- phase 2: per layer ----------------------------------------------------------------------------------

// H_s[k][c] = M_s[c][c] for k = c, 2·M_s[c][k] for k < c, 0 below the diagonal, with M_s's lower triangle
// summed over the side's chunks in chunk order (zero for a side with no columns).
template <typename T, typename acc_t>
void upper_forms(const Problem<T, acc_t>& pb, int64_t l) {
  const int64_t R4 = pb.R4;
  std::vector<acc_t> gram(R4 * R4);
  for (int s = 0; s < 2; ++s) {
    std::fill(gram.begin(), gram.end(), acc_t(0));
    for (int64_t c = 0; c < pb.side[s].chunks; ++c) {
      const acc_t* part = pb.part_at(l, s, c);
      for (int64_t i = 0; i < R4; ++i) {
        for (int64_t k = 0; k <= i; ++k) gram[i * R4 + k] += part[i * R4 + k];
      }
    }
    acc_t* H = pb.H_at(l, s);
    std::fill(H, H + R4 * R4, acc_t(0));
    for (int64_t c = 0; c < R4; ++c) {
      for (int64_t k = 0; k < c; ++k) H[k * R4 + c] = acc_t(2) * gram[c * R4 + k];
      H[c * R4 + c] = gram[c * R4 + c];
    }
  }
}

template <typename T, typename acc_t>
void run(Problem<T, acc_t>& pb) {
  const bool vectorised = cpu::avx512_enabled();
  const int64_t R4 = pb.R4;
  const int64_t per_layer = pb.side[0].chunks + pb.side[1].chunks;
  const int64_t chunk_work = R4 * R4 * kChunk / 2;
  // All three phases run on a group of layers before the next group starts: one layer per thread (phases
  // never mix layers, so the grouping changes no result), and the scratch holds one group. Not cleared:
  // phase 1 writes every entry that phases 2 and 3 read.
  const int64_t group = std::min<int64_t>(pb.L, std::max<int64_t>(1, at::get_num_threads()));
  const std::unique_ptr<acc_t[]> panel(new acc_t[group * R4 * (pb.side[0].ld + pb.side[1].ld)]);
  const std::unique_ptr<acc_t[]> part(new acc_t[group * 2 * pb.max_chunks * R4 * R4]);
  const std::unique_ptr<acc_t[]> H(new acc_t[group * 2 * R4 * R4]);
  pb.panel = panel.get();
  pb.part = part.get();
  pb.H = H.get();
  for (int64_t l0 = 0; l0 < pb.L; l0 += group) {
    const int64_t nl = std::min(group, pb.L - l0);
    pb.l0 = l0;
    const Problem<T, acc_t>& cpb = pb;
    auto chunk_phase = [&](void (*fn)(const Problem<T, acc_t>&, int64_t)) {
      cpu::parallel_tasks(nl * per_layer, chunk_work, [&](int64_t task) { fn(cpb, task); });
    };
    chunk_phase(vectorised ? &gram_chunk_avx512<T, acc_t> : &gram_chunk_generic<T, acc_t>);
    cpu::parallel_tasks(nl, R4 * R4 * pb.max_chunks, [&](int64_t l) { upper_forms(cpb, l0 + l); });
    chunk_phase(vectorised ? &energy_chunk_avx512<T, acc_t> : &energy_chunk_generic<T, acc_t>);
  }
}

// ---- the op -----------------------------------------------------------------------------------------------

std::vector<int64_t> with_length(at::IntArrayRef batch, int64_t N) {
  std::vector<int64_t> shape(batch.begin(), batch.end());
  shape.push_back(N);
  return shape;
}

std::tuple<at::Tensor, at::Tensor> tangent_energies_cpu(const at::Tensor& B, const at::Tensor& E, const at::Tensor& F,
                                                        const at::Tensor& A) {
  constexpr const char* op = "tangent_energies";
  const TangentSizes sz = check_tangent_energies(B, E, F, A, at::kCPU);
  const int64_t L = sz.L, m = sz.m, n = sz.n, r_B = sz.r_B, r_F = sz.r_F;
  const at::IntArrayRef batch = sz.batch;
  const int64_t R = r_B + r_F;

  const DtypePlan dtypes = dtype_plan({B, E, F, A});
  const at::ScalarType acc = dtypes.acc, out_dtype = dtypes.out;
  const bool one_dtype = dtypes.uniform;
  const auto opts = B.options().dtype(acc);
  at::Tensor rows = at::empty(with_length(batch, m), opts);
  at::Tensor cols = at::empty(with_length(batch, n), opts);
  if (rows.numel() == 0 && cols.numel() == 0) {
    return {rows.to(out_dtype), cols.to(out_dtype)};
  }
  if (R == 0) {  // B·E + F·A is an empty sum
    rows.zero_();
    cols.zero_();
    return {rows.to(out_dtype), cols.to(out_dtype)};
  }

  // Mixed input dtypes (not what the optimizers pass) are unified in the accumulation dtype; otherwise the
  // inputs are read as they are, through their strides.
  auto input = [&](const at::Tensor& t) {
    const at::Tensor flat = t.reshape({L, t.size(-2), t.size(-1)});
    return one_dtype ? flat : flat.to(acc);
  };
  const at::Tensor B3 = input(B), E3 = input(E), F3 = input(F), A3 = input(A);

  auto launch = [&](auto t_tag, auto acc_tag) {
    using T = decltype(t_tag);
    using acc_t = decltype(acc_tag);
    constexpr int64_t W = GenericOps<acc_t>::kLanes;
    Problem<T, acc_t> pb{};
    pb.L = L;
    pb.R = R;
    pb.R4 = round_up(R, kTile);
    // Side 0: V = Zᵀ, its rows are the columns of B then of F. Side 1: V = W, the rows of E then of A.
    pb.side[0] = {{B3.const_data_ptr<T>(), B3.stride(0), B3.stride(2), B3.stride(1), r_B},
                  {F3.const_data_ptr<T>(), F3.stride(0), F3.stride(2), F3.stride(1), r_F},
                  m, round_up(m, W), (m + kChunk - 1) / kChunk, rows.mutable_data_ptr<acc_t>()};
    pb.side[1] = {{E3.const_data_ptr<T>(), E3.stride(0), E3.stride(1), E3.stride(2), r_B},
                  {A3.const_data_ptr<T>(), A3.stride(0), A3.stride(1), A3.stride(2), r_F},
                  n, round_up(n, W), (n + kChunk - 1) / kChunk, cols.mutable_data_ptr<acc_t>()};
    pb.max_chunks = std::max(pb.side[0].chunks, pb.side[1].chunks);
    run(pb);
  };
  const at::ScalarType in_dtype = one_dtype ? B.scalar_type() : acc;
  switch (in_dtype) {
    case at::kDouble: launch(double{}, double{}); break;
    case at::kFloat: launch(float{}, float{}); break;
    case at::kBFloat16: launch(c10::BFloat16{}, float{}); break;
    case at::kHalf: launch(c10::Half{}, float{}); break;
    default: TORCH_CHECK(false, op, ": internal error: unexpected dtype ", in_dtype);
  }
  return {rows.to(out_dtype), cols.to(out_dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(lorsum, CPU, m) {
  m.impl("tangent_energies", &tangent_energies_cpu);
}

}  // namespace lorsum
