// Input checks, batch flattening, dtype dispatch and task parallelism shared by the CPU ops.

#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace lorsum::cpu {

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

// A dense CPU floating tensor with at least min_dim dimensions, or a clear error naming op and argument.
inline void check_input(const at::Tensor& t, const char* op, const char* name, int64_t min_dim) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got one on ", t.device());
  TORCH_CHECK(t.layout() == at::kStrided, op, ": ", name, " must be a dense (strided) tensor, got layout ",
              t.layout());
  TORCH_CHECK(t.dim() >= min_dim, op, ": ", name, " must have at least ", min_dim, " dimensions, got shape ",
              t.sizes());
  TORCH_CHECK(is_float_dtype(t.scalar_type()), op, ": ", name,
              " must be float32, float64, bfloat16 or float16, got ", t.scalar_type());
}

// The leading (batch) dimensions of t, before its last `trailing` ones.
inline at::IntArrayRef batch_shape(const at::Tensor& t, int64_t trailing) {
  return t.sizes().slice(0, t.dim() - trailing);
}

inline int64_t numel_of(at::IntArrayRef shape) {
  int64_t n = 1;
  for (const int64_t s : shape) {
    n *= s;
  }
  return n;
}

// t (..., a, b) as (L, a, b) with unit stride along b: a view when the batch dimensions merge into one
// stride and b is contiguous (S.mT of a contiguous S is such a view of S's transpose), else a copy.
inline at::Tensor rows_view(const at::Tensor& t, int64_t L) {
  at::Tensor t3 = t.reshape({L, t.size(-2), t.size(-1)});
  if (t3.size(2) > 1 && t3.stride(2) != 1) {
    t3 = t3.contiguous();
  }
  return t3;
}

// fp64 when any of the tensors is fp64, else fp32: the dtype all arithmetic runs in (DESIGN.md
// "Numerical policy"); bf16 and fp16 inputs are read as they are and accumulated in fp32.
inline at::ScalarType acc_dtype(std::initializer_list<at::Tensor> tensors) {
  for (const auto& t : tensors) {
    if (t.defined() && t.scalar_type() == at::kDouble) {
      return at::kDouble;
    }
  }
  return at::kFloat;
}

// Calls f(T{}) with T the C++ type of an fp32-accumulated input dtype (float, BFloat16, Half).
template <typename F>
inline void dispatch_fp32_input(at::ScalarType t, const char* op, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default: TORCH_CHECK(false, op, ": internal error: no fp32-accumulating kernel for ", t);
  }
}

// Multiply-adds a chunk of tasks should hold before it is worth handing to another thread.
constexpr int64_t kMinWorkPerChunk = int64_t(1) << 17;

// fn(task) for every task in [0, ntasks), spread over the intra-op threads when the work is worth it.
template <typename F>
inline void parallel_tasks(int64_t ntasks, int64_t work_per_task, const F& fn) {
  const int64_t grain = std::max<int64_t>(1, kMinWorkPerChunk / std::max<int64_t>(1, work_per_task));
  at::parallel_for(0, ntasks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      fn(task);
    }
  });
}

}  // namespace lorsum::cpu

namespace lorsum::cpu {

// Solves gram[l] · Z = rhs[l] in place for every l: gram (L, r, r) and rhs (L, r, N), both contiguous,
// both fp32 or both fp64, with the ridged Cholesky of small_spd.h. Defined in spd_solve.cpp.
void solve_spd_batched_(const at::Tensor& gram, const at::Tensor& rhs);

}  // namespace lorsum::cpu
