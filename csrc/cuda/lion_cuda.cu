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
#include "sage_dist/multi_tensor.cuh"

namespace sage_dist {
namespace {

constexpr int kThreads = 256;

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

int num_blocks(int64_t n, int device) {
  int sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
  // Enough blocks to fill the GPU a few times over; the grid-stride loop does the rest.
  const int64_t wanted = (n + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(wanted, 8LL * sm_count)));
}

void lion_update_cuda(const at::Tensor& param, const at::Tensor& exp_avg, const at::Tensor& grad,
                      double lr, double beta1, double beta2, double weight_decay) {
  check_lion_args(param, exp_avg, grad, c10::DeviceType::CUDA);
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
  __device__ void operator()(const int64_t* rec, int64_t i) const {
    P* param = multi_tensor::ptr<P>(rec[0]);
    float* exp_avg = multi_tensor::ptr<float>(rec[1]);
    const G* grad = multi_tensor::ptr<const G>(rec[2]);
    float p = static_cast<float>(param[i]);
    float m = exp_avg[i];
    elementwise::lion_update(p, m, static_cast<float>(grad[i]), c);
    param[i] = static_cast<P>(p);
    exp_avg[i] = m;
  }
};

void lion_update_multi_cuda(at::TensorList params, at::TensorList exp_avgs, at::TensorList grads,
                            double lr, double beta1, double beta2, double weight_decay) {
  check_lion_multi_args(params, exp_avgs, grads, c10::DeviceType::CUDA);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const auto c = elementwise::make_lion_coeffs(lr, beta1, beta2, weight_decay);
  constexpr const char* op = "sage_dist::lion_update_multi_";
  multi_tensor::for_each_dtype_pair(params, grads, [&](auto pt, auto gt, const auto& idx) {
    std::vector<std::array<int64_t, 4>> records;
    for (size_t i : idx)
      records.push_back({multi_tensor::word(params[i].data_ptr()),
                         multi_tensor::word(exp_avgs[i].data_ptr()),
                         multi_tensor::word(grads[i].data_ptr()), params[i].numel()});
    dispatch_param_and_grad(pt, gt, op, [&](auto p_tag, auto g_tag) {
      using P = decltype(p_tag);
      using G = decltype(g_tag);
      multi_tensor::apply<4>(records, params[0].device(), LionMultiOp<P, G>{c});
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(sage_dist, CUDA, m) {
  m.impl("lion_update_", &lion_update_cuda);
  m.impl("lion_update_multi_", &lion_update_multi_cuda);
}

}  // namespace sage_dist
