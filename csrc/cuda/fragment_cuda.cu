// CUDA kernels of the fragment ops: sage_dist::colsum_abs, sq_sums, sage_update_,
// scaled_update_, momentum_scaled_update_ (math: csrc/include/sage_dist/elementwise.h). fp32 math in registers,
// loads and stores in the storage dtype. One launch per fragment, or one per list of
// fragments for the *_multi_ forms.
//
// COMPILED, NEVER RUN: no GPU was available where this was written (see README).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <vector>
#include <optional>
#include <tuple>

#include "sage_dist/checks.h"
#include "sage_dist/elementwise.h"
#include "sage_dist/fragment_checks.h"
#include "sage_dist/multi_tensor.cuh"

namespace sage_dist {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kRowsPerBlock = 128;  // column sums: rows one thread adds into one partial
constexpr c10::DeviceType kCUDA = c10::DeviceType::CUDA;

const float* opt_ptr(const std::optional<at::Tensor>& t) {
  return t ? t->const_data_ptr<float>() : nullptr;
}

int grid_for(int64_t n, int device) {
  int sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
  const int64_t wanted = (n + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(wanted, 8LL * sm_count)));
}

// What the statistics read: the gradient, and SCALE's head momentum when m is given.
struct StatInput {
  const float* r;                     // row scale or null
  const float* c;                     // column scale or null
  const float* m;                     // momentum or null: then x = beta m + (1 - beta) g
  elementwise::MomentumCoeffs beta;
};

// value = |g| (kind 0) or (x r c)^2 (kind 1), x = g or the momentum.
template <typename G>
__device__ inline float stat_value(const G* g, int64_t k, const StatInput& in, int64_t i,
                                   int64_t j, int kind) {
  float x = static_cast<float>(g[k]);
  if (kind == 0) return fabsf(x);
  if (in.m) x = elementwise::momentum(in.m[k], x, in.beta);
  return elementwise::scaled_square(x, in.r ? in.r[i] : 1.f, in.c ? in.c[j] : 1.f);
}

// Column sums, deterministic: thread (column j, block b of kRowsPerBlock rows) writes its
// partial sum to partial[b, j]; a second kernel adds the partials of each column in block
// order, in double. No atomics: the same inputs give the same bits on every run and every
// rank (DDP ranks compute these statistics separately and must stay identical). Blocks of
// rows are walked grid-stride in y, so any number of rows fits the grid.
template <typename G>
__global__ void column_partials_kernel(const G* __restrict__ g, StatInput in,
                                       float* __restrict__ partial, int64_t n, int64_t C,
                                       int64_t start, int64_t first_row, int64_t last_row,
                                       int64_t nblocks, int kind) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= C) return;
  for (int64_t b = blockIdx.y; b < nblocks; b += gridDim.y) {
    const int64_t i0 = first_row + b * kRowsPerBlock;
    const int64_t i1 = min(last_row + 1, i0 + kRowsPerBlock);
    float s = 0.f;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t k = i * C + j - start;
      if (k >= 0 && k < n) s += stat_value(g, k, in, i, j, kind);
    }
    partial[b * C + j] = s;
  }
}

__global__ void combine_partials_kernel(const float* __restrict__ partial,
                                        float* __restrict__ out, int64_t nblocks, int64_t C) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= C) return;
  double s = 0.0;
  for (int64_t b = 0; b < nblocks; ++b) s += static_cast<double>(partial[b * C + j]);
  out[j] = static_cast<float>(s);
}

// Row sums: one block per row, a shared-memory tree reduction.
template <typename G>
__global__ void row_sums_kernel(const G* __restrict__ g, StatInput in, float* __restrict__ out,
                                int64_t n, int64_t C, int64_t start, int64_t first_row) {
  __shared__ float partial[kThreads];
  const int64_t i = first_row + blockIdx.x;
  const int64_t a = max(start, i * C), b = min(start + n, (i + 1) * C);
  float s = 0.f;
  for (int64_t e = a + threadIdx.x; e < b; e += blockDim.x)
    s += stat_value(g, e - start, in, i, e - i * C, 1);
  partial[threadIdx.x] = s;
  __syncthreads();
  for (int w = blockDim.x / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) partial[threadIdx.x] += partial[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[i] = partial[0];
}

template <typename F>
void dispatch_grad(const at::Tensor& grad, const char* op, F&& f) {
  dispatch_float_or_bfloat16(grad.scalar_type(), op, "grad", f);
}

at::Tensor column_sums(const at::Tensor& grad, const StatInput& in, int64_t C, int64_t start,
                       int kind, const char* op) {
  at::Tensor out = at::zeros({C}, grad.options().dtype(at::kFloat));
  const int64_t n = grad.numel();
  if (n == 0) return out;
  const c10::cuda::CUDAGuard guard(grad.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t first = start / C, last = (start + n - 1) / C;
  const int64_t nblocks = (last - first + kRowsPerBlock) / kRowsPerBlock;
  const unsigned col_blocks = static_cast<unsigned>((C + kThreads - 1) / kThreads);
  const dim3 grid(col_blocks, static_cast<unsigned>(std::min<int64_t>(nblocks, 65535)));
  at::Tensor partial = at::empty({nblocks, C}, grad.options().dtype(at::kFloat));
  dispatch_grad(grad, op, [&](auto tag) {
    using G = decltype(tag);
    column_partials_kernel<G><<<grid, kThreads, 0, stream>>>(
        grad.const_data_ptr<G>(), in, partial.data_ptr<float>(), n, C, start, first, last,
        nblocks, kind);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  combine_partials_kernel<<<col_blocks, kThreads, 0, stream>>>(partial.const_data_ptr<float>(),
                                                               out.data_ptr<float>(), nblocks, C);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor colsum_abs_cuda(const at::Tensor& grad, int64_t C, int64_t start) {
  check_colsum_abs_args(grad, C, start, kCUDA);
  const StatInput none{nullptr, nullptr, nullptr, elementwise::make_momentum_coeffs(0.0)};
  return column_sums(grad, none, C, start, 0, "sage_dist::colsum_abs");
}

at::Tensor sq_sums_cuda(const at::Tensor& grad, const std::optional<at::Tensor>& r,
                        const std::optional<at::Tensor>& c, int64_t R, int64_t C,
                        int64_t start, int64_t dim, const std::optional<at::Tensor>& m,
                        double beta) {
  check_sq_sums_args(grad, r, c, R, C, start, dim, m, kCUDA);
  constexpr const char* op = "sage_dist::sq_sums";
  const StatInput in{opt_ptr(r), opt_ptr(c), opt_ptr(m), elementwise::make_momentum_coeffs(beta)};
  if (dim == 0) return column_sums(grad, in, C, start, 1, op);
  at::Tensor out = at::zeros({R}, grad.options().dtype(at::kFloat));
  const int64_t n = grad.numel();
  if (n == 0) return out;
  const c10::cuda::CUDAGuard guard(grad.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t first = start / C, last = (start + n - 1) / C;
  dispatch_grad(grad, op, [&](auto tag) {
    using G = decltype(tag);
    row_sums_kernel<G><<<static_cast<unsigned>(last - first + 1), kThreads, 0, stream>>>(
        grad.const_data_ptr<G>(), in, out.data_ptr<float>(), n, C, start, first);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// ---------------------------------------------------------------------------
template <typename P, typename G>
__global__ void sage_kernel(P* __restrict__ param, float* __restrict__ m,
                            const G* __restrict__ grad, const float* __restrict__ h, int64_t n,
                            int64_t C, int64_t start, elementwise::SageCoeffs k) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += stride) {
    float p = static_cast<float>(param[e]);
    float mv = m[e];
    elementwise::sage_update(p, mv, static_cast<float>(grad[e]), h[(start + e) % C], k);
    param[e] = static_cast<P>(p);
    m[e] = mv;
  }
}

void sage_update_cuda(const at::Tensor& param, const at::Tensor& m, const at::Tensor& grad,
                      const at::Tensor& h, int64_t C, int64_t start, double lr, double beta1,
                      double beta2, double weight_decay, bool momentum_first) {
  check_sage_update_args(param, m, grad, h, C, start, kCUDA);
  const int64_t n = param.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(param.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int blocks = grid_for(n, param.device().index());
  const auto k = elementwise::make_sage_coeffs(lr, beta1, beta2, weight_decay, momentum_first);
  constexpr const char* op = "sage_dist::sage_update_";
  dispatch_param_and_grad(param.scalar_type(), grad.scalar_type(), op, [&](auto p_tag, auto g_tag) {
    using P = decltype(p_tag);
    using G = decltype(g_tag);
    sage_kernel<P, G><<<blocks, kThreads, 0, stream>>>(
        param.data_ptr<P>(), m.data_ptr<float>(), grad.const_data_ptr<G>(),
        h.const_data_ptr<float>(), n, C, start, k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename P, typename G>
__global__ void scaled_kernel(P* __restrict__ param, const G* __restrict__ grad,
                              const float* __restrict__ r, const float* __restrict__ c,
                              int64_t n, int64_t C, int64_t start, elementwise::ScaledCoeffs k) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += stride) {
    const int64_t flat = start + e;
    const float ri = r ? r[flat / C] : 1.f;
    const float cj = c ? c[flat % C] : 1.f;
    param[e] = static_cast<P>(elementwise::scaled_update(static_cast<float>(param[e]),
                                                         static_cast<float>(grad[e]), ri, cj,
                                                         k));
  }
}

void scaled_update_cuda(const at::Tensor& param, const at::Tensor& grad,
                        const std::optional<at::Tensor>& r,
                        const std::optional<at::Tensor>& c, int64_t C, int64_t start,
                        double lr, double weight_decay, double step) {
  check_scaled_update_args(param, grad, r, c, C, start, kCUDA);
  const int64_t n = param.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(param.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int blocks = grid_for(n, param.device().index());
  const auto k = elementwise::make_scaled_coeffs(lr, weight_decay, step);
  constexpr const char* op = "sage_dist::scaled_update_";
  dispatch_param_and_grad(param.scalar_type(), grad.scalar_type(), op, [&](auto p_tag, auto g_tag) {
    using P = decltype(p_tag);
    using G = decltype(g_tag);
    scaled_kernel<P, G><<<blocks, kThreads, 0, stream>>>(param.data_ptr<P>(),
                                                        grad.const_data_ptr<G>(), opt_ptr(r),
                                                        opt_ptr(c), n, C, start, k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ---------------------------------------------------------------------------
// Multi-tensor forms (sage_dist/multi_tensor.cuh): one launch per dtype pair.
// Record: param, grad, r, c, C, start, numel.
template <typename P, typename G>
struct ScaledMultiOp {
  elementwise::ScaledCoeffs k;
  __device__ void operator()(const int64_t* rec, int64_t e) const {
    P* param = multi_tensor::ptr<P>(rec[0]);
    const G* grad = multi_tensor::ptr<const G>(rec[1]);
    const float* r = multi_tensor::ptr<const float>(rec[2]);
    const float* c = multi_tensor::ptr<const float>(rec[3]);
    const int64_t C = rec[4], flat = rec[5] + e;
    param[e] = static_cast<P>(elementwise::scaled_update(
        static_cast<float>(param[e]), static_cast<float>(grad[e]), r[flat / C], c[flat % C], k));
  }
};

void scaled_update_multi_cuda(at::TensorList params, at::TensorList grads, at::TensorList rs,
                              at::TensorList cs, at::IntArrayRef Cs, at::IntArrayRef starts,
                              double lr, double weight_decay, double step) {
  check_scaled_update_multi_args(params, grads, rs, cs, Cs, starts, kCUDA);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const auto k = elementwise::make_scaled_coeffs(lr, weight_decay, step);
  constexpr const char* op = "sage_dist::scaled_update_multi_";
  multi_tensor::for_each_dtype_pair(params, grads, [&](auto pt, auto gt, const auto& idx) {
    std::vector<std::array<int64_t, 7>> records;
    for (size_t i : idx)
      records.push_back({multi_tensor::word(params[i].data_ptr()),
                         multi_tensor::word(grads[i].data_ptr()),
                         multi_tensor::word(rs[i].data_ptr()), multi_tensor::word(cs[i].data_ptr()),
                         Cs[i], starts[i], params[i].numel()});
    dispatch_param_and_grad(pt, gt, op, [&](auto p_tag, auto g_tag) {
      using P = decltype(p_tag);
      using G = decltype(g_tag);
      multi_tensor::apply<7>(records, params[0].device(), ScaledMultiOp<P, G>{k});
    });
  });
}

// Record: param, m, grad, h, C, start, numel.
template <typename P, typename G>
struct SageMultiOp {
  elementwise::SageCoeffs k;
  __device__ void operator()(const int64_t* rec, int64_t e) const {
    P* param = multi_tensor::ptr<P>(rec[0]);
    float* m = multi_tensor::ptr<float>(rec[1]);
    const G* grad = multi_tensor::ptr<const G>(rec[2]);
    const float* h = multi_tensor::ptr<const float>(rec[3]);
    float p = static_cast<float>(param[e]);
    float mv = m[e];
    elementwise::sage_update(p, mv, static_cast<float>(grad[e]), h[(rec[5] + e) % rec[4]], k);
    param[e] = static_cast<P>(p);
    m[e] = mv;
  }
};

void sage_update_multi_cuda(at::TensorList params, at::TensorList ms, at::TensorList grads,
                            at::TensorList hs, at::IntArrayRef Cs, at::IntArrayRef starts,
                            double lr, double beta1, double beta2, double weight_decay,
                            bool momentum_first) {
  check_sage_update_multi_args(params, ms, grads, hs, Cs, starts, kCUDA);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const auto k = elementwise::make_sage_coeffs(lr, beta1, beta2, weight_decay, momentum_first);
  constexpr const char* op = "sage_dist::sage_update_multi_";
  multi_tensor::for_each_dtype_pair(params, grads, [&](auto pt, auto gt, const auto& idx) {
    std::vector<std::array<int64_t, 7>> records;
    for (size_t i : idx)
      records.push_back({multi_tensor::word(params[i].data_ptr()),
                         multi_tensor::word(ms[i].data_ptr()),
                         multi_tensor::word(grads[i].data_ptr()),
                         multi_tensor::word(hs[i].data_ptr()), Cs[i], starts[i],
                         params[i].numel()});
    dispatch_param_and_grad(pt, gt, op, [&](auto p_tag, auto g_tag) {
      using P = decltype(p_tag);
      using G = decltype(g_tag);
      multi_tensor::apply<7>(records, params[0].device(), SageMultiOp<P, G>{k});
    });
  });
}

__global__ void rescale_kernel(float* __restrict__ scale, const float* __restrict__ s,
                               int64_t n, float target, float eps) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) scale[i] = elementwise::sinkhorn_rescale(scale[i], s[i], target, eps);
}

void rescale(at::Tensor& scale, const at::Tensor& s, float target, float eps) {
  const int64_t n = scale.numel();
  rescale_kernel<<<static_cast<unsigned>((n + kThreads - 1) / kThreads), kThreads, 0,
                   c10::cuda::getCurrentCUDAStream()>>>(scale.data_ptr<float>(),
                                                         s.const_data_ptr<float>(), n, target,
                                                         eps);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor sinkhorn_rescale_cuda(const at::Tensor& scale, const at::Tensor& s, double target,
                                 double eps) {
  check_sinkhorn_rescale_args(scale, s, kCUDA);
  const c10::cuda::CUDAGuard guard(scale.device());
  at::Tensor out = scale.clone();
  if (out.numel() > 0) rescale(out, s, static_cast<float>(target), static_cast<float>(eps));
  return out;
}

// The iterations are a host loop of the statistics kernels and a small rescale kernel per
// half-iteration, all on the current stream: no synchronisation with the host.
std::tuple<at::Tensor, at::Tensor> sinkhorn_scales_cuda(const at::Tensor& grad, int64_t R,
                                                        int64_t C, int64_t iters, double eps,
                                                        double row_target, double col_target) {
  check_sinkhorn_scales_args(grad, R, C, iters, eps, kCUDA);
  const c10::cuda::CUDAGuard guard(grad.device());
  const auto f32 = grad.options().dtype(at::kFloat);
  at::Tensor r = at::ones({R}, f32), c = at::ones({C}, f32);
  const float e = static_cast<float>(eps);
  for (int64_t it = 0; it < iters; ++it) {
    rescale(r, sq_sums_cuda(grad, std::nullopt, c, R, C, 0, 1, std::nullopt, 0.0),
            static_cast<float>(row_target), e);
    rescale(c, sq_sums_cuda(grad, r, std::nullopt, R, C, 0, 0, std::nullopt, 0.0),
            static_cast<float>(col_target), e);
  }
  return {r, c};
}

template <typename P, typename G>
__global__ void momentum_scaled_kernel(P* __restrict__ param, float* __restrict__ m,
                                       const G* __restrict__ grad, const float* __restrict__ r,
                                       const float* __restrict__ c, int64_t n, int64_t C,
                                       int64_t start, elementwise::MomentumCoeffs km,
                                       elementwise::ScaledCoeffs k) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += stride) {
    const int64_t flat = start + e;
    const float x = elementwise::momentum(m[e], static_cast<float>(grad[e]), km);
    m[e] = x;
    param[e] = static_cast<P>(elementwise::scaled_update(
        static_cast<float>(param[e]), x, r ? r[flat / C] : 1.f, c ? c[flat % C] : 1.f, k));
  }
}

void momentum_scaled_update_cuda(const at::Tensor& param, const at::Tensor& m,
                                 const at::Tensor& grad, const std::optional<at::Tensor>& r,
                                 const std::optional<at::Tensor>& c, int64_t C, int64_t start,
                                 double beta, double lr, double weight_decay, double step) {
  check_momentum_scaled_update_args(param, m, grad, r, c, C, start, kCUDA);
  const int64_t n = param.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(param.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int blocks = grid_for(n, param.device().index());
  const auto km = elementwise::make_momentum_coeffs(beta);
  const auto k = elementwise::make_scaled_coeffs(lr, weight_decay, step);
  constexpr const char* op = "sage_dist::momentum_scaled_update_";
  dispatch_param_and_grad(param.scalar_type(), grad.scalar_type(), op, [&](auto p_tag, auto g_tag) {
    using P = decltype(p_tag);
    using G = decltype(g_tag);
    momentum_scaled_kernel<P, G><<<blocks, kThreads, 0, stream>>>(
        param.data_ptr<P>(), m.data_ptr<float>(), grad.const_data_ptr<G>(), opt_ptr(r),
        opt_ptr(c), n, C, start, km, k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(sage_dist, CUDA, m) {
  m.impl("scaled_update_multi_", &scaled_update_multi_cuda);
  m.impl("sage_update_multi_", &sage_update_multi_cuda);
  m.impl("sinkhorn_rescale", &sinkhorn_rescale_cuda);
  m.impl("sinkhorn_scales", &sinkhorn_scales_cuda);
  m.impl("momentum_scaled_update_", &momentum_scaled_update_cuda);
  m.impl("colsum_abs", &colsum_abs_cuda);
  m.impl("sq_sums", &sq_sums_cuda);
  m.impl("sage_update_", &sage_update_cuda);
  m.impl("scaled_update_", &scaled_update_cuda);
}

}  // namespace sage_dist
