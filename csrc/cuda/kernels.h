// CUDA kernels of lorsum_kernels: plain CUDA launchers, no torch headers (DESIGN.md "The house").
//
// Each launcher is defined in the .cu file of its op, like csrc/cpu: diag_metric.cu (1), energies.cu (2),
// spd_solve.cu (3), block_power.cu (4), adaprelora_solve.cu (5), tangent_energies.cu (6), with the helpers
// they share in common.cuh / common.cu, tile.cuh and small_spd.cuh. Each compiles with nvcc alone (`make
// cuda-check`); <op>_binding.cpp registers the ops for the CUDA dispatch key on top of these launchers,
// with the input checks of csrc/checks.h (shared with the CPU ops). References:
// lorsum_kernels/reference.py. Schemas: csrc/lorsum.cpp.
//
// Contract shared by every launcher:
//
// * Matrices are batches of L row-major matrices addressed by (batch stride, row stride) in elements,
//   with unit column stride unless a launcher says otherwise; strides may be 0 (expanded views) and
//   pointers need no particular alignment (no vector loads). Sizes and strides are int64_t.
// * Inputs are float, double, __nv_bfloat16 or __half; arithmetic is in acc_t<T>: double for double
//   inputs, float otherwise (DESIGN.md "Numerical policy").
// * Nothing synchronises with the host: every launcher only enqueues kernels (and at most a
//   cudaMemsetAsync) on `stream`, so the ops can be captured in a CUDA graph.
// * Every reduction runs in an order fixed by the shapes alone (never by the device, the number of SMs,
//   or timing), with no floating-point atomics: the same inputs give bitwise identical outputs on every
//   run and every rank (spec/lorsum.md §12: data-parallel ranks must stay identical).
// * Scratch memory is the caller's: a launcher that needs some has a *_workspace_bytes() function with the
//   same size arguments, and takes (workspace, workspace_bytes); the pointer may be null when that size is
//   0. Keeping allocation outside lets the binding use torch's stream-ordered caching allocator.
// * Return value: cudaSuccess, cudaErrorInvalidValue for bad arguments (negative sizes, a null pointer
//   where data is needed, a workspace too small, r > kMaxSolveRank, R > kMaxTangentRank), or the error
//   cudaGetLastError() reports after a launch. Zero-size problems return cudaSuccess and launch nothing
//   (outputs of an empty sum are zero-filled).

#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace lorsum::cuda {

// The arithmetic type of an input type.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

// ---- (1) column sums of squares ------------------------------------------------------------------
//
// out[b, j] = Σ_t x[b, t, j]²   for b < B, t < T, j < n          (reference.col_sq_sums)
//
// x: B matrices T×n, element (b, t, j) at x[b·batch_stride + t·row_stride + j].
// out: contiguous (B, n) in acc_t<T>. T = 0 gives zeros.
// Grid over (column blocks, T chunks, batch); each chunk's sum is reduced in a fixed tree inside its
// block, and the chunks are added in order by a second kernel (through the workspace) when there is more
// than one.
size_t col_sq_sums_workspace_bytes(int64_t B, int64_t T, int64_t n, size_t acc_size);

template <typename T>
cudaError_t col_sq_sums(const T* x, int64_t B, int64_t T_rows, int64_t n, int64_t batch_stride,
                        int64_t row_stride, acc_t<T>* out, void* workspace, size_t workspace_bytes,
                        cudaStream_t stream);

// ---- (2) row and column energies of G = Sᵀ·X, without writing G -----------------------------------
//
// rows[b, i] = Σ_j G[b]_ij²,  cols[b, j] = Σ_i G[b]_ij²,  G[b] = S[b]ᵀ·X[b] (m×n)   (reference.row_col_energies)
//
// S: L matrices T×m (s_batch_stride, s_row_stride); X: L matrices T×n (x_batch_stride, x_row_stride).
// rows: contiguous (L, m); cols: contiguous (L, n); acc_t (the binding converts both inputs to double
// when either is double, so the instantiations are {float, bf16, half}² and (double, double)).
// Each 64×64 tile of G is accumulated over all of T in registers (shared-memory tiles of S and X, 16
// tokens at a time), squared and reduced in the epilogue into per-tile partial row and column sums; a
// second kernel adds the partials of the tiles in order.
size_t row_col_energies_workspace_bytes(int64_t L, int64_t m, int64_t n, size_t acc_size);

template <typename TS, typename TX>
cudaError_t row_col_energies(const TS* S, int64_t s_batch_stride, int64_t s_row_stride, const TX* X,
                             int64_t x_batch_stride, int64_t x_row_stride, int64_t L, int64_t T_rows,
                             int64_t m, int64_t n, acc_t<TX>* rows, acc_t<TX>* cols, void* workspace,
                             size_t workspace_bytes, cudaStream_t stream);

// ---- (3) batched small SPD solves with the relative ridge ------------------------------------------
//
// For each of L matrices: s = max(mean(diag(gram)), sqrt(smallest normal)); C = chol(gram + ridge·s·I),
// and where that factorisation fails (a pivot not > 0, NaN included), C = chol(gram + fallback_ridge·s·I)
// instead, chosen per matrix inside the kernel (reference.ridged_cholesky with fallback_ridge =
// ridge + FALLBACK_RIDGE[dtype], reference.spd_solve with ridge = RELATIVE_RIDGE[dtype]). Where both fail,
// or s is not finite, the factor is NaN, so the solution is NaN: a non-finite Gram never gives a finite
// result. Then out = (C·Cᵀ)⁻¹·rhs for r×N right-hand sides.
//
// gram: L r×r matrices in acc_t, element (b, i, k) at gram[b·g_bs + i·g_rs + k·g_cs]; only the lower
//   triangle (k ≤ i) is read. g_bs = 0 shares one matrix across the batch.
// rhs / out: L r×N matrices of T, element (b, i, c) at ptr[b·bs + i·ks + c·cs] (any strides: a right
//   solve Z·gram = R is the left solve gram·Zᵀ = Rᵀ, passed with the strides swapped). out may not
//   overlap rhs unless the two have identical strides.
// One block per (matrix, block of up to 128 right-hand-side columns): the block factors its matrix in
// shared memory (each column block of a matrix recomputes the same r³/3-flop factor, bit for bit, rather
// than communicate) then runs the forward and back substitutions, one thread per column.
// 1 ≤ r ≤ kMaxSolveRank; the binding composes ATen calls for larger r.
constexpr int kMaxSolveRank = 64;

template <typename T>
cudaError_t spd_solve(const acc_t<T>* gram, int64_t g_bs, int64_t g_rs, int64_t g_cs, const T* rhs,
                      int64_t rhs_bs, int64_t rhs_ks, int64_t rhs_cs, T* out, int64_t out_bs, int64_t out_ks,
                      int64_t out_cs, int64_t L, int64_t r, int64_t N, acc_t<T> ridge, acc_t<T> fallback_ridge,
                      cudaStream_t stream);

// ---- (4) skinny token products of the block power iteration ------------------------------------------
//
// out[b] = (A[b]·W[b])ᵀ·Bm[b]   (w×N per layer)
//
// A: L matrices K×M of TA (K = tokens), Bm: L matrices K×N of TB, both with unit column stride;
// W: L matrices M×w, contiguous, in acc_t (small: a factor); out element (b, k, j) at
// out[b·o_bs + k·o_ks + j·o_js].
// For the gradient pair (X, Sᵀ) of LoRSum:
//   P = (S·B̂)ᵀ·X  (r×n):  A = S (T×m), W = B̂ (m×r), Bm = X (T×n), out row-major (r, n);
//   Q = Sᵀ·(X·Âᵀ) (m×r):  Qᵀ = (X·Âᵀ)ᵀ·S, so A = X, W = Âᵀ (n×r), Bm = S, out = Q with (o_ks, o_js) = (1, r).
// Two kernels: Y = A·W (K×w, acc_t, in the workspace; r-wide, so M/w times smaller than A; its sum over
// M split into chunks of at most 1024 features, enough for ~1024 blocks, added in order by a second
// kernel), then
// out = Yᵀ·Bm, tiled over (w, N) (16×128 tiles for w ≤ 16, else 64×64) with the token dimension split into
// chunks of at most 1024 rows, each block staging 16 rows of Y and Bm at a time in shared memory and
// accumulating in registers; the chunks' partial products are added in order by a second-stage kernel.
// Y is computed once, not once per column tile of Bm (fusing it into the product would recompute S·W for
// every tile of n, M/BN times the product's own flops); the product kernel reads it back from L2.
// Instantiations: TA, TB ∈ {float, bf16, half}², and (double, double).
size_t projected_product_workspace_bytes(int64_t L, int64_t K, int64_t M, int64_t w, int64_t N,
                                         size_t acc_size);

template <typename TA, typename TB>
cudaError_t projected_product(const TA* A, int64_t a_bs, int64_t a_rs, const acc_t<TB>* W, int64_t w_bs,
                              const TB* Bm, int64_t b_bs, int64_t b_rs, int64_t L, int64_t K, int64_t M,
                              int64_t w, int64_t N, acc_t<TB>* out, int64_t o_bs, int64_t o_ks, int64_t o_js,
                              void* workspace, size_t workspace_bytes, cudaStream_t stream);

// ---- (5) AdaPreLoRA's H-weighted factor solve ---------------------------------------------------------
//
// For each of L layers (reference.adaprelora_solve), with P = diag(p), Q = diag(q), M_B = BᵀPB, M_A = AQAᵀ:
//
//   dA = M_B⁻¹ g_A Q⁻¹ − ½ (M_B⁻¹ g_A Aᵀ) M_A⁻¹ A,   dB = P⁻¹ g_B M_A⁻¹ − ½ B M_B⁻¹ (Bᵀ g_B M_A⁻¹)
//
// Each Gram is factored with the rules of (3) and the caller's relative ridge ρ (ridge_per_layer[b·ridge_bs]
// when that device pointer is not null, else `ridge`): s = max(mean(diag), sqrt(smallest normal)),
// chol(M + ρ·s·I), where that fails chol(M + (ρ + fallback_ridge)·s·I), where both fail (or s is not
// finite) NaN; chosen per layer inside the kernel.
// Inputs, all of type T and addressed by the strides of AdaPreLoRAInputs (any strides, 0 included):
// A (L, r, n), B (L, m, r), g_A (L, r, n), g_B (L, m, r), p (L, m), q (L, n), p and q positive (not
// checked). Outputs: dA (L, r, n) and dB (L, m, r), contiguous, in acc_t<T>.
// Both factors are one computation on r×N matrices ("sides": A has F = A, G = g_A, w = q; B has F = Bᵀ,
// G = g_Bᵀ, w = p), in five kernels: (i) per chunk of kAdaChunk columns, its share of M_s = F·diag(w)·Fᵀ;
// (ii) per layer, the shares summed in order, both ridged factors and the inverses W_s = M_s⁻¹ (through
// the triangular inverse of the factor); (iii) per chunk, V_s = W_other·G written to the output and its
// share of K_s = V_s·Fᵀ; (iv) per layer, C_s = K_s·W_s; (v) per chunk, out = V_s·diag(w)⁻¹ − ½·C_s·F in
// place, which is dA for side A and dBᵀ for side B. Chunk blocks stage 32-column panels in shared memory.
// 1 ≤ r ≤ kMaxSolveRank; the binding composes ATen calls for larger r.
constexpr int64_t kAdaChunk = 512;

template <typename T>
struct AdaPreLoRAInputs {
  const T* A;
  int64_t a_bs, a_rs, a_cs;
  const T* B;
  int64_t b_bs, b_rs, b_cs;
  const T* g_A;
  int64_t ga_bs, ga_rs, ga_cs;
  const T* g_B;
  int64_t gb_bs, gb_rs, gb_cs;
  const T* p;
  int64_t p_bs, p_s;
  const T* q;
  int64_t q_bs, q_s;
};

size_t adaprelora_solve_workspace_bytes(int64_t L, int64_t r, int64_t m, int64_t n, size_t acc_size);

template <typename T>
cudaError_t adaprelora_solve(const AdaPreLoRAInputs<T>& in, int64_t L, int64_t r, int64_t m, int64_t n,
                             acc_t<T> ridge, const acc_t<T>* ridge_per_layer, int64_t ridge_bs,
                             acc_t<T> fallback_ridge, acc_t<T>* dA, acc_t<T>* dB, void* workspace,
                             size_t workspace_bytes, cudaStream_t stream);

// ---- (6) AdaPreLoRA's surrogate statistics: the row and column energies of B·E + F·A ----------------------
//
// For each of L layers (reference.tangent_energies), with Z = [B F] (m×R) and W = [E; A] (R×n),
// R = r_B + r_F:
//
//   rows[b, i] = max(0, z_iᵀ (W·Wᵀ) z_i),   cols[b, j] = max(0, w_jᵀ (Zᵀ·Z) w_j)   (a NaN stays NaN)
//
// Inputs, all of type T and addressed by the strides of TangentInputs (any strides, 0 included): B (L, m, r_B),
// E (L, r_B, n), F (L, m, r_F), A (L, r_F, n). Outputs: rows (L, m) and cols (L, n), contiguous, in acc_t<T>.
// Both are one computation on R×N matrices ("sides": side 0 is V = Zᵀ with N = m, side 1 is V = W with
// N = n), in three kernels: (i) per chunk of kTangentChunk columns, its share of the Gram M_s = V·Vᵀ (packed
// lower triangle, one thread per entry, summed in column order); (ii) per layer and side, the shares summed
// in chunk order into the full symmetric M_s; (iii) per chunk, each column's quadratic form in the other
// side's Gram, one warp per column, clamped. Chunk blocks stage 32-column panels in shared memory.
// 0 ≤ R ≤ kMaxTangentRank (R = 0 gives zeros); the binding composes ATen calls for larger R.
constexpr int kMaxTangentRank = 128;
constexpr int64_t kTangentChunk = 512;

template <typename T>
struct TangentInputs {
  const T* B;
  int64_t b_bs, b_rs, b_cs;
  const T* E;
  int64_t e_bs, e_rs, e_cs;
  const T* F;
  int64_t f_bs, f_rs, f_cs;
  const T* A;
  int64_t a_bs, a_rs, a_cs;
};

size_t tangent_energies_workspace_bytes(int64_t L, int64_t R, int64_t m, int64_t n, size_t acc_size);

template <typename T>
cudaError_t tangent_energies(const TangentInputs<T>& in, int64_t L, int64_t r_B, int64_t r_F, int64_t m, int64_t n,
                             acc_t<T>* rows, acc_t<T>* cols, void* workspace, size_t workspace_bytes,
                             cudaStream_t stream);

// ---- explicit instantiations (defined in each op's .cu) --------------------------------------------

#define LORSUM_CUDA_FOR_EACH_INPUT(X) X(float) X(double) X(__nv_bfloat16) X(__half)
#define LORSUM_CUDA_FOR_EACH_PAIR(X)                                                        \
  X(float, float) X(float, __nv_bfloat16) X(float, __half) X(__nv_bfloat16, float)          \
  X(__nv_bfloat16, __nv_bfloat16) X(__nv_bfloat16, __half) X(__half, float)                 \
  X(__half, __nv_bfloat16) X(__half, __half) X(double, double)

#define LORSUM_CUDA_DECLARE_SINGLE(T)                                                                    \
  extern template cudaError_t col_sq_sums<T>(const T*, int64_t, int64_t, int64_t, int64_t, int64_t,      \
                                             acc_t<T>*, void*, size_t, cudaStream_t);                    \
  extern template cudaError_t spd_solve<T>(const acc_t<T>*, int64_t, int64_t, int64_t, const T*, int64_t, \
                                           int64_t, int64_t, T*, int64_t, int64_t, int64_t, int64_t,      \
                                           int64_t, int64_t, acc_t<T>, acc_t<T>, cudaStream_t);
#define LORSUM_CUDA_DECLARE_PAIR(TA, TB)                                                                  \
  extern template cudaError_t row_col_energies<TA, TB>(const TA*, int64_t, int64_t, const TB*, int64_t,   \
                                                       int64_t, int64_t, int64_t, int64_t, int64_t,       \
                                                       acc_t<TB>*, acc_t<TB>*, void*, size_t,             \
                                                       cudaStream_t);                                     \
  extern template cudaError_t projected_product<TA, TB>(                                                  \
      const TA*, int64_t, int64_t, const acc_t<TB>*, int64_t, const TB*, int64_t, int64_t, int64_t,       \
      int64_t, int64_t, int64_t, int64_t, acc_t<TB>*, int64_t, int64_t, int64_t, void*, size_t,           \
      cudaStream_t);

#define LORSUM_CUDA_DECLARE_ADAPRELORA(T)                                                                 \
  extern template cudaError_t adaprelora_solve<T>(const AdaPreLoRAInputs<T>&, int64_t, int64_t, int64_t,  \
                                                  int64_t, acc_t<T>, const acc_t<T>*, int64_t, acc_t<T>, \
                                                  acc_t<T>*, acc_t<T>*, void*, size_t, cudaStream_t);

LORSUM_CUDA_FOR_EACH_INPUT(LORSUM_CUDA_DECLARE_SINGLE)
LORSUM_CUDA_FOR_EACH_PAIR(LORSUM_CUDA_DECLARE_PAIR)
LORSUM_CUDA_FOR_EACH_INPUT(LORSUM_CUDA_DECLARE_ADAPRELORA)

#define LORSUM_CUDA_DECLARE_TANGENT(T)                                                                    \
  extern template cudaError_t tangent_energies<T>(const TangentInputs<T>&, int64_t, int64_t, int64_t,     \
                                                  int64_t, int64_t, acc_t<T>*, acc_t<T>*, void*, size_t,   \
                                                  cudaStream_t);

LORSUM_CUDA_FOR_EACH_INPUT(LORSUM_CUDA_DECLARE_TANGENT)

#undef LORSUM_CUDA_DECLARE_SINGLE
#undef LORSUM_CUDA_DECLARE_PAIR
#undef LORSUM_CUDA_DECLARE_ADAPRELORA
#undef LORSUM_CUDA_DECLARE_TANGENT

}  // namespace lorsum::cuda
