// CPU kernel of sage_dist::round_bf16_ (math: csrc/include/sage_dist/elementwise.h).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "sage_dist/checks.h"
#include "sage_dist/elementwise.h"

namespace sage_dist {
namespace {

constexpr int64_t kGrainSize = 32768;

void round_bf16_cpu(const at::Tensor& out, const at::Tensor& src, int64_t seed, int64_t offset) {
  check_round_bf16_args(out, src, offset, c10::DeviceType::CPU);
  const int64_t n = out.numel();
  if (n == 0) return;
  c10::BFloat16* o = out.data_ptr<c10::BFloat16>();
  const float* x = src.const_data_ptr<float>();
  const uint64_t s = static_cast<uint64_t>(seed), base = static_cast<uint64_t>(offset);
  at::parallel_for(0, n, kGrainSize, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const uint32_t rand = elementwise::random_bits(s, base + static_cast<uint64_t>(k));
      o[k] = c10::BFloat16(elementwise::bf16_bits_stochastic(x[k], rand),
                           c10::BFloat16::from_bits());
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(sage_dist, CPU, m) {
  m.impl("round_bf16_", &round_bf16_cpu);
}

}  // namespace sage_dist
