// CUDA kernels of the fragment ops: sage_dist::colsum_abs, sq_sums, sage_update_,
// scaled_update_, momentum_scaled_update_, sinkhorn_rescale, sinkhorn_scales and the
// *_multi_ forms (math: csrc/include/sage_dist/elementwise.h). fp32 math in registers, loads
// and stores in the storage dtype. One launch per fragment, or one per list of fragments for
// the *_multi_ forms. Launch shapes and index arithmetic: csrc/include/sage_dist/launch.h
// (tested on the CPU by tests/test_gpu_ready.py).
//
// Statistics add launch::kStatTerms terms per thread in fp32, then accumulate in double, as
// the CPU kernels do; no atomics, and shapes that depend on the fragment only, so the same
// inputs give the same bits on every run, rank and GPU.
//
// The GPU tests (tests/gpu/, run by tests/gpu/check.sh) have not run yet where this was
// written: no GPU was available.

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
#include "sage_dist/launch.h"
#include "sage_dist/multi_tensor.cuh"

namespace sage_dist {
namespace {

constexpr int kThreads = launch::kThreads;
constexpr c10::DeviceType kCUDA = c10::DeviceType::CUDA;

const float* opt_ptr(const std::optional<at::Tensor>& t) {
  return t ? t->const_data_ptr<float>() : nullptr;
}

// Blocks of a grid-stride element-wise kernel over n > 0 elements.
int grid_for(int64_t n, int device) {
  return static_cast<int>(launch::elementwise_blocks(n, sm_count(device)));
}

// What the statistics read: the gradient, and SCALE's head momentum when m is given.
struct StatInput {
  const float* r;                     // row scale or null
  const float* c;                     // column scale or null
  const float* m;                     // momentum or null: then x = beta m + (1 - beta) g
  elementwise::MomentumCoeffs beta;
};

// value = |g| (kKind 0) or (x r c)^2 (kKind 1), x = g or the momentum; element k of the
// fragment, at row i, column j.
template <typename G, int kKind>
__device__ inline float stat_value(const G* __restrict__ g, int64_t k, const StatInput& in,
                                   int64_t i, int64_t j) {
  float x = static_cast<float>(g[k]);
  if (kKind == 0) return fabsf(x);
  if (in.m) x = elementwise::momentum(in.m[k], x, in.beta);
  return elementwise::scaled_square(x, in.r ? in.r[i] : 1.f, in.c ? in.c[j] : 1.f);
}

// Column sums (shape: launch::column_sum_shape). Block (tile, band), thread (x, y): column
// launch::column(s, tile * block_x + x) (the fragment's columns from start % C on, modulo C),
// rows y, y + block_y, ... of the band, kStatTerms of them in fp32 at a time, then double;
// the block's lanes are added in lane order. One band: the sum goes straight to out;
// several: to partial[band, column index], added in band order by combine_bands_kernel.
// Columns the fragment does not touch keep out's zeros.
template <typename G, int kKind>
__global__ void column_sums_kernel(const G* __restrict__ g, StatInput in,
                                   double* __restrict__ partial, float* __restrict__ out,
                                   int64_t n, int64_t C, int64_t start,
                                   launch::ColumnSumShape s) {
  __shared__ double lanes[kThreads];
  const int64_t jj = static_cast<int64_t>(blockIdx.x) * s.block_x + threadIdx.x;
  const int64_t j = launch::column(s, jj, C);
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * s.band_rows;
  const int64_t r1 = min(s.rows, r0 + s.band_rows);
  double acc = 0.0;
  if (jj < s.cols) {
    float part = 0.f;
    int terms = 0;
    for (int64_t ri = r0 + threadIdx.y; ri < r1; ri += s.block_y) {
      const int64_t i = s.first_row + ri;
      const int64_t k = i * C + j - start;
      if (k >= 0 && k < n) part += stat_value<G, kKind>(g, k, in, i, j);
      if (++terms == launch::kStatTerms) {
        acc += static_cast<double>(part);
        part = 0.f;
        terms = 0;
      }
    }
    acc += static_cast<double>(part);
  }
  lanes[threadIdx.y * blockDim.x + threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && jj < s.cols) {
    double sum = 0.0;
    for (int y = 0; y < s.block_y; ++y) sum += lanes[y * blockDim.x + threadIdx.x];
    if (partial)
      partial[static_cast<int64_t>(blockIdx.y) * s.cols + jj] = sum;
    else
      out[j] = static_cast<float>(sum);
  }
}

__global__ void combine_bands_kernel(const double* __restrict__ partial,
                                     float* __restrict__ out, int64_t C,
                                     launch::ColumnSumShape s) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t jj = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; jj < s.cols;
       jj += stride) {
    double sum = 0.0;
    for (int64_t b = 0; b < s.bands; ++b) sum += partial[b * s.cols + jj];
    out[launch::column(s, jj, C)] = static_cast<float>(sum);
  }
}

// Row sums of squares (shape: launch::row_sum_shape): threads_per_row threads per row, each
// adding kStatTerms of its elements in fp32 at a time, then double; the row's threads are
// added by a fixed tree in double. Groups of rows_per_block rows are walked grid-stride (the
// trip count is the same for every thread of a block, so the barriers are safe).
template <typename G>
__global__ void row_sums_kernel(const G* __restrict__ g, StatInput in, float* __restrict__ out,
                                int64_t n, int64_t C, int64_t start, launch::RowSumShape s) {
  __shared__ double partial[kThreads];
  const int tpr = s.threads_per_row;
  const int lane = threadIdx.x & (tpr - 1);
  const int slot = threadIdx.x / tpr;
  const int64_t group_stride = static_cast<int64_t>(gridDim.x) * s.rows_per_block;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * s.rows_per_block; base < s.rows;
       base += group_stride) {
    const int64_t ri = base + slot;
    double acc = 0.0;
    if (ri < s.rows) {
      const int64_t i = s.first_row + ri;
      const int64_t row0 = i * C;
      const int64_t a = max(start, row0), b = min(start + n, row0 + C);
      float part = 0.f;
      int terms = 0;
      for (int64_t e = a + lane; e < b; e += tpr) {
        part += stat_value<G, 1>(g, e - start, in, i, e - row0);
        if (++terms == launch::kStatTerms) {
          acc += static_cast<double>(part);
          part = 0.f;
          terms = 0;
        }
      }
      acc += static_cast<double>(part);
    }
    partial[threadIdx.x] = acc;
    __syncthreads();
    for (int w = tpr / 2; w > 0; w >>= 1) {
      if (lane < w) partial[threadIdx.x] += partial[threadIdx.x + w];
      __syncthreads();
    }
    if (lane == 0 && ri < s.rows) out[s.first_row + ri] = static_cast<float>(partial[threadIdx.x]);
    __syncthreads();  // partial is rewritten by the next group
  }
}

template <typename F>
void dispatch_grad(const at::Tensor& grad, const char* op, F&& f) {
  dispatch_float_or_bfloat16(grad.scalar_type(), op, "grad", f);
}

at::Tensor column_sums(const at::Tensor& grad, const StatInput& in, int64_t C, int64_t start,
                       int kind, const char* op) {
  at::Tensor out = at::zeros({C}, grad.options().dtype(at::kFloat));
  const int64_t n = grad.numel();
  const launch::ColumnSumShape s = launch::column_sum_shape(n, C, start);
  if (s.rows == 0) return out;
  TORCH_CHECK(s.fits, op, ": a fragment of ", n, " elements over ", C,
              " columns needs a grid of ", s.col_tiles, " x ", s.bands,
              " blocks, beyond the GPU's limits");
  const c10::cuda::CUDAGuard guard(grad.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor partial;
  if (s.bands > 1) partial = at::empty({s.bands, s.cols}, grad.options().dtype(at::kDouble));
  double* part = s.bands > 1 ? partial.data_ptr<double>() : nullptr;
  const dim3 block(static_cast<unsigned>(s.block_x), static_cast<unsigned>(s.block_y));
  const dim3 grid(static_cast<unsigned>(s.col_tiles), static_cast<unsigned>(s.bands));
  dispatch_grad(grad, op, [&](auto tag) {
    using G = decltype(tag);
    if (kind == 0)
      column_sums_kernel<G, 0><<<grid, block, 0, stream>>>(
          grad.const_data_ptr<G>(), in, part, out.data_ptr<float>(), n, C, start, s);
    else
      column_sums_kernel<G, 1><<<grid, block, 0, stream>>>(
          grad.const_data_ptr<G>(), in, part, out.data_ptr<float>(), n, C, start, s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (s.bands > 1) {
    combine_bands_kernel<<<grid_for(s.cols, grad.device().index()), kThreads, 0, stream>>>(
        partial.const_data_ptr<double>(), out.data_ptr<float>(), C, s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
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
  const launch::RowSumShape s = launch::row_sum_shape(
      n, C, start, launch::kBlocksPerSM * sm_count(grad.device().index()));
  dispatch_grad(grad, op, [&](auto tag) {
    using G = decltype(tag);
    row_sums_kernel<G><<<static_cast<unsigned>(s.blocks), kThreads, 0, stream>>>(
        grad.const_data_ptr<G>(), in, out.data_ptr<float>(), n, C, start, s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// ---------------------------------------------------------------------------
template <typename P, typename G>
__global__ void sage_kernel(P* __restrict__ param, float* __restrict__ m,
                            const G* __restrict__ grad, const float* __restrict__ h, int64_t n,
                            int64_t C, int64_t start, launch::Step step,
                            elementwise::SageCoeffs k) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= n) return;
  launch::Pos pos = launch::pos_of(start + e, C);  // then only additions
  for (; e < n; e += stride, launch::advance(pos, step, C)) {
    float p = static_cast<float>(param[e]);
    float mv = m[e];
    elementwise::sage_update(p, mv, static_cast<float>(grad[e]), h[pos.col], k);
    param[e] = static_cast<P>(p);
    m[e] = mv;
  }
}

void sage_update_cuda(const at::Tensor& param, const at::Tensor& m, const at::Tensor& grad,
                      const at::Tensor& h, int64_t C, int64_t start, double lr, double beta1,
                      double beta2, double weight_decay, bool momentum_first) {
  check_sage_update_args(param, m, grad, h, C, start, kCUDA);
  constexpr const char* op = "sage_dist::sage_update_";
  AliasCheck alias(op);
  alias.add("param", param, true);
  alias.add("m", m, true);
  alias.add("grad", grad, false);
  alias.add("h", h, false);
  alias.check();
  const int64_t n = param.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(param.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int blocks = grid_for(n, param.device().index());
  const launch::Step step = launch::step_of(static_cast<int64_t>(blocks) * kThreads, C);
  const auto k = elementwise::make_sage_coeffs(lr, beta1, beta2, weight_decay, momentum_first);
  dispatch_param_and_grad(param.scalar_type(), grad.scalar_type(), op, [&](auto p_tag, auto g_tag) {
    using P = decltype(p_tag);
    using G = decltype(g_tag);
    sage_kernel<P, G><<<blocks, kThreads, 0, stream>>>(
        param.data_ptr<P>(), m.data_ptr<float>(), grad.const_data_ptr<G>(),
        h.const_data_ptr<float>(), n, C, start, step, k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename P, typename G>
__global__ void scaled_kernel(P* __restrict__ param, const G* __restrict__ grad,
                              const float* __restrict__ r, const float* __restrict__ c,
                              int64_t n, int64_t C, int64_t start, launch::Step step,
                              elementwise::ScaledCoeffs k) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= n) return;
  launch::Pos pos = launch::pos_of(start + e, C);
  for (; e < n; e += stride, launch::advance(pos, step, C)) {
    const float ri = r ? r[pos.row] : 1.f;
    const float cj = c ? c[pos.col] : 1.f;
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
  constexpr const char* op = "sage_dist::scaled_update_";
  AliasCheck alias(op);
  alias.add("param", param, true);
  alias.add("grad", grad, false);
  alias.add("r", r, false);
  alias.add("c", c, false);
  alias.check();
  const int64_t n = param.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(param.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int blocks = grid_for(n, param.device().index());
  const launch::Step index_step = launch::step_of(static_cast<int64_t>(blocks) * kThreads, C);
  const auto k = elementwise::make_scaled_coeffs(lr, weight_decay, step);
  dispatch_param_and_grad(param.scalar_type(), grad.scalar_type(), op, [&](auto p_tag, auto g_tag) {
    using P = decltype(p_tag);
    using G = decltype(g_tag);
    scaled_kernel<P, G><<<blocks, kThreads, 0, stream>>>(param.data_ptr<P>(),
                                                        grad.const_data_ptr<G>(), opt_ptr(r),
                                                        opt_ptr(c), n, C, start,
                                                        index_step, k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ---------------------------------------------------------------------------
// Multi-tensor forms (sage_dist/multi_tensor.cuh): one launch per dtype pair.
// Record: param, grad, r, c, C, start, numel.
template <typename P, typename G>
struct ScaledMultiOp {
  elementwise::ScaledCoeffs k;
  __device__ void operator()(const int64_t* rec, int64_t i0, int64_t end, int64_t stride) const {
    P* __restrict__ param = multi_tensor::ptr<P>(rec[0]);
    const G* __restrict__ grad = multi_tensor::ptr<const G>(rec[1]);
    const float* __restrict__ r = multi_tensor::ptr<const float>(rec[2]);
    const float* __restrict__ c = multi_tensor::ptr<const float>(rec[3]);
    const int64_t C = rec[4];
    if (i0 >= end) return;
    launch::Pos pos = launch::pos_of(rec[5] + i0, C);
    const launch::Step step = launch::step_of(stride, C);
    for (int64_t e = i0; e < end; e += stride, launch::advance(pos, step, C))
      param[e] = static_cast<P>(elementwise::scaled_update(
          static_cast<float>(param[e]), static_cast<float>(grad[e]), r[pos.row], c[pos.col], k));
  }
};

void scaled_update_multi_cuda(at::TensorList params, at::TensorList grads, at::TensorList rs,
                              at::TensorList cs, at::IntArrayRef Cs, at::IntArrayRef starts,
                              double lr, double weight_decay, double step) {
  check_scaled_update_multi_args(params, grads, rs, cs, Cs, starts, kCUDA);
  constexpr const char* op = "sage_dist::scaled_update_multi_";
  AliasCheck alias(op);  // across the lists too: two entries must not share what they write
  for (size_t i = 0; i < params.size(); ++i) {
    const auto k = static_cast<int64_t>(i);
    alias.add("params", params[i], true, k);
    alias.add("grads", grads[i], false, k);
    alias.add("rs", rs[i], false, k);
    alias.add("cs", cs[i], false, k);
  }
  alias.check();
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const auto k = elementwise::make_scaled_coeffs(lr, weight_decay, step);
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
      multi_tensor::apply<7>(op, records, params[0].device(), ScaledMultiOp<P, G>{k});
    });
  });
}

// Record: param, m, grad, h, C, start, numel.
template <typename P, typename G>
struct SageMultiOp {
  elementwise::SageCoeffs k;
  __device__ void operator()(const int64_t* rec, int64_t i0, int64_t end, int64_t stride) const {
    P* __restrict__ param = multi_tensor::ptr<P>(rec[0]);
    float* __restrict__ m = multi_tensor::ptr<float>(rec[1]);
    const G* __restrict__ grad = multi_tensor::ptr<const G>(rec[2]);
    const float* __restrict__ h = multi_tensor::ptr<const float>(rec[3]);
    const int64_t C = rec[4];
    if (i0 >= end) return;
    launch::Pos pos = launch::pos_of(rec[5] + i0, C);
    const launch::Step step = launch::step_of(stride, C);
    for (int64_t e = i0; e < end; e += stride, launch::advance(pos, step, C)) {
      float p = static_cast<float>(param[e]);
      float mv = m[e];
      elementwise::sage_update(p, mv, static_cast<float>(grad[e]), h[pos.col], k);
      param[e] = static_cast<P>(p);
      m[e] = mv;
    }
  }
};

void sage_update_multi_cuda(at::TensorList params, at::TensorList ms, at::TensorList grads,
                            at::TensorList hs, at::IntArrayRef Cs, at::IntArrayRef starts,
                            double lr, double beta1, double beta2, double weight_decay,
                            bool momentum_first) {
  check_sage_update_multi_args(params, ms, grads, hs, Cs, starts, kCUDA);
  constexpr const char* op = "sage_dist::sage_update_multi_";
  AliasCheck alias(op);  // across the lists too: two entries must not share what they write
  for (size_t i = 0; i < params.size(); ++i) {
    const auto k = static_cast<int64_t>(i);
    alias.add("params", params[i], true, k);
    alias.add("ms", ms[i], true, k);
    alias.add("grads", grads[i], false, k);
    alias.add("hs", hs[i], false, k);
  }
  alias.check();
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const auto k = elementwise::make_sage_coeffs(lr, beta1, beta2, weight_decay, momentum_first);
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
      multi_tensor::apply<7>(op, records, params[0].device(), SageMultiOp<P, G>{k});
    });
  });
}

__global__ void rescale_kernel(float* __restrict__ scale, const float* __restrict__ s,
                               int64_t n, float target, float eps) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride)
    scale[i] = elementwise::sinkhorn_rescale(scale[i], s[i], target, eps);
}

// scale <- rescale(scale, s): scale is the op's own fresh tensor, s a fresh sum (no aliasing).
void rescale(at::Tensor& scale, const at::Tensor& s, float target, float eps) {
  const int64_t n = scale.numel();
  if (n == 0) return;
  rescale_kernel<<<grid_for(n, scale.device().index()), kThreads, 0,
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
                                       int64_t start, launch::Step step,
                                       elementwise::MomentumCoeffs km,
                                       elementwise::ScaledCoeffs k) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= n) return;
  launch::Pos pos = launch::pos_of(start + e, C);
  for (; e < n; e += stride, launch::advance(pos, step, C)) {
    const float x = elementwise::momentum(m[e], static_cast<float>(grad[e]), km);
    m[e] = x;
    param[e] = static_cast<P>(elementwise::scaled_update(
        static_cast<float>(param[e]), x, r ? r[pos.row] : 1.f, c ? c[pos.col] : 1.f, k));
  }
}

void momentum_scaled_update_cuda(const at::Tensor& param, const at::Tensor& m,
                                 const at::Tensor& grad, const std::optional<at::Tensor>& r,
                                 const std::optional<at::Tensor>& c, int64_t C, int64_t start,
                                 double beta, double lr, double weight_decay, double step) {
  check_momentum_scaled_update_args(param, m, grad, r, c, C, start, kCUDA);
  constexpr const char* op = "sage_dist::momentum_scaled_update_";
  AliasCheck alias(op);
  alias.add("param", param, true);
  alias.add("m", m, true);
  alias.add("grad", grad, false);
  alias.add("r", r, false);
  alias.add("c", c, false);
  alias.check();
  const int64_t n = param.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(param.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int blocks = grid_for(n, param.device().index());
  const launch::Step index_step = launch::step_of(static_cast<int64_t>(blocks) * kThreads, C);
  const auto km = elementwise::make_momentum_coeffs(beta);
  const auto k = elementwise::make_scaled_coeffs(lr, weight_decay, step);
  dispatch_param_and_grad(param.scalar_type(), grad.scalar_type(), op, [&](auto p_tag, auto g_tag) {
    using P = decltype(p_tag);
    using G = decltype(g_tag);
    momentum_scaled_kernel<P, G><<<blocks, kThreads, 0, stream>>>(
        param.data_ptr<P>(), m.data_ptr<float>(), grad.const_data_ptr<G>(), opt_ptr(r),
        opt_ptr(c), n, C, start, index_step, km, k);
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
