// CUDA kernels of sage_dist::lion_update_ and lion_update_multi_ (math:
// csrc/include/sage_dist/elementwise.h). Compiled in CI; they have not run on a GPU.
//
// Only c10/cuda headers are used (not ATen/cuda/CUDAContext.h), which keeps the
// cuBLAS/cuSPARSE headers out of the build and the compile short.

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <vector>

#include "sage_dist/checks.h"
#include "sage_dist/elementwise.h"
#include "sage_dist/launch.h"
#include "sage_dist/multi_tensor.cuh"

namespace sage_dist {
namespace {

constexpr int kThreads = launch::kThreads;

// Grid-stride loop: fp32 math in registers, stores in the storage dtype.
template <typename P, typename G>
__global__ void lion_cuda_kernel(P* __restrict__ param, float* __restrict__ exp_avg,
                                 const G* __restrict__ grad, int64_t n,
                                 elementwise::LionCoeffs c) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    float p = static_cast<float>(param[i]);
    float m = exp_avg[i];
    elementwise::lion_update(p, m, static_cast<float>(grad[i]), c);
    param[i] = static_cast<P>(p);
    exp_avg[i] = m;
  }
}

// Enough blocks to fill the GPU (launch::elementwise_blocks); the grid-stride loop does the rest.
int num_blocks(int64_t n, int device) {
  return static_cast<int>(launch::elementwise_blocks(n, sm_count(device)));
}

void lion_update_cuda(const at::Tensor& param, const at::Tensor& exp_avg, const at::Tensor& grad,
                      double lr, double beta1, double beta2, double weight_decay) {
  check_lion_args(param, exp_avg, grad, c10::DeviceType::CUDA);
  AliasCheck alias("sage_dist::lion_update_");
  alias.add("param", param, true);
  alias.add("exp_avg", exp_avg, true);
  alias.add("grad", grad, false);
  alias.check();
  const int64_t n = param.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(param.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int blocks = num_blocks(n, param.device().index());
  const auto c = elementwise::make_lion_coeffs(lr, beta1, beta2, weight_decay);
  constexpr const char* op = "sage_dist::lion_update_";
  dispatch_param_and_grad(param.scalar_type(), grad.scalar_type(), op, [&](auto p_tag, auto g_tag) {
    using P = decltype(p_tag);
    using G = decltype(g_tag);
    lion_cuda_kernel<P, G><<<blocks, kThreads, 0, stream>>>(
        param.data_ptr<P>(), exp_avg.data_ptr<float>(), grad.const_data_ptr<G>(), n, c);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ---------------------------------------------------------------------------
// Multi-tensor: ONE launch per dtype pair updates every tensor of the lists
// (sage_dist/multi_tensor.cuh). Record: param, exp_avg, grad, numel.
template <typename P, typename G>
struct LionMultiOp {
  elementwise::LionCoeffs c;
  __device__ void operator()(const int64_t* rec, int64_t i0, int64_t end, int64_t stride) const {
    P* __restrict__ param = multi_tensor::ptr<P>(rec[0]);
    float* __restrict__ exp_avg = multi_tensor::ptr<float>(rec[1]);
    const G* __restrict__ grad = multi_tensor::ptr<const G>(rec[2]);
    for (int64_t i = i0; i < end; i += stride) {
      float p = static_cast<float>(param[i]);
      float m = exp_avg[i];
      elementwise::lion_update(p, m, static_cast<float>(grad[i]), c);
      param[i] = static_cast<P>(p);
      exp_avg[i] = m;
    }
  }
};

void lion_update_multi_cuda(at::TensorList params, at::TensorList exp_avgs, at::TensorList grads,
                            double lr, double beta1, double beta2, double weight_decay) {
  check_lion_multi_args(params, exp_avgs, grads, c10::DeviceType::CUDA);
  constexpr const char* op = "sage_dist::lion_update_multi_";
  AliasCheck alias(op);  // across the lists too: two entries must not share memory either
  for (size_t i = 0; i < params.size(); ++i) {
    const auto k = static_cast<int64_t>(i);
    alias.add("params", params[i], true, k);
    alias.add("exp_avgs", exp_avgs[i], true, k);
    alias.add("grads", grads[i], false, k);
  }
  alias.check();
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const auto c = elementwise::make_lion_coeffs(lr, beta1, beta2, weight_decay);
  multi_tensor::for_each_dtype_pair(params, grads, [&](auto pt, auto gt, const auto& idx) {
    std::vector<std::array<int64_t, 4>> records;
    for (size_t i : idx)
      records.push_back({multi_tensor::word(params[i].data_ptr()),
                         multi_tensor::word(exp_avgs[i].data_ptr()),
                         multi_tensor::word(grads[i].data_ptr()), params[i].numel()});
    dispatch_param_and_grad(pt, gt, op, [&](auto p_tag, auto g_tag) {
      using P = decltype(p_tag);
      using G = decltype(g_tag);
      multi_tensor::apply<4>(op, records, params[0].device(), LionMultiOp<P, G>{c});
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(sage_dist, CUDA, m) {
  m.impl("lion_update_", &lion_update_cuda);
  m.impl("lion_update_multi_", &lion_update_multi_cuda);
}

}  // namespace sage_dist
