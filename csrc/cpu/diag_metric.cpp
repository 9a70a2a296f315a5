// CPU implementations of the diagonal-metric statistics (spec/lorsum.md §6.1): column sums of squares.
//
// Reference: lorsum_kernels.reference.col_sq_sums. Schemas: csrc/lorsum.cpp.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace lorsum {
namespace {

// Widest column block one task owns. Its accumulators (two arrays of this many acc_t) stay on the stack
// and in L1, while each row of the block is one contiguous read of up to 1 KiB (fp32).
constexpr int64_t kMaxColBlock = 256;
// Narrowest column block: one 64-byte cache line of fp32, so splitting columns for parallelism never
// makes two tasks share a line of input.
constexpr int64_t kMinColBlock = 16;
// Rows summed into a partial before it is added to the running total. This two-level summation keeps
// the rounding error growing like kRowChunk + T / kRowChunk rather than like T, close to the pairwise
// summation of the torch reference, at no cost in memory traffic.
constexpr int64_t kRowChunk = 128;

// x points at a (B, T, n) array with strides (batch_stride, row_stride, 1); out is a contiguous (B, n)
// array. Each task owns one (batch element, column block) and walks T, so the inner loop runs over
// contiguous columns with independent accumulators: it vectorises without reassociating any sum.
template <typename scalar_t, typename acc_t>
void col_sq_sums_kernel(
    const scalar_t* x,
    acc_t* out,
    int64_t B,
    int64_t T,
    int64_t n,
    int64_t batch_stride,
    int64_t row_stride,
    int64_t col_block) {
  const int64_t blocks_per_batch = (n + col_block - 1) / col_block;
  const int64_t tasks = B * blocks_per_batch;
  // Enough tasks per chunk that each chunk reads about at::internal::GRAIN_SIZE elements: small problems
  // stay on one thread, where starting the pool would cost more than the work.
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, T * col_block));

  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    acc_t total[kMaxColBlock];
    acc_t partial[kMaxColBlock];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks_per_batch;
      const int64_t c0 = (task % blocks_per_batch) * col_block;
      const int64_t nb = std::min(col_block, n - c0);
      const scalar_t* base = x + b * batch_stride + c0;

      std::fill(total, total + nb, acc_t(0));
      for (int64_t t0 = 0; t0 < T; t0 += kRowChunk) {
        const int64_t t1 = std::min(T, t0 + kRowChunk);
        std::fill(partial, partial + nb, acc_t(0));
        for (int64_t t = t0; t < t1; ++t) {
          const scalar_t* row = base + t * row_stride;
          for (int64_t j = 0; j < nb; ++j) {
            const acc_t v = static_cast<acc_t>(row[j]);
            partial[j] += v * v;
          }
        }
        for (int64_t j = 0; j < nb; ++j) {
          total[j] += partial[j];
        }
      }
      std::copy(total, total + nb, out + b * n + c0);
    }
  });
}

at::Tensor col_sq_sums_cpu(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "col_sq_sums: expected a CPU tensor, got one on ", x.device());
  TORCH_CHECK(x.layout() == at::kStrided, "col_sq_sums: expected a dense (strided) tensor, got layout ",
              x.layout());
  TORCH_CHECK(x.dim() >= 2, "col_sq_sums: x must have at least 2 dimensions (..., T, n), got a ", x.dim(),
              "-D tensor of shape ", x.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf,
              "col_sq_sums: x must be float32, float64, bfloat16 or float16, got ", dtype);

  const int64_t T = x.size(-2);
  const int64_t n = x.size(-1);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end() - 2);
  out_shape.push_back(n);
  const auto acc_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty(out_shape, x.options().dtype(acc_dtype));
  if (out.numel() == 0) {
    return out;
  }
  if (T == 0) {
    return out.zero_();  // an empty sum
  }

  // A (B, T, n) view; reshape copies only when the batch dimensions cannot be merged into one stride.
  at::Tensor x3 = x.reshape({-1, T, n});
  // Rows are walked with any stride, but the columns of a row must be contiguous for the inner loop
  // (a transposed view is not): copy those once. Sliced rows or columns need no copy.
  if (n > 1 && x3.stride(2) != 1) {
    x3 = x3.contiguous();
  }
  const int64_t B = x3.size(0);

  // Narrower column blocks when there are too few (batch, block) tasks to occupy every thread.
  const int64_t threads = at::get_num_threads();
  int64_t col_block = kMaxColBlock;
  while (col_block > kMinColBlock && B * ((n + col_block - 1) / col_block) < threads) {
    col_block /= 2;
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "col_sq_sums_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;  // float for fp32/bf16/fp16, double for fp64
    col_sq_sums_kernel<scalar_t, acc_t>(
        x3.const_data_ptr<scalar_t>(), out.mutable_data_ptr<acc_t>(), B, T, n, x3.stride(0), x3.stride(1),
        col_block);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lorsum, CPU, m) {
  m.impl("col_sq_sums", &col_sq_sums_cpu);
}

}  // namespace lorsum
