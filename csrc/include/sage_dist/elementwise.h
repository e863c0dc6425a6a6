// Per-element optimizer math, shared by the CPU and CUDA kernels.
//
// This header is the only place where the fused kernels spell out an update rule
// (the spec is docs/ALGORITHMS.md). Everything here is fp32 math on
// scalars, with no ATen dependency, so it compiles for host and device alike.
//
// Scalar hyperparameters arrive from the op as doubles. They are folded into fp32
// coefficients ONCE, on the host, in double precision (e.g. 1 - beta1 is computed in
// double, then rounded). That is exactly what the pure-PyTorch reference does when it
// multiplies an fp32 tensor by a Python float, so kernel and reference round the same.
#pragma once

#ifdef __CUDACC__
#define SD_HOST_DEVICE __host__ __device__
#else
#define SD_HOST_DEVICE
#endif

#include <cmath>
#include <cstdint>
#include <cstring>

namespace sage_dist {
namespace elementwise {

// sign(x) in {-1, 0, +1}, with sign(0) = sign(-0) = sign(NaN) = +0, as torch.sign gives.
SD_HOST_DEVICE inline float sign(float x) {
  return static_cast<float>((x > 0.f) - (x < 0.f));
}

// ---------------------------------------------------------------------------
// Lion (spec §5)
//   p <- p * (1 - lr*wd);  u <- sign(beta1*m + (1-beta1)*g);  p <- p - lr*u;
//   m <- beta2*m + (1-beta2)*g
// ---------------------------------------------------------------------------
struct LionCoeffs {
  float lr;
  float decay;            // 1 - lr * weight_decay
  float beta1;
  float one_minus_beta1;
  float beta2;
  float one_minus_beta2;
};

SD_HOST_DEVICE inline LionCoeffs make_lion_coeffs(double lr, double beta1, double beta2,
                                                  double weight_decay) {
  LionCoeffs c;
  c.lr = static_cast<float>(lr);
  c.decay = static_cast<float>(1.0 - lr * weight_decay);
  c.beta1 = static_cast<float>(beta1);
  c.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  c.beta2 = static_cast<float>(beta2);
  c.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  return c;
}

// Updates p and m in place. The direction uses the OLD m (interpolation before the
// momentum update), which is what makes Lion differ from signed heavy-ball momentum.
SD_HOST_DEVICE inline void lion_update(float& p, float& m, float g, const LionCoeffs& c) {
  const float u = sign(c.beta1 * m + c.one_minus_beta1 * g);
  p = p * c.decay;
  p = p - c.lr * u;
  m = c.beta2 * m + c.one_minus_beta2 * g;
}

// ---------------------------------------------------------------------------
// Generic forms below are templates on the value type T: float on CUDA and in the CPU
// loops, 8 fp32 lanes (F8 in csrc/cpu/fragment_cpu.cpp) on the CPU's explicit AVX2 path.
// Coefficients are broadcast with T(x). Each product and sum is rounded on its
// own, in the order the pure-PyTorch reference uses.
// ---------------------------------------------------------------------------
template <typename T>
SD_HOST_DEVICE inline T sign_of(T x);

template <>
SD_HOST_DEVICE inline float sign_of<float>(float x) {
  return sign(x);
}

// SAGE (spec §1), the elementwise part once the per-column damper h is known:
//   p <- p (1 - lr wd);  m, u per `momentum_first`;  p <- p - lr (u h)
// The coefficients are Lion's (same lr, decay and betas) plus the order flag.
struct SageCoeffs : LionCoeffs {
  bool momentum_first;  // the authors' order: m is updated before the direction
};

SD_HOST_DEVICE inline SageCoeffs make_sage_coeffs(double lr, double beta1, double beta2,
                                                  double weight_decay, bool momentum_first) {
  SageCoeffs c;
  static_cast<LionCoeffs&>(c) = make_lion_coeffs(lr, beta1, beta2, weight_decay);
  c.momentum_first = momentum_first;
  return c;
}

template <typename T>
SD_HOST_DEVICE inline void sage_update(T& p, T& m, T g, T h, const SageCoeffs& c) {
  T u;
  if (c.momentum_first) {
    m = T(c.beta2) * m + T(c.one_minus_beta2) * g;
    u = sign_of(T(c.beta1) * m + T(c.one_minus_beta1) * g);
  } else {
    u = sign_of(T(c.beta1) * m + T(c.one_minus_beta1) * g);
    m = T(c.beta2) * m + T(c.one_minus_beta2) * g;
  }
  p = p * T(c.decay);
  p = p - T(c.lr) * (u * h);
}

// Sinkhorn / SinkGD / SCALE (spec §2-4): the final step with the gradient scaled on the fly,
//   p <- p (1 - lr wd) - step (g r c)     (r: row scale, c: column scale; 1 when absent)
struct ScaledCoeffs {
  float decay;  // 1 - lr * weight_decay
  float step;
};

SD_HOST_DEVICE inline ScaledCoeffs make_scaled_coeffs(double lr, double weight_decay,
                                                      double step) {
  ScaledCoeffs c;
  c.decay = static_cast<float>(1.0 - lr * weight_decay);
  c.step = static_cast<float>(step);
  return c;
}

template <typename T>
SD_HOST_DEVICE inline T scaled_update(T p, T g, T r, T c, const ScaledCoeffs& k) {
  T x = g * r;
  x = x * c;
  p = p * T(k.decay);
  return p - T(k.step) * x;
}

// SCALE's head (spec §4): momentum m <- beta m + (1 - beta) g, the tensor its step
// normalises and applies in place of g.
struct MomentumCoeffs {
  float beta;
  float one_minus_beta;
};

SD_HOST_DEVICE inline MomentumCoeffs make_momentum_coeffs(double beta) {
  MomentumCoeffs c;
  c.beta = static_cast<float>(beta);
  c.one_minus_beta = static_cast<float>(1.0 - beta);
  return c;
}

template <typename T>
SD_HOST_DEVICE inline T momentum(T m, T g, const MomentumCoeffs& k) {
  return T(k.beta) * m + T(k.one_minus_beta) * g;
}

// One Sinkhorn half-iteration for one row (or column) scale (spec §2-3): with the complete
// sum of squares s = sum (g r c)^2 along that line, the line of X = g r c gets norm `target`:
//   scale <- target * scale / (scale * sqrt(s) + eps)   if s > 0, else unchanged
// (an all-zero line of X stays zero whatever its scale, and dividing by eps there would grow
// the scale without bound). target and eps arrive already rounded to fp32.
SD_HOST_DEVICE inline float sinkhorn_rescale(float scale, float s, float target, float eps) {
  if (!(s > 0.f)) return scale;
  const float norm = scale * sqrtf(s);
  return (scale * target) / (norm + eps);
}

// The value whose square the Sinkhorn / SCALE statistics sum: g r c.
template <typename T>
SD_HOST_DEVICE inline T scaled_square(T g, T r, T c) {
  T x = g * r;
  x = x * c;
  return x * x;
}

// ---------------------------------------------------------------------------
// Stochastic rounding fp32 -> bf16 (optional write-back of bf16 parameters and state).
//
// A bf16 value is the top 16 bits of an fp32. Adding a uniform random 16-bit integer to the
// low 16 bits and truncating rounds the magnitude up with probability (dropped bits) / 2^16:
// the expected result is x itself, so updates smaller than half a bf16 step still count on
// average instead of always vanishing under round-to-nearest. Inf and NaN are kept (NaN
// quietened). Finite values above the largest bf16 may round up to Inf, as they would under
// round-to-nearest.
//
// The random bits of element `index` are a counter-based hash of (seed, index), the
// SplitMix64 finaliser (Steele, Lea, Flood, "Fast splittable pseudorandom number
// generators", OOPSLA 2014), so they do not depend on the device, the thread layout or on
// how the index range is split into fragments.
// ---------------------------------------------------------------------------
SD_HOST_DEVICE inline uint32_t random_bits(uint64_t seed, uint64_t index) {
  uint64_t z = seed ^ (index * 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return static_cast<uint32_t>((z ^ (z >> 31)) >> 32);
}

SD_HOST_DEVICE inline uint32_t float_bits(float x) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(x);
#else
  uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
#endif
}

// The bf16 bit pattern of x rounded stochastically with the random word `rand`.
SD_HOST_DEVICE inline uint16_t bf16_bits_stochastic(float x, uint32_t rand) {
  uint32_t b = float_bits(x);
  if ((b & 0x7F800000u) == 0x7F800000u)  // Inf or NaN: no rounding
    return static_cast<uint16_t>((b >> 16) | ((b & 0x007FFFFFu) ? 0x0040u : 0u));
  b += rand & 0xFFFFu;
  return static_cast<uint16_t>(b >> 16);
}

}  // namespace elementwise
}  // namespace sage_dist
