// CUDA implementations of the lorsum ops: TORCH_LIBRARY_IMPL(lorsum, CUDA, m) over the plain-CUDA launchers
// of kernels.h. Built only against a CUDA torch (setup.py adds csrc/cuda/*.cpp with the .cu files).
//
// Schemas: csrc/lorsum.cpp. References: lorsum_kernels/reference.py. Each op checks its inputs (device,
// dtype, dimensions, shapes) with a TORCH_CHECK naming the op and the argument, flattens the batch
// dimensions, copies an input only when its columns are not contiguous (or to convert it to fp64 when
// another input is fp64), takes scratch memory from torch's caching allocator on the current stream, and
// never synchronises with the host.
//
//   col_sq_sums             kernel (1)
//   kfac_metric_update      kernel (1) for both statistics, then the EMA, damping and power as ATen
//                           element-wise ops, in the reference's order
//   row_col_energies        kernel (2)
//   spd_solve               kernel (3) for r ≤ 64; for r > 64 the reference's ATen calls
//                           (linalg_cholesky_ex with the on-device fallback, cholesky_solve)
//   pair_products           kernel (4), once per product
//   lorsum_update_in / out  kernel (4) for every pair's data term, cuBLAS (at::matmul) for the r-wide
//                           Grams and anchor terms, kernel (3) for the solve; reference.lorsum_update_in/out's
//                           formulation: the anchor plus the solved change from it
//   adaprelora_solve        kernel (5) for r ≤ 64; for r > 64 the reference's ATen calls
//   tangent_energies        kernel (6) for r_B + r_F ≤ 128; above, the reference's ATen calls

#include "kernels.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace lorsum {
namespace {

namespace kc = lorsum::cuda;

// Must equal reference.RELATIVE_RIDGE and reference.FALLBACK_RIDGE.
double relative_ridge(at::ScalarType acc) { return acc == at::kDouble ? 1e-14 : 1e-7; }
double fallback_ridge(at::ScalarType acc) { return acc == at::kDouble ? 1e-8 : 1e-4; }

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

// A dense floating CUDA tensor on `device` with at least min_dim dimensions.
void check_input(const at::Tensor& t, const char* op, const char* name, int64_t min_dim, const at::Device& device) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == device, op, ": ", name, " is on ", t.device(), " but the first input is on ", device,
              " (all tensor inputs must be on one device)");
  TORCH_CHECK(t.layout() == at::kStrided, op, ": ", name, " must be a dense (strided) tensor, got layout ",
              t.layout());
  TORCH_CHECK(t.dim() >= min_dim, op, ": ", name, " must have at least ", min_dim, " dimensions, got shape ",
              t.sizes());
  TORCH_CHECK(is_float_dtype(t.scalar_type()), op, ": ", name, " must be float32, float64, bfloat16 or float16, got ",
              t.scalar_type());
}

void check_launch(cudaError_t status, const char* op) {
  TORCH_CHECK(status == cudaSuccess, op, ": CUDA kernel failed: ", cudaGetErrorName(status), ": ",
              cudaGetErrorString(status));
}

at::IntArrayRef batch_shape(const at::Tensor& t, int64_t trailing) { return t.sizes().slice(0, t.dim() - trailing); }

int64_t numel_of(at::IntArrayRef shape) {
  int64_t n = 1;
  for (const int64_t s : shape) {
    n *= s;
  }
  return n;
}

std::vector<int64_t> with_trailing(at::IntArrayRef batch, std::initializer_list<int64_t> trailing) {
  std::vector<int64_t> shape(batch.begin(), batch.end());
  shape.insert(shape.end(), trailing);
  return shape;
}

// fp64 when any defined tensor is fp64, else fp32 (DESIGN.md "Numerical policy").
at::ScalarType acc_dtype(std::initializer_list<at::Tensor> tensors) {
  for (const auto& t : tensors) {
    if (t.defined() && t.scalar_type() == at::kDouble) {
      return at::kDouble;
    }
  }
  return at::kFloat;
}

// t (..., a, b) as (L, a, b) with unit column stride (the kernels' layout): a view when the batch
// dimensions merge into one stride and the columns are contiguous (X itself, and f_out.mT() = S for the
// gradient pair f_out = S.mT()), else a copy. Converted to fp64 first when the op computes in fp64.
at::Tensor rows_view(const at::Tensor& t, int64_t L, at::ScalarType acc) {
  at::Tensor t3 = t.reshape({L, t.size(-2), t.size(-1)});
  if (acc == at::kDouble && t3.scalar_type() != at::kDouble) {
    t3 = t3.to(at::kDouble);
  }
  if (t3.size(2) > 1 && t3.stride(2) != 1) {
    t3 = t3.contiguous();
  }
  return t3;
}

at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

template <typename T>
const T* cptr(const at::Tensor& t) {
  return static_cast<const T*>(t.const_data_ptr());
}
template <typename T>
T* mptr(const at::Tensor& t) {
  return static_cast<T*>(t.mutable_data_ptr());
}

// f(T{}) with T the CUDA type of a floating dtype.
template <typename F>
void dispatch_input(at::ScalarType t, const char* op, F&& f) {
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
void dispatch_pair(at::ScalarType a, at::ScalarType b, const char* op, F&& f) {
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

// ---- col_sq_sums, kfac_metric_update ------------------------------------------------------------------

at::Tensor col_sq_sums_cuda(const at::Tensor& x) {
  constexpr const char* op = "col_sq_sums";
  TORCH_CHECK(x.defined(), op, ": x is undefined");
  check_input(x, op, "x", 2, x.device());
  const int64_t T = x.size(-2);
  const int64_t n = x.size(-1);
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty(with_trailing(batch_shape(x, 2), {n}), x.options().dtype(acc));
  if (out.numel() == 0) {
    return out;
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = out.numel() / n;
  const at::Tensor x3 = rows_view(x, B, x.scalar_type());
  const size_t elem = acc == at::kDouble ? sizeof(double) : sizeof(float);
  const size_t bytes = kc::col_sq_sums_workspace_bytes(B, T, n, elem);
  const at::Tensor ws = workspace(bytes, x);
  dispatch_input(x.scalar_type(), op, [&](auto tag) {
    using T_ = decltype(tag);
    check_launch(kc::col_sq_sums<T_>(cptr<T_>(x3), B, T, n, x3.stride(0), x3.stride(1), mptr<kc::acc_t<T_>>(out),
                                     bytes ? ws.data_ptr() : nullptr, bytes, current_stream()),
                 op);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kfac_metric_update_cuda(
    const at::Tensor& X, const at::Tensor& S, const at::Tensor& v_in, const at::Tensor& v_out, double beta,
    double damping, double power, double scale_in, double scale_out) {
  constexpr const char* op = "kfac_metric_update";
  TORCH_CHECK(X.defined(), op, ": X is undefined");
  const auto device = X.device();
  check_input(X, op, "X", 2, device);
  check_input(S, op, "S", 2, device);
  check_input(v_in, op, "v_in", 1, device);
  check_input(v_out, op, "v_out", 1, device);
  for (const auto* v : {&v_in, &v_out}) {
    TORCH_CHECK(v->scalar_type() == at::kFloat || v->scalar_type() == at::kDouble, op,
                ": the metric state must be float32 or float64, got ", v->scalar_type());
  }
  const auto batch = batch_shape(X, 2);
  TORCH_CHECK(batch_shape(S, 2) == batch && S.size(-2) == X.size(-2), op, ": X ", X.sizes(),
              " is (..., T, n) and S ", S.sizes(), " must be (..., T, m) with the same batch shape and T");
  TORCH_CHECK(batch_shape(v_in, 1) == batch && v_in.size(-1) == X.size(-1), op, ": v_in must be (..., n) = ", batch,
              " + (", X.size(-1), ",), got shape ", v_in.sizes());
  TORCH_CHECK(batch_shape(v_out, 1) == batch && v_out.size(-1) == S.size(-1), op, ": v_out must be (..., m) = ",
              batch, " + (", S.size(-1), ",), got shape ", v_out.sizes());
  const c10::cuda::CUDAGuard guard(device);
  // reference.kfac_metric_update, operation for operation: stat·scale in the statistic's dtype, then the
  // EMA and the power in v's dtype.
  auto step = [&](const at::Tensor& v, const at::Tensor& data, double scale) {
    const at::Tensor stat = col_sq_sums_cuda(data).mul(scale).to(v.scalar_type());
    at::Tensor new_v = v.mul(beta).add(stat.mul(1.0 - beta));
    at::Tensor metric = new_v.add(damping).pow(power);
    return std::pair{new_v, metric};
  };
  auto [new_in, m_in] = step(v_in, X, scale_in);
  auto [new_out, m_out] = step(v_out, S, scale_out);
  return {new_in, new_out, m_in, m_out};
}

// ---- row_col_energies ----------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> row_col_energies_cuda(const at::Tensor& X, const at::Tensor& S) {
  constexpr const char* op = "row_col_energies";
  TORCH_CHECK(X.defined(), op, ": X is undefined");
  check_input(X, op, "X", 2, X.device());
  check_input(S, op, "S", 2, X.device());
  const auto batch = batch_shape(X, 2);
  TORCH_CHECK(batch_shape(S, 2) == batch && S.size(-2) == X.size(-2), op, ": X ", X.sizes(),
              " is (..., T, n) and S ", S.sizes(), " must be (..., T, m) with the same batch shape and T");
  const int64_t L = numel_of(batch), T = X.size(-2), n = X.size(-1), m = S.size(-1);
  const auto acc = acc_dtype({X, S});
  const auto opts = X.options().dtype(acc);
  at::Tensor rows = at::empty(with_trailing(batch, {m}), opts);
  at::Tensor cols = at::empty(with_trailing(batch, {n}), opts);
  if (L == 0 || (m == 0 && n == 0)) {
    return {rows, cols};
  }
  const c10::cuda::CUDAGuard guard(X.device());
  const at::Tensor X3 = rows_view(X, L, acc);
  const at::Tensor S3 = rows_view(S, L, acc);
  const size_t elem = acc == at::kDouble ? sizeof(double) : sizeof(float);
  const size_t bytes = kc::row_col_energies_workspace_bytes(L, m, n, elem);
  const at::Tensor ws = workspace(bytes, X);
  dispatch_pair(S3.scalar_type(), X3.scalar_type(), op, [&](auto ts, auto tx) {
    using TS = decltype(ts);
    using TX = decltype(tx);
    using A = kc::acc_t<TX>;
    check_launch(kc::row_col_energies<TS, TX>(cptr<TS>(S3), S3.stride(0), S3.stride(1), cptr<TX>(X3), X3.stride(0),
                                              X3.stride(1), L, T, m, n, mptr<A>(rows), mptr<A>(cols),
                                              bytes ? ws.data_ptr() : nullptr, bytes, current_stream()),
                 op);
  });
  return {rows, cols};
}

// ---- spd_solve -------------------------------------------------------------------------------------------

// reference.spd_solve through ATen (the r > 64 case): ridged Cholesky with the fallback chosen on the device.
at::Tensor spd_solve_aten(const at::Tensor& gram, const at::Tensor& rhs, bool left, at::ScalarType acc) {
  const at::Tensor g = gram.to(acc);
  const at::Tensor b = rhs.to(acc);
  const int64_t r = g.size(-1);
  const at::Tensor eye = at::eye(r, g.options());
  const double floor = acc == at::kDouble ? 0x1p-511 : 0x1p-63;  // sqrt(finfo.tiny)
  const at::Tensor scale = g.diagonal(0, -2, -1).mean(-1).clamp_min(floor).unsqueeze(-1).unsqueeze(-1);
  const double ridge = relative_ridge(acc);
  const auto first = at::linalg_cholesky_ex(g + scale.mul(ridge) * eye);
  const at::Tensor chol_fallback = std::get<0>(at::linalg_cholesky_ex(g + scale.mul(ridge + fallback_ridge(acc)) * eye));
  const at::Tensor factor =
      at::where(std::get<1>(first).eq(0).unsqueeze(-1).unsqueeze(-1), std::get<0>(first), chol_fallback);
  return left ? at::cholesky_solve(b, factor) : at::cholesky_solve(b.mT(), factor).mT();
}

at::Tensor spd_solve_cuda(const at::Tensor& gram, const at::Tensor& rhs, bool left) {
  constexpr const char* op = "spd_solve";
  TORCH_CHECK(gram.defined(), op, ": gram is undefined");
  check_input(gram, op, "gram", 2, gram.device());
  check_input(rhs, op, "rhs", 2, gram.device());
  const int64_t r = gram.size(-1);
  TORCH_CHECK(gram.size(-2) == r, op, ": gram must be square (..., r, r), got shape ", gram.sizes());
  TORCH_CHECK((left ? rhs.size(-2) : rhs.size(-1)) == r, op, ": rhs must be ",
              left ? "(..., r, N) for left=True" : "(..., N, r) for left=False", " with r = ", r,
              " (the size of gram), got shape ", rhs.sizes());

  // Broadcast the batch dimensions, as torch.cholesky_solve does.
  const auto gb = batch_shape(gram, 2);
  const auto rb = batch_shape(rhs, 2);
  const int64_t nb = std::max<int64_t>(gb.size(), rb.size());
  std::vector<int64_t> batch(nb);
  for (int64_t i = 0; i < nb; ++i) {
    const int64_t gi = i - (nb - static_cast<int64_t>(gb.size()));
    const int64_t ri = i - (nb - static_cast<int64_t>(rb.size()));
    const int64_t gs = gi >= 0 ? gb[gi] : 1;
    const int64_t rs = ri >= 0 ? rb[ri] : 1;
    TORCH_CHECK(gs == rs || gs == 1 || rs == 1, op, ": the batch dimensions of gram ", gram.sizes(), " and rhs ",
                rhs.sizes(), " do not broadcast");
    batch[i] = gs == 1 ? rs : gs;
  }
  const int64_t L = numel_of(batch);
  const int64_t N = left ? rhs.size(-1) : rhs.size(-2);
  const auto out_dtype = at::promote_types(gram.scalar_type(), rhs.scalar_type());
  const auto acc = out_dtype == at::kDouble ? at::kDouble : at::kFloat;
  const std::vector<int64_t> out_shape = with_trailing(batch, {rhs.size(-2), rhs.size(-1)});
  at::Tensor out = at::empty(out_shape, rhs.options().dtype(out_dtype));
  if (out.numel() == 0) {
    return out;
  }
  const c10::cuda::CUDAGuard guard(gram.device());
  if (r > kc::kMaxSolveRank) {
    out.copy_(spd_solve_aten(gram, rhs, left, acc).expand(out_shape));
    return out;
  }
  // gram (L, r, r) in the accumulation dtype: a stride-0 batch when one matrix serves every right side.
  const at::Tensor g = gram.expand(with_trailing(batch, {r, r})).reshape({L, r, r}).to(acc);
  at::Tensor b = rhs.expand(out_shape).reshape({L, rhs.size(-2), rhs.size(-1)});
  if (b.scalar_type() != out_dtype) {
    b = b.to(out_dtype);
  }
  const at::Tensor o = out.view({L, rhs.size(-2), rhs.size(-1)});
  // A right solve Z·gram = R is gram·Zᵀ = Rᵀ: the same kernel with the row and column strides swapped.
  const int64_t bk = left ? 1 : 2, bc = left ? 2 : 1;
  dispatch_input(out_dtype, op, [&](auto tag) {
    using T_ = decltype(tag);
    using A = kc::acc_t<T_>;
    check_launch(kc::spd_solve<T_>(cptr<A>(g), g.stride(0), g.stride(1), g.stride(2), cptr<T_>(b), b.stride(0),
                                   b.stride(bk), b.stride(bc), mptr<T_>(o), o.stride(0), o.stride(bk), o.stride(bc), L,
                                   r, N, static_cast<A>(relative_ridge(acc)),
                                   static_cast<A>(relative_ridge(acc) + fallback_ridge(acc)), current_stream()),
                 op);
  });
  return out;
}

// ---- token products ------------------------------------------------------------------------------------

// out (L, w, N), addressed by (o_bs, o_ks, o_js), = (A3·W)ᵀ·B3 for A3 (L, K, M) and B3 (L, K, N) from
// rows_view (unit column stride, both fp64 or neither) and W (L, M, w) contiguous in the accumulation dtype.
void projected_product(const char* op, const at::Tensor& A3, const at::Tensor& W, const at::Tensor& B3,
                       const at::Tensor& out, int64_t o_bs, int64_t o_ks, int64_t o_js) {
  const int64_t L = A3.size(0), K = A3.size(1), M = A3.size(2), w = W.size(2), N = B3.size(2);
  TORCH_INTERNAL_ASSERT(W.is_contiguous() && W.size(0) == L && W.size(1) == M && B3.size(0) == L && B3.size(1) == K);
  const size_t elem = W.scalar_type() == at::kDouble ? sizeof(double) : sizeof(float);
  const size_t bytes = kc::projected_product_workspace_bytes(L, K, w, N, elem);
  const at::Tensor ws = workspace(bytes, W);
  dispatch_pair(A3.scalar_type(), B3.scalar_type(), op, [&](auto ta, auto tb) {
    using TA = decltype(ta);
    using TB = decltype(tb);
    using Acc = kc::acc_t<TB>;
    TORCH_INTERNAL_ASSERT(W.scalar_type() == (std::is_same_v<Acc, double> ? at::kDouble : at::kFloat));
    check_launch(kc::projected_product<TA, TB>(cptr<TA>(A3), A3.stride(0), A3.stride(1), cptr<Acc>(W), M * w,
                                               cptr<TB>(B3), B3.stride(0), B3.stride(1), L, K, M, w, N,
                                               mptr<Acc>(out), o_bs, o_ks, o_js, bytes ? ws.data_ptr() : nullptr,
                                               bytes, current_stream()),
                 op);
  });
}

// (Wᵀ·f_out·f_in (L, w, n), f_out·f_in·Vᵀ (L, m, v)) for the pair f_in (L, q, n), f_out (L, m, q); W (L, m, w) and
// V (L, v, n) optional, all in any dtype; results in acc.
std::pair<at::Tensor, at::Tensor> pair_products_flat(const char* op, const at::Tensor& f_in, const at::Tensor& f_out,
                                                     const at::Tensor& W, const at::Tensor& V, at::ScalarType acc) {
  const int64_t L = f_in.size(0), n = f_in.size(2), m = f_out.size(1);
  const auto opts = f_in.options().dtype(acc);
  const at::Tensor X3 = rows_view(f_in, L, acc);         // tokens × n
  const at::Tensor S3 = rows_view(f_out.mT(), L, acc);   // tokens × m
  at::Tensor P, Q;
  if (W.defined()) {
    const int64_t w = W.size(2);
    P = at::empty({L, w, n}, opts);
    projected_product(op, S3, W.to(acc).contiguous(), X3, P, w * n, n, 1);
  }
  if (V.defined()) {
    const int64_t v = V.size(1);
    Q = at::empty({L, m, v}, opts);
    // Qᵀ = (f_in·Vᵀ)ᵀ·f_outᵀ, written transposed into Q.
    projected_product(op, X3, V.to(acc).mT().contiguous(), S3, Q, m * v, 1, v);
  }
  return {P, Q};
}

std::tuple<at::Tensor, at::Tensor> pair_products_cuda(const at::Tensor& f_in, const at::Tensor& f_out,
                                                      const std::optional<at::Tensor>& W,
                                                      const std::optional<at::Tensor>& V) {
  constexpr const char* op = "pair_products";
  TORCH_CHECK(f_in.defined(), op, ": f_in is undefined");
  const auto device = f_in.device();
  check_input(f_in, op, "f_in", 2, device);
  check_input(f_out, op, "f_out", 2, device);
  const int64_t q = f_in.size(-2), n = f_in.size(-1), m = f_out.size(-2);
  TORCH_CHECK(f_out.size(-1) == q, op, ": f_in ", f_in.sizes(), " is (..., q, n) and f_out ", f_out.sizes(),
              " must be (..., m, q) with the same q");
  const auto batch = batch_shape(f_in, 2);
  TORCH_CHECK(batch_shape(f_out, 2) == batch, op, ": f_out has batch shape ", batch_shape(f_out, 2),
              " but f_in has ", batch, " (all inputs share the leading batch dimensions)");
  if (W.has_value()) {
    check_input(*W, op, "W", 2, device);
    TORCH_CHECK(W->size(-2) == m && batch_shape(*W, 2) == batch, op, ": W must be (..., m, w) with m = ", m,
                " and batch shape ", batch, ", got shape ", W->sizes());
  }
  if (V.has_value()) {
    check_input(*V, op, "V", 2, device);
    TORCH_CHECK(V->size(-1) == n && batch_shape(*V, 2) == batch, op, ": V must be (..., v, n) with n = ", n,
                " and batch shape ", batch, ", got shape ", V->sizes());
  }
  const at::Tensor Wt = W.value_or(at::Tensor());
  const at::Tensor Vt = V.value_or(at::Tensor());
  const auto acc = acc_dtype({f_in, f_out, Wt, Vt});
  const int64_t L = numel_of(batch);
  const int64_t w = Wt.defined() ? Wt.size(-1) : 0;
  const int64_t v = Vt.defined() ? Vt.size(-2) : 0;
  const auto opts = f_in.options().dtype(acc);
  if (L == 0 || (w == 0 && v == 0)) {
    return {at::zeros(with_trailing(batch, {w, n}), opts), at::zeros(with_trailing(batch, {m, v}), opts)};
  }
  const c10::cuda::CUDAGuard guard(device);
  auto [P, Q] = pair_products_flat(op, f_in.reshape({L, q, n}), f_out.reshape({L, m, q}),
                                   Wt.defined() ? Wt.reshape({L, m, w}) : at::Tensor(),
                                   Vt.defined() ? Vt.reshape({L, v, n}) : at::Tensor(), acc);
  return {P.defined() ? P.view(with_trailing(batch, {w, n})) : at::empty(with_trailing(batch, {0, n}), opts),
          Q.defined() ? Q.view(with_trailing(batch, {m, v})) : at::empty(with_trailing(batch, {m, 0}), opts)};
}

// ---- LoRSum half-steps -----------------------------------------------------------------------------------

// One coefficient per layer: a host number when it is shared and given on the CPU (no copy at all, so the
// op can be captured in a CUDA graph), else an (L, 1, 1) device tensor (a per-layer CPU row is copied with
// non_blocking=true: no stream synchronisation; pass coefficients on the device to capture such a step).
struct Coef {
  bool is_scalar = true;
  double value = 0.0;
  at::Tensor tensor;
  at::Tensor mul(const at::Tensor& x) const { return is_scalar ? x.mul(value) : x.mul(tensor); }
};

Coef make_coef(const at::Tensor& row, int64_t L, at::ScalarType acc, const at::Device& device) {
  Coef c;
  if (row.dim() == 0 && row.device().is_cpu()) {
    c.value = row.item<double>();  // host memory: no device synchronisation
    return c;
  }
  c.is_scalar = false;
  c.tensor = row.to(at::TensorOptions().device(device).dtype(acc), /*non_blocking=*/true)
                 .reshape({row.dim() == 0 ? 1 : L, 1, 1});
  return c;
}

struct HalfStep {
  int64_t L = 0, m = 0, n = 0, r = 0;
  std::vector<int64_t> batch;
  at::ScalarType acc = at::kFloat;
  at::Tensor hat, A0, B0, m_in, m_out;   // (L, ...) in acc
  std::vector<at::Tensor> f_in, f_out;   // (L, q_j, n), (L, m, q_j) in their own dtypes
  std::vector<Coef> coef;                // c0, c1, ..., cJ
  Coef lmbd;
};

HalfStep parse_half_step(const char* op, bool in_side, const at::Tensor& hat, const at::Tensor& A0,
                         const at::Tensor& B0, at::TensorList f_in, at::TensorList f_out, const at::Tensor& coeffs,
                         const at::Tensor& lmbd, const std::optional<at::Tensor>& m_in,
                         const std::optional<at::Tensor>& m_out) {
  const char* hat_name = in_side ? "B_hat" : "A_hat";
  TORCH_CHECK(A0.defined(), op, ": A0 is undefined");
  const auto device = A0.device();
  check_input(A0, op, "A0", 2, device);
  check_input(B0, op, "B0", 2, device);
  check_input(hat, op, hat_name, 2, device);
  HalfStep h;
  h.r = A0.size(-2);
  h.n = A0.size(-1);
  h.m = B0.size(-2);
  TORCH_CHECK(B0.size(-1) == h.r, op, ": A0 ", A0.sizes(), " is (..., r, n) and B0 ", B0.sizes(),
              " is (..., m, r): their ranks r differ");
  const auto batch = batch_shape(A0, 2);
  h.batch.assign(batch.begin(), batch.end());
  h.L = numel_of(batch);
  TORCH_CHECK(batch_shape(B0, 2) == batch, op, ": B0 has batch shape ", batch_shape(B0, 2), " but A0 has ", batch,
              " (all inputs share the leading batch dimensions)");
  TORCH_CHECK(batch_shape(hat, 2) == batch, op, ": ", hat_name, " has batch shape ", batch_shape(hat, 2),
              " but A0 has ", batch, " (all inputs share the leading batch dimensions)");
  if (in_side) {
    TORCH_CHECK(hat.size(-2) == h.m && hat.size(-1) == h.r, op, ": B_hat must be (..., m, r) = (..., ", h.m, ", ",
                h.r, ") like B0, got shape ", hat.sizes());
  } else {
    TORCH_CHECK(hat.size(-2) == h.r && hat.size(-1) == h.n, op, ": A_hat must be (..., r, n) = (..., ", h.r, ", ",
                h.n, ") like A0, got shape ", hat.sizes());
  }
  TORCH_CHECK(f_in.size() == f_out.size(), op, ": got ", f_in.size(), " f_in factors but ", f_out.size(),
              " f_out factors (one of each per pair)");
  const int64_t J = static_cast<int64_t>(f_in.size());
  bool any_fp64 = A0.scalar_type() == at::kDouble || B0.scalar_type() == at::kDouble ||
                  hat.scalar_type() == at::kDouble;
  for (int64_t j = 0; j < J; ++j) {
    const at::Tensor& fi = f_in[j];
    const at::Tensor& fo = f_out[j];
    check_input(fi, op, "f_in[j]", 2, device);
    check_input(fo, op, "f_out[j]", 2, device);
    TORCH_CHECK(fi.size(-1) == h.n && fo.size(-2) == h.m && fi.size(-2) == fo.size(-1), op, ": pair ", j, " (f_in ",
                fi.sizes(), ", f_out ", fo.sizes(), ") does not stand for an ", h.m, "x", h.n,
                " matrix f_out @ f_in: f_in must be (..., q, ", h.n, ") and f_out (..., ", h.m, ", q)");
    TORCH_CHECK(batch_shape(fi, 2) == batch && batch_shape(fo, 2) == batch, op, ": pair ", j, " has batch shapes ",
                batch_shape(fi, 2), " and ", batch_shape(fo, 2), " but A0 has ", batch,
                " (all inputs share the leading batch dimensions)");
    h.f_in.push_back(fi.reshape({h.L, fi.size(-2), h.n}));
    h.f_out.push_back(fo.reshape({h.L, h.m, fo.size(-1)}));
    any_fp64 = any_fp64 || fi.scalar_type() == at::kDouble || fo.scalar_type() == at::kDouble;
  }
  TORCH_CHECK(m_in.has_value() == m_out.has_value(), op,
              ": give both metrics (m_in and m_out) or neither; got only ", m_in.has_value() ? "m_in" : "m_out");
  if (m_in.has_value()) {
    check_input(*m_in, op, "m_in", 1, device);
    check_input(*m_out, op, "m_out", 1, device);
    TORCH_CHECK(m_in->size(-1) == h.n && batch_shape(*m_in, 1) == batch, op, ": m_in must be (..., n) = ", batch,
                " + (", h.n, ",), got shape ", m_in->sizes());
    TORCH_CHECK(m_out->size(-1) == h.m && batch_shape(*m_out, 1) == batch, op, ": m_out must be (..., m) = ", batch,
                " + (", h.m, ",), got shape ", m_out->sizes());
    any_fp64 = any_fp64 || m_in->scalar_type() == at::kDouble || m_out->scalar_type() == at::kDouble;
  }
  h.acc = any_fp64 ? at::kDouble : at::kFloat;

  for (const auto* t : {&coeffs, &lmbd}) {
    TORCH_CHECK(t->device().is_cpu() || t->device() == device, op, ": ", t == &coeffs ? "coeffs" : "lmbd",
                " must be on the CPU or on ", device, ", got one on ", t->device());
    TORCH_CHECK(is_float_dtype(t->scalar_type()), op, ": ", t == &coeffs ? "coeffs" : "lmbd",
                " must be a floating tensor, got ", t->scalar_type());
  }
  TORCH_CHECK((coeffs.dim() == 1 || (coeffs.dim() == 2 && coeffs.size(1) == h.L)) && coeffs.size(0) == J + 1, op,
              ": coeffs must be (J+1,) or (J+1, L) = (", J + 1, ",) or (", J + 1, ", ", h.L,
              "): one coefficient for the anchor and one per pair, shared or per layer; got shape ", coeffs.sizes());
  TORCH_CHECK(lmbd.dim() == 0 || (lmbd.dim() == 1 && lmbd.size(0) == h.L), op,
              ": lmbd must be a 0-d tensor or one value per layer (L,) = (", h.L, ",), got shape ", lmbd.sizes());
  // One device copy of a per-layer coefficient table (not one per row).
  const at::Tensor table = coeffs.dim() == 2 && coeffs.device().is_cpu()
                               ? coeffs.to(at::TensorOptions().device(device).dtype(h.acc), /*non_blocking=*/true)
                               : coeffs;
  for (int64_t j = 0; j <= J; ++j) {
    h.coef.push_back(make_coef(table[j], h.L, h.acc, device));
  }
  h.lmbd = make_coef(lmbd, h.L, h.acc, device);

  if (m_in.has_value()) {
    h.m_in = m_in->reshape({h.L, h.n}).to(h.acc);
    h.m_out = m_out->reshape({h.L, h.m}).to(h.acc);
  }
  h.hat = hat.reshape({h.L, hat.size(-2), hat.size(-1)}).to(h.acc);
  h.A0 = A0.reshape({h.L, h.r, h.n}).to(h.acc);
  h.B0 = B0.reshape({h.L, h.m, h.r}).to(h.acc);
  return h;
}

// Â = A0 + (B̂ᵀM_outB̂ + λI)⁻¹ [B̂ᵀM_out(c0·B0 − B̂)·A0 + (Σ_j c_j (B̂ᵀF_out_j)F_in_j)·M_in⁻¹]  (reference.lorsum_update_in)
at::Tensor lorsum_update_in_cuda(const at::Tensor& B_hat, const at::Tensor& A0, const at::Tensor& B0,
                                 at::TensorList f_in, at::TensorList f_out, const at::Tensor& coeffs,
                                 const at::Tensor& lmbd, const std::optional<at::Tensor>& m_in,
                                 const std::optional<at::Tensor>& m_out) {
  constexpr const char* op = "lorsum_update_in";
  const HalfStep h = parse_half_step(op, true, B_hat, A0, B0, f_in, f_out, coeffs, lmbd, m_in, m_out);
  const c10::cuda::CUDAGuard guard(A0.device());
  const auto opts = h.A0.options();
  const at::Tensor out = at::empty(with_trailing(h.batch, {h.r, h.n}), A0.options());
  if (out.numel() == 0) {
    return out;
  }
  const at::Tensor BwT = (h.m_out.defined() ? h.hat * h.m_out.unsqueeze(-1) : h.hat).mT();
  const at::Tensor gram = at::matmul(BwT, h.hat) + h.lmbd.mul(at::eye(h.r, opts));
  at::Tensor residual = at::matmul(at::matmul(BwT, h.coef[0].mul(h.B0) - h.hat), h.A0);
  if (!h.f_in.empty()) {
    at::Tensor data;
    for (size_t j = 0; j < h.f_in.size(); ++j) {
      const at::Tensor P = pair_products_flat(op, h.f_in[j], h.f_out[j], h.hat, at::Tensor(), h.acc).first;
      const at::Tensor term = h.coef[j + 1].mul(P);
      data = data.defined() ? data + term : term;
    }
    residual = residual + (h.m_in.defined() ? data / h.m_in.unsqueeze(-2) : data);
  }
  const at::Tensor delta = spd_solve_cuda(gram, residual, /*left=*/true);
  out.view({h.L, h.r, h.n}).copy_(h.A0 + delta);
  return out;
}

// B̂ = B0 + [B0·(c0·A0 − Â)·M_inÂᵀ + M_out⁻¹·Σ_j c_j F_out_j(F_in_jÂᵀ)] (ÂM_inÂᵀ + λI)⁻¹  (reference.lorsum_update_out)
at::Tensor lorsum_update_out_cuda(const at::Tensor& A_hat, const at::Tensor& A0, const at::Tensor& B0,
                                  at::TensorList f_in, at::TensorList f_out, const at::Tensor& coeffs,
                                  const at::Tensor& lmbd, const std::optional<at::Tensor>& m_in,
                                  const std::optional<at::Tensor>& m_out) {
  constexpr const char* op = "lorsum_update_out";
  const HalfStep h = parse_half_step(op, false, A_hat, A0, B0, f_in, f_out, coeffs, lmbd, m_in, m_out);
  const c10::cuda::CUDAGuard guard(A0.device());
  const auto opts = h.A0.options();
  const at::Tensor out = at::empty(with_trailing(h.batch, {h.m, h.r}), A0.options());
  if (out.numel() == 0) {
    return out;
  }
  const at::Tensor Aw = h.m_in.defined() ? h.hat * h.m_in.unsqueeze(-2) : h.hat;
  const at::Tensor gram = at::matmul(Aw, h.hat.mT()) + h.lmbd.mul(at::eye(h.r, opts));
  at::Tensor residual = at::matmul(h.B0, at::matmul(h.coef[0].mul(h.A0) - h.hat, Aw.mT()));
  if (!h.f_in.empty()) {
    at::Tensor data;
    for (size_t j = 0; j < h.f_in.size(); ++j) {
      const at::Tensor Q = pair_products_flat(op, h.f_in[j], h.f_out[j], at::Tensor(), h.hat, h.acc).second;
      const at::Tensor term = h.coef[j + 1].mul(Q);
      data = data.defined() ? data + term : term;
    }
    residual = residual + (h.m_out.defined() ? data / h.m_out.unsqueeze(-1) : data);
  }
  const at::Tensor delta = spd_solve_cuda(gram, residual, /*left=*/false);
  out.view({h.L, h.m, h.r}).copy_(h.B0 + delta);
  return out;
}

// ---- adaprelora_solve -------------------------------------------------------------------------------------

// The ridged factor of reference.ridged_cholesky through ATen (the r > 64 case): rho (L, 1, 1) in acc.
at::Tensor ridged_cholesky_aten(const at::Tensor& gram, const at::Tensor& rho, at::ScalarType acc) {
  const at::Tensor eye = at::eye(gram.size(-1), gram.options());
  const double floor = acc == at::kDouble ? 0x1p-511 : 0x1p-63;  // sqrt(finfo.tiny)
  const at::Tensor scale = gram.diagonal(0, -2, -1).mean(-1).clamp_min(floor).unsqueeze(-1).unsqueeze(-1);
  const auto first = at::linalg_cholesky_ex(gram + (rho * scale) * eye);
  const at::Tensor fallback = std::get<0>(at::linalg_cholesky_ex(gram + ((rho + fallback_ridge(acc)) * scale) * eye));
  return at::where(std::get<1>(first).eq(0).unsqueeze(-1).unsqueeze(-1), std::get<0>(first), fallback);
}

// reference.adaprelora_solve, operation for operation, on (L, ...) tensors in acc (the r > 64 case).
std::pair<at::Tensor, at::Tensor> adaprelora_solve_aten(const at::Tensor& A, const at::Tensor& B, const at::Tensor& g_A,
                                                        const at::Tensor& g_B, const at::Tensor& p, const at::Tensor& q,
                                                        const at::Tensor& rho, at::ScalarType acc) {
  const at::Tensor pB = B * p.unsqueeze(-1);
  const at::Tensor L_B = ridged_cholesky_aten(at::matmul(B.mT(), pB), rho, acc);
  const at::Tensor L_A = ridged_cholesky_aten(at::matmul(A * q.unsqueeze(-2), A.mT()), rho, acc);
  const at::Tensor Y = at::cholesky_solve(g_A, L_B);
  const at::Tensor Z = at::cholesky_solve((g_B / p.unsqueeze(-1)).mT(), L_A).mT();
  const at::Tensor cross_A = at::cholesky_solve(at::matmul(Y, A.mT()).mT(), L_A).mT();
  const at::Tensor cross_B = at::cholesky_solve(at::matmul(pB.mT(), Z), L_B);
  return {Y / q.unsqueeze(-2) - at::matmul(cross_A, A).mul(0.5), Z - at::matmul(B, cross_B).mul(0.5)};
}

std::tuple<at::Tensor, at::Tensor> adaprelora_solve_cuda(const at::Tensor& A, const at::Tensor& B,
                                                         const at::Tensor& g_A, const at::Tensor& g_B,
                                                         const at::Tensor& p, const at::Tensor& q,
                                                         const at::Tensor& ridge) {
  constexpr const char* op = "adaprelora_solve";
  TORCH_CHECK(A.defined(), op, ": A is undefined");
  const auto device = A.device();
  check_input(A, op, "A", 2, device);
  check_input(B, op, "B", 2, device);
  check_input(g_A, op, "g_A", 2, device);
  check_input(g_B, op, "g_B", 2, device);
  check_input(p, op, "p", 1, device);
  check_input(q, op, "q", 1, device);
  const int64_t r = A.size(-2), n = A.size(-1), m = B.size(-2);
  TORCH_CHECK(B.size(-1) == r, op, ": A ", A.sizes(), " is (..., r, n) and B ", B.sizes(),
              " must be (..., m, r) with the same r");
  const auto batch = batch_shape(A, 2);
  TORCH_CHECK(batch_shape(B, 2) == batch, op, ": B has batch shape ", batch_shape(B, 2), " but A has ", batch,
              " (all inputs share the leading batch dimensions)");
  TORCH_CHECK(g_A.sizes() == A.sizes(), op, ": g_A must have the shape of A ", A.sizes(), ", got ", g_A.sizes());
  TORCH_CHECK(g_B.sizes() == B.sizes(), op, ": g_B must have the shape of B ", B.sizes(), ", got ", g_B.sizes());
  TORCH_CHECK(p.size(-1) == m && batch_shape(p, 1) == batch, op, ": p must be (..., m) = ", batch, " + (", m,
              ",), got shape ", p.sizes());
  TORCH_CHECK(q.size(-1) == n && batch_shape(q, 1) == batch, op, ": q must be (..., n) = ", batch, " + (", n,
              ",), got shape ", q.sizes());
  const int64_t L = numel_of(batch);
  TORCH_CHECK(ridge.defined() && is_float_dtype(ridge.scalar_type()), op, ": ridge must be a floating tensor");
  TORCH_CHECK(ridge.device().is_cpu() || ridge.device() == device, op, ": ridge must be on the CPU or on ", device,
              ", got one on ", ridge.device());
  TORCH_CHECK(ridge.dim() == 0 || (ridge.dim() == 1 && ridge.size(0) == L), op,
              ": ridge must be a 0-d tensor or one value per layer (L,) = (", L, ",), got shape ", ridge.sizes());

  const auto acc = acc_dtype({A, B, g_A, g_B, p, q});
  at::ScalarType out_dtype = A.scalar_type();
  bool one_dtype = true;
  for (const at::Tensor* t : {&B, &g_A, &g_B, &p, &q}) {
    out_dtype = at::promote_types(out_dtype, t->scalar_type());
    one_dtype = one_dtype && t->scalar_type() == A.scalar_type();
  }
  const auto opts = A.options().dtype(acc);
  at::Tensor dA = at::empty(with_trailing(batch, {r, n}), opts);
  at::Tensor dB = at::empty(with_trailing(batch, {m, r}), opts);
  if (dA.numel() == 0 && dB.numel() == 0) {
    return {dA.to(out_dtype), dB.to(out_dtype)};
  }
  const c10::cuda::CUDAGuard guard(device);
  // Mixed input dtypes are unified in the accumulation dtype; otherwise the kernels read the inputs as they
  // are, through their strides.
  auto input = [&](const at::Tensor& t, std::initializer_list<int64_t> shape) {
    const at::Tensor flat = t.reshape(shape);
    return one_dtype ? flat : flat.to(acc);
  };
  const at::Tensor A3 = input(A, {L, r, n}), gA3 = input(g_A, {L, r, n});
  const at::Tensor B3 = input(B, {L, m, r}), gB3 = input(g_B, {L, m, r});
  const at::Tensor p2 = input(p, {L, m}), q2 = input(q, {L, n});

  // A shared ridge given on the CPU is a host number (no copy, so the op can be captured in a CUDA graph);
  // otherwise a device array (a per-layer CPU row is copied with non_blocking=true, no synchronisation).
  double ridge_value = 0.0;
  at::Tensor ridge_dev;
  if (ridge.dim() == 0 && ridge.device().is_cpu()) {
    ridge_value = ridge.item<double>();  // host memory: no device synchronisation
  } else {
    ridge_dev = ridge.to(at::TensorOptions().device(device).dtype(acc), /*non_blocking=*/true).contiguous();
  }

  if (r > kc::kMaxSolveRank) {
    const at::Tensor rho = ridge_dev.defined() ? ridge_dev.reshape({ridge.dim() == 0 ? 1 : L, 1, 1})
                                               : at::full({1, 1, 1}, ridge_value, opts);
    auto [a, b] = adaprelora_solve_aten(A3.to(acc), B3.to(acc), gA3.to(acc), gB3.to(acc), p2.to(acc), q2.to(acc), rho,
                                        acc);
    dA.view({L, r, n}).copy_(a);
    dB.view({L, m, r}).copy_(b);
    return {dA.to(out_dtype), dB.to(out_dtype)};
  }

  const size_t elem = acc == at::kDouble ? sizeof(double) : sizeof(float);
  const size_t bytes = kc::adaprelora_solve_workspace_bytes(L, r, m, n, elem);
  const at::Tensor ws = workspace(bytes, A);
  dispatch_input(one_dtype ? A.scalar_type() : acc, op, [&](auto tag) {
    using T_ = decltype(tag);
    using Acc = kc::acc_t<T_>;
    kc::AdaPreLoRAInputs<T_> in{cptr<T_>(A3), A3.stride(0), A3.stride(1), A3.stride(2),
                                cptr<T_>(B3), B3.stride(0), B3.stride(1), B3.stride(2),
                                cptr<T_>(gA3), gA3.stride(0), gA3.stride(1), gA3.stride(2),
                                cptr<T_>(gB3), gB3.stride(0), gB3.stride(1), gB3.stride(2),
                                cptr<T_>(p2), p2.stride(0), p2.stride(1),
                                cptr<T_>(q2), q2.stride(0), q2.stride(1)};
    const Acc* per_layer = ridge_dev.defined() ? cptr<Acc>(ridge_dev) : nullptr;
    const int64_t ridge_bs = ridge_dev.defined() && ridge_dev.dim() == 1 ? 1 : 0;
    check_launch(kc::adaprelora_solve<T_>(in, L, r, m, n, static_cast<Acc>(ridge_value), per_layer, ridge_bs,
                                          static_cast<Acc>(fallback_ridge(acc)), mptr<Acc>(dA), mptr<Acc>(dB),
                                          bytes ? ws.data_ptr() : nullptr, bytes, current_stream()),
                 op);
  });
  return {dA.to(out_dtype), dB.to(out_dtype)};
}

// ---- tangent_energies -------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> tangent_energies_cuda(const at::Tensor& B, const at::Tensor& E, const at::Tensor& F,
                                                         const at::Tensor& A) {
  constexpr const char* op = "tangent_energies";
  TORCH_CHECK(B.defined(), op, ": B is undefined");
  const auto device = B.device();
  check_input(B, op, "B", 2, device);
  check_input(E, op, "E", 2, device);
  check_input(F, op, "F", 2, device);
  check_input(A, op, "A", 2, device);
  const int64_t m = B.size(-2), r_B = B.size(-1), n = E.size(-1), r_F = F.size(-1);
  TORCH_CHECK(E.size(-2) == r_B, op, ": B ", B.sizes(), " is (..., m, r) and E ", E.sizes(),
              " must be (..., r, n) with the same r");
  TORCH_CHECK(F.size(-2) == m, op, ": F ", F.sizes(), " must be (..., m, r_F) with the m of B ", B.sizes());
  TORCH_CHECK(A.size(-2) == r_F && A.size(-1) == n, op, ": A must be (..., r_F, n) = (..., ", r_F, ", ", n,
              ") for F ", F.sizes(), " and E ", E.sizes(), ", got shape ", A.sizes());
  const auto batch = batch_shape(B, 2);
  for (const auto& [t, name] : {std::pair{&E, "E"}, std::pair{&F, "F"}, std::pair{&A, "A"}}) {
    TORCH_CHECK(batch_shape(*t, 2) == batch, op, ": ", name, " has batch shape ", batch_shape(*t, 2), " but B has ",
                batch, " (all inputs share the leading batch dimensions)");
  }
  const int64_t L = numel_of(batch);
  const int64_t R = r_B + r_F;

  const auto acc = acc_dtype({B, E, F, A});
  at::ScalarType out_dtype = B.scalar_type();
  bool one_dtype = true;
  for (const at::Tensor* t : {&E, &F, &A}) {
    out_dtype = at::promote_types(out_dtype, t->scalar_type());
    one_dtype = one_dtype && t->scalar_type() == B.scalar_type();
  }
  const auto opts = B.options().dtype(acc);
  at::Tensor rows = at::empty(with_trailing(batch, {m}), opts);
  at::Tensor cols = at::empty(with_trailing(batch, {n}), opts);
  if (rows.numel() == 0 && cols.numel() == 0) {
    return {rows.to(out_dtype), cols.to(out_dtype)};
  }
  const c10::cuda::CUDAGuard guard(device);
  // Mixed input dtypes are unified in the accumulation dtype; otherwise the kernels read the inputs as they
  // are, through their strides.
  auto input = [&](const at::Tensor& t) {
    const at::Tensor flat = t.reshape({L, t.size(-2), t.size(-1)});
    return one_dtype ? flat : flat.to(acc);
  };
  const at::Tensor B3 = input(B), E3 = input(E), F3 = input(F), A3 = input(A);

  if (R > kc::kMaxTangentRank) {
    // reference.tangent_energies, operation for operation, in acc.
    const at::Tensor Z = at::cat({B3.to(acc), F3.to(acc)}, -1);
    const at::Tensor W = at::cat({E3.to(acc), A3.to(acc)}, -2);
    rows.view({L, m}).copy_(at::matmul(Z, at::matmul(W, W.mT())).mul(Z).sum(-1).clamp_min(0));
    cols.view({L, n}).copy_(at::matmul(at::matmul(Z.mT(), Z), W).mul(W).sum(-2).clamp_min(0));
    return {rows.to(out_dtype), cols.to(out_dtype)};
  }

  const size_t elem = acc == at::kDouble ? sizeof(double) : sizeof(float);
  const size_t bytes = kc::tangent_energies_workspace_bytes(L, R, m, n, elem);
  const at::Tensor ws = workspace(bytes, B);
  dispatch_input(one_dtype ? B.scalar_type() : acc, op, [&](auto tag) {
    using T_ = decltype(tag);
    using Acc = kc::acc_t<T_>;
    kc::TangentInputs<T_> in{cptr<T_>(B3), B3.stride(0), B3.stride(1), B3.stride(2),
                             cptr<T_>(E3), E3.stride(0), E3.stride(1), E3.stride(2),
                             cptr<T_>(F3), F3.stride(0), F3.stride(1), F3.stride(2),
                             cptr<T_>(A3), A3.stride(0), A3.stride(1), A3.stride(2)};
    check_launch(kc::tangent_energies<T_>(in, L, r_B, r_F, m, n, mptr<Acc>(rows), mptr<Acc>(cols),
                                          bytes ? ws.data_ptr() : nullptr, bytes, current_stream()),
                 op);
  });
  return {rows.to(out_dtype), cols.to(out_dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(lorsum, CUDA, m) {
  m.impl("col_sq_sums", &col_sq_sums_cuda);
  m.impl("kfac_metric_update", &kfac_metric_update_cuda);
  m.impl("row_col_energies", &row_col_energies_cuda);
  m.impl("spd_solve", &spd_solve_cuda);
  m.impl("pair_products", &pair_products_cuda);
  m.impl("lorsum_update_in", &lorsum_update_in_cuda);
  m.impl("lorsum_update_out", &lorsum_update_out_cuda);
  m.impl("adaprelora_solve", &adaprelora_solve_cuda);
  m.impl("tangent_energies", &tangent_energies_cuda);
}

}  // namespace lorsum
