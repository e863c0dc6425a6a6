// The hot loops (kernels_impl.h) for AVX2, chosen at run time on CPUs that have it and lack
// AVX-512 (isa.h). As in isa_avx512.cpp, everything compiled for AVX2 has names of its own.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "isa.h"

// GCC only: clang ignores `#pragma GCC target`, and its intrinsics then refuse to compile
// (clang builds run the generic loops).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx2")
#define elementwise elementwise_avx2
#define SD_ISA_NS isa_avx2
#define SD_ISA_NAME "avx2"
#include "sage_dist/elementwise.h"

namespace sage_dist {
namespace SD_ISA_NS {
namespace ew = ::sage_dist::elementwise;
namespace {

// 16 lanes as two 8-lane halves: lanes 0-7 in a, 8-15 in b.
struct V {
  __m256 a, b;
  V() = default;
  V(__m256 x, __m256 y) : a(x), b(y) {}
  explicit V(float x) : a(_mm256_set1_ps(x)), b(a) {}
  static V zero() { return V(_mm256_setzero_ps(), _mm256_setzero_ps()); }
  static V load(const float* p) { return V(_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)); }
  static __m256 widen(__m128i h) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static V load(const uint16_t* p) {  // bf16 bits: the top half of an fp32
    return V(widen(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
             widen(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8))));
  }
  template <typename T>
  static V load_n(const T* p, int n) {
    T buf[16] = {};
    std::memcpy(buf, p, sizeof(T) * n);
    return load(buf);
  }
  void store(float* p) const {
    _mm256_storeu_ps(p, a);
    _mm256_storeu_ps(p + 8, b);
  }
  static __m256 abs8(__m256 x) {
    return _mm256_castsi256_ps(_mm256_and_si256(_mm256_castps_si256(x), _mm256_set1_epi32(0x7FFFFFFF)));
  }
  V abs() const { return V(abs8(a), abs8(b)); }
  static __m256 sign8(__m256 x) {  // (x > 0) - (x < 0): +1, -1, or +0 (also for NaN)
    const __m256 z = _mm256_setzero_ps(), one = _mm256_set1_ps(1.f);
    return _mm256_sub_ps(_mm256_and_ps(_mm256_cmp_ps(x, z, _CMP_GT_OQ), one),
                         _mm256_and_ps(_mm256_cmp_ps(x, z, _CMP_LT_OQ), one));
  }
  V sign() const { return V(sign8(a), sign8(b)); }
  static V add_n(V acc, V x, int n) {  // lanes >= n add +0, which leaves a sum of terms >= 0 as it is
    const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256 lo = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n), idx));
    const __m256 hi = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n - 8), idx));
    return V(_mm256_add_ps(acc.a, _mm256_and_ps(x.a, lo)), _mm256_add_ps(acc.b, _mm256_and_ps(x.b, hi)));
  }
};

// (Free functions, not hidden friends: GCC applies the target pragma only to those.)
inline V operator+(V x, V y) { return V(_mm256_add_ps(x.a, y.a), _mm256_add_ps(x.b, y.b)); }
inline V operator-(V x, V y) { return V(_mm256_sub_ps(x.a, y.a), _mm256_sub_ps(x.b, y.b)); }
inline V operator*(V x, V y) { return V(_mm256_mul_ps(x.a, y.a), _mm256_mul_ps(x.b, y.b)); }
// 32 double lanes: q[k] holds lanes 4k to 4k + 3.
struct D {
  __m256d q[8];
  static D zero() {
    D r;
    for (__m256d& x : r.q) x = _mm256_setzero_pd();
    return r;
  }
  void add(V f0, V f1) {
    const __m256 h[4] = {f0.a, f0.b, f1.a, f1.b};
    for (int k = 0; k < 4; ++k) {
      q[2 * k] = _mm256_add_pd(q[2 * k], _mm256_cvtps_pd(_mm256_castps256_ps128(h[k])));
      q[2 * k + 1] = _mm256_add_pd(q[2 * k + 1], _mm256_cvtps_pd(_mm256_extractf128_ps(h[k], 1)));
    }
  }
  double sum() const {
    __m256d e[4];
    for (int k = 0; k < 4; ++k) e[k] = _mm256_add_pd(q[k], q[k + 4]);          // l + (l + 16)
    const __m256d g = _mm256_add_pd(_mm256_add_pd(e[0], e[2]), _mm256_add_pd(e[1], e[3]));
    const __m128d h = _mm_add_pd(_mm256_castpd256_pd128(g), _mm256_extractf128_pd(g, 1));
    return _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
  }
};

struct B {
  __m256i m;
  static B zero() { return {_mm256_setzero_si256()}; }
  void add(V x) {
    const __m256i mask = _mm256_set1_epi32(0x7FFFFFFF);
    m = _mm256_max_epu32(m, _mm256_and_si256(_mm256_castps_si256(x.a), mask));
    m = _mm256_max_epu32(m, _mm256_and_si256(_mm256_castps_si256(x.b), mask));
  }
  uint32_t max() const {
    uint32_t lanes[8];
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(lanes), m);
    return *std::max_element(lanes, lanes + 8);
  }
};

}  // namespace
}  // namespace SD_ISA_NS
}  // namespace sage_dist

#include "kernels_impl.h"

#undef SD_ISA_NAME
#undef SD_ISA_NS
#undef elementwise
#pragma GCC pop_options

const sage_dist::cpu::Kernels* sage_dist::cpu::kernels_avx2() { return &isa_avx2::kTable; }

#else
const sage_dist::cpu::Kernels* sage_dist::cpu::kernels_avx2() { return nullptr; }
#endif
