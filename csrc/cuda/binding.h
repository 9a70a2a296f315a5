// ATen-side helpers shared by the CUDA bindings csrc/cuda/*_binding.cpp: the glue between ATen tensors and
// the plain-CUDA launchers of kernels.h (launch status, scratch memory, pointers, dtype dispatch) and the
// ATen composition of the ridged Cholesky factor used where r exceeds the kernels' limit. Input checks
// are in csrc/checks.h, shared with the CPU ops. Built only against a CUDA torch.

#pragma once

#include "../checks.h"
#include "kernels.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <type_traits>

namespace lorsum::cuda_ops {

namespace kc = lorsum::cuda;

// Must equal reference.RELATIVE_RIDGE and reference.FALLBACK_RIDGE.
inline double relative_ridge(at::ScalarType acc) { return acc == at::kDouble ? 1e-14 : 1e-7; }
inline double fallback_ridge(at::ScalarType acc) { return acc == at::kDouble ? 1e-8 : 1e-4; }

inline void check_launch(cudaError_t status, const char* op) {
  TORCH_CHECK(status == cudaSuccess, op, ": CUDA kernel failed: ", cudaGetErrorName(status), ": ",
              cudaGetErrorString(status));
}

// t (..., a, b) as (L, a, b) with unit column stride (the kernels' layout): a view when the batch
// dimensions merge into one stride and the columns are contiguous (X itself, and f_out.mT() = S for the
// gradient pair f_out = S.mT()), else a copy. Converted to fp64 first when the op computes in fp64.
inline at::Tensor rows_view(const at::Tensor& t, int64_t L, at::ScalarType acc) {
  at::Tensor t3 = t.reshape({L, t.size(-2), t.size(-1)});
  if (acc == at::kDouble && t3.scalar_type() != at::kDouble) {
    t3 = t3.to(at::kDouble);
  }
  if (t3.size(2) > 1 && t3.stride(2) != 1) {
    t3 = t3.contiguous();
  }
  return t3;
}

// Scratch memory from torch's caching allocator, ordered on the current stream (kernels.h: the caller
// owns every launcher's workspace).
inline at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

template <typename T>
inline const T* cptr(const at::Tensor& t) {
  return static_cast<const T*>(t.const_data_ptr());
}
template <typename T>
inline T* mptr(const at::Tensor& t) {
  return static_cast<T*>(t.mutable_data_ptr());
}

// f(T{}) with T the CUDA type of a floating dtype.
template <typename F>
inline void dispatch_input(at::ScalarType t, const char* op, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kDouble: f(double{}); break;
    case at::kBFloat16: f(__nv_bfloat16{}); break;
    case at::kHalf: f(__half{}); break;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", t);
  }
}

// f(TA{}, TB{}) for the instantiated pairs of kernels.h: both fp64, or neither.
template <typename F>
inline void dispatch_pair(at::ScalarType a, at::ScalarType b, const char* op, F&& f) {
  dispatch_input(a, op, [&](auto ta) {
    dispatch_input(b, op, [&](auto tb) {
      using TA = decltype(ta);
      using TB = decltype(tb);
      if constexpr (std::is_same_v<TA, double> == std::is_same_v<TB, double>) {
        f(ta, tb);
      } else {
        TORCH_CHECK(false, op, ": internal error: fp64 mixed with ", a == at::kDouble ? b : a);
      }
    });
  });
}

// reference.ridged_cholesky through ATen (the r > kMaxSolveRank cases of spd_solve and adaprelora_solve):
// rho is the relative ridge, a tensor that broadcasts against (L, 1, 1), in acc; the fallback factor is
// chosen per matrix on the device (linalg_cholesky_ex's info), never on the host.
inline at::Tensor ridged_cholesky_aten(const at::Tensor& gram, const at::Tensor& rho, at::ScalarType acc) {
  const at::Tensor eye = at::eye(gram.size(-1), gram.options());
  const double floor = acc == at::kDouble ? 0x1p-511 : 0x1p-63;  // sqrt(finfo.tiny)
  const at::Tensor scale = gram.diagonal(0, -2, -1).mean(-1).clamp_min(floor).unsqueeze(-1).unsqueeze(-1);
  const auto first = at::linalg_cholesky_ex(gram + (rho * scale) * eye);
  const at::Tensor fallback = std::get<0>(at::linalg_cholesky_ex(gram + ((rho + fallback_ridge(acc)) * scale) * eye));
  return at::where(std::get<1>(first).eq(0).unsqueeze(-1).unsqueeze(-1), std::get<0>(first), fallback);
}

// spd_solve's CUDA implementation (spd_solve_binding.cpp), also the r×r solve of the LoRSum half-steps
// (block_power_binding.cpp).
at::Tensor spd_solve_cuda(const at::Tensor& gram, const at::Tensor& rhs, bool left);

}  // namespace lorsum::cuda_ops
