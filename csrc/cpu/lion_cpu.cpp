// CPU kernel of sage_dist::lion_update_ (math: csrc/include/sage_dist/elementwise.h).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "sage_dist/checks.h"
#include "sage_dist/elementwise.h"

namespace sage_dist {
namespace {

// Elements per parallel task: the grain ATen uses for its own element-wise kernels.
constexpr int64_t kGrainSize = 32768;

// P: param storage type, G: grad storage type (float or c10::BFloat16).
// Loads upcast to fp32, the update runs in fp32, the store rounds to P (nearest-even).
template <typename P, typename G>
void lion_cpu_loop(P* param, float* exp_avg, const G* grad, int64_t n,
                   const elementwise::LionCoeffs& c) {
  at::parallel_for(0, n, kGrainSize, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float p = static_cast<float>(param[i]);
      float m = exp_avg[i];
      elementwise::lion_update(p, m, static_cast<float>(grad[i]), c);
      param[i] = static_cast<P>(p);
      exp_avg[i] = m;
    }
  });
}

void lion_update_cpu(const at::Tensor& param, const at::Tensor& exp_avg, const at::Tensor& grad,
                     double lr, double beta1, double beta2, double weight_decay) {
  check_lion_args(param, exp_avg, grad, c10::DeviceType::CPU);
  if (param.numel() == 0) return;
  const auto c = elementwise::make_lion_coeffs(lr, beta1, beta2, weight_decay);
  constexpr const char* op = "sage_dist::lion_update_";
  dispatch_float_or_bfloat16(param.scalar_type(), op, "param", [&](auto p_tag) {
    using P = decltype(p_tag);
    dispatch_float_or_bfloat16(grad.scalar_type(), op, "grad", [&](auto g_tag) {
      using G = decltype(g_tag);
      lion_cpu_loop<P, G>(param.data_ptr<P>(), exp_avg.data_ptr<float>(),
                          grad.const_data_ptr<G>(), param.numel(), c);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(sage_dist, CPU, m) {
  m.impl("lion_update_", &lion_update_cpu);
}

}  // namespace sage_dist
