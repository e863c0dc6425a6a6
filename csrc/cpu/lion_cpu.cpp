// CPU kernels of sage_dist::lion_update_ and lion_update_multi_ (math:
// csrc/include/sage_dist/elementwise.h).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "sage_dist/checks.h"
#include "sage_dist/elementwise.h"

namespace sage_dist {
namespace {

// Elements per parallel task: the grain ATen uses for its own element-wise kernels.
constexpr int64_t kGrainSize = 32768;

// P: param storage type, G: grad storage type (float or c10::BFloat16).
// Loads upcast to fp32, the update runs in fp32, the store rounds to P (nearest-even).
template <typename P, typename G>
void lion_loop(P* param, float* exp_avg, const G* grad, int64_t n,
               const elementwise::LionCoeffs& c) {
  for (int64_t i = 0; i < n; ++i) {
    float p = static_cast<float>(param[i]);
    float m = exp_avg[i];
    elementwise::lion_update(p, m, static_cast<float>(grad[i]), c);
    param[i] = static_cast<P>(p);
    exp_avg[i] = m;
  }
}

template <typename P, typename G>
void lion_cpu_loop(P* param, float* exp_avg, const G* grad, int64_t n,
                   const elementwise::LionCoeffs& c) {
  at::parallel_for(0, n, kGrainSize, [&](int64_t begin, int64_t end) {
    lion_loop<P, G>(param + begin, exp_avg + begin, grad + begin, end - begin, c);
  });
}

void lion_update_cpu(const at::Tensor& param, const at::Tensor& exp_avg, const at::Tensor& grad,
                     double lr, double beta1, double beta2, double weight_decay) {
  check_lion_args(param, exp_avg, grad, c10::DeviceType::CPU);
  if (param.numel() == 0) return;
  const auto c = elementwise::make_lion_coeffs(lr, beta1, beta2, weight_decay);
  constexpr const char* op = "sage_dist::lion_update_";
  dispatch_param_and_grad(param.scalar_type(), grad.scalar_type(), op, [&](auto p_tag, auto g_tag) {
    using P = decltype(p_tag);
    using G = decltype(g_tag);
    lion_cpu_loop<P, G>(param.data_ptr<P>(), exp_avg.data_ptr<float>(),
                        grad.const_data_ptr<G>(), param.numel(), c);
  });
}

// Many tensors: the chunks of every tensor share one parallel loop, so small tensors do
// not each pay a parallel region of their own.
void lion_update_multi_cpu(at::TensorList params, at::TensorList exp_avgs, at::TensorList grads,
                           double lr, double beta1, double beta2, double weight_decay) {
  check_lion_multi_args(params, exp_avgs, grads, c10::DeviceType::CPU);
  struct Chunk {
    size_t tensor;
    int64_t begin, end;
  };
  std::vector<Chunk> chunks;
  for (size_t t = 0; t < params.size(); ++t)
    for (int64_t b = 0; b < params[t].numel(); b += kGrainSize)
      chunks.push_back({t, b, std::min(params[t].numel(), b + kGrainSize)});
  const auto c = elementwise::make_lion_coeffs(lr, beta1, beta2, weight_decay);
  constexpr const char* op = "sage_dist::lion_update_multi_";
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t c0, int64_t c1) {
    for (int64_t k = c0; k < c1; ++k) {
      const Chunk& ch = chunks[k];
      const at::Tensor& param = params[ch.tensor];
      const at::Tensor& grad = grads[ch.tensor];
      float* m = exp_avgs[ch.tensor].data_ptr<float>() + ch.begin;
      dispatch_param_and_grad(param.scalar_type(), grad.scalar_type(), op,
                              [&](auto p_tag, auto g_tag) {
        using P = decltype(p_tag);
        using G = decltype(g_tag);
        lion_loop<P, G>(param.data_ptr<P>() + ch.begin, m, grad.const_data_ptr<G>() + ch.begin,
                        ch.end - ch.begin, c);
      });
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(sage_dist, CPU, m) {
  m.impl("lion_update_", &lion_update_cpu);
  m.impl("lion_update_multi_", &lion_update_multi_cpu);
}

}  // namespace sage_dist
