// Batch flattening, dtype dispatch and task parallelism shared by the CPU ops; their input checks, shared
// with the CUDA ops, are in csrc/checks.h.

#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "../checks.h"

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace lorsum::cpu {

// t (..., a, b) as (L, a, b) with unit stride along b: a view when the batch dimensions merge into one
// stride and b is contiguous (S.mT of a contiguous S is such a view of S's transpose), else a copy.
inline at::Tensor rows_view(const at::Tensor& t, int64_t L) {
  at::Tensor t3 = t.reshape({L, t.size(-2), t.size(-1)});
  if (t3.size(2) > 1 && t3.stride(2) != 1) {
    t3 = t3.contiguous();
  }
  return t3;
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

// x^p with the exponents torch's pow special-cases taken as it takes them: p = 0.5 as the square root
// (correctly rounded here; torch's vectorised one may differ by an ulp), 1 as x and 0 as 1; std::pow
// otherwise. The usual p = 0.5 then costs a square root instead of a general power.
template <typename T>
inline T scalar_pow(T x, T p) {
  if (p == T(0.5)) {
    return std::sqrt(x);
  }
  if (p == T(1)) {
    return x;
  }
  if (p == T(0)) {
    return T(1);
  }
  return std::pow(x, p);
}

}  // namespace lorsum::cpu

namespace lorsum::cpu {

// Solves gram[l] · Z = rhs[l] in place for every l: gram (L, r, r) and rhs (L, r, N), both contiguous,
// both fp32 or both fp64, with the ridged Cholesky of small_spd.h. Defined in spd_solve.cpp.
void solve_spd_batched_(const at::Tensor& gram, const at::Tensor& rhs);

}  // namespace lorsum::cpu
