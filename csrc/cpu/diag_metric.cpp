// CPU implementations of the diagonal-metric statistics (spec/lorsum.md §6.1): column sums of squares, and
// the fused diagonal K-FAC metric step built on them (sums, EMA, damping, power).
//
// References: lorsum_kernels.reference.col_sq_sums, kfac_metric_update. Schemas: csrc/lorsum.cpp.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"
#include "common.h"
#include "tiles.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <utility>
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

// Sums of squares of the nb ≤ kMaxColBlock contiguous columns at `base` over T rows (row stride
// row_stride), written to out[0, nb).
template <typename scalar_t, typename acc_t>
inline __attribute__((always_inline)) void col_block_sq_sums(const scalar_t* base, int64_t T, int64_t nb,
                                                             int64_t row_stride, acc_t* out) {
  acc_t total[kMaxColBlock];
  acc_t partial[kMaxColBlock];
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
  std::copy(total, total + nb, out);
}

template <typename scalar_t, typename acc_t>
LORSUM_AVX512 void col_block_sq_sums_avx512(const scalar_t* base, int64_t T, int64_t nb, int64_t row_stride,
                                            acc_t* out) {
  col_block_sq_sums<scalar_t, acc_t>(base, T, nb, row_stride, out);
}

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

  // The same loops compiled for AVX-512 where the CPU has it (16 fp32 lanes instead of SSE2's 4).
  const bool avx512 = cpu::avx512_enabled();
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks_per_batch;
      const int64_t c0 = (task % blocks_per_batch) * col_block;
      const int64_t nb = std::min(col_block, n - c0);
      const scalar_t* base = x + b * batch_stride + c0;
      if (avx512) {
        col_block_sq_sums_avx512<scalar_t, acc_t>(base, T, nb, row_stride, out + b * n + c0);
      } else {
        col_block_sq_sums<scalar_t, acc_t>(base, T, nb, row_stride, out + b * n + c0);
      }
    }
  });
}

at::Tensor col_sq_sums_cpu(const at::Tensor& x) {
  check_col_sq_sums(x, at::kCPU);
  const auto dtype = x.scalar_type();

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

// The diagonal K-FAC metric step of spec/lorsum.md §6.1 for a group of layers, one read of X and of S:
//   v_in  ← β·v_in  + (1−β)·scale_in ·Σ_t x_t²,   M_in  = (v_in  + δ)^p
//   v_out ← β·v_out + (1−β)·scale_out·Σ_t s_t²,   M_out = (v_out + δ)^p
// The sums accumulate in fp32 (fp64 for fp64 input), as col_sq_sums; the update runs in v's dtype.
// Reference: lorsum_kernels.reference.kfac_metric_update.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kfac_metric_update_cpu(
    const at::Tensor& X, const at::Tensor& S, const at::Tensor& v_in, const at::Tensor& v_out, double beta,
    double damping, double power, double scale_in, double scale_out) {
  check_kfac_metric_update(X, S, v_in, v_out, at::kCPU);

  const at::Tensor stat_in = col_sq_sums_cpu(X);
  const at::Tensor stat_out = col_sq_sums_cpu(S);
  auto step = [&](const at::Tensor& v, const at::Tensor& stat, double scale) {
    const at::Tensor vc = v.contiguous();
    const at::Tensor sc = stat.contiguous();
    at::Tensor new_v = at::empty(v.sizes(), v.options());
    at::Tensor metric = at::empty(v.sizes(), v.options());
    const int64_t count = v.numel();
    AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "kfac_metric_update_cpu", [&] {
      using v_t = scalar_t;
      const v_t* vp = vc.const_data_ptr<v_t>();
      v_t* np = new_v.mutable_data_ptr<v_t>();
      v_t* mp = metric.mutable_data_ptr<v_t>();
      AT_DISPATCH_FLOATING_TYPES(sc.scalar_type(), "kfac_metric_update_cpu", [&] {
        const scalar_t* sp = sc.const_data_ptr<scalar_t>();
        // The reference's operations, in its order and dtypes: stat·scale in the statistic's dtype, then
        // the EMA and the power in v's.
        const v_t b = static_cast<v_t>(beta), one_minus_b = static_cast<v_t>(1.0 - beta);
        const v_t delta = static_cast<v_t>(damping), p = static_cast<v_t>(power);
        at::parallel_for(0, count, at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) {
            const v_t s = static_cast<v_t>(sp[i] * static_cast<scalar_t>(scale));
            const v_t nv = vp[i] * b + s * one_minus_b;
            np[i] = nv;
            mp[i] = cpu::scalar_pow(nv + delta, p);
          }
        });
      });
    });
    return std::pair{new_v, metric};
  };
  auto [new_in, m_in] = step(v_in, stat_in, scale_in);
  auto [new_out, m_out] = step(v_out, stat_out, scale_out);
  return {new_in, new_out, m_in, m_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(lorsum, CPU, m) {
  m.impl("col_sq_sums", &col_sq_sums_cpu);
  m.impl("kfac_metric_update", &kfac_metric_update_cpu);
}

}  // namespace lorsum
