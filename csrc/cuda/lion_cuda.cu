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
#include <vector>

#include <ATen/ops/empty.h>

#include "sage_dist/checks.h"
#include "sage_dist/elementwise.h"

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
  dispatch_float_or_bfloat16(param.scalar_type(), op, "param", [&](auto p_tag) {
    using P = decltype(p_tag);
    dispatch_float_or_bfloat16(grad.scalar_type(), op, "grad", [&](auto g_tag) {
      using G = decltype(g_tag);
      lion_cuda_kernel<P, G><<<blocks, kThreads, 0, stream>>>(
          param.data_ptr<P>(), exp_avg.data_ptr<float>(), grad.const_data_ptr<G>(), n, c);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

// ---------------------------------------------------------------------------
// Multi-tensor: ONE launch updates every tensor of a list (per combination of param and grad
// dtypes). Block b takes chunk b of a table built on the host: (tensor, first element), and
// each tensor's (param, exp_avg, grad, numel) are read from the same device buffer, copied
// once from pinned host memory on the current stream.
constexpr int64_t kChunk = 16384;  // elements per block

template <typename P, typename G>
__global__ void lion_multi_kernel(const int64_t* __restrict__ meta, int64_t ntensors,
                                  elementwise::LionCoeffs c) {
  const int64_t* chunk = meta + 4 * ntensors + 2 * static_cast<int64_t>(blockIdx.x);
  const int64_t* t = meta + 4 * chunk[0];
  P* param = reinterpret_cast<P*>(t[0]);
  float* exp_avg = reinterpret_cast<float*>(t[1]);
  const G* grad = reinterpret_cast<const G*>(t[2]);
  const int64_t end = min(t[3], chunk[1] + kChunk);
  for (int64_t i = chunk[1] + threadIdx.x; i < end; i += blockDim.x) {
    float p = static_cast<float>(param[i]);
    float m = exp_avg[i];
    elementwise::lion_update(p, m, static_cast<float>(grad[i]), c);
    param[i] = static_cast<P>(p);
    exp_avg[i] = m;
  }
}

void lion_update_multi_cuda(at::TensorList params, at::TensorList exp_avgs, at::TensorList grads,
                            double lr, double beta1, double beta2, double weight_decay) {
  check_lion_multi_args(params, exp_avgs, grads, c10::DeviceType::CUDA);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto c = elementwise::make_lion_coeffs(lr, beta1, beta2, weight_decay);
  constexpr const char* op = "sage_dist::lion_update_multi_";
  for (const auto pt : {at::kFloat, at::kBFloat16}) {
    for (const auto gt : {at::kFloat, at::kBFloat16}) {
      std::vector<size_t> members;
      int64_t nchunks = 0;
      for (size_t i = 0; i < params.size(); ++i) {
        if (params[i].scalar_type() == pt && grads[i].scalar_type() == gt && params[i].numel()) {
          members.push_back(i);
          nchunks += (params[i].numel() + kChunk - 1) / kChunk;
        }
      }
      if (members.empty()) continue;
      const int64_t nt = static_cast<int64_t>(members.size());
      at::Tensor meta = at::empty({4 * nt + 2 * nchunks},
                                  at::TensorOptions().dtype(at::kLong).pinned_memory(true));
      int64_t* h = meta.data_ptr<int64_t>();
      int64_t* table = h + 4 * nt;
      for (int64_t k = 0; k < nt; ++k) {
        const size_t i = members[k];
        h[4 * k] = reinterpret_cast<int64_t>(params[i].data_ptr());
        h[4 * k + 1] = reinterpret_cast<int64_t>(exp_avgs[i].data_ptr());
        h[4 * k + 2] = reinterpret_cast<int64_t>(grads[i].data_ptr());
        h[4 * k + 3] = params[i].numel();
        for (int64_t b = 0; b < params[i].numel(); b += kChunk) {
          *table++ = k;
          *table++ = b;
        }
      }
      const at::Tensor dmeta =
          meta.to(at::TensorOptions().device(params[0].device()), /*non_blocking=*/true);
      dispatch_float_or_bfloat16(pt, op, "param", [&](auto p_tag) {
        using P = decltype(p_tag);
        dispatch_float_or_bfloat16(gt, op, "grad", [&](auto g_tag) {
          using G = decltype(g_tag);
          lion_multi_kernel<P, G><<<static_cast<unsigned>(nchunks), kThreads, 0, stream>>>(
              dmeta.const_data_ptr<int64_t>(), nt, c);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(sage_dist, CUDA, m) {
  m.impl("lion_update_", &lion_update_cuda);
  m.impl("lion_update_multi_", &lion_update_multi_cuda);
}

}  // namespace sage_dist
