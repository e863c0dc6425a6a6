// CUDA kernel of sage_dist::round_bf16_ (math: csrc/include/sage_dist/elementwise.h).
// Compiled in CI; it has not run on a GPU.

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>

#include "sage_dist/checks.h"
#include "sage_dist/elementwise.h"
#include "sage_dist/launch.h"
#include "sage_dist/multi_tensor.cuh"

namespace sage_dist {
namespace {

constexpr int kThreads = launch::kThreads;

__global__ void round_bf16_kernel(uint16_t* __restrict__ out, const float* __restrict__ src,
                                  int64_t n, uint64_t seed, uint64_t offset) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < n;
       k += stride) {
    const uint32_t rand = elementwise::random_bits(seed, offset + static_cast<uint64_t>(k));
    out[k] = elementwise::bf16_bits_stochastic(src[k], rand);
  }
}

void round_bf16_cuda(const at::Tensor& out, const at::Tensor& src, int64_t seed,
                     int64_t offset) {
  check_round_bf16_args(out, src, offset, c10::DeviceType::CUDA);
  AliasCheck alias("sage_dist::round_bf16_");
  alias.add("out", out, true);
  alias.add("src", src, false);
  alias.check();
  const int64_t n = out.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  const int blocks =
      static_cast<int>(launch::elementwise_blocks(n, sm_count(out.device().index())));
  round_bf16_kernel<<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<uint16_t*>(out.data_ptr<c10::BFloat16>()), src.const_data_ptr<float>(),
      n, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(sage_dist, CUDA, m) {
  m.impl("round_bf16_", &round_bf16_cuda);
}

}  // namespace sage_dist
