// CPU implementation of the row and column energies of G = Sᵀ·X (diagonal Shampoo statistics, spec/lorsum.md
// §6.1; Adafactor's factored second moment, spec/adaprelora.md) without ever writing G.
//
// Reference: lorsum_kernels.reference.row_col_energies. Schemas: csrc/lorsum.cpp.
//
// G is produced one (mb × nb) tile at a time, summed over all T tokens in an L2-resident fp32 buffer
// (outer_accumulate of tiles.h, with S's rows for the tile converted to fp32 kTokenBlock at a time), then
// squared and reduced into per-tile partial row and column sums: the epilogue of a blocked GEMM. The
// partials are added in a fixed order at the end, so results do not depend on the number of threads.
// 2·T·m·n multiply-adds, X and S read from memory in column blocks, no m×n array.
//
// With few tokens (4·T·(m+n) ≤ m·n) the same energies come from the two T×T Grams instead, at half the
// multiply-adds or fewer: rows = diag(Sᵀ·(X·Xᵀ)·S), cols = diag(Xᵀ·(S·Sᵀ)·X).

#include "common.h"
#include "tiles.h"

#include <torch/library.h>

#include <vector>

namespace lorsum {
namespace {

using cpu::avx512_enabled;

constexpr int64_t kTileRows = 128;    // mb: rows of G (columns of S) per tile
constexpr int64_t kTileCols = 192;    // nb: columns of G (columns of X) per tile, four 48-wide slabs
constexpr int64_t kTokenBlock = 128;  // tokens converted and summed in registers at a time
// Columns of G per slab in the portable path (the reference's block_size).
constexpr int64_t kGenericSlab = 256;

template <typename TS, typename TX>
LORSUM_AVX512 void energy_tile(int64_t T, int64_t mb, int64_t nb, const TS* S, int64_t lds, const TX* X, int64_t ldx,
                               float* pack, float* G) {
  std::fill(G, G + mb * nb, 0.0f);
  for (int64_t t0 = 0; t0 < T; t0 += kTokenBlock) {
    const int64_t nt = std::min(kTokenBlock, T - t0);
    for (int64_t t = 0; t < nt; ++t) {
      cpu::avx512::to_fp32(S + (t0 + t) * lds, pack + t * mb, mb);
    }
    cpu::avx512::outer_accumulate<TX>(nt, mb, nb, pack, mb, X + t0 * ldx, ldx, G, nb, kTokenBlock);
  }
}

void energies_avx512(const at::Tensor& X, const at::Tensor& S, float* rows, float* cols) {
  const int64_t L = X.size(0), T = X.size(1), n = X.size(2), m = S.size(2);
  const int64_t row_tiles = (m + kTileRows - 1) / kTileRows;
  const int64_t col_tiles = (n + kTileCols - 1) / kTileCols;
  // Partial sums per tile: rows_part (L, col_tiles, m) and cols_part (L, row_tiles, n).
  std::vector<float> rows_part(L * col_tiles * m);
  std::vector<float> cols_part(L * row_tiles * n);
  cpu::dispatch_fp32_input(S.scalar_type(), "row_col_energies", [&](auto s_tag) {
    using TS = decltype(s_tag);
    cpu::dispatch_fp32_input(X.scalar_type(), "row_col_energies", [&](auto x_tag) {
      using TX = decltype(x_tag);
      const TS* s = S.const_data_ptr<TS>();
      const TX* x = X.const_data_ptr<TX>();
      // Row tiles vary fastest: consecutive tasks share the column block of X, which stays in cache.
      cpu::parallel_tasks(L * col_tiles * row_tiles, T * kTileRows * kTileCols, [&](int64_t task) {
        const int64_t b = task / (col_tiles * row_tiles);
        const int64_t ct = (task / row_tiles) % col_tiles;
        const int64_t rt = task % row_tiles;
        const int64_t i0 = rt * kTileRows, j0 = ct * kTileCols;
        const int64_t mb = std::min(kTileRows, m - i0), nb = std::min(kTileCols, n - j0);
        std::vector<float> pack(kTokenBlock * mb);
        std::vector<float> G(mb * nb);
        energy_tile<TS, TX>(T, mb, nb, s + b * S.stride(0) + i0, S.stride(1), x + b * X.stride(0) + j0, X.stride(1),
                            pack.data(), G.data());
        float* rp = rows_part.data() + (b * col_tiles + ct) * m + i0;
        float* cp = cols_part.data() + (b * row_tiles + rt) * n + j0;
        std::fill(cp, cp + nb, 0.0f);
        for (int64_t i = 0; i < mb; ++i) {
          const float* g = G.data() + i * nb;
          float acc = 0.0f;
          for (int64_t j = 0; j < nb; ++j) {
            const float v = g[j] * g[j];
            acc += v;
            cp[j] += v;
          }
          rp[i] = acc;
        }
      });
    });
  });
  for (int64_t b = 0; b < L; ++b) {
    for (int64_t i = 0; i < m; ++i) {
      float acc = 0.0f;
      for (int64_t ct = 0; ct < col_tiles; ++ct) {
        acc += rows_part[(b * col_tiles + ct) * m + i];
      }
      rows[b * m + i] = acc;
    }
    for (int64_t j = 0; j < n; ++j) {
      float acc = 0.0f;
      for (int64_t rt = 0; rt < row_tiles; ++rt) {
        acc += cols_part[(b * row_tiles + rt) * n + j];
      }
      cols[b * n + j] = acc;
    }
  }
}

std::tuple<at::Tensor, at::Tensor> row_col_energies_cpu(const at::Tensor& X, const at::Tensor& S) {
  check_row_col_energies(X, S, at::kCPU);
  const auto batch_ref = batch_shape(X, 2);
  const std::vector<int64_t> batch(batch_ref.begin(), batch_ref.end());
  const int64_t L = numel_of(batch), T = X.size(-2), n = X.size(-1), m = S.size(-1);
  const auto acc = acc_dtype({X, S});
  std::vector<int64_t> rows_shape(batch), cols_shape(batch);
  rows_shape.push_back(m);
  cols_shape.push_back(n);
  const auto opts = X.options().dtype(acc);
  if (L == 0 || m == 0 || n == 0 || T == 0) {
    return {at::zeros(rows_shape, opts), at::zeros(cols_shape, opts)};
  }
  const at::Tensor X3 = cpu::rows_view(X, L);
  const at::Tensor S3 = cpu::rows_view(S, L);
  if (4 * T * (m + n) <= m * n) {
    // Few tokens: rows = diag(Sᵀ(XXᵀ)S) and cols = diag(Xᵀ(SSᵀ)X) through the two T×T Grams, 4·T²·(m+n)
    // multiply-adds instead of 2·T·m·n (at least half as many here), as large GEMMs.
    const at::Tensor Xa = X3.to(acc), Sa = S3.to(acc);
    const at::Tensor rows = (at::matmul(at::matmul(Xa, Xa.mT()), Sa) * Sa).sum(1);
    const at::Tensor cols = (at::matmul(at::matmul(Sa, Sa.mT()), Xa) * Xa).sum(1);
    return {rows.view(rows_shape), cols.view(cols_shape)};
  }
  if (acc == at::kFloat && avx512_enabled()) {
    at::Tensor rows = at::empty(rows_shape, opts);
    at::Tensor cols = at::empty(cols_shape, opts);
    energies_avx512(X3, S3, rows.mutable_data_ptr<float>(), cols.mutable_data_ptr<float>());
    return {rows, cols};
  }
  // Portable path: the reference's slabs through ATen, in the accumulation dtype.
  const at::Tensor St = S3.to(acc).mT();
  at::Tensor rows = at::zeros({L, m}, opts);
  at::Tensor cols = at::empty({L, n}, opts);
  for (int64_t j0 = 0; j0 < n; j0 += kGenericSlab) {
    const int64_t nb = std::min(kGenericSlab, n - j0);
    const at::Tensor slab = at::matmul(St, X3.narrow(2, j0, nb).to(acc)).square();
    rows.add_(slab.sum(-1));
    cols.narrow(1, j0, nb).copy_(slab.sum(-2));
  }
  return {rows.view(rows_shape), cols.view(cols_shape)};
}

}  // namespace

TORCH_LIBRARY_IMPL(lorsum, CPU, m) {
  m.impl("row_col_energies", &row_col_energies_cpu);
}

}  // namespace lorsum
