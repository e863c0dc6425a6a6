// The hot loops (kernels_impl.h) for AVX-512 (AVX512F), chosen at run time on CPUs that have
// it (isa.h). Everything after the target pragma, including this file's copy of the shared
// math, lives in names of its own (namespace elementwise_avx512, isa_avx512), so none of
// it can be picked by the linker for code that runs on other CPUs.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "isa.h"

// GCC only: clang ignores `#pragma GCC target`, and its intrinsics then refuse to compile
// (clang builds run the generic loops).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// GCC 12 warns about the _mm512_undefined_* operands inside its own intrinsics.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f")
#define elementwise elementwise_avx512
#define SD_ISA_NS isa_avx512
#define SD_ISA_NAME "avx512"
#include "sage_dist/elementwise.h"

namespace sage_dist {
namespace SD_ISA_NS {
namespace ew = ::sage_dist::elementwise;
namespace {

inline __mmask16 first_n(int n) { return static_cast<__mmask16>((1u << n) - 1u); }

struct V {
  __m512 v;
  V() = default;
  V(__m512 x) : v(x) {}
  explicit V(float x) : v(_mm512_set1_ps(x)) {}
  static V zero() { return V(_mm512_setzero_ps()); }
  static V load(const float* p) { return V(_mm512_loadu_ps(p)); }
  static V load(const uint16_t* p) {  // bf16 bits: the top half of an fp32
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return V(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
  }
  static V load_n(const float* p, int n) { return V(_mm512_maskz_loadu_ps(first_n(n), p)); }
  static V load_n(const uint16_t* p, int n) {
    uint16_t buf[16] = {};
    std::memcpy(buf, p, sizeof(uint16_t) * n);
    return load(buf);
  }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  V abs() const {
    return V(_mm512_castsi512_ps(
        _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7FFFFFFF))));
  }
  V sign() const {  // (x > 0) - (x < 0): +1, -1, or +0 (also for NaN)
    const __m512 z = _mm512_setzero_ps();
    __m512 s = _mm512_mask_mov_ps(z, _mm512_cmp_ps_mask(v, z, _CMP_GT_OQ), _mm512_set1_ps(1.f));
    return V(_mm512_mask_mov_ps(s, _mm512_cmp_ps_mask(v, z, _CMP_LT_OQ), _mm512_set1_ps(-1.f)));
  }
  static V add_n(V acc, V x, int n) { return V(_mm512_mask_add_ps(acc.v, first_n(n), acc.v, x.v)); }
};

// (Free functions, not hidden friends: GCC applies the target pragma only to those.)
inline V operator+(V a, V b) { return V(_mm512_add_ps(a.v, b.v)); }
inline V operator-(V a, V b) { return V(_mm512_sub_ps(a.v, b.v)); }
inline V operator*(V a, V b) { return V(_mm512_mul_ps(a.v, b.v)); }
// 32 double lanes: a = 0-7, b = 8-15, c = 16-23, d = 24-31.
struct D {
  __m512d a, b, c, d;
  static D zero() { return {_mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd()}; }
  static __m512d lo(V f) { return _mm512_cvtps_pd(_mm512_castps512_ps256(f.v)); }
  static __m512d hi(V f) {
    return _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(f.v), 1)));
  }
  void add(V f0, V f1) {
    a = _mm512_add_pd(a, lo(f0));
    b = _mm512_add_pd(b, hi(f0));
    c = _mm512_add_pd(c, lo(f1));
    d = _mm512_add_pd(d, hi(f1));
  }
  double sum() const {
    const __m512d f = _mm512_add_pd(_mm512_add_pd(a, c), _mm512_add_pd(b, d));
    const __m256d g = _mm256_add_pd(_mm512_castpd512_pd256(f), _mm512_extractf64x4_pd(f, 1));
    const __m128d h = _mm_add_pd(_mm256_castpd256_pd128(g), _mm256_extractf128_pd(g, 1));
    return _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
  }
};

struct B {
  __m512i m;
  static B zero() { return {_mm512_setzero_si512()}; }
  void add(V x) {
    m = _mm512_max_epu32(m, _mm512_and_si512(_mm512_castps_si512(x.v), _mm512_set1_epi32(0x7FFFFFFF)));
  }
  uint32_t max() const { return _mm512_reduce_max_epu32(m); }
};

}  // namespace
}  // namespace SD_ISA_NS
}  // namespace sage_dist

#include "kernels_impl.h"

#undef SD_ISA_NAME
#undef SD_ISA_NS
#undef elementwise
#pragma GCC pop_options
#pragma GCC diagnostic pop

const sage_dist::cpu::Kernels* sage_dist::cpu::kernels_avx512() { return &isa_avx512::kTable; }

#else
const sage_dist::cpu::Kernels* sage_dist::cpu::kernels_avx512() { return nullptr; }
#endif
