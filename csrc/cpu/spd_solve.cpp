// CPU implementation of the batched r×r SPD solve with a relative ridge (spec/lorsum.md §9 H4).
//
// Reference: lorsum_kernels.reference.spd_solve. Schemas: csrc/lorsum.cpp. The factorisation and the
// substitutions are in small_spd.h; this file batches them: one ridged Cholesky per matrix (in parallel
// over the batch), then the substitutions in parallel over (matrix, block of right-hand-side columns).

#include "common.h"
#include "small_spd.h"
#include "tiles.h"

#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <vector>

namespace lorsum {

namespace cpu {

void solve_spd_batched_(const at::Tensor& gram, const at::Tensor& rhs) {
  const int64_t L = gram.size(0);
  const int64_t r = gram.size(1);
  const int64_t N = rhs.size(2);
  TORCH_INTERNAL_ASSERT(gram.is_contiguous() && rhs.is_contiguous() && gram.scalar_type() == rhs.scalar_type());
  TORCH_INTERNAL_ASSERT(rhs.size(0) == L && rhs.size(1) == r && gram.size(2) == r);
  if (L == 0 || r == 0 || N == 0) {
    return;
  }
  at::Tensor chol = at::empty({L, r, r}, gram.options());
  const bool vectorised = avx512_enabled();
  AT_DISPATCH_FLOATING_TYPES(gram.scalar_type(), "spd_solve_cpu", [&] {
    const scalar_t* g = gram.const_data_ptr<scalar_t>();
    scalar_t* c = chol.mutable_data_ptr<scalar_t>();
    scalar_t* b = rhs.mutable_data_ptr<scalar_t>();
    parallel_tasks(L, r * r * r / 3 + 1, [&](int64_t l) { ridged_cholesky(g + l * r * r, r, r, c + l * r * r); });
    const int64_t col_blocks = (N + kSolveColBlock - 1) / kSolveColBlock;
    parallel_tasks(L * col_blocks, r * r * std::min(N, kSolveColBlock), [&](int64_t task) {
      const int64_t l = task / col_blocks;
      const int64_t c0 = (task % col_blocks) * kSolveColBlock;
      const int64_t nc = std::min(kSolveColBlock, N - c0);
      scalar_t* block = b + l * r * N + c0;
      if (vectorised) {
        cholesky_solve_block_avx512<scalar_t>(c + l * r * r, r, block, N, nc);
      } else {
        cholesky_solve_block_generic<scalar_t>(c + l * r * r, r, block, N, nc);
      }
    });
  });
}

}  // namespace cpu

namespace {

at::Tensor spd_solve_cpu(const at::Tensor& gram, const at::Tensor& rhs, bool left) {
  const std::vector<int64_t> batch = check_spd_solve(gram, rhs, left, at::kCPU);
  const int64_t r = gram.size(-1);
  const int64_t L = numel_of(batch);
  const int64_t N = left ? rhs.size(-1) : rhs.size(-2);
  const auto out_dtype = at::promote_types(gram.scalar_type(), rhs.scalar_type());
  const auto acc = out_dtype == at::kDouble ? at::kDouble : at::kFloat;

  std::vector<int64_t> gram_shape(batch);
  gram_shape.insert(gram_shape.end(), {r, r});
  std::vector<int64_t> work_shape(batch);
  work_shape.insert(work_shape.end(), {r, N});
  std::vector<int64_t> out_shape(batch);
  out_shape.insert(out_shape.end(), {rhs.size(-2), rhs.size(-1)});

  at::Tensor g = gram.expand(gram_shape).to(acc).reshape({L, r, r}).contiguous();
  // The right-hand sides, transposed for a right solve (Z·gram = rhs ⇔ gram·Zᵀ = rhsᵀ), in a fresh
  // buffer that the substitutions overwrite.
  at::Tensor work = at::empty(work_shape, rhs.options().dtype(acc));
  work.copy_(left ? rhs.expand(out_shape) : rhs.expand(out_shape).mT());
  cpu::solve_spd_batched_(g, work.view({L, r, N}));
  if (left && acc == out_dtype) {
    return work;
  }
  at::Tensor out = at::empty(out_shape, rhs.options().dtype(out_dtype));
  out.copy_(left ? work : work.mT());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lorsum, CPU, m) {
  m.impl("spd_solve", &spd_solve_cpu);
}

}  // namespace lorsum
