// The vector operations the fused CPU kernels are written against: AVX-512 intrinsics, or plain 64-byte
// arrays the compiler vectorises for any x86-64. Both have the same lane count, so a kernel's padded
// layout does not depend on the path. A kernel that needs more (masked loads, shuffles, transposes)
// derives from these and adds its own.

#pragma once

#include "tiles.h"  // LORSUM_AVX512

#include <immintrin.h>

#include <cstring>

#define LORSUM_ALWAYS_INLINE inline __attribute__((always_inline))

namespace lorsum::cpu::vec {

template <typename acc_t>
struct Avx512Base;

template <>
struct Avx512Base<float> {
  using V = __m512;
  static constexpr int kLanes = 16;
  LORSUM_AVX512 static inline V zero() { return _mm512_setzero_ps(); }
  LORSUM_AVX512 static inline V set1(float a) { return _mm512_set1_ps(a); }
  LORSUM_AVX512 static inline V load(const float* p) { return _mm512_loadu_ps(p); }
  LORSUM_AVX512 static inline void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  LORSUM_AVX512 static inline V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  LORSUM_AVX512 static inline V add(V a, V b) { return _mm512_add_ps(a, b); }
  LORSUM_AVX512 static inline V sub(V a, V b) { return _mm512_sub_ps(a, b); }
};

template <>
struct Avx512Base<double> {
  using V = __m512d;
  static constexpr int kLanes = 8;
  LORSUM_AVX512 static inline V zero() { return _mm512_setzero_pd(); }
  LORSUM_AVX512 static inline V set1(double a) { return _mm512_set1_pd(a); }
  LORSUM_AVX512 static inline V load(const double* p) { return _mm512_loadu_pd(p); }
  LORSUM_AVX512 static inline void store(double* p, V v) { _mm512_storeu_pd(p, v); }
  LORSUM_AVX512 static inline V fma(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
  LORSUM_AVX512 static inline V add(V a, V b) { return _mm512_add_pd(a, b); }
  LORSUM_AVX512 static inline V sub(V a, V b) { return _mm512_sub_pd(a, b); }
};

template <typename acc_t>
struct GenericBase {
  static constexpr int kLanes = 64 / sizeof(acc_t);
  struct V {
    acc_t x[kLanes];
  };
  static LORSUM_ALWAYS_INLINE V zero() {
    V v;
    for (int l = 0; l < kLanes; ++l) v.x[l] = acc_t(0);
    return v;
  }
  static LORSUM_ALWAYS_INLINE V set1(acc_t a) {
    V v;
    for (int l = 0; l < kLanes; ++l) v.x[l] = a;
    return v;
  }
  static LORSUM_ALWAYS_INLINE V load(const acc_t* p) {
    V v;
    std::memcpy(v.x, p, sizeof(v.x));
    return v;
  }
  static LORSUM_ALWAYS_INLINE void store(acc_t* p, const V& v) { std::memcpy(p, v.x, sizeof(v.x)); }
  static LORSUM_ALWAYS_INLINE V fma(const V& a, const V& b, V c) {
    for (int l = 0; l < kLanes; ++l) c.x[l] += a.x[l] * b.x[l];
    return c;
  }
  static LORSUM_ALWAYS_INLINE V add(V a, const V& b) {
    for (int l = 0; l < kLanes; ++l) a.x[l] += b.x[l];
    return a;
  }
  static LORSUM_ALWAYS_INLINE V sub(V a, const V& b) {
    for (int l = 0; l < kLanes; ++l) a.x[l] -= b.x[l];
    return a;
  }
};

}  // namespace lorsum::cpu::vec
