// Per-element optimizer math, shared by the CPU and CUDA kernels.
//
// This header is the only place where the fused kernels spell out an update rule
// (the spec is /work/shared/spec/ALGORITHMS.md). Everything here is fp32 math on
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

}  // namespace elementwise
}  // namespace sage_dist
