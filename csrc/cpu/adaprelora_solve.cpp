// CPU implementation of AdaPreLoRA's H-weighted factor solve (spec/adaprelora.md §3.3–3.7).
//
// Reference: lorsum_kernels.reference.adaprelora_solve. Schema: csrc/lorsum.cpp. For every layer of the
// batch, with P = diag(p), Q = diag(q), M_B = BᵀPB and M_A = AQAᵀ:
//
//   dA = M_B⁻¹ g_A Q⁻¹ − ½ (M_B⁻¹ g_A Aᵀ) M_A⁻¹ A
//   dB = P⁻¹ g_B M_A⁻¹ − ½ B M_B⁻¹ (Bᵀ g_B M_A⁻¹)
//
// Each Gram is factored once with reference.ridged_cholesky's rules and the caller's relative ridge ρ:
// gram + ρ·s·I with s the mean diagonal floored at sqrt(smallest normal), and where that fails,
// gram + (ρ + FALLBACK_RIDGE)·s·I, chosen per layer; a factor is NaN where both fail, so a non-finite input
// never gives a finite result. Inputs may have any strides and any of fp32/fp64/bf16/fp16; they are read
// in place and converted as they are loaded (no converted or contiguous copy unless the six inputs mix
// dtypes). Arithmetic in fp32, fp64 when an input is fp64; results in the inputs' promoted dtype. p and q
// must be positive; that is not checked (a zero gives inf, as in the reference).
//
// Both factors are the same computation on r×N matrices ("sides"): side A has F = A (N = n), G = g_A and
// w = q; side B has F = Bᵀ (N = m), G = g_Bᵀ and w = p. With M_s = F·diag(w)·Fᵀ (M_A, M_B) and "other" the
// opposite side:
//
//   V_s = M_other⁻¹ G,   K_s = V_s Fᵀ,   C_sᵀ = M_s⁻¹ K_sᵀ,   out_s = V_s diag(w)⁻¹ − ½ C_s F
//
// gives out_A = dA and out_B = dBᵀ (for B, K_Bᵀ = Bᵀ g_B M_A⁻¹ is the reference's Bᵀ·P·Z, and C_Bᵀ its
// cross_B). Five phases, each parallel over independent tasks, run on one group of layers (one per thread)
// after another, so that a group's inputs stay in cache across its three passes:
//
//   1. (layer, side, chunk of kChunk columns)  the chunk's share of M_s
//   2. (layer)                                 M_s summed over the chunks in order, both factored
//   3. (layer, side, chunk)                    V_s by Cholesky substitution, kept in the output buffer;
//                                              the chunk's share of K_s
//   4. (layer)                                 K_s summed in order, C_sᵀ by substitution
//   5. (layer, side, chunk)                    out_s = V_s/w − ½ C_s F, in place
//
// No m×n matrix is formed: the scratch is one r×r partial per chunk and a chunk's r-wide panels. Every sum runs in an order fixed by the shapes, so results do not depend on the number of
// threads. The r-wide products run in a register-tiled micro-kernel, compiled once for AVX-512 and once
// for any x86-64 (LORSUM_CPU_KERNELS=generic forces the latter, see tiles.h).

#include "common.h"
#include "small_spd.h"
#include "tiles.h"
#include "vec_ops.h"

#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <tuple>
#include <vector>

namespace lorsum {
namespace {


// Columns per task: the per-chunk partial Grams (L·2·⌈N/kChunk⌉ of r×r) stay small next to the factors,
// and a chunk's r-wide panels (r·kChunk numbers) fit in L2.
constexpr int64_t kChunk = 512;
// Summation index steps per pass of the micro-kernel: a 32-column slab of its right operand stays in L1.
constexpr int64_t kTBlock = 128;
// Register tile of the micro-kernel: kMR rows × kNV vectors.
constexpr int kMR = 4;
constexpr int kNV = 2;

// ---- vector operations (vec_ops.h) ----------------------------------------------------------------------

template <typename acc_t>
using Avx512Ops = cpu::vec::Avx512Base<acc_t>;
template <typename acc_t>
using GenericOps = cpu::vec::GenericBase<acc_t>;

// ---- the micro-kernel -------------------------------------------------------------------------------

// The templates below are always inlined into the *_avx512 / *_generic entry points, so an AVX-512 vector
// never crosses a call boundary; GCC still warns about the ABI of the uninlined template bodies.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

// What a product does with its result, as template flags: kScale multiplies step t by s_t; kLower skips the
// tiles that lie wholly above the diagonal (a symmetric result of which only the lower triangle is read);
// kSubtract makes it P −= Σ instead of P = Σ.
constexpr int kScale = 1, kLower = 2, kSubtract = 4;

// One MR × (NV·lanes) tile of P over the summation steps [t0, t1): Σ[i][c] = Σ_t s_t·U[t·u_ts + i·u_is]·
// Y[t·ldy + c], then P = Σ (first), P += Σ, or P −= Σ (kSubtract). U, Y and P point at the tile's first
// row / column.
template <typename Ops, int MR, int NV, int kFlags, typename acc_t>
LORSUM_ALWAYS_INLINE void tile(int64_t t0, int64_t t1, bool first, const acc_t* U, int64_t u_ts, int64_t u_is,
                               const acc_t* ts, const acc_t* Y, int64_t ldy, acc_t* P, int64_t ldp) {
  using V = typename Ops::V;
  constexpr int W = Ops::kLanes;
  V acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = Ops::zero();
  }
  for (int64_t t = t0; t < t1; ++t) {
    V y[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) y[v] = Ops::load(Y + t * ldy + v * W);
    const acc_t* u = U + t * u_ts;
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const V b = Ops::set1((kFlags & kScale) ? u[i * u_is] * ts[t] : u[i * u_is]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] = Ops::fma(b, y[v], acc[i][v]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      acc_t* p = P + i * ldp + v * W;
      if constexpr ((kFlags & kSubtract) != 0) {
        Ops::store(p, Ops::sub(Ops::load(p), acc[i][v]));
      } else {
        Ops::store(p, first ? acc[i][v] : Ops::add(Ops::load(p), acc[i][v]));
      }
    }
  }
}

template <typename Ops, int NV, int kFlags, typename acc_t>
LORSUM_ALWAYS_INLINE void tile_rows(int mr, int64_t t0, int64_t t1, bool first, const acc_t* U, int64_t u_ts,
                                    int64_t u_is, const acc_t* ts, const acc_t* Y, int64_t ldy, acc_t* P,
                                    int64_t ldp) {
  static_assert(kMR == 4, "one case per row count below");
  switch (mr) {
    case 4: tile<Ops, 4, NV, kFlags>(t0, t1, first, U, u_ts, u_is, ts, Y, ldy, P, ldp); break;
    case 3: tile<Ops, 3, NV, kFlags>(t0, t1, first, U, u_ts, u_is, ts, Y, ldy, P, ldp); break;
    case 2: tile<Ops, 2, NV, kFlags>(t0, t1, first, U, u_ts, u_is, ts, Y, ldy, P, ldp); break;
    default: tile<Ops, 1, NV, kFlags>(t0, t1, first, U, u_ts, u_is, ts, Y, ldy, P, ldp); break;
  }
}

// P[i][c] = Σ_{t<T} s_t · U[t·u_ts + i·u_is] · Y[t·ldy + c] for i < I and c < Nc (or P −= that sum, see the
// flags above), with s_t = ts[t] under kScale, else 1. Nc is a multiple of the lane count (the callers pad
// with zero columns). The sum over t runs in blocks of kTBlock steps, each accumulated in registers and
// then added to P in order; the column-tile loop is outside the row-tile loop, so a block's slab of Y is
// read from L1 by every row tile.
template <typename Ops, int kFlags, typename acc_t>
LORSUM_ALWAYS_INLINE void outer_product(int64_t I, int64_t Nc, int64_t T, const acc_t* U, int64_t u_ts,
                                        int64_t u_is, const acc_t* ts, const acc_t* Y, int64_t ldy, acc_t* P,
                                        int64_t ldp) {
  constexpr int64_t W = Ops::kLanes;
  if (T == 0) {
    if constexpr ((kFlags & kSubtract) == 0) {
      for (int64_t i = 0; i < I; ++i) std::fill(P + i * ldp, P + i * ldp + Nc, acc_t(0));
    }
    return;
  }
  for (int64_t t0 = 0; t0 < T; t0 += kTBlock) {
    const int64_t t1 = std::min(T, t0 + kTBlock);
    for (int64_t c = 0; c < Nc; c += kNV * W) {
      const bool wide = c + kNV * W <= Nc;  // else exactly one vector is left
      for (int64_t i = 0; i < I; i += kMR) {
        const int mr = static_cast<int>(std::min<int64_t>(kMR, I - i));
        if ((kFlags & kLower) != 0 && c > i + mr - 1) {
          continue;
        }
        const acc_t* u = U + i * u_is;
        acc_t* p = P + i * ldp + c;
        if (wide) {
          tile_rows<Ops, kNV, kFlags>(mr, t0, t1, t0 == 0, u, u_ts, u_is, ts, Y + c, ldy, p, ldp);
        } else {
          tile_rows<Ops, 1, kFlags>(mr, t0, t1, t0 == 0, u, u_ts, u_is, ts, Y + c, ldy, p, ldp);
        }
      }
    }
  }
}

// Rows of the diagonal blocks of the blocked substitutions below.
constexpr int64_t kSolveBlock = 16;

// Solves (L·Lᵀ)·X = V in place for the r×Nc matrix V (row stride ldv, Nc a multiple of the lane count):
// forward then backward substitution by blocks of kSolveBlock rows, each block first updated with the
// blocks already solved (a product in the micro-kernel, where nearly all the flops go) and then
// substituted row by row. For r ≤ kSolveBlock this is plain substitution (small_spd.h's order).
template <typename Ops, typename acc_t>
LORSUM_ALWAYS_INLINE void blocked_cholesky_solve(const acc_t* chol, int64_t r, acc_t* V, int64_t ldv, int64_t Nc) {
  const acc_t* none = nullptr;
  for (int64_t i0 = 0; i0 < r; i0 += kSolveBlock) {
    const int64_t i1 = std::min(r, i0 + kSolveBlock);
    // V[i0:i1] −= L[i0:i1, :i0] · V[:i0]
    outer_product<Ops, kSubtract>(i1 - i0, Nc, i0, chol + i0 * r, 1, r, none, V, ldv, V + i0 * ldv, ldv);
    for (int64_t i = i0; i < i1; ++i) {
      acc_t* vi = V + i * ldv;
      for (int64_t k = i0; k < i; ++k) {
        const acc_t lik = chol[i * r + k];
        const acc_t* vk = V + k * ldv;
        for (int64_t c = 0; c < Nc; ++c) vi[c] -= lik * vk[c];
      }
      const acc_t d = chol[i * r + i];
      for (int64_t c = 0; c < Nc; ++c) vi[c] /= d;
    }
  }
  for (int64_t i1 = r; i1 > 0; i1 -= kSolveBlock) {
    const int64_t i0 = std::max<int64_t>(0, i1 - kSolveBlock);
    // V[i0:i1] −= L[i1:, i0:i1]ᵀ · V[i1:]
    outer_product<Ops, kSubtract>(i1 - i0, Nc, r - i1, chol + i1 * r + i0, r, 1, none, V + i1 * ldv, ldv,
                                  V + i0 * ldv, ldv);
    for (int64_t i = i1 - 1; i >= i0; --i) {
      acc_t* vi = V + i * ldv;
      for (int64_t k = i + 1; k < i1; ++k) {
        const acc_t lki = chol[k * r + i];
        const acc_t* vk = V + k * ldv;
        for (int64_t c = 0; c < Nc; ++c) vi[c] -= lki * vk[c];
      }
      const acc_t d = chol[i * r + i];
      for (int64_t c = 0; c < Nc; ++c) vi[c] /= d;
    }
  }
}

// ---- the problem --------------------------------------------------------------------------------------

// One side as r×N matrices of one layer l: F(k, c) = F[l·f_bs + k·f_ks + c·f_cs], likewise G, w(c) and the
// output out(k, c) (the accumulation-dtype result buffer, which also holds V between phases 3 and 5).
template <typename T, typename acc_t>
struct Side {
  const T* F;
  int64_t f_bs, f_ks, f_cs;
  const T* G;
  int64_t g_bs, g_ks, g_cs;
  const T* w;
  int64_t w_bs, w_cs;
  acc_t* out;
  int64_t o_bs, o_ks, o_cs;
  int64_t N, chunks;
};

template <typename T, typename acc_t>
struct Problem {
  int64_t L, r, rp;  // rp: r padded to the lane count (the row stride of the r×r partials)
  Side<T, acc_t> side[2];
  int64_t max_chunks;
  acc_t* part;   // (L, 2, max_chunks, r, rp): per-chunk shares of M_s (phase 1), then of K_s (phase 3)
  acc_t* chol;   // (L, 2, r, r): Cholesky factors of M_A (side 0) and M_B (side 1)
  acc_t* ct;     // (L, 2, r, r): C_sᵀ
  const double* ridge;
  int64_t ridge_stride;  // 0: one ridge for every layer

  acc_t* part_at(int64_t l, int s, int64_t c) const { return part + ((l * 2 + s) * max_chunks + c) * r * rp; }
  acc_t* chol_at(int64_t l, int s) const { return chol + (l * 2 + s) * r * r; }
  acc_t* ct_at(int64_t l, int s) const { return ct + (l * 2 + s) * r * r; }

  // The (layer, side, chunk) of a chunk task: all chunks of side A of a layer, then those of side B.
  void decode(int64_t task, int64_t& l, int& s, int64_t& c) const {
    const int64_t per_layer = side[0].chunks + side[1].chunks;
    l = task / per_layer;
    c = task - l * per_layer;
    s = c < side[0].chunks ? 0 : 1;
    if (s == 1) c -= side[0].chunks;
  }
};

// dst(k, t) = src(k, t) for k < r, t < nc, converted to D, each addressed by (row, column) strides. The inner
// loop runs along the index in which src is contiguous (else along dst's), and where both are contiguous the
// loop is a plain converting copy that vectorises.
template <typename D, typename S>
LORSUM_ALWAYS_INLINE void copy_panel(const S* src, int64_t s_ks, int64_t s_ts, D* dst, int64_t d_ks, int64_t d_ts,
                                     int64_t r, int64_t nc) {
  if (s_ts == 1 || (s_ks != 1 && d_ts == 1)) {
    for (int64_t k = 0; k < r; ++k) {
      const S* s = src + k * s_ks;
      D* d = dst + k * d_ks;
      if (s_ts == 1 && d_ts == 1) {
        for (int64_t t = 0; t < nc; ++t) d[t] = static_cast<D>(s[t]);
      } else {
        for (int64_t t = 0; t < nc; ++t) d[t * d_ts] = static_cast<D>(s[t * s_ts]);
      }
    }
  } else {
    for (int64_t t = 0; t < nc; ++t) {
      const S* s = src + t * s_ts;
      D* d = dst + t * d_ts;
      if (s_ks == 1 && d_ks == 1) {
        for (int64_t k = 0; k < r; ++k) d[k] = static_cast<D>(s[k]);
      } else {
        for (int64_t k = 0; k < r; ++k) d[k * d_ks] = static_cast<D>(s[k * s_ks]);
      }
    }
  }
}

// dst[k·ld + t] = F(k, c0 + t): the chunk in row layout.
template <typename acc_t, typename T>
LORSUM_ALWAYS_INLINE void stage_rows(const T* src, int64_t ks, int64_t cs, int64_t r, int64_t nc, acc_t* dst,
                                     int64_t ld) {
  copy_panel(src, ks, cs, dst, ld, 1, r, nc);
}

// dst[t·ld + k] = F(k, c0 + t): the chunk transposed.
template <typename acc_t, typename T>
LORSUM_ALWAYS_INLINE void stage_transposed(const T* src, int64_t ks, int64_t cs, int64_t r, int64_t nc, acc_t* dst,
                                           int64_t ld) {
  copy_panel(src, ks, cs, dst, 1, ld, r, nc);
}

// Scratch of n numbers whose first `valid` of every `ld` are written before they are read: only the rest
// (the zero padding the micro-kernel relies on) is cleared.
template <typename acc_t>
std::unique_ptr<acc_t[]> padded_scratch(int64_t rows, int64_t ld, int64_t valid) {
  std::unique_ptr<acc_t[]> buf(new acc_t[rows * ld]);
  if (valid < ld) {
    for (int64_t i = 0; i < rows; ++i) std::fill(buf.get() + i * ld + valid, buf.get() + (i + 1) * ld, acc_t(0));
  }
  return buf;
}

int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// ---- phases 1, 3, 5: one chunk of one side of one layer -----------------------------------------------

// Phase 1: part = F_chunk · diag(w_chunk) · F_chunkᵀ.
template <typename Ops, typename T, typename acc_t>
LORSUM_ALWAYS_INLINE void gram_chunk(const Problem<T, acc_t>& pb, int64_t task) {
  int64_t l, chunk;
  int s;
  pb.decode(task, l, s, chunk);
  const Side<T, acc_t>& sd = pb.side[s];
  const int64_t r = pb.r, rp = pb.rp, c0 = chunk * kChunk, nc = std::min(kChunk, sd.N - c0);
  const auto ft = padded_scratch<acc_t>(nc, rp, r);
  std::vector<acc_t> w(nc);
  stage_transposed(sd.F + l * sd.f_bs + c0 * sd.f_cs, sd.f_ks, sd.f_cs, r, nc, ft.get(), rp);
  copy_panel(sd.w + l * sd.w_bs + c0 * sd.w_cs, 0, sd.w_cs, w.data(), 0, 1, 1, nc);
  outer_product<Ops, kScale | kLower>(r, rp, nc, ft.get(), rp, 1, w.data(), ft.get(), rp, pb.part_at(l, s, chunk),
                                      rp);
}

// Phase 3: V_chunk = M_other⁻¹ G_chunk into the output buffer, part = V_chunk · F_chunkᵀ.
template <typename Ops, typename T, typename acc_t>
LORSUM_ALWAYS_INLINE void solve_chunk(const Problem<T, acc_t>& pb, int64_t task) {
  int64_t l, chunk;
  int s;
  pb.decode(task, l, s, chunk);
  const Side<T, acc_t>& sd = pb.side[s];
  const int64_t r = pb.r, rp = pb.rp, c0 = chunk * kChunk, nc = std::min(kChunk, sd.N - c0);
  const int64_t ncp = round_up(nc, Ops::kLanes);
  const auto v = padded_scratch<acc_t>(r, ncp, nc);
  const auto ft = padded_scratch<acc_t>(nc, rp, r);
  stage_rows(sd.G + l * sd.g_bs + c0 * sd.g_cs, sd.g_ks, sd.g_cs, r, nc, v.get(), ncp);
  blocked_cholesky_solve<Ops>(pb.chol_at(l, 1 - s), r, v.get(), ncp, ncp);
  stage_transposed(sd.F + l * sd.f_bs + c0 * sd.f_cs, sd.f_ks, sd.f_cs, r, nc, ft.get(), rp);
  outer_product<Ops, 0>(r, rp, nc, v.get(), 1, ncp, static_cast<const acc_t*>(nullptr), ft.get(), rp,
                        pb.part_at(l, s, chunk), rp);
  copy_panel(v.get(), ncp, 1, sd.out + l * sd.o_bs + c0 * sd.o_cs, sd.o_ks, sd.o_cs, r, nc);
}

// Phase 5: out_chunk = V_chunk / w_chunk − ½ C_s F_chunk, in place over V.
template <typename Ops, typename T, typename acc_t>
LORSUM_ALWAYS_INLINE void output_chunk(const Problem<T, acc_t>& pb, int64_t task) {
  int64_t l, chunk;
  int s;
  pb.decode(task, l, s, chunk);
  const Side<T, acc_t>& sd = pb.side[s];
  const int64_t r = pb.r, c0 = chunk * kChunk, nc = std::min(kChunk, sd.N - c0);
  const int64_t ncp = round_up(nc, Ops::kLanes);
  const auto fr = padded_scratch<acc_t>(r, ncp, nc);
  const auto prod = padded_scratch<acc_t>(r, ncp, ncp);
  std::vector<acc_t> w(nc);
  stage_rows(sd.F + l * sd.f_bs + c0 * sd.f_cs, sd.f_ks, sd.f_cs, r, nc, fr.get(), ncp);
  copy_panel(sd.w + l * sd.w_bs + c0 * sd.w_cs, 0, sd.w_cs, w.data(), 0, 1, 1, nc);
  // C_s[k][t] = ct[t·r + k].
  outer_product<Ops, 0>(r, ncp, r, pb.ct_at(l, s), r, 1, static_cast<const acc_t*>(nullptr), fr.get(), ncp,
                        prod.get(), ncp);
  acc_t* out = sd.out + l * sd.o_bs + c0 * sd.o_cs;
  const acc_t* pr = prod.get();
  if (sd.o_cs == 1) {  // side A: rows of dA
    for (int64_t k = 0; k < r; ++k) {
      acc_t* o = out + k * sd.o_ks;
      const acc_t* pk = pr + k * ncp;
      for (int64_t t = 0; t < nc; ++t) o[t] = o[t] / w[t] - acc_t(0.5) * pk[t];
    }
  } else {  // side B: rows of dB, one per column of the chunk
    for (int64_t t = 0; t < nc; ++t) {
      acc_t* o = out + t * sd.o_cs;
      for (int64_t k = 0; k < r; ++k) o[k * sd.o_ks] = o[k * sd.o_ks] / w[t] - acc_t(0.5) * pr[k * ncp + t];
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
LORSUM_CHUNK_PHASE(solve_chunk)
LORSUM_CHUNK_PHASE(output_chunk)
#undef LORSUM_CHUNK_PHASE
#pragma GCC diagnostic pop

// ---- phases 2 and 4: per layer --------------------------------------------------------------------------

// sum (r×rp) = Σ_c part_at(l, s, c) over the side's chunks, in chunk order (zero for an empty side).
template <typename T, typename acc_t>
void sum_partials(const Problem<T, acc_t>& pb, int64_t l, int s, acc_t* sum) {
  const int64_t size = pb.r * pb.rp;
  std::fill(sum, sum + size, acc_t(0));
  for (int64_t c = 0; c < pb.side[s].chunks; ++c) {
    const acc_t* part = pb.part_at(l, s, c);
    for (int64_t e = 0; e < size; ++e) sum[e] += part[e];
  }
}

// reference.ridged_cholesky with the caller's ridge: the factor of gram + ridge·s·I, else of
// gram + (ridge + FALLBACK_RIDGE)·s·I, else NaN. The ridges are summed in fp64 and each shift is rounded
// to the arithmetic dtype before it multiplies s, as torch does with a Python-number ridge.
template <typename acc_t>
void ridged_factor(const acc_t* gram, int64_t ldg, int64_t r, double ridge, acc_t* chol) {
  acc_t trace = 0;
  for (int64_t i = 0; i < r; ++i) trace += gram[i * ldg + i];
  acc_t scale = trace / static_cast<acc_t>(r);
  const acc_t floor = std::sqrt(std::numeric_limits<acc_t>::min());
  scale = scale < floor ? floor : scale;  // a NaN scale stays NaN, as with clamp_min
  if (cpu::cholesky_with_ridge(gram, ldg, r, static_cast<acc_t>(ridge) * scale, chol)) return;
  const double fallback = ridge + cpu::kFallbackRidge<acc_t>;
  if (cpu::cholesky_with_ridge(gram, ldg, r, static_cast<acc_t>(fallback) * scale, chol)) return;
  std::fill(chol, chol + r * r, std::numeric_limits<acc_t>::quiet_NaN());
}

template <typename T, typename acc_t>
void factor_layer(const Problem<T, acc_t>& pb, int64_t l) {
  std::vector<acc_t> gram(pb.r * pb.rp);
  const double ridge = pb.ridge[l * pb.ridge_stride];
  for (int s = 0; s < 2; ++s) {
    sum_partials(pb, l, s, gram.data());
    ridged_factor(gram.data(), pb.rp, pb.r, ridge, pb.chol_at(l, s));
  }
}

// C_sᵀ = M_s⁻¹ K_sᵀ: the transposed K_s solved in place with the side's own factor.
template <typename T, typename acc_t>
void cross_layer(const Problem<T, acc_t>& pb, int64_t l) {
  const int64_t r = pb.r, rp = pb.rp;
  std::vector<acc_t> K(r * rp);
  for (int s = 0; s < 2; ++s) {
    sum_partials(pb, l, s, K.data());
    acc_t* ct = pb.ct_at(l, s);
    for (int64_t i = 0; i < r; ++i) {
      for (int64_t j = 0; j < r; ++j) ct[i * r + j] = K[j * rp + i];
    }
    cpu::cholesky_solve_block<acc_t>(pb.chol_at(l, s), r, ct, r, r);
  }
}

template <typename T, typename acc_t>
void run(const Problem<T, acc_t>& pb) {
  const bool vectorised = cpu::avx512_enabled();
  const int64_t r = pb.r;
  const int64_t per_layer = pb.side[0].chunks + pb.side[1].chunks;
  const int64_t chunk_work = r * r * kChunk;
  // All five phases run on a group of layers before the next group starts, so a group's inputs are still
  // in cache for the second and third pass: one layer per thread (phases never mix layers, so the grouping
  // changes no result).
  const int64_t group = std::max<int64_t>(1, at::get_num_threads());
  for (int64_t l0 = 0; l0 < pb.L; l0 += group) {
    const int64_t nl = std::min(group, pb.L - l0);
    auto chunk_phase = [&](void (*fn)(const Problem<T, acc_t>&, int64_t)) {
      cpu::parallel_tasks(nl * per_layer, chunk_work, [&](int64_t task) { fn(pb, l0 * per_layer + task); });
    };
    chunk_phase(vectorised ? &gram_chunk_avx512<T, acc_t> : &gram_chunk_generic<T, acc_t>);
    cpu::parallel_tasks(nl, r * r * r, [&](int64_t l) { factor_layer(pb, l0 + l); });
    chunk_phase(vectorised ? &solve_chunk_avx512<T, acc_t> : &solve_chunk_generic<T, acc_t>);
    cpu::parallel_tasks(nl, r * r * r, [&](int64_t l) { cross_layer(pb, l0 + l); });
    chunk_phase(vectorised ? &output_chunk_avx512<T, acc_t> : &output_chunk_generic<T, acc_t>);
  }
}

// ---- the op -----------------------------------------------------------------------------------------------

std::vector<int64_t> with_matrix(at::IntArrayRef batch, int64_t rows, int64_t cols) {
  std::vector<int64_t> shape(batch.begin(), batch.end());
  shape.push_back(rows);
  shape.push_back(cols);
  return shape;
}

std::tuple<at::Tensor, at::Tensor> adaprelora_solve_cpu(const at::Tensor& A, const at::Tensor& B,
                                                        const at::Tensor& g_A, const at::Tensor& g_B,
                                                        const at::Tensor& p, const at::Tensor& q,
                                                        const at::Tensor& ridge) {
  constexpr const char* op = "adaprelora_solve";
  const AdaPreLoRASizes sz = check_adaprelora_solve(A, B, g_A, g_B, p, q, ridge, at::kCPU);
  const int64_t L = sz.L, r = sz.r, m = sz.m, n = sz.n;
  const at::IntArrayRef batch = sz.batch;

  const DtypePlan dtypes = dtype_plan({A, B, g_A, g_B, p, q});
  const at::ScalarType acc = dtypes.acc, out_dtype = dtypes.out;
  const bool one_dtype = dtypes.uniform;
  const auto opts = A.options().dtype(acc);
  at::Tensor dA = at::empty(with_matrix(batch, r, n), opts);
  at::Tensor dB = at::empty(with_matrix(batch, m, r), opts);
  if (dA.numel() == 0 && dB.numel() == 0) {
    return {dA.to(out_dtype), dB.to(out_dtype)};
  }

  // Mixed input dtypes (not what the optimizers pass) are unified in the accumulation dtype; otherwise the
  // inputs are read as they are, through their strides.
  auto input = [&](const at::Tensor& t, std::initializer_list<int64_t> shape) {
    const at::Tensor flat = t.reshape(shape);
    return one_dtype ? flat : flat.to(acc);
  };
  const at::Tensor A3 = input(A, {L, r, n}), gA3 = input(g_A, {L, r, n});
  const at::Tensor B3 = input(B, {L, m, r}), gB3 = input(g_B, {L, m, r});
  const at::Tensor p2 = input(p, {L, m}), q2 = input(q, {L, n});
  const at::Tensor ridge_d = ridge.to(at::kDouble).contiguous();

  auto launch = [&](auto t_tag, auto acc_tag) {
    using T = decltype(t_tag);
    using acc_t = decltype(acc_tag);
    Problem<T, acc_t> pb;
    pb.L = L;
    pb.r = r;
    pb.rp = round_up(std::max<int64_t>(r, 1), GenericOps<acc_t>::kLanes);
    acc_t* a_out = dA.mutable_data_ptr<acc_t>();
    acc_t* b_out = dB.mutable_data_ptr<acc_t>();
    // Side A: F = A, G = g_A, w = q, out = dA. Side B: F = Bᵀ, G = g_Bᵀ, w = p, out = dBᵀ.
    pb.side[0] = {A3.const_data_ptr<T>(), A3.stride(0), A3.stride(1), A3.stride(2),
                  gA3.const_data_ptr<T>(), gA3.stride(0), gA3.stride(1), gA3.stride(2),
                  q2.const_data_ptr<T>(), q2.stride(0), q2.stride(1),
                  a_out, r * n, n, 1,
                  n, (n + kChunk - 1) / kChunk};
    pb.side[1] = {B3.const_data_ptr<T>(), B3.stride(0), B3.stride(2), B3.stride(1),
                  gB3.const_data_ptr<T>(), gB3.stride(0), gB3.stride(2), gB3.stride(1),
                  p2.const_data_ptr<T>(), p2.stride(0), p2.stride(1),
                  b_out, m * r, 1, r,
                  m, (m + kChunk - 1) / kChunk};
    pb.max_chunks = std::max(pb.side[0].chunks, pb.side[1].chunks);
    std::vector<acc_t> part(L * 2 * pb.max_chunks * r * pb.rp), chol(L * 2 * r * r), ct(L * 2 * r * r);
    pb.part = part.data();
    pb.chol = chol.data();
    pb.ct = ct.data();
    pb.ridge = ridge_d.const_data_ptr<double>();
    pb.ridge_stride = ridge_d.dim() == 0 ? 0 : 1;
    run(pb);
  };
  const at::ScalarType in_dtype = one_dtype ? A.scalar_type() : acc;
  switch (in_dtype) {
    case at::kDouble: launch(double{}, double{}); break;
    case at::kFloat: launch(float{}, float{}); break;
    case at::kBFloat16: launch(c10::BFloat16{}, float{}); break;
    case at::kHalf: launch(c10::Half{}, float{}); break;
    default: TORCH_CHECK(false, op, ": internal error: unexpected dtype ", in_dtype);
  }
  return {dA.to(out_dtype), dB.to(out_dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(lorsum, CPU, m) {
  m.impl("adaprelora_solve", &adaprelora_solve_cpu);
}

}  // namespace lorsum
