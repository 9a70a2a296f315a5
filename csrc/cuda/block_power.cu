// Kernel (4) of kernels.h: the skinny token products of the block power iteration, (A·W)ᵀ·Bm (pair_products
// and the LoRSum half-steps' data terms in block_power_binding.cpp). Reference: reference.pair_products.

#include "common.cuh"
#include "tile.cuh"

#include <algorithm>
#include <cstdint>

namespace lorsum::cuda {

using namespace detail;

namespace {

// Y[b] = A[b]·W[b] (K×w, contiguous, acc_t), computed as the tile Yᵀ = Wᵀ·A[b]ᵀ: rows over w, columns
// over tokens. W is M×w contiguous (the main loop's K-major operand); A[b] is read as the transpose of a
// row-major K×M matrix. The contraction over M is split into chunks of m_rows (blockIdx.z = layer · splits
// + chunk): with one chunk the tile is written to Y, else to part (L, splits, K, w) contiguous. Unsplit,
// a 7B layer's Y (K = 2048 tokens, w = 16) is 16 blocks, each summing M = 11008 features in turn: 0.8 ms a
// call on an H200, 40× the time to read A once (the H200 profile of the 7B step, docs/gpu.md).
template <int BM, int BN, int TM, int TN, typename TA>
__global__ void __launch_bounds__(kTileThreads, 2)
    project_kernel(const TA* __restrict__ Aop, int64_t a_bs, int64_t a_rs, const acc_t<TA>* __restrict__ W,
                   int64_t w_bs, int64_t K, int64_t M, int64_t w, int64_t m_rows, int64_t splits, int64_t b0,
                   acc_t<TA>* __restrict__ Y, acc_t<TA>* __restrict__ part) {
  using A = acc_t<TA>;
  using Shape = TileShape<BM, BN, TM, TN>;
  __shared__ A As[kBK][BM];
  __shared__ A Bs[kBK][BN + 1];
  const int64_t b = b0 + blockIdx.z / splits;
  const int64_t p = blockIdx.z % splits;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * BN;  // tokens
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * BM;  // columns of W
  const int64_t m_begin = p * m_rows;
  const int64_t m_end = min64(M, m_begin + m_rows);
  A acc[TM][TN];
#pragma unroll
  for (int u = 0; u < TM; ++u) {
#pragma unroll
    for (int v = 0; v < TN; ++v) {
      acc[u][v] = A(0);
    }
  }
  atb_mainloop<BM, BN, TM, TN, true>(W + b * w_bs, w, Aop + b * a_bs, a_rs, w, K, i0, j0, m_begin, m_end,
                                     As, Bs, acc);
  const int tid = threadIdx.x;
  const int tx = tid % Shape::TX;
  const int ty = tid / Shape::TX;
  A* Yb = splits == 1 ? Y + b * K * w : part + (b * splits + p) * K * w;
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
// Rows per chunk of either contraction (the tokens of the product, the features of Y = A·W): at most
// 1024 (bounded sequential sums in each accumulator), at least 128.
constexpr int64_t kProdMinRows = 128;
constexpr int64_t kProdMaxRows = 1024;

struct ProdPlan {
  bool narrow;
  int64_t rows_per_split;  // the product's token chunks
  int64_t splits;
  int64_t m_rows;          // Y's feature chunks
  int64_t m_splits;
  size_t y_bytes;          // Y: L·K·w acc
  size_t part_bytes;       // partials, one region for both stages (run in turn on one stream): the product's
                           // L·splits·w·N acc when splits > 1, Y's L·m_splits·K·w when m_splits > 1
};

ProdPlan plan_product(int64_t L, int64_t K, int64_t M, int64_t w, int64_t N, size_t acc_size) {
  ProdPlan p{};
  p.narrow = w <= kNarrowWidth;
  const int64_t bm = p.narrow ? NarrowTile::BM : WideTile::BM;
  const int64_t bn = p.narrow ? NarrowTile::BN : WideTile::BN;
  const int64_t tiles = ceil_div(N, bn) * ceil_div(w, bm);
  p.rows_per_split = plan_rows_per_chunk(K, L * tiles, kProdMinRows, kProdMaxRows, kBK);
  p.splits = std::max<int64_t>(1, ceil_div(K, p.rows_per_split));
  const int64_t y_tiles = ceil_div(K, bn) * ceil_div(w, bm);
  p.m_rows = plan_rows_per_chunk(M, L * y_tiles, kProdMinRows, kProdMaxRows, kBK);
  p.m_splits = K > 0 ? std::max<int64_t>(1, ceil_div(M, p.m_rows)) : 1;
  p.y_bytes = K > 0 ? align_bytes(static_cast<size_t>(L * K * w) * acc_size) : 0;
  const size_t product_part = p.splits > 1 ? static_cast<size_t>(L * p.splits * w * N) : 0;
  const size_t y_part = p.m_splits > 1 ? static_cast<size_t>(L * p.m_splits * K * w) : 0;
  const size_t part = std::max(product_part, y_part);
  p.part_bytes = part > 0 ? align_bytes(part * acc_size) : 0;
  return p;
}

template <typename Tile, typename TA, typename TB>
cudaError_t launch_projected_product(const TA* A_, int64_t a_bs, int64_t a_rs, const acc_t<TB>* W, int64_t w_bs,
                                     const TB* Bm, int64_t b_bs, int64_t b_rs, int64_t L, int64_t K, int64_t M,
                                     int64_t w, int64_t N, acc_t<TB>* out, int64_t o_bs, int64_t o_ks, int64_t o_js,
                                     const ProdPlan& plan, acc_t<TB>* Y, acc_t<TB>* part, cudaStream_t stream) {
  // Stage 1: Y = A·W (skipped without tokens: the product is then an empty sum, written as zeros below),
  // feature chunks side by side in the grid's z dimension, then added in order into Y.
  if (K > 0) {
    const dim3 grid(static_cast<unsigned>(ceil_div(K, Tile::BN)), static_cast<unsigned>(ceil_div(w, Tile::BM)), 1);
    const int64_t y_layers_per_launch = std::max<int64_t>(1, kMaxGridYZ / plan.m_splits);
    for (int64_t b0 = 0; b0 < L; b0 += y_layers_per_launch) {
      dim3 g = grid;
      g.z = static_cast<unsigned>(std::min(y_layers_per_launch, L - b0) * plan.m_splits);
      project_kernel<Tile::BM, Tile::BN, Tile::TM, Tile::TN, TA><<<g, kTileThreads, 0, stream>>>(
          A_, a_bs, a_rs, W, w_bs, K, M, w, plan.m_rows, plan.m_splits, b0, Y, part);
      if (const cudaError_t e = launch_status(); e != cudaSuccess) {
        return e;
      }
    }
    if (plan.m_splits > 1) {
      if (const cudaError_t e = sum_partials<acc_t<TB>>(part, L, plan.m_splits, K, w, Y, K * w, w, 1, stream);
          e != cudaSuccess) {
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

}  // namespace

size_t projected_product_workspace_bytes(int64_t L, int64_t K, int64_t M, int64_t w, int64_t N,
                                         size_t acc_size) {
  if (L <= 0 || w <= 0 || N <= 0) {
    return 0;
  }
  const ProdPlan p = plan_product(L, K, M, w, N, acc_size);
  return p.y_bytes + p.part_bytes;
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
  const ProdPlan plan = plan_product(L, K, M, w, N, sizeof(A));
  const size_t need = projected_product_workspace_bytes(L, K, M, w, N, sizeof(A));
  if (need > 0 && (workspace == nullptr || workspace_bytes < need)) {
    return cudaErrorInvalidValue;
  }
  if (ceil_div(w, plan.narrow ? NarrowTile::BM : WideTile::BM) > kMaxGridYZ) {
    return cudaErrorInvalidValue;
  }
  A* Y = static_cast<A*>(workspace);
  A* part =
      plan.part_bytes > 0 ? reinterpret_cast<A*>(static_cast<char*>(workspace) + plan.y_bytes) : nullptr;
  if (plan.narrow) {
    return launch_projected_product<NarrowTile, TA, TB>(A_, a_bs, a_rs, W, w_bs, Bm, b_bs, b_rs, L, K, M, w, N, out,
                                                        o_bs, o_ks, o_js, plan, Y, part, stream);
  }
  return launch_projected_product<WideTile, TA, TB>(A_, a_bs, a_rs, W, w_bs, Bm, b_bs, b_rs, L, K, M, w, N, out,
                                                    o_bs, o_ks, o_js, plan, Y, part, stream);
}

#define LORSUM_CUDA_INSTANTIATE(TA, TB)                                                                      \
  template cudaError_t projected_product<TA, TB>(const TA*, int64_t, int64_t, const acc_t<TB>*, int64_t,       \
                                                 const TB*, int64_t, int64_t, int64_t, int64_t, int64_t,       \
                                                 int64_t, int64_t, acc_t<TB>*, int64_t, int64_t, int64_t,      \
                                                 void*, size_t, cudaStream_t);
LORSUM_CUDA_FOR_EACH_PAIR(LORSUM_CUDA_INSTANTIATE)
#undef LORSUM_CUDA_INSTANTIATE

}  // namespace lorsum::cuda
