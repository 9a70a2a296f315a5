// CUDA kernels of lorsum_kernels (DESIGN.md "Hot paths"): plain CUDA, no torch headers. Contracts are in
// kernels.h; the ops built on them are registered in binding.cpp.
//
// Determinism: every sum below has an order fixed by the problem's shapes. Work splits (T chunks, tiles)
// are planned from the shapes and fixed constants only, never from the device (SM count, free memory),
// each partial sum is produced by one thread in a fixed order, and partials are combined by a separate
// kernel in index order. No floating-point atomics anywhere.
//
// bf16 / fp16 values are converted with the explicit intrinsics (__bfloat162float, __float2half, ...):
// torch builds CUDA sources with -D__CUDA_NO_HALF_CONVERSIONS__ / -D__CUDA_NO_BFLOAT16_CONVERSIONS__,
// which remove the implicit conversions.

#include "kernels.h"

#include <algorithm>
#include <cstdint>

namespace lorsum::cuda {
namespace {

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
int64_t plan_rows_per_chunk(int64_t K, int64_t base_blocks, int64_t min_rows, int64_t max_rows, int64_t multiple) {
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
// out is addressed by (o_bs, o_ks, o_js).
template <typename A>
__global__ void __launch_bounds__(256) sum_partials_kernel(const A* __restrict__ part, int64_t B, int64_t P,
                                                           int64_t rows, int64_t cols, A* __restrict__ out,
                                                           int64_t o_bs, int64_t o_ks, int64_t o_js) {
  const int64_t width = rows * cols;
  const int64_t total = B * width;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = idx / width;
    const int64_t x = idx - b * width;
    const A* p = part + b * P * width + x;
    A s = p[0];
    for (int64_t q = 1; q < P; ++q) {
      s += p[q * width];
    }
    const int64_t k = x / cols;
    const int64_t j = x - k * cols;
    out[b * o_bs + k * o_ks + j * o_js] = s;
  }
}

template <typename A>
cudaError_t sum_partials(const A* part, int64_t B, int64_t P, int64_t rows, int64_t cols, A* out, int64_t o_bs,
                         int64_t o_ks, int64_t o_js, cudaStream_t stream) {
  const int64_t total = B * rows * cols;
  if (total == 0) {
    return cudaSuccess;
  }
  const int64_t blocks = std::min<int64_t>(ceil_div(total, 256), int64_t(1) << 20);
  sum_partials_kernel<A><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(part, B, P, rows, cols, out, o_bs,
                                                                             o_ks, o_js);
  return launch_status();
}

// ---- (1) column sums of squares ---------------------------------------------------------------------

constexpr int kCssWarpCols = 32;                           // threads along the columns
constexpr int kCssColsPerThread = 2;                       // columns per thread (kCssWarpCols apart)
constexpr int kCssCols = kCssWarpCols * kCssColsPerThread;  // columns per block
constexpr int kCssRowThreads = 8;                          // threads along the rows
// Rows per chunk: at most 1024 (so a thread sums at most 128 squares before the block's tree and the
// ordered sum over chunks: error ~ 128 + 8 + T/1024 roundings rather than T), at least 64.
constexpr int64_t kCssMinRows = 64;
constexpr int64_t kCssMaxRows = 1024;

struct CssPlan {
  int64_t col_blocks;
  int64_t rows_per_chunk;
  int64_t chunks;
};

CssPlan plan_col_sq_sums(int64_t B, int64_t T, int64_t n) {
  CssPlan p{};
  p.col_blocks = ceil_div(n, kCssCols);
  p.rows_per_chunk = plan_rows_per_chunk(T, B * p.col_blocks, kCssMinRows, kCssMaxRows, kCssRowThreads);
  p.chunks = std::max<int64_t>(1, ceil_div(T, p.rows_per_chunk));
  return p;
}

// One block: kCssCols columns × one chunk of rows of one batch element. Thread (tx, ty) sums the squares
// of rows ty, ty + 8, ... of its chunk in its two columns; the 8 row-thread sums are then added in order.
// part is (B, chunks, n) contiguous (the output itself when chunks == 1).
template <typename T>
__global__ void __launch_bounds__(kCssWarpCols* kCssRowThreads)
    col_sq_sums_kernel(const T* __restrict__ x, int64_t T_rows, int64_t n, int64_t batch_stride, int64_t row_stride,
                       int64_t rows_per_chunk, int64_t chunks, int64_t b0, acc_t<T>* __restrict__ part) {
  using A = acc_t<T>;
  __shared__ A red[kCssRowThreads][kCssCols];
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kCssCols;
  const int64_t chunk = blockIdx.y;
  const int64_t b = b0 + blockIdx.z;
  const int64_t t_begin = chunk * rows_per_chunk;
  const int64_t t_end = min64(T_rows, t_begin + rows_per_chunk);
  const T* base = x + b * batch_stride + c0;

  A acc[kCssColsPerThread];
#pragma unroll
  for (int u = 0; u < kCssColsPerThread; ++u) {
    acc[u] = A(0);
  }
  for (int64_t t = t_begin + ty; t < t_end; t += kCssRowThreads) {
    const T* row = base + t * row_stride;
#pragma unroll
    for (int u = 0; u < kCssColsPerThread; ++u) {
      const int64_t j = tx + u * kCssWarpCols;
      if (c0 + j < n) {
        const A v = to_acc(row[j]);
        acc[u] += v * v;
      }
    }
  }
#pragma unroll
  for (int u = 0; u < kCssColsPerThread; ++u) {
    red[ty][tx + u * kCssWarpCols] = acc[u];
  }
  __syncthreads();
  const int tid = ty * kCssWarpCols + tx;
  if (tid < kCssCols && c0 + tid < n) {
    A s = red[0][tid];
#pragma unroll
    for (int y = 1; y < kCssRowThreads; ++y) {
      s += red[y][tid];
    }
    part[(b * chunks + chunk) * n + c0 + tid] = s;
  }
}

// ---- the tile main loop shared by (2) and (4) ---------------------------------------------------------
//
// acc[u][v] += Σ_{k_begin ≤ t < k_end} A(t, i0 + ty + u·TY) · B(t, j0 + tx + v·TX): a BM×BN tile of AᵀB
// where A is K×M with element (t, i) at a[t·lda + i], and B is K×N with element (t, j) at b[t·ldb + j]
// (B_KFAST = false) or at b[j·ldb + t] (B_KFAST = true: B is the transpose of a row-major matrix).
// 256 threads, thread (ty, tx) = (tid / TX, tid % TX) with TX = BN/TN, TY = BM/TM. Tiles of kBK tokens are
// converted to acc_t while staged in shared memory; out-of-range rows, columns and tokens load as 0.
// Each accumulator adds its tokens one at a time in increasing order.

constexpr int kBK = 16;
// Threads per tile block. The tile kernels are declared __launch_bounds__(kTileThreads, 2): at most 128
// registers a thread, which ptxas uses without spilling (with no minimum it caps itself at 48 and spills
// a few bytes); untuned, no GPU was at hand to time the alternatives.
constexpr int kTileThreads = 256;

template <int BM, int BN, int TM, int TN>
struct TileShape {
  static constexpr int TX = BN / TN;
  static constexpr int TY = BM / TM;
  static_assert(TX * TY == kTileThreads, "a tile is computed by 256 threads");
};

template <int BM, int BN, int TM, int TN, bool B_KFAST, typename A, typename TA, typename TB>
__device__ __forceinline__ void atb_mainloop(const TA* __restrict__ a, int64_t lda, const TB* __restrict__ b,
                                             int64_t ldb, int64_t M, int64_t N, int64_t i0, int64_t j0,
                                             int64_t k_begin, int64_t k_end, A (*As)[BM], A (*Bs)[BN + 1],
                                             A (&acc)[TM][TN]) {
  using Shape = TileShape<BM, BN, TM, TN>;
  const int tid = threadIdx.x;
  const int tx = tid % Shape::TX;
  const int ty = tid / Shape::TX;
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kBK) {
    // A tile: kBK tokens × BM columns, consecutive threads on consecutive columns (coalesced).
    for (int e = tid; e < kBK * BM; e += kTileThreads) {
      const int kk = e / BM;
      const int i = e % BM;
      const int64_t t = k0 + kk;
      As[kk][i] = (t < k_end && i0 + i < M) ? to_acc(a[t * lda + i0 + i]) : A(0);
    }
    // B tile: kBK tokens × BN columns, consecutive threads along whichever index is contiguous.
    for (int e = tid; e < kBK * BN; e += kTileThreads) {
      int kk;
      int j;
      if constexpr (B_KFAST) {
        kk = e % kBK;
        j = e / kBK;
      } else {
        kk = e / BN;
        j = e % BN;
      }
      const int64_t t = k0 + kk;
      const int64_t col = j0 + j;
      A v = A(0);
      if (t < k_end && col < N) {
        v = B_KFAST ? to_acc(b[col * ldb + t]) : to_acc(b[t * ldb + col]);
      }
      Bs[kk][j] = v;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK; ++kk) {
      A av[TM];
      A bv[TN];
#pragma unroll
      for (int u = 0; u < TM; ++u) {
        av[u] = As[kk][ty + u * Shape::TY];
      }
#pragma unroll
      for (int v = 0; v < TN; ++v) {
        bv[v] = Bs[kk][tx + v * Shape::TX];
      }
#pragma unroll
      for (int u = 0; u < TM; ++u) {
#pragma unroll
        for (int v = 0; v < TN; ++v) {
          acc[u][v] = fma(av[u], bv[v], acc[u][v]);
        }
      }
    }
    __syncthreads();
  }
}

// ---- (2) row and column energies ------------------------------------------------------------------------

constexpr int kEnBM = 64;
constexpr int kEnBN = 64;
constexpr int kEnTM = 4;
constexpr int kEnTN = 4;

// One block: the 64×64 tile (rt, ct) of G[b] = S[b]ᵀ·X[b], summed over all tokens, then squared.
// rows_part (L, col_tiles, m) gets the tile's row sums, cols_part (L, row_tiles, n) its column sums (the
// outputs themselves when there is a single tile along that direction).
template <typename TS, typename TX>
__global__ void __launch_bounds__(kTileThreads, 2)
    energies_kernel(const TS* __restrict__ S, int64_t s_bs, int64_t s_rs, const TX* __restrict__ X, int64_t x_bs,
                    int64_t x_rs, int64_t T_rows, int64_t m, int64_t n, int64_t b0, int64_t row_tiles,
                    int64_t col_tiles, acc_t<TX>* __restrict__ rows_part, acc_t<TX>* __restrict__ cols_part) {
  using A = acc_t<TX>;
  using Shape = TileShape<kEnBM, kEnBN, kEnTM, kEnTN>;
  __shared__ A As[kBK][kEnBM];
  __shared__ A Bs[kBK][kEnBN + 1];
  __shared__ A col_red[Shape::TY][kEnBN];
  const int64_t b = b0 + blockIdx.z;
  const int64_t ct = blockIdx.x;
  const int64_t rt = blockIdx.y;
  const int64_t i0 = rt * kEnBM;
  const int64_t j0 = ct * kEnBN;

  A acc[kEnTM][kEnTN];
#pragma unroll
  for (int u = 0; u < kEnTM; ++u) {
#pragma unroll
    for (int v = 0; v < kEnTN; ++v) {
      acc[u][v] = A(0);
    }
  }
  atb_mainloop<kEnBM, kEnBN, kEnTM, kEnTN, false>(S + b * s_bs, s_rs, X + b * x_bs, x_rs, m, n, i0, j0, 0, T_rows,
                                                  As, Bs, acc);

  // Epilogue: square, and reduce within the tile. Elements outside G are left out (not just zero: a
  // padded row times an infinite X would be NaN).
  const int tid = threadIdx.x;
  const int tx = tid % Shape::TX;
  const int ty = tid / Shape::TX;
  A row_sum[kEnTM];
  A col_sum[kEnTN];
#pragma unroll
  for (int v = 0; v < kEnTN; ++v) {
    col_sum[v] = A(0);
  }
#pragma unroll
  for (int u = 0; u < kEnTM; ++u) {
    row_sum[u] = A(0);
    const bool row_ok = i0 + ty + u * Shape::TY < m;
#pragma unroll
    for (int v = 0; v < kEnTN; ++v) {
      if (row_ok && j0 + tx + v * Shape::TX < n) {
        const A g2 = acc[u][v] * acc[u][v];
        row_sum[u] += g2;
        col_sum[v] += g2;
      }
    }
  }
  // Row sums: across the 16 threads of equal ty (16 consecutive lanes of one warp), a fixed butterfly.
#pragma unroll
  for (int u = 0; u < kEnTM; ++u) {
#pragma unroll
    for (int off = Shape::TX / 2; off > 0; off /= 2) {
      row_sum[u] += __shfl_xor_sync(0xffffffffu, row_sum[u], off, Shape::TX);
    }
  }
  if (tx == 0) {
#pragma unroll
    for (int u = 0; u < kEnTM; ++u) {
      const int64_t i = i0 + ty + u * Shape::TY;
      if (i < m) {
        rows_part[(b * col_tiles + ct) * m + i] = row_sum[u];
      }
    }
  }
  // Column sums: across the 16 values of ty, through shared memory, added in order of ty.
#pragma unroll
  for (int v = 0; v < kEnTN; ++v) {
    col_red[ty][tx + v * Shape::TX] = col_sum[v];
  }
  __syncthreads();
  if (tid < kEnBN && j0 + tid < n) {
    A s = col_red[0][tid];
#pragma unroll
    for (int y = 1; y < Shape::TY; ++y) {
      s += col_red[y][tid];
    }
    cols_part[(b * row_tiles + rt) * n + j0 + tid] = s;
  }
}

// ---- (4) skinny token products ------------------------------------------------------------------------

// Y[b] = A[b]·W[b] (K×w, contiguous, acc_t), computed as the tile Yᵀ = Wᵀ·A[b]ᵀ: rows over w, columns
// over tokens. W is M×w contiguous (the main loop's K-major operand); A[b] is read as the transpose of a
// row-major K×M matrix.
template <int BM, int BN, int TM, int TN, typename TA>
__global__ void __launch_bounds__(kTileThreads, 2)
    project_kernel(const TA* __restrict__ Aop, int64_t a_bs, int64_t a_rs, const acc_t<TA>* __restrict__ W,
                   int64_t w_bs, int64_t K, int64_t M, int64_t w, int64_t b0, acc_t<TA>* __restrict__ Y) {
  using A = acc_t<TA>;
  using Shape = TileShape<BM, BN, TM, TN>;
  __shared__ A As[kBK][BM];
  __shared__ A Bs[kBK][BN + 1];
  const int64_t b = b0 + blockIdx.z;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * BN;  // tokens
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * BM;  // columns of W
  A acc[TM][TN];
#pragma unroll
  for (int u = 0; u < TM; ++u) {
#pragma unroll
    for (int v = 0; v < TN; ++v) {
      acc[u][v] = A(0);
    }
  }
  atb_mainloop<BM, BN, TM, TN, true>(W + b * w_bs, w, Aop + b * a_bs, a_rs, w, K, i0, j0, 0, M, As, Bs, acc);
  const int tid = threadIdx.x;
  const int tx = tid % Shape::TX;
  const int ty = tid / Shape::TX;
  A* Yb = Y + b * K * w;
#pragma unroll
  for (int u = 0; u < TM; ++u) {
    const int64_t k = i0 + ty + u * Shape::TY;
#pragma unroll
    for (int v = 0; v < TN; ++v) {
      const int64_t t = j0 + tx + v * Shape::TX;
      if (k < w && t < K) {
        Yb[t * w + k] = acc[u][v];
      }
    }
  }
}

// out[b] = Y[b]ᵀ·Bm[b] over one chunk of tokens per block (blockIdx.z = layer · splits + chunk). With one
// chunk the tile is written to out (strides o_*); else to part (L, splits, w, N) contiguous.
template <int BM, int BN, int TM, int TN, typename TB>
__global__ void __launch_bounds__(kTileThreads, 2)
    token_product_kernel(const acc_t<TB>* __restrict__ Y, const TB* __restrict__ Bm, int64_t b_bs, int64_t b_rs,
                         int64_t K, int64_t w, int64_t N, int64_t rows_per_split, int64_t splits, int64_t b0,
                         acc_t<TB>* __restrict__ out, int64_t o_bs, int64_t o_ks, int64_t o_js,
                         acc_t<TB>* __restrict__ part) {
  using A = acc_t<TB>;
  using Shape = TileShape<BM, BN, TM, TN>;
  __shared__ A As[kBK][BM];
  __shared__ A Bs[kBK][BN + 1];
  const int64_t b = b0 + blockIdx.z / splits;
  const int64_t p = blockIdx.z % splits;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * BN;
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * BM;
  const int64_t k_begin = p * rows_per_split;
  const int64_t k_end = min64(K, k_begin + rows_per_split);
  A acc[TM][TN];
#pragma unroll
  for (int u = 0; u < TM; ++u) {
#pragma unroll
    for (int v = 0; v < TN; ++v) {
      acc[u][v] = A(0);
    }
  }
  atb_mainloop<BM, BN, TM, TN, false>(Y + b * K * w, w, Bm + b * b_bs, b_rs, w, N, i0, j0, k_begin, k_end, As, Bs,
                                      acc);
  const int tid = threadIdx.x;
  const int tx = tid % Shape::TX;
  const int ty = tid / Shape::TX;
#pragma unroll
  for (int u = 0; u < TM; ++u) {
    const int64_t k = i0 + ty + u * Shape::TY;
#pragma unroll
    for (int v = 0; v < TN; ++v) {
      const int64_t j = j0 + tx + v * Shape::TX;
      if (k < w && j < N) {
        if (splits == 1) {
          out[b * o_bs + k * o_ks + j * o_js] = acc[u][v];
        } else {
          part[((b * splits + p) * w + k) * N + j] = acc[u][v];
        }
      }
    }
  }
}

// Tile shapes of (4): a 16-row tile for widths up to 16 (r ≤ 16: no wasted rows of w), else 64×64.
constexpr int kNarrowWidth = 16;
struct NarrowTile {
  static constexpr int BM = 16, BN = 128, TM = 1, TN = 8;
};
struct WideTile {
  static constexpr int BM = 64, BN = 64, TM = 4, TN = 4;
};
// Token rows per chunk of the product: at most 1024 (bounded sequential sums in each accumulator), at
// least 128.
constexpr int64_t kProdMinRows = 128;
constexpr int64_t kProdMaxRows = 1024;

struct ProdPlan {
  bool narrow;
  int64_t rows_per_split;
  int64_t splits;
  size_t y_bytes;     // Y: L·K·w acc
  size_t part_bytes;  // partials: L·splits·w·N acc when splits > 1
};

ProdPlan plan_product(int64_t L, int64_t K, int64_t w, int64_t N, size_t acc_size) {
  ProdPlan p{};
  p.narrow = w <= kNarrowWidth;
  const int64_t bm = p.narrow ? NarrowTile::BM : WideTile::BM;
  const int64_t bn = p.narrow ? NarrowTile::BN : WideTile::BN;
  const int64_t tiles = ceil_div(N, bn) * ceil_div(w, bm);
  p.rows_per_split = plan_rows_per_chunk(K, L * tiles, kProdMinRows, kProdMaxRows, kBK);
  p.splits = std::max<int64_t>(1, ceil_div(K, p.rows_per_split));
  p.y_bytes = align_bytes(static_cast<size_t>(L * K * w) * acc_size);
  p.part_bytes = p.splits > 1 ? align_bytes(static_cast<size_t>(L * p.splits * w * N) * acc_size) : 0;
  return p;
}

template <typename Tile, typename TA, typename TB>
cudaError_t launch_projected_product(const TA* A_, int64_t a_bs, int64_t a_rs, const acc_t<TB>* W, int64_t w_bs,
                                     const TB* Bm, int64_t b_bs, int64_t b_rs, int64_t L, int64_t K, int64_t M,
                                     int64_t w, int64_t N, acc_t<TB>* out, int64_t o_bs, int64_t o_ks, int64_t o_js,
                                     const ProdPlan& plan, acc_t<TB>* Y, acc_t<TB>* part, cudaStream_t stream) {
  // Stage 1: Y = A·W (skipped without tokens: the product is then an empty sum, written as zeros below).
  if (K > 0) {
    const dim3 grid(static_cast<unsigned>(ceil_div(K, Tile::BN)), static_cast<unsigned>(ceil_div(w, Tile::BM)), 1);
    for (int64_t b0 = 0; b0 < L; b0 += kMaxGridYZ) {
      dim3 g = grid;
      g.z = static_cast<unsigned>(std::min(kMaxGridYZ, L - b0));
      project_kernel<Tile::BM, Tile::BN, Tile::TM, Tile::TN, TA>
          <<<g, kTileThreads, 0, stream>>>(A_, a_bs, a_rs, W, w_bs, K, M, w, b0, Y);
      if (const cudaError_t e = launch_status(); e != cudaSuccess) {
        return e;
      }
    }
  }
  // Stage 2: out = Yᵀ·Bm, token chunks side by side in the grid's z dimension.
  const dim3 grid(static_cast<unsigned>(ceil_div(N, Tile::BN)), static_cast<unsigned>(ceil_div(w, Tile::BM)), 1);
  const int64_t layers_per_launch = std::max<int64_t>(1, kMaxGridYZ / plan.splits);
  for (int64_t b0 = 0; b0 < L; b0 += layers_per_launch) {
    dim3 g = grid;
    g.z = static_cast<unsigned>(std::min(layers_per_launch, L - b0) * plan.splits);
    token_product_kernel<Tile::BM, Tile::BN, Tile::TM, Tile::TN, TB><<<g, kTileThreads, 0, stream>>>(
        Y, Bm, b_bs, b_rs, K, w, N, plan.rows_per_split, plan.splits, b0, out, o_bs, o_ks, o_js, part);
    if (const cudaError_t e = launch_status(); e != cudaSuccess) {
      return e;
    }
  }
  // Stage 3: the chunks' partial products, added in order.
  if (plan.splits > 1) {
    return sum_partials<acc_t<TB>>(part, L, plan.splits, w, N, out, o_bs, o_ks, o_js, stream);
  }
  return cudaSuccess;
}

// ---- (3) batched small SPD solves -----------------------------------------------------------------------

constexpr int kSolveThreads = 128;
constexpr size_t kSolveSmemLimit = 48 * 1024;  // static limit: no opt-in attribute needed

__device__ __forceinline__ int tri(int i, int k) { return i * (i + 1) / 2 + k; }

size_t solve_smem_bytes(int64_t r, int64_t cb, size_t acc_size) {
  return static_cast<size_t>(r * (r + 1) / 2 + r * (cb + 1)) * acc_size;
}

// Right-hand-side columns per block: the widest of 128, 64, 32 whose packed factor and r×(cb+1) block fit
// in the static shared-memory limit (fp32: 128 for every r ≤ 64; fp64: 32 at r = 64).
int64_t solve_cols_per_block(int64_t r, size_t acc_size) {
  for (int64_t cb = kSolveThreads; cb > 32; cb /= 2) {
    if (solve_smem_bytes(r, cb, acc_size) <= kSolveSmemLimit) {
      return cb;
    }
  }
  return 32;
}

// Cholesky factor of gram + shift·I into the packed lower triangle Lp (row i at tri(i, 0)), by all threads
// of the block, right-looking: pivot, scale the column, update the trailing lower triangle. Returns false
// (the same value in every thread) when a pivot is not > 0 (NaN included), as LAPACK's potrf reports.
template <typename A>
__device__ bool factor_packed(const A* __restrict__ g, int64_t g_rs, int64_t g_cs, int r, A shift, A* Lp,
                              int* s_fail) {
  const int tid = threadIdx.x;
  // Every thread is done with Lp and *s_fail from a previous attempt.
  __syncthreads();
  for (int i = 0; i < r; ++i) {
    for (int k = tid; k <= i; k += kSolveThreads) {
      const A v = g[i * g_rs + k * g_cs];
      Lp[tri(i, k)] = i == k ? v + shift : v;
    }
  }
  if (tid == 0) {
    *s_fail = 0;
  }
  __syncthreads();
  for (int j = 0; j < r; ++j) {
    if (tid == 0) {
      const A d = Lp[tri(j, j)];
      if (!(d > A(0))) {
        *s_fail = 1;
      }
      Lp[tri(j, j)] = sqrt(d);
    }
    __syncthreads();
    // Uniform: read by every thread after the barrier, written again only after the next one.
    if (*s_fail) {
      return false;
    }
    const A djj = Lp[tri(j, j)];
    for (int i = j + 1 + tid; i < r; i += kSolveThreads) {
      Lp[tri(i, j)] /= djj;
    }
    __syncthreads();
    const int rem = r - j - 1;
    for (int e = tid; e < rem * rem; e += kSolveThreads) {
      const int i = j + 1 + e / rem;
      const int k = j + 1 + e % rem;
      if (k <= i) {
        Lp[tri(i, k)] -= Lp[tri(i, j)] * Lp[tri(k, j)];
      }
    }
    __syncthreads();
  }
  return true;
}

// One block: matrix blockIdx.x, right-hand-side columns [c0, c0 + cb) with c0 = (c_block0 + blockIdx.y)·cb.
template <typename T>
__global__ void __launch_bounds__(kSolveThreads)
    spd_solve_kernel(const acc_t<T>* __restrict__ gram, int64_t g_bs, int64_t g_rs, int64_t g_cs,
                     const T* rhs, int64_t r_bs, int64_t r_ks, int64_t r_cs, T* out, int64_t o_bs, int64_t o_ks,
                     int64_t o_cs, int r, int64_t N, int cb, int64_t c_block0, acc_t<T> ridge,
                     acc_t<T> fallback_ridge) {
  using A = acc_t<T>;
  extern __shared__ __align__(16) unsigned char solve_smem[];
  A* Lp = reinterpret_cast<A*>(solve_smem);  // packed lower triangle, r(r+1)/2
  A* Bm = Lp + r * (r + 1) / 2;              // r × cb block of right-hand sides, row stride cb + 1
  const int ldb = cb + 1;
  __shared__ A s_scale;
  __shared__ int s_fail;

  const int tid = threadIdx.x;
  const int64_t b = blockIdx.x;
  const int64_t c0 = (c_block0 + blockIdx.y) * cb;
  const int nc = static_cast<int>(min64(cb, N - c0));
  const A* g = gram + b * g_bs;

  // Stage the right-hand sides, consecutive threads along whichever index has the smaller stride.
  {
    const T* src = rhs + b * r_bs + c0 * r_cs;
    const bool c_fast = r_cs <= r_ks;
    for (int e = tid; e < r * nc; e += kSolveThreads) {
      const int k = c_fast ? e / nc : e % r;
      const int c = c_fast ? e % nc : e / r;
      Bm[k * ldb + c] = to_acc(src[k * r_ks + c * r_cs]);
    }
  }
  // The mean diagonal, floored at sqrt(tiny) (a NaN stays NaN, as with clamp_min).
  if (tid == 0) {
    A d = A(0);
    for (int i = 0; i < r; ++i) {
      d += g[i * (g_rs + g_cs)];
    }
    d /= static_cast<A>(r);
    const A floor = sqrt_tiny(A(0));
    s_scale = d < floor ? floor : d;
  }
  __syncthreads();
  const A scale = s_scale;
  bool ok = false;
  if (is_finite(scale)) {
    ok = factor_packed(g, g_rs, g_cs, r, ridge * scale, Lp, &s_fail);
    if (!ok) {
      ok = factor_packed(g, g_rs, g_cs, r, fallback_ridge * scale, Lp, &s_fail);
    }
  }
  __syncthreads();
  if (!ok) {
    // Both factorisations failed (a NaN Gram) or the scale is not finite: a NaN factor, so NaN results.
    const A nan = A(0) / A(0);
    for (int e = tid; e < r * (r + 1) / 2; e += kSolveThreads) {
      Lp[e] = nan;
    }
    __syncthreads();
  }

  // Forward then back substitution, one thread per column.
  if (tid < nc) {
    A* col = Bm + tid;
    for (int i = 0; i < r; ++i) {
      A v = col[i * ldb];
      const A* li = Lp + tri(i, 0);
      for (int k = 0; k < i; ++k) {
        v -= li[k] * col[k * ldb];
      }
      col[i * ldb] = v / li[i];
    }
    for (int i = r - 1; i >= 0; --i) {
      A v = col[i * ldb];
      for (int k = i + 1; k < r; ++k) {
        v -= Lp[tri(k, i)] * col[k * ldb];
      }
      col[i * ldb] = v / Lp[tri(i, i)];
    }
  }
  __syncthreads();
  {
    T* dst = out + b * o_bs + c0 * o_cs;
    const bool c_fast = o_cs <= o_ks;
    for (int e = tid; e < r * nc; e += kSolveThreads) {
      const int k = c_fast ? e / nc : e % r;
      const int c = c_fast ? e % nc : e / r;
      store(dst + k * o_ks + c * o_cs, Bm[k * ldb + c]);
    }
  }
}


// ---- (5) AdaPreLoRA's H-weighted factor solve -------------------------------------------------------------

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

// ---- launchers --------------------------------------------------------------------------------------------

size_t col_sq_sums_workspace_bytes(int64_t B, int64_t T, int64_t n, size_t acc_size) {
  if (B <= 0 || T <= 0 || n <= 0) {
    return 0;
  }
  const CssPlan p = plan_col_sq_sums(B, T, n);
  return p.chunks > 1 ? align_bytes(static_cast<size_t>(B * p.chunks * n) * acc_size) : 0;
}

template <typename T>
cudaError_t col_sq_sums(const T* x, int64_t B, int64_t T_rows, int64_t n, int64_t batch_stride, int64_t row_stride,
                        acc_t<T>* out, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  using A = acc_t<T>;
  if (B < 0 || T_rows < 0 || n < 0 || batch_stride < 0 || row_stride < 0) {
    return cudaErrorInvalidValue;
  }
  if (B == 0 || n == 0) {
    return cudaSuccess;
  }
  if (out == nullptr) {
    return cudaErrorInvalidValue;
  }
  if (T_rows == 0) {
    return cudaMemsetAsync(out, 0, static_cast<size_t>(B * n) * sizeof(A), stream);  // an empty sum
  }
  if (x == nullptr) {
    return cudaErrorInvalidValue;
  }
  const CssPlan plan = plan_col_sq_sums(B, T_rows, n);
  const size_t need = col_sq_sums_workspace_bytes(B, T_rows, n, sizeof(A));
  if (need > 0 && (workspace == nullptr || workspace_bytes < need)) {
    return cudaErrorInvalidValue;
  }
  A* part = plan.chunks > 1 ? static_cast<A*>(workspace) : out;
  const dim3 block(kCssWarpCols, kCssRowThreads);
  for (int64_t b0 = 0; b0 < B; b0 += kMaxGridYZ) {
    const dim3 grid(static_cast<unsigned>(plan.col_blocks), static_cast<unsigned>(plan.chunks),
                    static_cast<unsigned>(std::min(kMaxGridYZ, B - b0)));
    col_sq_sums_kernel<T><<<grid, block, 0, stream>>>(x, T_rows, n, batch_stride, row_stride, plan.rows_per_chunk,
                                                      plan.chunks, b0, part);
    if (const cudaError_t e = launch_status(); e != cudaSuccess) {
      return e;
    }
  }
  if (plan.chunks > 1) {
    return sum_partials<A>(part, B, plan.chunks, 1, n, out, n, 0, 1, stream);
  }
  return cudaSuccess;
}

size_t row_col_energies_workspace_bytes(int64_t L, int64_t m, int64_t n, size_t acc_size) {
  if (L <= 0 || m <= 0 || n <= 0) {
    return 0;
  }
  const int64_t row_tiles = ceil_div(m, kEnBM);
  const int64_t col_tiles = ceil_div(n, kEnBN);
  size_t bytes = 0;
  if (col_tiles > 1) {
    bytes += align_bytes(static_cast<size_t>(L * col_tiles * m) * acc_size);
  }
  if (row_tiles > 1) {
    bytes += align_bytes(static_cast<size_t>(L * row_tiles * n) * acc_size);
  }
  return bytes;
}

template <typename TS, typename TX>
cudaError_t row_col_energies(const TS* S, int64_t s_bs, int64_t s_rs, const TX* X, int64_t x_bs, int64_t x_rs,
                             int64_t L, int64_t T_rows, int64_t m, int64_t n, acc_t<TX>* rows, acc_t<TX>* cols,
                             void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  using A = acc_t<TX>;
  static_assert(sizeof(acc_t<TS>) == sizeof(A), "S and X must share the accumulation type");
  if (L < 0 || T_rows < 0 || m < 0 || n < 0 || s_bs < 0 || s_rs < 0 || x_bs < 0 || x_rs < 0) {
    return cudaErrorInvalidValue;
  }
  if (L == 0 || (m == 0 && n == 0)) {
    return cudaSuccess;
  }
  if ((m > 0 && rows == nullptr) || (n > 0 && cols == nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (m == 0 || n == 0) {
    // G has no entries: every energy is an empty sum.
    if (m > 0) {
      return cudaMemsetAsync(rows, 0, static_cast<size_t>(L * m) * sizeof(A), stream);
    }
    return cudaMemsetAsync(cols, 0, static_cast<size_t>(L * n) * sizeof(A), stream);
  }
  if (T_rows > 0 && (S == nullptr || X == nullptr)) {
    return cudaErrorInvalidValue;
  }
  const size_t need = row_col_energies_workspace_bytes(L, m, n, sizeof(A));
  if (need > 0 && (workspace == nullptr || workspace_bytes < need)) {
    return cudaErrorInvalidValue;
  }
  const int64_t row_tiles = ceil_div(m, kEnBM);
  const int64_t col_tiles = ceil_div(n, kEnBN);
  if (row_tiles > kMaxGridYZ) {
    return cudaErrorInvalidValue;
  }
  char* ws = static_cast<char*>(workspace);
  A* rows_part = rows;
  A* cols_part = cols;
  if (col_tiles > 1) {
    rows_part = reinterpret_cast<A*>(ws);
    ws += align_bytes(static_cast<size_t>(L * col_tiles * m) * sizeof(A));
  }
  if (row_tiles > 1) {
    cols_part = reinterpret_cast<A*>(ws);
  }
  for (int64_t b0 = 0; b0 < L; b0 += kMaxGridYZ) {
    const dim3 grid(static_cast<unsigned>(col_tiles), static_cast<unsigned>(row_tiles),
                    static_cast<unsigned>(std::min(kMaxGridYZ, L - b0)));
    energies_kernel<TS, TX><<<grid, kTileThreads, 0, stream>>>(S, s_bs, s_rs, X, x_bs, x_rs, T_rows, m, n, b0,
                                                               row_tiles, col_tiles, rows_part, cols_part);
    if (const cudaError_t e = launch_status(); e != cudaSuccess) {
      return e;
    }
  }
  if (col_tiles > 1) {
    if (const cudaError_t e = sum_partials<A>(rows_part, L, col_tiles, 1, m, rows, m, 0, 1, stream);
        e != cudaSuccess) {
      return e;
    }
  }
  if (row_tiles > 1) {
    return sum_partials<A>(cols_part, L, row_tiles, 1, n, cols, n, 0, 1, stream);
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t spd_solve(const acc_t<T>* gram, int64_t g_bs, int64_t g_rs, int64_t g_cs, const T* rhs, int64_t rhs_bs,
                      int64_t rhs_ks, int64_t rhs_cs, T* out, int64_t out_bs, int64_t out_ks, int64_t out_cs,
                      int64_t L, int64_t r, int64_t N, acc_t<T> ridge, acc_t<T> fallback_ridge,
                      cudaStream_t stream) {
  using A = acc_t<T>;
  if (L < 0 || r < 0 || N < 0 || r > kMaxSolveRank || g_bs < 0 || g_rs < 0 || g_cs < 0 || rhs_bs < 0 ||
      rhs_ks < 0 || rhs_cs < 0 || out_bs < 0 || out_ks < 0 || out_cs < 0) {
    return cudaErrorInvalidValue;
  }
  if (L == 0 || r == 0 || N == 0) {
    return cudaSuccess;
  }
  if (gram == nullptr || rhs == nullptr || out == nullptr) {
    return cudaErrorInvalidValue;
  }
  const int64_t cb = solve_cols_per_block(r, sizeof(A));
  const size_t smem = solve_smem_bytes(r, cb, sizeof(A));
  const int64_t col_blocks = ceil_div(N, cb);
  for (int64_t c_block0 = 0; c_block0 < col_blocks; c_block0 += kMaxGridYZ) {
    for (int64_t b0 = 0; b0 < L; b0 += INT32_MAX) {
      const int64_t nb = std::min<int64_t>(INT32_MAX, L - b0);
      const dim3 grid(static_cast<unsigned>(nb), static_cast<unsigned>(std::min(kMaxGridYZ, col_blocks - c_block0)));
      spd_solve_kernel<T><<<grid, kSolveThreads, smem, stream>>>(
          gram + b0 * g_bs, g_bs, g_rs, g_cs, rhs + b0 * rhs_bs, rhs_bs, rhs_ks, rhs_cs, out + b0 * out_bs, out_bs,
          out_ks, out_cs, static_cast<int>(r), N, static_cast<int>(cb), c_block0, static_cast<A>(ridge),
          static_cast<A>(fallback_ridge));
      if (const cudaError_t e = launch_status(); e != cudaSuccess) {
        return e;
      }
    }
  }
  return cudaSuccess;
}

size_t projected_product_workspace_bytes(int64_t L, int64_t K, int64_t w, int64_t N, size_t acc_size) {
  if (L <= 0 || w <= 0 || N <= 0) {
    return 0;
  }
  const ProdPlan p = plan_product(L, K, w, N, acc_size);
  return (K > 0 ? p.y_bytes : 0) + p.part_bytes;
}

template <typename TA, typename TB>
cudaError_t projected_product(const TA* A_, int64_t a_bs, int64_t a_rs, const acc_t<TB>* W, int64_t w_bs,
                              const TB* Bm, int64_t b_bs, int64_t b_rs, int64_t L, int64_t K, int64_t M, int64_t w,
                              int64_t N, acc_t<TB>* out, int64_t o_bs, int64_t o_ks, int64_t o_js, void* workspace,
                              size_t workspace_bytes, cudaStream_t stream) {
  using A = acc_t<TB>;
  static_assert(sizeof(acc_t<TA>) == sizeof(A), "A and Bm must share the accumulation type");
  if (L < 0 || K < 0 || M < 0 || w < 0 || N < 0 || a_bs < 0 || a_rs < 0 || w_bs < 0 || b_bs < 0 || b_rs < 0 ||
      o_bs < 0 || o_ks < 0 || o_js < 0) {
    return cudaErrorInvalidValue;
  }
  if (L == 0 || w == 0 || N == 0) {
    return cudaSuccess;
  }
  if (out == nullptr || (K > 0 && (A_ == nullptr || Bm == nullptr || (M > 0 && W == nullptr)))) {
    return cudaErrorInvalidValue;
  }
  const ProdPlan plan = plan_product(L, K, w, N, sizeof(A));
  const size_t need = projected_product_workspace_bytes(L, K, w, N, sizeof(A));
  if (need > 0 && (workspace == nullptr || workspace_bytes < need)) {
    return cudaErrorInvalidValue;
  }
  if (ceil_div(w, plan.narrow ? NarrowTile::BM : WideTile::BM) > kMaxGridYZ) {
    return cudaErrorInvalidValue;
  }
  A* Y = static_cast<A*>(workspace);
  A* part = plan.splits > 1 ? reinterpret_cast<A*>(static_cast<char*>(workspace) + (K > 0 ? plan.y_bytes : 0))
                            : nullptr;
  if (plan.narrow) {
    return launch_projected_product<NarrowTile, TA, TB>(A_, a_bs, a_rs, W, w_bs, Bm, b_bs, b_rs, L, K, M, w, N, out,
                                                        o_bs, o_ks, o_js, plan, Y, part, stream);
  }
  return launch_projected_product<WideTile, TA, TB>(A_, a_bs, a_rs, W, w_bs, Bm, b_bs, b_rs, L, K, M, w, N, out,
                                                    o_bs, o_ks, o_js, plan, Y, part, stream);
}

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

// ---- (6) AdaPreLoRA's surrogate statistics ----------------------------------------------------------------

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

// ---- explicit instantiations ------------------------------------------------------------------------------

#define LORSUM_CUDA_INSTANTIATE_SINGLE(T)                                                                      \
  template cudaError_t col_sq_sums<T>(const T*, int64_t, int64_t, int64_t, int64_t, int64_t, acc_t<T>*, void*, \
                                      size_t, cudaStream_t);                                                   \
  template cudaError_t spd_solve<T>(const acc_t<T>*, int64_t, int64_t, int64_t, const T*, int64_t, int64_t,    \
                                    int64_t, T*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,         \
                                    acc_t<T>, acc_t<T>, cudaStream_t);
#define LORSUM_CUDA_INSTANTIATE_PAIR(TA, TB)                                                                    \
  template cudaError_t row_col_energies<TA, TB>(const TA*, int64_t, int64_t, const TB*, int64_t, int64_t,       \
                                                int64_t, int64_t, int64_t, int64_t, acc_t<TB>*, acc_t<TB>*,     \
                                                void*, size_t, cudaStream_t);                                   \
  template cudaError_t projected_product<TA, TB>(const TA*, int64_t, int64_t, const acc_t<TB>*, int64_t,        \
                                                 const TB*, int64_t, int64_t, int64_t, int64_t, int64_t,        \
                                                 int64_t, int64_t, acc_t<TB>*, int64_t, int64_t, int64_t,       \
                                                 void*, size_t, cudaStream_t);

#define LORSUM_CUDA_INSTANTIATE_ADAPRELORA(T)                                                                  \
  template cudaError_t adaprelora_solve<T>(const AdaPreLoRAInputs<T>&, int64_t, int64_t, int64_t, int64_t,      \
                                           acc_t<T>, const acc_t<T>*, int64_t, acc_t<T>, acc_t<T>*, acc_t<T>*, \
                                           void*, size_t, cudaStream_t);

LORSUM_CUDA_FOR_EACH_INPUT(LORSUM_CUDA_INSTANTIATE_SINGLE)
LORSUM_CUDA_FOR_EACH_PAIR(LORSUM_CUDA_INSTANTIATE_PAIR)
LORSUM_CUDA_FOR_EACH_INPUT(LORSUM_CUDA_INSTANTIATE_ADAPRELORA)

#define LORSUM_CUDA_INSTANTIATE_TANGENT(T)                                                                     \
  template cudaError_t tangent_energies<T>(const TangentInputs<T>&, int64_t, int64_t, int64_t, int64_t, int64_t, \
                                           acc_t<T>*, acc_t<T>*, void*, size_t, cudaStream_t);

LORSUM_CUDA_FOR_EACH_INPUT(LORSUM_CUDA_INSTANTIATE_TANGENT)

#undef LORSUM_CUDA_INSTANTIATE_SINGLE
#undef LORSUM_CUDA_INSTANTIATE_PAIR
#undef LORSUM_CUDA_INSTANTIATE_ADAPRELORA
#undef LORSUM_CUDA_INSTANTIATE_TANGENT

}  // namespace lorsum::cuda
