// CPU implementation of normalize_step's finish and write (lorsum_kernels/optim/step_normalization.py):
// for each of L layers, the merged step's size from r×r Grams, the statistics' update, the shrink to the
// layer's lr and the write of the factors and statistics, in place, in one pass over the layer's old and
// new factors (the torch composite takes about ten: joins, stacks, differences, Grams, the shrink, copies).
//
// Reference: lorsum_kernels.reference.finish_normalized_step. Schema: csrc/lorsum.cpp.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"
#include "common.h"
#include "r_wide.h"
#include "tiles.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#define LORSUM_INLINE inline __attribute__((always_inline))

namespace lorsum {
namespace {

constexpr const char* kOp = "finish_normalized_step";

// One layer's operands as raw fp32 arrays: the parameters (written), the new factors and its statistics.
struct Layer {
  float* A;  // r×n, row-major
  float* B;  // m×r, row-major
  const float* A_new;
  const float* B_new;
  float* v;
  float* t;
  float* scale;
  int64_t r, n, m;
};

// Σ_i x[i]·y[i] over an r×r pair, in order, in fp64.
LORSUM_INLINE double frobenius_dot(const double* x, const double* y, int64_t count) {
  double sum = 0.0;
  for (int64_t i = 0; i < count; ++i) {
    sum += x[i] * y[i];
  }
  return sum;
}

// Rows summed in fp32 (the r-wide kernels) before their partial Gram is added to the fp64 total, so the
// Grams' rounding grows with kGramChunk + K / kGramChunk terms rather than K (the composite's fp32 bmm sums
// in blocks too; the bound comes out as accurate as the composite's against an fp64 computation).
constexpr int64_t kGramChunk = 64;
// _numerics.STEP_NOISE_FLOOR, in units of ε·‖A‖_F·‖B‖_F.
constexpr double kNoiseFloor = 16.0;

// G (r×r, fp64) = Σ_k P[k,:]ᵀ·Q[k,:] over the K rows of P and Q (row stride r), chunk by chunk.
template <bool kVectorised>
LORSUM_INLINE void chunked_gram(int64_t K, int64_t r, const float* P, const float* Q,
                                                        float* partial, double* G) {
  std::fill(G, G + r * r, 0.0);
  for (int64_t k0 = 0; k0 < K; k0 += kGramChunk) {
    const int64_t rows = std::min(kGramChunk, K - k0);
    cpu::r_wide::weighted_outer_sum<float>(kVectorised, rows, r, P + k0 * r, r, Q + k0 * r, r, nullptr, 0.0f,
                                           partial);
    for (int64_t i = 0; i < r * r; ++i) {
      G[i] += partial[i];
    }
  }
}

// 0 when every value of the count at p is finite (x·0 is 0 there, NaN for ±inf and NaN), else NaN; 16
// lanes summed apart so the loop vectorises without reordering a sum.
LORSUM_INLINE float nonfinite_probe(const float* p, int64_t count) {
  float lanes[16] = {};
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) {
    for (int l = 0; l < 16; ++l) {
      lanes[l] += p[i + l] * 0.0f;
    }
  }
  for (; i < count; ++i) {
    lanes[0] += p[i] * 0.0f;
  }
  float total = 0.0f;
  for (const float lane : lanes) {
    total += lane;
  }
  return total;
}

// diff = new / root − old and probe += new / root · 0 over `count` values (the new factor unbalanced as
// StreamedStep.collect divides it, and its finiteness).
LORSUM_INLINE void unbalanced_difference(const float* new_values, const float* old, float root, bool balanced,
                                         int64_t count, float* diff, float* probe) {
  float lanes[16] = {};
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) {
    for (int l = 0; l < 16; ++l) {
      const float value = balanced ? new_values[i + l] / root : new_values[i + l];
      diff[i + l] = value - old[i + l];
      lanes[l] += value * 0.0f;
    }
  }
  for (; i < count; ++i) {
    const float value = balanced ? new_values[i] / root : new_values[i];
    diff[i] = value - old[i];
    lanes[0] += value * 0.0f;
  }
  for (const float lane : lanes) {
    *probe += lane;
  }
}

// old ← old + (new − old)·α as torch.lerp computes it where α < 1, else new (update_clip.moved_by).
LORSUM_INLINE void move(float* old, const float* new_values, float root, bool balanced, float alpha,
                        int64_t count) {
  const bool cut = alpha < 1.0f;
  const bool small = std::abs(alpha) < 0.5f;
  for (int64_t i = 0; i < count; ++i) {
    const float value = balanced ? new_values[i] / root : new_values[i];
    if (!cut) {
      old[i] = value;
    } else if (small) {
      old[i] = old[i] + alpha * (value - old[i]);
    } else {
      old[i] = value - (value - old[i]) * (1.0f - alpha);
    }
  }
}

// The layer's finish; false (nothing written) when a new factor has a non-finite value.
template <bool kVectorised>
LORSUM_INLINE bool finish_layer(const Layer& L, float root, float layer_lr, float lr,
                                                       double beta, bool balanced) {
  const int64_t r = L.r, n = L.n, m = L.m;
  // Per thread, kept: a factor's worth of scratch is over glibc's mmap threshold, fresh pages per call.
  thread_local std::vector<float> scratch;
  scratch.resize(std::max<size_t>(scratch.size(), r * n + 2 * n * r + m * r + r * r));
  float* dA = scratch.data();         // r×n
  float* At = dA + r * n;             // n×r: Aᵀ
  float* dAt = At + n * r;            // n×r: δAᵀ
  float* dB = dAt + n * r;            // m×r
  float* partial = dB + m * r;        // r×r: one chunk's Gram
  thread_local std::vector<double> grams;
  grams.resize(std::max<size_t>(grams.size(), 6 * r * r));
  double* AA = grams.data();          // A·Aᵀ
  double* dAdA = AA + r * r;          // δA·δAᵀ
  double* AdA = dAdA + r * r;         // A·δAᵀ
  double* BB = AdA + r * r;           // BᵀB
  double* dBdB = BB + r * r;          // δBᵀδB
  double* dBB = dBdB + r * r;         // δBᵀB
  float probe = 0.0f;
  unbalanced_difference(L.A_new, L.A, root, balanced, r * n, dA, &probe);
  unbalanced_difference(L.B_new, L.B, root, balanced, m * r, dB, &probe);
  if (!(probe == 0.0f)) {
    return false;
  }
  // The A side's Grams from the factors' columns: r-wide rows after a transpose, as the half-steps do.
  cpu::r_wide::transpose<float>(kVectorised, r, n, L.A, n, At);
  cpu::r_wide::transpose<float>(kVectorised, r, n, dA, n, dAt);
  chunked_gram<kVectorised>(n, r, At, At, partial, AA);
  chunked_gram<kVectorised>(n, r, dAt, dAt, partial, dAdA);
  chunked_gram<kVectorised>(n, r, At, dAt, partial, AdA);
  chunked_gram<kVectorised>(m, r, L.B, L.B, partial, BB);
  chunked_gram<kVectorised>(m, r, dB, dB, partial, dBdB);
  chunked_gram<kVectorised>(m, r, dB, L.B, partial, dBB);
  // update_clip.merged_update_bound: ‖δB·A + B·δA‖_F + ‖δB·δA‖_F of the unbalanced factors (its two squares
  // in fp64, then fp32), then step_normalization.finish's arithmetic in its fp32 order.
  const float first = static_cast<float>(frobenius_dot(dBdB, AA, r * r) + frobenius_dot(BB, dAdA, r * r) +
                                         2.0 * frobenius_dot(dBB, AdA, r * r));
  const float second = static_cast<float>(frobenius_dot(dBdB, dAdA, r * r));
  const float bound = std::sqrt(std::max(first, 0.0f)) + std::sqrt(std::max(second, 0.0f));
  // _numerics.STEP_NOISE_FLOOR: a step within the factors' rounding (‖ΔW‖ ≤ 16·ε·‖A‖_F·‖B‖_F) measures
  // nothing, and the statistics stay; a NaN bound counts as measured (it reaches v, as in the composite).
  double trace_a = 0.0, trace_b = 0.0;
  for (int64_t i = 0; i < r; ++i) {
    trace_a += AA[i * r + i];
    trace_b += BB[i * r + i];
  }
  const float noise_floor = static_cast<float>(kNoiseFloor * std::numeric_limits<float>::epsilon()) *
                            static_cast<float>(std::sqrt(trace_a)) * static_cast<float>(std::sqrt(trace_b));
  const bool measured = !(bound <= noise_floor);
  const float entries_root = static_cast<float>(std::sqrt(static_cast<double>(n * m)));
  const float u = bound / (layer_lr * entries_root) * (root * root);
  // As torch rounds the Python numbers β and 1 − β against an fp32 tensor (1 − β from the double β).
  const float beta_f = static_cast<float>(beta), one_minus_beta = static_cast<float>(1.0 - beta);
  const float v_new = measured ? *L.v * beta_f + one_minus_beta * u * u : *L.v;
  const float t_new = measured ? *L.t + 1.0f : *L.t;
  float scale = 0.0f;
  if (v_new > 0.0f) {
    scale = 1.0f / std::max(std::sqrt(v_new / (1.0f - std::pow(beta_f, t_new))), 1e-30f);
  }
  const float alpha = std::min(lr * scale / layer_lr, 1.0f);
  move(L.A, L.A_new, root, balanced, alpha, r * n);
  move(L.B, L.B_new, root, balanced, alpha, m * r);
  *L.v = v_new;
  *L.t = t_new;
  *L.scale = scale;
  return true;
}

// The AVX-512 build: the same source compiled for that target (the loops above vectorise 16 wide), with
// the r-wide kernels' AVX-512 forms; finish_layer<false> is the portable build.
LORSUM_AVX512 bool finish_layer_avx512(const Layer& L, float root, float layer_lr, float lr, double beta,
                                       bool balanced) {
  return finish_layer<true>(L, root, layer_lr, lr, beta, balanced);
}

std::string described(const at::Tensor& t) {
  return t.defined() ? c10::str(t.scalar_type(), " ", t.sizes(), " on ", t.device()) : "an undefined tensor";
}

void check_fp32_matrix(const at::Tensor& t, const char* name, int64_t l, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.defined() && t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(), kOp,
              ": ", name, "[", l, "] must be a contiguous float32 CPU tensor, got ", described(t));
  if (rows >= 0) {
    TORCH_CHECK(t.numel() == rows * cols && t.dim() >= 2 && t.size(-2) == rows && t.size(-1) == cols, kOp,
                ": ", name, "[", l, "] must be (", rows, ", ", cols,
                ") (leading dimensions of size 1 allowed), got ", t.sizes());
  }
}

void check_state(const at::Tensor& t, const char* name, int64_t l) {
  TORCH_CHECK(t.defined() && t.device().is_cpu() && t.scalar_type() == at::kFloat && t.numel() == 1, kOp,
              ": ", name, "[", l, "] must be a one-element float32 CPU tensor, got ", described(t));
}

void check_per_layer(const at::Tensor& t, const char* name, int64_t L, at::ScalarType dtype) {
  const bool ok = t.defined() && t.device().is_cpu() && t.scalar_type() == dtype && t.dim() == 1;
  TORCH_CHECK(ok && t.size(0) == L, kOp, ": ", name, " must be a (", L, ",) ", dtype, " CPU tensor, got ",
              described(t));
}

bool all_finite(const at::Tensor& t) {
  if (t.scalar_type() == at::kFloat && t.is_contiguous()) {
    return nonfinite_probe(t.data_ptr<float>(), t.numel()) == 0.0f;
  }
  return at::isfinite(t).all().item<bool>();
}

at::Tensor finish_normalized_step_cpu(at::TensorList A, at::TensorList B, at::TensorList A_new,
                                      at::TensorList B_new, at::TensorList checked, at::TensorList v,
                                      at::TensorList t, at::TensorList scale, const at::Tensor& root,
                                      const at::Tensor& layer_lr, const at::Tensor& allowed, bool balanced,
                                      double lr, double beta) {
  const int64_t L = static_cast<int64_t>(A.size());
  const std::initializer_list<std::pair<at::TensorList, const char*>> lists = {
      {B, "B"}, {A_new, "A_new"}, {B_new, "B_new"}, {v, "v"}, {t, "t"}, {scale, "scale"}};
  for (const auto& [list, name] : lists) {
    TORCH_CHECK(static_cast<int64_t>(list.size()) == L, kOp, ": ", name, " has ", list.size(),
                " tensors and A has ", L, " (one per layer)");
  }
  TORCH_CHECK(L == 0 ? checked.empty() : checked.size() % L == 0, kOp, ": checked has ", checked.size(),
              " tensors, not a multiple of the ", L, " layers (the same number per layer, layer by layer)");
  check_per_layer(root, "root", L, at::kFloat);
  check_per_layer(layer_lr, "layer_lr", L, at::kFloat);
  check_per_layer(allowed, "allowed", L, at::kBool);
  std::vector<Layer> layers(L);
  for (int64_t l = 0; l < L; ++l) {
    check_fp32_matrix(A[l], "A", l, -1, -1);
    TORCH_CHECK(A[l].dim() == 2 && B[l].dim() == 2, kOp, ": A[", l, "] and B[", l,
                "] must be matrices (r, n) and (m, r), got ", A[l].sizes(), " and ", B[l].sizes());
    const int64_t r = A[l].size(0), n = A[l].size(1), m = B[l].size(0);
    check_fp32_matrix(B[l], "B", l, m, r);
    check_fp32_matrix(A_new[l], "A_new", l, r, n);
    check_fp32_matrix(B_new[l], "B_new", l, m, r);
    check_state(v[l], "v", l);
    check_state(t[l], "t", l);
    check_state(scale[l], "scale", l);
    layers[l] = Layer{A[l].data_ptr<float>(), B[l].data_ptr<float>(), A_new[l].data_ptr<float>(),
                      B_new[l].data_ptr<float>(), v[l].data_ptr<float>(), t[l].data_ptr<float>(),
                      scale[l].data_ptr<float>(), r, n, m};
  }
  for (const auto& c : checked) {
    TORCH_CHECK(c.defined() && c.device().is_cpu() && is_float_dtype(c.scalar_type()), kOp,
                ": checked must hold floating CPU tensors");
  }
  at::Tensor finite = allowed.clone();
  bool* ok = finite.data_ptr<bool>();
  const float* roots = root.data_ptr<float>();
  const float* lrs = layer_lr.data_ptr<float>();
  const int64_t per_layer = L == 0 ? 0 : static_cast<int64_t>(checked.size()) / L;
  for (int64_t l = 0; l < L && per_layer > 0; ++l) {  // the other new state: ATen calls for odd dtypes
    for (int64_t k = 0; k < per_layer && ok[l]; ++k) {
      ok[l] = all_finite(checked[l * per_layer + k]);
    }
  }
  const bool vectorised = cpu::avx512_enabled();
  const float lr_f = static_cast<float>(lr);
  int64_t work = 0;
  for (const auto& layer : layers) {
    work = std::max(work, 3 * layer.r * layer.r * (layer.m + layer.n));
  }
  cpu::parallel_tasks(L, work, [&](int64_t l) {
    if (ok[l]) {
      ok[l] = vectorised ? finish_layer_avx512(layers[l], roots[l], lrs[l], lr_f, beta, balanced)
                         : finish_layer<false>(layers[l], roots[l], lrs[l], lr_f, beta, balanced);
    }
  });
  return finite;
}

}  // namespace

TORCH_LIBRARY_IMPL(lorsum, CPU, m) {
  m.impl("finish_normalized_step", &finish_normalized_step_cpu);
}

}  // namespace lorsum
