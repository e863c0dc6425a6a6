// The hot loops (kernels_impl.h) with the base build's flags only (SAGE_DIST_CPU_ARCH), for
// CPUs without AVX2 (and non-x86 builds): 16 lanes as a GCC/Clang vector type, which the
// compiler maps onto whatever SIMD the target has. Same lanes, blocks and order as the AVX2
// and AVX-512 builds, so the same numbers.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "isa.h"
#include "sage_dist/elementwise.h"

// 64-byte vectors in internal functions only (all inlined): no ABI is crossed.
#pragma GCC diagnostic ignored "-Wpsabi"

#define SD_ISA_NS isa_generic
#define SD_ISA_NAME "generic"

namespace sage_dist {
namespace SD_ISA_NS {
namespace ew = ::sage_dist::elementwise;
namespace {

typedef float F16 __attribute__((vector_size(64)));
typedef int32_t I16 __attribute__((vector_size(64)));
typedef uint32_t U16 __attribute__((vector_size(64)));
typedef uint16_t H16 __attribute__((vector_size(32)));

inline I16 lane_index() { return I16{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}; }

struct V {
  F16 x;
  V() = default;
  V(F16 v) : x(v) {}
  explicit V(float s) : x(F16{} + s) {}
  static V zero() { return V(F16{}); }
  static V load(const float* p) {
    F16 v;
    std::memcpy(&v, p, sizeof v);
    return V(v);
  }
  static V load(const uint16_t* p) {  // bf16 bits: the top half of an fp32
    H16 h;
    std::memcpy(&h, p, sizeof h);
    return V(reinterpret_cast<F16>(__builtin_convertvector(h, U16) << 16));
  }
  template <typename T>
  static V load_n(const T* p, int n) {
    T buf[16] = {};
    std::memcpy(buf, p, sizeof(T) * n);
    return load(buf);
  }
  void store(float* p) const { std::memcpy(p, &x, sizeof x); }
  V abs() const { return V(reinterpret_cast<F16>(reinterpret_cast<I16>(x) & 0x7FFFFFFF)); }
  V sign() const {  // (x > 0) - (x < 0): +1, -1, or +0 (also for NaN)
    const I16 one = reinterpret_cast<I16>(F16{} + 1.f);
    return V(reinterpret_cast<F16>((x > 0.f) & one) - reinterpret_cast<F16>((x < 0.f) & one));
  }
  static V add_n(V acc, V v, int n) {  // lanes >= n add +0, which leaves a sum of terms >= 0 as it is
    return V(acc.x + reinterpret_cast<F16>(reinterpret_cast<I16>(v.x) & (lane_index() < n)));
  }
};

inline V operator+(V a, V b) { return V(a.x + b.x); }
inline V operator-(V a, V b) { return V(a.x - b.x); }
inline V operator*(V a, V b) { return V(a.x * b.x); }

// 32 double lanes: q[k] holds lanes 8k to 8k + 7.
typedef double D8 __attribute__((vector_size(64)));
typedef float F8 __attribute__((vector_size(32)));

struct D {
  D8 q[4];
  static D zero() { return {{D8{}, D8{}, D8{}, D8{}}}; }
  static D8 lo(F16 f) { return __builtin_convertvector(__builtin_shufflevector(f, f, 0, 1, 2, 3, 4, 5, 6, 7), D8); }
  static D8 hi(F16 f) {
    return __builtin_convertvector(__builtin_shufflevector(f, f, 8, 9, 10, 11, 12, 13, 14, 15), D8);
  }
  void add(V f0, V f1) {
    q[0] += lo(f0.x);
    q[1] += hi(f0.x);
    q[2] += lo(f1.x);
    q[3] += hi(f1.x);
  }
  double sum() const {  // the tree: l + (l + 16), + 8, + 4, + 2, + 1
    const D8 f = (q[0] + q[2]) + (q[1] + q[3]);
    double v[8];
    std::memcpy(v, &f, sizeof v);
    for (int w = 4; w >= 1; w /= 2)
      for (int l = 0; l < w; ++l) v[l] += v[l + w];
    return v[0];
  }
};

struct B {
  U16 m;
  static B zero() { return {U16{}}; }
  void add(V v) {
    const U16 a = reinterpret_cast<U16>(v.x) & 0x7FFFFFFFu;
    m = a > m ? a : m;
  }
  uint32_t max() const {
    uint32_t r = 0;
    for (int l = 0; l < 16; ++l) r = std::max(r, static_cast<uint32_t>(m[l]));
    return r;
  }
};

}  // namespace
}  // namespace SD_ISA_NS
}  // namespace sage_dist

#include "kernels_impl.h"

const sage_dist::cpu::Kernels* sage_dist::cpu::kernels_generic() { return &isa_generic::kTable; }
