// CPU implementation of LoRSum's ALS half-steps (spec/lorsum.md §3.3, §6.2), the block power iteration
// over a group of L same-shape layers, and of the token products it is built from.
//
// References: lorsum_kernels.reference.lorsum_update_in / lorsum_update_out / pair_products.
// Schemas: csrc/lorsum.cpp.
//
// The A-step, per layer, in the reference's form (the B-step is its mirror image, assembled and solved in
// transposed form):
//
//   gram     = B̂ᵀ M_out B̂ + λI
//   residual = B̂ᵀ M_out (c0·B0 − B̂)·A0 + (Σ_j c_j·(B̂ᵀ F_out_j)·F_in_j)·M_in⁻¹
//   Â        = A0 + gram⁻¹ residual
//
// Only the data term Σ_j touches the token dimension (the gradient pair (X, Sᵀ): T×n and T×m numbers per
// layer). It takes two passes, each reading one of the two big operands once, in its own dtype (bf16
// and fp16 are converted as they are loaded, into fp32 registers), with only the r-wide T×r
// intermediate written in between:
//
//   tmp = c_j · F_out_jᵀ · B̂      row_dots over the rows of S          parallel over (layer, token block)
//   D  += tmpᵀ · F_in_j           outer_accumulate over the rows of X  parallel over (layer, column block)
//
// No scaled copy of X or S, no m×n matrix. Every sum runs in an order fixed by the shapes alone, so the
// result does not depend on the number of threads. The r-wide terms (Grams, anchor products, transposes)
// are the plain loops of r_wide.h and the r×r systems the ridged Cholesky of small_spd.h, per layer, with
// no ATen call between them: in the streamed step these run in backward right after the layer's GEMMs,
// where each ATen call cost tens of µs cold (r_wide.h).
//
// The same two passes with several factors side by side (a wide B̂, e.g. [B̂ | B̂_m] for the weight and
// momentum steps of PSI-LoRA, spec §9 H2) are exposed as the op pair_products.

#include "common.h"
#include "r_wide.h"
#include "small_spd.h"
#include "tiles.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

namespace lorsum {
namespace {

using cpu::avx512_enabled;

// Token rows per row_dots task.
constexpr int64_t kRowsPerTask = 64;
// Most token rows outer_accumulate sums in registers before adding to the output (the inner level of its
// two-level summation).
constexpr int64_t kTokenBlock = 128;
// Tokens per block of outer_accumulate: a 48-column slab of them and their row of tmp (w fp32 numbers)
// fit in about 16 KiB of L1, between 16 and kTokenBlock.
int64_t token_block(int64_t elem_size, int64_t w) {
  const int64_t bytes_per_token = cpu::avx512::kOuterCols * elem_size + 4 * w;
  int64_t tb = kTokenBlock;
  while (tb > 16 && tb * bytes_per_token > (int64_t(16) << 10)) {
    tb /= 2;
  }
  return tb;
}

// Narrowest column block of an outer_accumulate task: 256 B of each fp32 row read contiguously.
constexpr int64_t kMinColBlock = 64;

// Column blocks per layer of outer_accumulate: whole rows when there are enough layers to occupy the
// threads, else about two tasks per thread, never narrower than kMinColBlock, and where the columns allow
// it a whole number of rounds over the threads. (With three 192-wide blocks of a 576-wide row on two
// threads one thread summed two and the other waited: the pass took 4/3 of its balanced time.) Fewer
// tasks than threads stay as they are (one round). The blocks split columns only, so the sums, and the
// results, are the same for any number of them.
int64_t balanced_col_blocks(int64_t L, int64_t N, int64_t threads) {
  if (L >= 2 * threads) {
    return 1;
  }
  const int64_t blocks = std::min(std::max<int64_t>(1, N / kMinColBlock), (2 * threads + L - 1) / L);
  for (int64_t b = blocks; L * b >= threads; --b) {
    if ((L * b) % threads == 0) {
      return b;
    }
  }
  return blocks;
}

// A scratch buffer of at least `count` numbers, owned by the calling thread and reused across calls (the
// half-steps' r-wide temporaries: no allocation per layer). Each slot is a buffer of its own, so a caller
// holding one slot's buffer can take another's.
template <typename acc_t, int slot = 0>
acc_t* scratch(int64_t count) {
  thread_local std::vector<acc_t> buffer;
  if (static_cast<int64_t>(buffer.size()) < count) {
    buffer.resize(count);
  }
  return buffer.data();
}

// The T×w intermediate of the two token passes (S·B̂ or X·Âᵀ): up to kTokenScratchMax numbers in a buffer owned
// by the calling thread and reused from call to call (128 KiB per 2048-token layer step at r = 16). Allocated
// per call, it sat at glibc's mmap threshold: each call's fresh pages faulted in (tools/cold_layer_step.py).
// Larger ones (big buckets) are allocated per call and freed with the returned tensor, so no thread keeps
// more than kTokenScratchMax numbers past a call.
constexpr int64_t kTokenScratchMax = int64_t(1) << 21;  // 8 MiB of fp32

struct TokenScratch {
  at::Tensor owned;  // the allocation of a large intermediate, undefined for the thread's buffer
  float* data = nullptr;
};

// Slot 1 of scratch: the half-steps hold slot 0 (their r-wide temporaries) while the token passes run.
TokenScratch token_scratch(int64_t count) {
  if (count > kTokenScratchMax) {
    TokenScratch large{at::empty({count}, at::kFloat)};
    large.data = large.owned.mutable_data_ptr<float>();
    return large;
  }
  return {at::Tensor(), scratch<float, 1>(count)};
}

// D += coef[b] · Z[b] · Y1[b]ᵀ · Y2[b] · diag(colscale[b]) for every layer b, with AVX-512 kernels. Z (L, w, K)
// and D (L, w, N) are contiguous fp32; Y1 (L, q, K) and Y2 (L, q, N) are fp32, bf16 or fp16 with unit
// column stride; colscale is a contiguous fp32 (L, N), or undefined for none. With sq1 / sq2 (contiguous
// fp32 (L, K) / (L, N), zeroed by the caller), also the column sums of squares of Y1 and Y2 over the q rows,
// summed from the rows each pass has just read (the K-FAC statistics of kfac_lorsum_update_in): Y1's by
// four rows inside row_dots, in blocks of kRowsPerTask rows added in block order, Y2's in the blocks of
// outer_accumulate, so neither depends on the number of threads.
void accumulate_pair_avx512(const at::Tensor& Z, const at::Tensor& Y1, const at::Tensor& Y2,
                            const std::vector<double>& coef, const at::Tensor& D, const at::Tensor& colscale,
                            float* sq1, float* sq2, const at::Tensor& Zt) {
  const int64_t L = Z.size(0), w = Z.size(1), K = Z.size(2);
  const int64_t q = Y1.size(1), N = Y2.size(2);
  if (L == 0 || q == 0 || w == 0 || N == 0) {
    return;
  }
  // Zᵀ (L, K, w) for row_dots' broadcast form (fp32 rows): the caller's, or transposed here.
  at::Tensor zt_own;
  const float* zt_p = nullptr;
  if (w >= cpu::avx512::kBroadcastMinWidth && Y1.scalar_type() == at::kFloat) {
    if (Zt.defined()) {
      zt_p = Zt.const_data_ptr<float>();
    } else {
      zt_own = Z.mT().contiguous();
      zt_p = zt_own.const_data_ptr<float>();
    }
  }
  const TokenScratch tmp = token_scratch(L * q * w);
  float* tmp_p = tmp.data;
  const float* z_p = Z.const_data_ptr<float>();
  float* d_p = D.mutable_data_ptr<float>();
  const float* s_p = colscale.defined() ? colscale.const_data_ptr<float>() : nullptr;

  // Pass 1: tmp[b] = coef[b] · Y1[b] · Z[b]ᵀ (q×w), by blocks of token rows.
  const int64_t row_blocks = (q + kRowsPerTask - 1) / kRowsPerTask;
  // Y1's sums of squares per block of rows (one row of K per task), added in block order below.
  std::vector<float> sq_blocks(sq1 != nullptr ? L * row_blocks * K : 0, 0.0f);
  cpu::dispatch_fp32_input(Y1.scalar_type(), "lorsum token products", [&](auto tag) {
    using T = decltype(tag);
    const T* y = Y1.const_data_ptr<T>();
    const int64_t bs = Y1.stride(0), ld = Y1.stride(1);
    cpu::parallel_tasks(L * row_blocks, kRowsPerTask * K * w, [&](int64_t task) {
      const int64_t b = task / row_blocks;
      const int64_t t0 = (task % row_blocks) * kRowsPerTask;
      const int64_t rows = std::min(kRowsPerTask, q - t0);
      const T* yb = y + b * bs + t0 * ld;
      cpu::avx512::row_dots<T>(rows, w, K, yb, ld, z_p + b * w * K, K, zt_p == nullptr ? nullptr : zt_p + b * K * w, w,
                               tmp_p + (b * q + t0) * w, w, static_cast<float>(coef[b]),
                               sq1 != nullptr ? sq_blocks.data() + task * K : nullptr);
    });
  });
  if (sq1 != nullptr) {
    for (int64_t b = 0; b < L; ++b) {
      float* out = sq1 + b * K;
      for (int64_t rb = 0; rb < row_blocks; ++rb) {
        const float* part = sq_blocks.data() + (b * row_blocks + rb) * K;
        for (int64_t k = 0; k < K; ++k) {
          out[k] += part[k];
        }
      }
    }
  }

  // Pass 2: D[b] += tmp[b]ᵀ · Y2[b] (w×N), by blocks of columns: whole rows when there are enough layers
  // to occupy the threads, else rows split into as many blocks as that takes (never narrower than
  // kMinColBlock).
  const int64_t col_blocks_wanted = balanced_col_blocks(L, N, at::get_num_threads());
  const int64_t cb = ((N + col_blocks_wanted - 1) / col_blocks_wanted + 15) / 16 * 16;
  const int64_t col_blocks = (N + cb - 1) / cb;
  cpu::dispatch_fp32_input(Y2.scalar_type(), "lorsum token products", [&](auto tag) {
    using T = decltype(tag);
    const T* y = Y2.const_data_ptr<T>();
    const int64_t bs = Y2.stride(0), ld = Y2.stride(1);
    const int64_t tb = token_block(sizeof(T), w);
    cpu::parallel_tasks(L * col_blocks, q * cb * w, [&](int64_t task) {
      const int64_t b = task / col_blocks;
      const int64_t c0 = (task % col_blocks) * cb;
      cpu::avx512::outer_accumulate<T>(q, w, std::min(cb, N - c0), tmp_p + b * q * w, w, y + b * bs + c0, ld,
                                       d_p + b * w * N + c0, N, tb, s_p == nullptr ? nullptr : s_p + b * N + c0,
                                       sq2 == nullptr ? nullptr : sq2 + b * N + c0);
    });
  });
}

at::Tensor per_layer(const std::vector<double>& values, at::ScalarType dtype) {
  const int64_t L = static_cast<int64_t>(values.size());
  return at::tensor(at::ArrayRef<double>(values), at::TensorOptions().dtype(at::kDouble)).to(dtype).view({L, 1, 1});
}

// out += (Σ_j coef[j][b] · Z[b] · Y1_j[b]ᵀ · Y2_j[b]) · diag(metric[b])⁻¹ for every layer b. out (L, w, N) is
// contiguous in Z's dtype (the accumulation dtype); Z (L, w, K); Y1_j (L, q_j, K) and Y2_j (L, q_j, N) with
// unit column stride; metric (L, N) or undefined for none. The AVX-512 path adds each token block's
// contribution, already scaled by 1/metric, straight into out. sq1 / sq2: the column sums of squares of
// Y1[0] and Y2[0] (accumulate_pair_avx512's; the AVX-512 path only). Zt: Zᵀ (L, K, w) contiguous fp32 where
// the caller has it already (row_dots' broadcast form reads it), or undefined.
void add_data_term(const at::Tensor& out, const at::Tensor& Z, const std::vector<at::Tensor>& Y1,
                   const std::vector<at::Tensor>& Y2, const std::vector<std::vector<double>>& coef,
                   const at::Tensor& metric, float* sq1 = nullptr, float* sq2 = nullptr,
                   const at::Tensor& Zt = at::Tensor()) {
  const auto acc = Z.scalar_type();
  if (Y1.empty()) {
    return;
  }
  if (acc == at::kFloat && avx512_enabled()) {
    const at::Tensor Zc = Z.contiguous();
    const at::Tensor inv = metric.defined() ? at::reciprocal(metric).contiguous() : at::Tensor();
    for (size_t j = 0; j < Y1.size(); ++j) {
      accumulate_pair_avx512(Zc, Y1[j], Y2[j], coef[j], out, inv, j == 0 ? sq1 : nullptr, j == 0 ? sq2 : nullptr,
                             Zt);
    }
    return;
  }
  TORCH_INTERNAL_ASSERT(sq1 == nullptr && sq2 == nullptr, "column sums of squares need the AVX-512 fp32 path");
  // Portable path (fp64, or a CPU without AVX-512): the same products through ATen, in the accumulation
  // dtype; bf16/fp16 operands are converted whole here.
  at::Tensor D;
  for (size_t j = 0; j < Y1.size(); ++j) {
    at::Tensor term = at::matmul(at::matmul(Z, Y1[j].to(acc).mT()), Y2[j].to(acc)) * per_layer(coef[j], acc);
    D = D.defined() ? D + term : term;
  }
  out.add_(metric.defined() ? D / metric.unsqueeze(-2) : D);
}

// ---- the half-steps ---------------------------------------------------------------------------------

struct HalfStep {
  int64_t L = 0, m = 0, n = 0, r = 0;
  std::vector<int64_t> batch;
  at::ScalarType acc = at::kFloat;
  at::ScalarType out_dtype = at::kFloat;
  at::Tensor hat, A0, B0, m_in, m_out;  // (L, ...) views, still in their own dtypes
  std::vector<at::Tensor> f_in, f_out;  // (L, q_j, n) and (L, m, q_j)
  std::vector<std::vector<double>> coef;  // J + 1 rows of L values
  std::vector<double> lmbd;               // L values
};

// Checks every input of lorsum_update_in (in_side) or lorsum_update_out and gathers them, batch
// dimensions flattened.
HalfStep parse_half_step(const char* op, bool in_side, const at::Tensor& hat, const at::Tensor& A0,
                         const at::Tensor& B0, at::TensorList f_in, at::TensorList f_out, const at::Tensor& coeffs,
                         const at::Tensor& lmbd, const std::optional<at::Tensor>& m_in,
                         const std::optional<at::Tensor>& m_out) {
  const HalfStepSizes sz = check_half_step(op, in_side, hat, A0, B0, f_in, f_out, coeffs, lmbd, m_in, m_out, at::kCPU);
  HalfStep h;
  h.L = sz.L;
  h.m = sz.m;
  h.n = sz.n;
  h.r = sz.r;
  h.batch = sz.batch;
  for (int64_t j = 0; j < sz.J; ++j) {
    h.f_in.push_back(cpu::rows_view(f_in[j], h.L));
    h.f_out.push_back(f_out[j].reshape({h.L, h.m, f_out[j].size(-1)}));
  }
  const at::Tensor c = coeffs.to(at::kDouble).contiguous();
  const double* cp = c.const_data_ptr<double>();
  h.coef.assign(sz.J + 1, std::vector<double>(h.L));
  for (int64_t j = 0; j <= sz.J; ++j) {
    for (int64_t b = 0; b < h.L; ++b) {
      h.coef[j][b] = coeffs.dim() == 1 ? cp[j] : cp[j * h.L + b];
    }
  }
  const at::Tensor lm = lmbd.to(at::kDouble).contiguous();
  h.lmbd.resize(h.L);
  for (int64_t b = 0; b < h.L; ++b) {
    h.lmbd[b] = lm.const_data_ptr<double>()[lmbd.dim() == 0 ? 0 : b];
  }
  if (m_in.has_value()) {
    h.m_in = m_in->reshape({h.L, h.n});
    h.m_out = m_out->reshape({h.L, h.m});
  }
  h.hat = hat.reshape({h.L, hat.size(-2), hat.size(-1)});
  h.A0 = A0.reshape({h.L, h.r, h.n});
  h.B0 = B0.reshape({h.L, h.m, h.r});
  h.acc = sz.any_fp64 ? at::kDouble : at::kFloat;
  h.out_dtype = A0.scalar_type();
  return h;
}

std::vector<int64_t> with_matrix(const std::vector<int64_t>& batch, int64_t rows, int64_t cols) {
  std::vector<int64_t> shape(batch);
  shape.push_back(rows);
  shape.push_back(cols);
  return shape;
}

// t in the accumulation dtype, contiguous: t itself when it already is (no ATen call).
at::Tensor as_acc(const at::Tensor& t, at::ScalarType acc) {
  const at::Tensor u = t.scalar_type() == acc ? t : t.to(acc);
  return u.is_contiguous() ? u : u.contiguous();
}

// Solves gram · Z = rhs in place for one layer (gram r×r, rhs r×N, both row-major), with the ridged
// Cholesky of small_spd.h; chol is r×r scratch.
template <typename acc_t>
void solve_one(bool vectorised, const acc_t* gram, int64_t r, acc_t* rhs, int64_t N, acc_t* chol) {
  cpu::ridged_cholesky(gram, r, r, chol);
  for (int64_t c0 = 0; c0 < N; c0 += cpu::kSolveColBlock) {
    const int64_t nc = std::min(cpu::kSolveColBlock, N - c0);
    if (vectorised) {
      cpu::cholesky_solve_block_avx512<acc_t>(chol, r, rhs + c0, N, nc);
    } else {
      cpu::cholesky_solve_block_generic<acc_t>(chol, r, rhs + c0, N, nc);
    }
  }
}

// The K-FAC metric step folded into an A-step (kfac_lorsum_update_in; spec/lorsum.md §6.1, §6.2): the
// statistics of the first data pair (X, Sᵀ) are summed in the A-step's own passes over S and X, and the EMA,
// damping and power then give the metrics the rest of the step needs (the Grams and anchor terms are formed
// after the passes, the data term scaled by M_in⁻¹ once summed). The arithmetic of kfac_metric_update_cpu:
// stat·scale in fp32, then the EMA and the power in the state's fp32. fp32 state, AVX-512 fp32 path only.
struct KfacFold {
  at::Tensor v_in, v_out;  // (L, n) and (L, m), fp32, contiguous
  double beta = 0.0, damping = 0.0, power = 1.0, scale_in = 1.0, scale_out = 1.0;
  at::Tensor new_in, new_out, m_in, m_out;  // the results, shaped as v_in and v_out

  void finish(const at::Tensor& sq_in, const at::Tensor& sq_out) {
    std::tie(new_in, m_in) = side(v_in, sq_in, scale_in);
    std::tie(new_out, m_out) = side(v_out, sq_out, scale_out);
  }

 private:
  std::pair<at::Tensor, at::Tensor> side(const at::Tensor& v, const at::Tensor& sq, double scale) const {
    at::Tensor nv = at::empty_like(v), metric = at::empty_like(v);
    const float* vp = v.const_data_ptr<float>();
    const float* sp = sq.const_data_ptr<float>();
    float* np = nv.mutable_data_ptr<float>();
    float* mp = metric.mutable_data_ptr<float>();
    const float b = static_cast<float>(beta), one_minus_b = static_cast<float>(1.0 - beta);
    const float delta = static_cast<float>(damping), p = static_cast<float>(power), sc = static_cast<float>(scale);
    for (int64_t i = 0; i < v.numel(); ++i) {
      const float x = vp[i] * b + (sp[i] * sc) * one_minus_b;
      np[i] = x;
      mp[i] = cpu::scalar_pow(x + delta, p);
    }
    return {nv, metric};
  }
};

// One half-step for every layer of h, in acc_t arithmetic: the r-wide algebra as the loops of r_wide.h,
// the token products as add_data_term's passes, the r×r solve as small_spd.h's; ATen only to convert
// inputs that are not already contiguous in acc_t and to allocate the result. With fold (an A-step, fp32,
// AVX-512, no metrics in h), the K-FAC metric step folded in: the token passes run first, unscaled, and
// sum the statistics the metrics are made of.
template <typename acc_t>
at::Tensor run_half_step_typed(const HalfStep& h, bool in_side, KfacFold* fold = nullptr) {
  const bool vectorised = avx512_enabled();
  const int64_t L = h.L, m = h.m, n = h.n, r = h.r;
  const at::Tensor A0 = as_acc(h.A0, h.acc), B0 = as_acc(h.B0, h.acc), hat = as_acc(h.hat, h.acc);
  bool scaled = h.m_in.defined();
  at::Tensor m_in = scaled ? as_acc(h.m_in, h.acc) : at::Tensor();
  at::Tensor m_out = scaled ? as_acc(h.m_out, h.acc) : at::Tensor();
  const acc_t* a0_p = A0.const_data_ptr<acc_t>();
  const acc_t* b0_p = B0.const_data_ptr<acc_t>();
  const acc_t* hat_p = hat.const_data_ptr<acc_t>();

  const int64_t N = in_side ? n : m;  // columns of the system's right-hand side
  const int64_t K = in_side ? m : n;  // rows the Grams sum over
  // Scratch, one region per quantity, each holding all L layers contiguously (the token passes take the
  // right-hand sides and Z as (L, r, N) and (L, r, K) arrays).
  const int64_t rr = r * r;
  acc_t* work = scratch<acc_t>(L * (4 * rr + 3 * K * r + r * N + r * m) + (fold != nullptr ? L * r * N : 0));
  acc_t* const grams = work;
  acc_t* const chols = grams + L * rr;
  acc_t* const smalls = chols + L * rr;
  acc_t* const smalls_t = smalls + L * rr;
  acc_t* const Ps = smalls_t + L * rr;
  acc_t* const Qs = Ps + L * K * r;
  acc_t* const Zs = Qs + L * K * r;
  acc_t* const rhss = Zs + L * r * K;
  acc_t* const B0ts = rhss + L * r * N;
  acc_t* const datas = B0ts + L * r * m;  // with fold: the data terms, summed before the metrics exist

  std::vector<at::Tensor> rows_S, rows_X;  // F_out_jᵀ (L, q, m) and F_in_j (L, q, n)
  for (size_t j = 0; j < h.f_in.size(); ++j) {
    rows_S.push_back(cpu::rows_view(h.f_out[j].mT(), L));
    rows_X.push_back(h.f_in[j]);
  }
  const auto opts = at::TensorOptions().dtype(h.acc);
  const std::vector<std::vector<double>> data_coef(h.coef.begin() + 1, h.coef.end());
  // The A-step's Z = B̂ᵀ is read only by row_dots' dot form: the token passes of fp32 rows with r ≥ 16 read
  // B̂ itself (the broadcast form's Zᵀ), and the transpose is skipped.
  bool broadcast_rows = vectorised && h.acc == at::kFloat && r >= cpu::avx512::kBroadcastMinWidth;
  for (const at::Tensor& rows : rows_S) {
    broadcast_rows = broadcast_rows && rows.scalar_type() == at::kFloat;
  }
  const bool z_of_hat = in_side && !broadcast_rows;
  if (fold != nullptr) {
    // 0. Z = B̂ᵀ, the data terms with the statistics of the first pair, then the metrics.
    TORCH_INTERNAL_ASSERT(in_side && !scaled && h.acc == at::kFloat && vectorised && !rows_S.empty());
    if (z_of_hat) {
      cpu::parallel_tasks(L, m * r, [&](int64_t b) {
        cpu::r_wide::transpose(vectorised, m, r, hat_p + b * m * r, r, Zs + b * r * K);
      });
    }
    std::fill(datas, datas + L * r * N, acc_t(0));
    const at::Tensor sq_in = at::zeros({L, n}, at::kFloat), sq_out = at::zeros({L, m}, at::kFloat);
    add_data_term(at::from_blob(datas, {L, r, N}, opts), at::from_blob(Zs, {L, r, K}, opts), rows_S, rows_X,
                  data_coef, at::Tensor(), sq_out.mutable_data_ptr<float>(), sq_in.mutable_data_ptr<float>(),
                  at::from_blob(const_cast<acc_t*>(hat_p), {L, K, r}, opts));
    fold->finish(sq_in, sq_out);
    m_in = fold->m_in;
    m_out = fold->m_out;
    scaled = true;
  }
  const acc_t* mi_p = scaled ? m_in.const_data_ptr<acc_t>() : nullptr;
  const acc_t* mo_p = scaled ? m_out.const_data_ptr<acc_t>() : nullptr;

  // 1. Per layer: the Gram (with λ on its diagonal), the anchor term of the right-hand side, and Z, the
  //    r-wide operand of the token products.
  cpu::parallel_tasks(L, 4 * K * r * r + r * r * N, [&](int64_t b) {
    const acc_t c0 = static_cast<acc_t>(h.coef[0][b]);
    const acc_t lam = static_cast<acc_t>(h.lmbd[b]);
    const acc_t* A0b = a0_p + b * r * n;
    const acc_t* B0b = b0_p + b * m * r;
    acc_t* gram = grams + b * rr;
    acc_t* small = smalls + b * rr;
    acc_t* P = Ps + b * K * r;
    acc_t* Q = Qs + b * K * r;
    acc_t* Z = Zs + b * r * K;
    acc_t* rhs = rhss + b * r * N;
    if (in_side) {
      // gram = B̂ᵀM_outB̂ + λI;  rhs = B̂ᵀM_out(c0·B0 − B̂)·A0;  Z = B̂ᵀ (where the dot form reads it).
      const acc_t* Bh = hat_p + b * m * r;
      const acc_t* mo = scaled ? mo_p + b * m : nullptr;
      cpu::r_wide::weighted_outer_sum(vectorised, m, r, Bh, r, Bh, r, mo, lam, gram);
      if (Bh == B0b && c0 == acc_t(1)) {
        // A first A-step (B̂ = B0, c0 = 1): c0·B0 − B̂ is 0, and the anchor term 0·A0 is 0 but in the columns
        // where A0 has a non-finite entry, which are NaN in every row, as the product makes them (a
        // non-finite B0 makes the Gram non-finite, whose solve is NaN as before). Two of the step's r-wide
        // products saved.
        for (int64_t c = 0; c < n; ++c) {
          rhs[c] = A0b[c] * acc_t(0);
        }
        for (int64_t l = 1; l < r; ++l) {
          for (int64_t c = 0; c < n; ++c) {
            rhs[c] += A0b[l * n + c] * acc_t(0);
          }
        }
        for (int64_t i = 1; i < r; ++i) {
          std::copy(rhs, rhs + n, rhs + i * n);
        }
      } else {
        for (int64_t i = 0; i < m * r; ++i) {
          Q[i] = B0b[i] * c0 - Bh[i];
        }
        cpu::r_wide::weighted_outer_sum(vectorised, m, r, Bh, r, Q, r, mo, acc_t(0), small);
        cpu::r_wide::rows_times(vectorised, r, r, n, small, r, A0b, n, rhs, n);
      }
      if (fold == nullptr && z_of_hat) {  // with fold, step 0 wrote Z already
        cpu::r_wide::transpose(vectorised, m, r, Bh, r, Z);
      }
    } else {
      // gram = ÂM_inÂᵀ + λI;  E = (c0·A0 − Â)·M_in·Âᵀ;  rhsᵀ = Eᵀ·B0ᵀ (the B-step in transposed form);
      // Z = Â. The sums over n run over the rows of Âᵀ and (c0·A0 − Â)ᵀ.
      const acc_t* Ah = hat_p + b * r * n;
      const acc_t* mi = scaled ? mi_p + b * n : nullptr;
      cpu::r_wide::transpose(vectorised, r, n, Ah, n, P);  // Âᵀ (n×r)
      for (int64_t i = 0; i < r * n; ++i) {  // c0·A0 − Â (r×n), in Z's space (Z is Â itself), transposed
        Z[i] = A0b[i] * c0 - Ah[i];
      }
      cpu::r_wide::transpose(vectorised, r, n, Z, n, Q);
      cpu::r_wide::weighted_outer_sum(vectorised, n, r, P, r, P, r, mi, lam, gram);
      cpu::r_wide::weighted_outer_sum(vectorised, n, r, Q, r, P, r, mi, acc_t(0), small);
      acc_t* small_t = smalls_t + b * rr;
      cpu::r_wide::transpose(vectorised, r, r, small, r, small_t);
      acc_t* B0t = B0ts + b * r * m;
      cpu::r_wide::transpose(vectorised, m, r, B0b, r, B0t);
      cpu::r_wide::rows_times(vectorised, r, r, m, small_t, r, B0t, m, rhs, m);
    }
  });

  // 2. The data terms, added to every layer's right-hand side by the token passes (with fold: the sums of
  //    step 0, scaled by M_in⁻¹ now).
  if (fold != nullptr) {
    cpu::parallel_tasks(L, r * N, [&](int64_t b) {
      const acc_t* mi = mi_p + b * n;
      for (int64_t i = 0; i < r; ++i) {
        acc_t* rhs = rhss + (b * r + i) * N;
        const acc_t* data = datas + (b * r + i) * N;
        if constexpr (std::is_same_v<acc_t, float>) {  // fold runs on the AVX-512 fp32 path only
          cpu::r_wide::add_divided(N, data, mi, rhs);
        } else {
          for (int64_t c = 0; c < N; ++c) {
            rhs[c] += data[c] / mi[c];
          }
        }
      }
    });
  } else if (!rows_S.empty()) {
    const at::Tensor rhs_all = at::from_blob(rhss, {L, r, N}, opts);
    // Z: B̂ᵀ (A-step, where step 1 wrote it) or Â itself (B-step).
    const at::Tensor z_all = at::from_blob(in_side ? Zs : const_cast<acc_t*>(hat_p), {L, r, K}, opts);
    // Zᵀ is B̂ itself (A-step) or step 1's Âᵀ (B-step).
    const at::Tensor zt_all = at::from_blob(in_side ? const_cast<acc_t*>(hat_p) : Ps, {L, K, r}, opts);
    add_data_term(rhs_all, z_all, in_side ? rows_S : rows_X, in_side ? rows_X : rows_S, data_coef,
                  in_side ? m_in : m_out, nullptr, nullptr, zt_all);
  }

  // 3. Per layer: solve, and add the anchor.
  const bool direct = h.out_dtype == h.acc;
  at::Tensor out = at::empty(with_matrix(h.batch, in_side ? r : m, in_side ? n : r),
                             at::TensorOptions().dtype(direct ? h.out_dtype : h.acc));
  acc_t* out_p = out.mutable_data_ptr<acc_t>();
  cpu::parallel_tasks(L, r * r * N, [&](int64_t b) {
    acc_t* rhs = rhss + b * r * N;
    solve_one(vectorised, grams + b * rr, r, rhs, N, chols + b * rr);
    if (in_side) {
      const acc_t* A0b = a0_p + b * r * n;
      acc_t* ob = out_p + b * r * n;
      for (int64_t i = 0; i < r * n; ++i) {
        ob[i] = A0b[i] + rhs[i];
      }
    } else {
      // The transposed solution (r×m) back to m×r in step 1's B0ᵀ space (read by then), then added.
      const acc_t* B0b = b0_p + b * m * r;
      acc_t* ob = out_p + b * m * r;
      acc_t* sol = B0ts + b * r * m;
      cpu::r_wide::transpose(vectorised, r, m, rhs, m, sol);
      for (int64_t i = 0; i < m * r; ++i) {
        ob[i] = B0b[i] + sol[i];
      }
    }
  });
  return direct ? out : out.to(h.out_dtype);
}

at::Tensor run_half_step(const HalfStep& h, bool in_side) {
  return h.acc == at::kDouble ? run_half_step_typed<double>(h, in_side) : run_half_step_typed<float>(h, in_side);
}

at::Tensor lorsum_update_in_cpu(const at::Tensor& B_hat, const at::Tensor& A0, const at::Tensor& B0,
                                at::TensorList f_in, at::TensorList f_out, const at::Tensor& coeffs,
                                const at::Tensor& lmbd, const std::optional<at::Tensor>& m_in,
                                const std::optional<at::Tensor>& m_out) {
  const HalfStep h =
      parse_half_step("lorsum_update_in", true, B_hat, A0, B0, f_in, f_out, coeffs, lmbd, m_in, m_out);
  return run_half_step(h, true);
}

at::Tensor lorsum_update_out_cpu(const at::Tensor& A_hat, const at::Tensor& A0, const at::Tensor& B0,
                                 at::TensorList f_in, at::TensorList f_out, const at::Tensor& coeffs,
                                 const at::Tensor& lmbd, const std::optional<at::Tensor>& m_in,
                                 const std::optional<at::Tensor>& m_out) {
  const HalfStep h =
      parse_half_step("lorsum_update_out", false, A_hat, A0, B0, f_in, f_out, coeffs, lmbd, m_in, m_out);
  return run_half_step(h, false);
}

// ScaledLoRSum's first A-step in the diagonal K-FAC metric of this batch (spec/lorsum.md §6.1, §6.2):
// kfac_metric_update of the first data pair (X = f_in[0], S = f_out[0]ᵀ) and the state (v_in, v_out), then
// lorsum_update_in in the new effective metrics. On the AVX-512 fp32 path with fp32 state the statistics
// are summed in the A-step's own passes over S and X (one read of the tokens fewer than the two ops);
// otherwise the two ops in turn. Returns (Â, v_in, v_out, M_in, M_out).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> kfac_lorsum_update_in_cpu(
    const at::Tensor& B_hat, const at::Tensor& A0, const at::Tensor& B0, at::TensorList f_in, at::TensorList f_out,
    const at::Tensor& coeffs, const at::Tensor& lmbd, const at::Tensor& v_in, const at::Tensor& v_out, double beta,
    double damping, double power, double scale_in, double scale_out) {
  constexpr const char* op = "kfac_lorsum_update_in";
  const HalfStep h = parse_half_step(op, true, B_hat, A0, B0, f_in, f_out, coeffs, lmbd, std::nullopt, std::nullopt);
  check_kfac_fold(op, h.batch, h.m, h.n, static_cast<int64_t>(f_in.size()), A0, v_in, v_out, at::kCPU);
  if (h.acc == at::kFloat && avx512_enabled() && v_in.scalar_type() == at::kFloat &&
      v_out.scalar_type() == at::kFloat) {
    KfacFold fold;
    fold.v_in = v_in.reshape({h.L, h.n}).contiguous();
    fold.v_out = v_out.reshape({h.L, h.m}).contiguous();
    fold.beta = beta;
    fold.damping = damping;
    fold.power = power;
    fold.scale_in = scale_in;
    fold.scale_out = scale_out;
    at::Tensor A = run_half_step_typed<float>(h, true, &fold);
    return {A, fold.new_in.view(v_in.sizes()), fold.new_out.view(v_out.sizes()), fold.m_in.view(v_in.sizes()),
            fold.m_out.view(v_out.sizes())};
  }
  static auto metric_op = c10::Dispatcher::singleton()
                              .findSchemaOrThrow("lorsum::kfac_metric_update", "")
                              .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                                  const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                                  double, double, double, double)>();
  auto [new_in, new_out, m_in, m_out] =
      metric_op.call(f_in[0], f_out[0].mT(), v_in, v_out, beta, damping, power, scale_in, scale_out);
  at::Tensor A = lorsum_update_in_cpu(B_hat, A0, B0, f_in, f_out, coeffs, lmbd, m_in, m_out);
  return {A, new_in, new_out, m_in, m_out};
}

// ---- pair products ----------------------------------------------------------------------------------

// (Wᵀ·F_out·F_in, F_out·F_in·Vᵀ) for the pair (F_in (..., q, n), F_out (..., m, q)): for the gradient pair
// (X, Sᵀ) these are (S·W)ᵀ·X (w×n) and Sᵀ·(X·Vᵀ) (m×v). An absent W or V gives a (..., 0, n) or (..., m, 0)
// result.
std::tuple<at::Tensor, at::Tensor> pair_products_cpu(const at::Tensor& f_in, const at::Tensor& f_out,
                                                     const std::optional<at::Tensor>& W,
                                                     const std::optional<at::Tensor>& V) {
  check_pair_products(f_in, f_out, W, V, at::kCPU);
  const int64_t n = f_in.size(-1), m = f_out.size(-2);
  const auto batch_ref = batch_shape(f_in, 2);
  const std::vector<int64_t> batch(batch_ref.begin(), batch_ref.end());
  const auto acc = acc_dtype({f_in, f_out, W.value_or(at::Tensor()), V.value_or(at::Tensor())});
  const int64_t L = numel_of(batch);
  const auto opts = f_in.options().dtype(acc);
  const at::Tensor rows_X = cpu::rows_view(f_in, L);
  const at::Tensor rows_S = cpu::rows_view(f_out.mT(), L);
  const std::vector<std::vector<double>> unit(1, std::vector<double>(L, 1.0));

  at::Tensor P, Q;
  if (W.has_value()) {
    const int64_t w = W->size(-1);
    const at::Tensor Z = W->reshape({L, m, w}).mT().to(acc).contiguous();
    P = at::zeros(with_matrix(batch, w, n), opts);
    add_data_term(P.view({L, w, n}), Z, {rows_S}, {rows_X}, unit, at::Tensor());
  } else {
    P = at::empty(with_matrix(batch, 0, n), opts);
  }
  if (V.has_value()) {
    const int64_t v = V->size(-2);
    const at::Tensor Z = V->reshape({L, v, n}).to(acc).contiguous();
    const at::Tensor QT = at::zeros({L, v, m}, opts);
    add_data_term(QT, Z, {rows_X}, {rows_S}, unit, at::Tensor());
    Q = at::empty(with_matrix(batch, m, v), opts);
    Q.view({L, m, v}).copy_(QT.mT());
  } else {
    Q = at::empty(with_matrix(batch, m, 0), opts);
  }
  return {P, Q};
}

}  // namespace

TORCH_LIBRARY_IMPL(lorsum, CPU, m) {
  m.impl("lorsum_update_in", &lorsum_update_in_cpu);
  m.impl("lorsum_update_out", &lorsum_update_out_cpu);
  m.impl("pair_products", &pair_products_cpu);
  m.impl("kfac_lorsum_update_in", &kfac_lorsum_update_in_cpu);
}

}  // namespace lorsum
