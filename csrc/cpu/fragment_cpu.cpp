// CPU kernels of the fragment ops: sage_dist::colsum_abs, sq_sums, sage_update_,
// scaled_update_, momentum_scaled_update_ (math: csrc/include/sage_dist/elementwise.h).
//
// A fragment [start, start + n) of a global [R, C] matrix is walked row by row (a partial
// first row, whole rows, a partial last row); rows are split across threads with
// at::parallel_for. The updates are plain per-element loops over the shared math, which the
// compiler vectorises (with -mavx2 when setup.py builds for an AVX2 machine); row sums of
// squares use 8-lane AVX2 vectors explicitly when available. Statistics are accumulated in
// double and rounded once, so they agree with torch's fp32 sums to well within 1e-6
// relative whatever the summation order.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "sage_dist/checks.h"
#include "sage_dist/elementwise.h"
#include "sage_dist/fragment_checks.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace sage_dist {
namespace {

#if defined(__AVX2__)
// Eight fp32 lanes with just the arithmetic the elementwise templates use, so the vector
// loops below run the header's math unchanged. Every operation is one IEEE-rounded
// instruction (no FMA), as in the scalar code.
struct F8 {
  __m256 v;
  F8(__m256 x) : v(x) {}
  explicit F8(float x) : v(_mm256_set1_ps(x)) {}
  static F8 load(const float* p) { return F8(_mm256_loadu_ps(p)); }
  friend F8 operator*(F8 a, F8 b) { return F8(_mm256_mul_ps(a.v, b.v)); }
  friend F8 operator+(F8 a, F8 b) { return F8(_mm256_add_ps(a.v, b.v)); }
};
#endif

// What a statistic squares (before the scales r, c): the gradient itself, or SCALE's head
// momentum beta m + (1 - beta) g formed in registers. at(j) is element j as fp32; vec(j)
// (AVX2 builds, fp32 storage only) elements j..j+7.
template <typename G>
struct GradSource {
  const G* g;
  float at(int64_t j) const { return static_cast<float>(g[j]); }
  GradSource at_offset(int64_t off) const { return {g + off}; }
#if defined(__AVX2__)
  F8 vec(int64_t j) const { return F8::load(g + j); }
#endif
};

template <typename G>
struct MomentumSource {
  const float* m;
  const G* g;
  elementwise::MomentumCoeffs k;
  float at(int64_t j) const { return elementwise::momentum(m[j], static_cast<float>(g[j]), k); }
  MomentumSource at_offset(int64_t off) const { return {m + off, g + off, k}; }
#if defined(__AVX2__)
  F8 vec(int64_t j) const { return elementwise::momentum(F8::load(m + j), F8::load(g + j), k); }
#endif
};
constexpr int64_t kGrainSize = 32768;  // elements per parallel task, as ATen's own kernels
constexpr c10::DeviceType kCPU = c10::DeviceType::CPU;

// Calls f(row, col_begin, col_end, offset_in_fragment) for every row the fragment touches;
// rows are split across threads, each row is visited by exactly one thread.
template <typename F>
void for_each_row(int64_t n, int64_t C, int64_t start, const F& f) {
  if (n == 0) return;
  const int64_t first = start / C, last = (start + n - 1) / C;
  const int64_t grain = std::max<int64_t>(1, kGrainSize / C);
  at::parallel_for(first, last + 1, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      const int64_t a = std::max(start, i * C), b = std::min(start + n, (i + 1) * C);
      f(i, a - i * C, b - i * C, a - start);
    }
  });
}

const float* opt_ptr(const std::optional<at::Tensor>& t) {
  return t ? t->const_data_ptr<float>() : nullptr;
}

// Column sums over the fragment into out[C]. add_row(acc, i, c0, len, off) adds the terms
// of row i, columns [c0, c0 + len), which sit at offset `off` of the fragment, into the fp32
// acc[0, len). Each thread sums kBlockRows rows per column in fp32 (all terms here are >= 0,
// so that partial sum is within (kBlockRows - 1) fp32 roundings, under 5e-7 relative), then
// adds it to a double accumulator; the threads' doubles are combined in thread order.
constexpr int kBlockRows = 8;

template <typename AddRow>
void column_sums(int64_t n, int64_t C, int64_t start, float* out, const AddRow& add_row) {
  const int threads = at::get_num_threads();
  std::vector<double> acc(static_cast<size_t>(threads) * C, 0.0);
  std::vector<float> part(static_cast<size_t>(threads) * C, 0.f);
  std::vector<int64_t> rows_in_part(static_cast<size_t>(threads) * 16, 0);  // 128 B apart
  auto flush = [&](int t) {
    double* a = acc.data() + static_cast<int64_t>(t) * C;
    float* f = part.data() + static_cast<int64_t>(t) * C;
    for (int64_t j = 0; j < C; ++j) {
      a[j] += static_cast<double>(f[j]);
      f[j] = 0.f;
    }
  };
  for_each_row(n, C, start, [&](int64_t i, int64_t c0, int64_t c1, int64_t off) {
    const int t = at::get_thread_num();
    add_row(part.data() + static_cast<int64_t>(t) * C + c0, i, c0, c1 - c0, off);
    if (++rows_in_part[16 * t] == kBlockRows) {
      flush(t);
      rows_in_part[16 * t] = 0;
    }
  });
  for (int t = 0; t < threads; ++t) flush(t);
  for (int64_t j = 0; j < C; ++j) {
    double s = 0.0;
    for (int t = 0; t < threads; ++t) s += acc[static_cast<size_t>(t) * C + j];
    out[j] = static_cast<float>(s);
  }
}

// ---------------------------------------------------------------------------
at::Tensor colsum_abs_cpu(const at::Tensor& grad, int64_t C, int64_t start) {
  check_colsum_abs_args(grad, C, start, kCPU);
  at::Tensor out = at::zeros({C}, grad.options().dtype(at::kFloat));
  dispatch_float_or_bfloat16(grad.scalar_type(), "sage_dist::colsum_abs", "grad", [&](auto tag) {
    using G = decltype(tag);
    const G* g = grad.const_data_ptr<G>();
    column_sums(grad.numel(), C, start, out.data_ptr<float>(),
                [g](float* a, int64_t, int64_t, int64_t len, int64_t off) {
                  const G* row = g + off;
                  for (int64_t j = 0; j < len; ++j) a[j] += std::fabs(static_cast<float>(row[j]));
                });
  });
  return out;
}

// ---------------------------------------------------------------------------
// sq_sums: sums of (g r c)^2 along rows (dim 1) or columns (dim 0).
//
// Each square is formed in fp32 by elementwise::scaled_square, then widened to double and
// added. The loops keep kLanes independent double accumulators (a row sum) or one per
// column (a column sum), so the compiler vectorises them without reassociating any sum:
// every accumulator adds its terms in index order, and the lanes are combined in a fixed
// order at the end.
constexpr int kLanes = 8;

template <typename G, typename Src>
double row_square_sum(const Src& x, const float* c, float ri, int64_t len) {
  double acc[kLanes] = {};
  int64_t j = 0;
#if defined(__AVX2__)
  if constexpr (std::is_same_v<G, float>) {
    // Two fp32 vectors take kBlockRows terms per lane (lane l of vector h: the terms j with
    // j % 16 == 8h + l, in order), then move into four double vectors; the tail below adds
    // to lane 0. As in the column sums, a lane's fp32 part is within 7 roundings.
    __m256d a[4] = {_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(),
                    _mm256_setzero_pd()};
    __m256 f[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    const F8 rv(ri), one(1.f);
    int terms = 0;
    auto flush = [&] {
      for (int h = 0; h < 2; ++h) {
        a[2 * h] = _mm256_add_pd(a[2 * h], _mm256_cvtps_pd(_mm256_castps256_ps128(f[h])));
        a[2 * h + 1] = _mm256_add_pd(a[2 * h + 1], _mm256_cvtps_pd(_mm256_extractf128_ps(f[h], 1)));
        f[h] = _mm256_setzero_ps();
      }
      terms = 0;
    };
    for (; j + 16 <= len; j += 16) {
      for (int h = 0; h < 2; ++h) {
        const F8 sq = elementwise::scaled_square(x.vec(j + 8 * h), rv,
                                                 c ? F8::load(c + j + 8 * h) : one);
        f[h] = _mm256_add_ps(f[h], sq.v);
      }
      if (++terms == kBlockRows) flush();
    }
    flush();
    double lanes[16];
    for (int h = 0; h < 4; ++h) _mm256_storeu_pd(lanes + 4 * h, a[h]);
    for (int l = 0; l < 16; ++l) acc[l % kLanes] += lanes[l];
  }
#endif
  for (; j + kLanes <= len; j += kLanes)
    for (int l = 0; l < kLanes; ++l)
      acc[l] += static_cast<double>(
          elementwise::scaled_square(x.at(j + l), ri, c ? c[j + l] : 1.f));
  for (; j < len; ++j)
    acc[0] += static_cast<double>(elementwise::scaled_square(x.at(j), ri, c ? c[j] : 1.f));
  double s = 0.0;
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}

template <typename Src>
void add_column_squares(float* acc, const Src& x, const float* c, float ri, int64_t len) {
  if (c) {
    for (int64_t j = 0; j < len; ++j) acc[j] += elementwise::scaled_square(x.at(j), ri, c[j]);
  } else {
    for (int64_t j = 0; j < len; ++j) acc[j] += elementwise::scaled_square(x.at(j), ri, 1.f);
  }
}

// Row sums (dim 1, length R) or column sums (dim 0, length C) of (x r c)^2 over the
// fragment [start, start + n) of an [R, C] matrix; r, c may be null (all ones).
template <typename G, typename Src>
void square_sums(const Src& x, const float* r, const float* c, int64_t n, int64_t C,
                 int64_t start, int64_t dim, float* out) {
  if (dim == 1) {
    for_each_row(n, C, start, [&](int64_t i, int64_t c0, int64_t c1, int64_t off) {
      out[i] = static_cast<float>(row_square_sum<G>(x.at_offset(off), c ? c + c0 : nullptr,
                                                    r ? r[i] : 1.f, c1 - c0));
    });
    return;
  }
  column_sums(n, C, start, out, [&](float* a, int64_t i, int64_t c0, int64_t len, int64_t off) {
    add_column_squares(a, x.at_offset(off), c ? c + c0 : nullptr, r ? r[i] : 1.f, len);
  });
}

at::Tensor sq_sums_cpu(const at::Tensor& grad, const std::optional<at::Tensor>& r,
                       const std::optional<at::Tensor>& c, int64_t R, int64_t C, int64_t start,
                       int64_t dim, const std::optional<at::Tensor>& m, double beta) {
  check_sq_sums_args(grad, r, c, R, C, start, dim, m, kCPU);
  at::Tensor out = at::zeros({dim == 1 ? R : C}, grad.options().dtype(at::kFloat));
  dispatch_float_or_bfloat16(grad.scalar_type(), "sage_dist::sq_sums", "grad", [&](auto tag) {
    using G = decltype(tag);
    const G* g = grad.const_data_ptr<G>();
    const int64_t n = grad.numel();
    float* o = out.data_ptr<float>();
    if (m) {
      const MomentumSource<G> x{m->const_data_ptr<float>(), g,
                                elementwise::make_momentum_coeffs(beta)};
      square_sums<G>(x, opt_ptr(r), opt_ptr(c), n, C, start, dim, o);
    } else {
      square_sums<G>(GradSource<G>{g}, opt_ptr(r), opt_ptr(c), n, C, start, dim, o);
    }
  });
  return out;
}

// ---------------------------------------------------------------------------
template <typename P, typename G>
void sage_rows(P* param, float* m, const G* grad, const float* h, int64_t n, int64_t C,
               int64_t start, const elementwise::SageCoeffs& k) {
  for_each_row(n, C, start, [&](int64_t, int64_t c0, int64_t c1, int64_t off) {
    P* pp = param + off;
    float* mm = m + off;
    const G* gg = grad + off;
    const float* hh = h + c0;
    const int64_t len = c1 - c0;
    // A plain loop: the compiler vectorises it, sign as two compares. (ATen's portable
    // at::vec::Vectorized, which extensions get, was measured 5x slower here.)
    int64_t j = 0;
    for (; j < len; ++j) {
      float p = static_cast<float>(pp[j]);
      elementwise::sage_update(p, mm[j], static_cast<float>(gg[j]), hh[j], k);
      pp[j] = static_cast<P>(p);
    }
  });
}

void sage_update_cpu(const at::Tensor& param, const at::Tensor& m, const at::Tensor& grad,
                     const at::Tensor& h, int64_t C, int64_t start, double lr, double beta1,
                     double beta2, double weight_decay, bool momentum_first) {
  check_sage_update_args(param, m, grad, h, C, start, kCPU);
  if (param.numel() == 0) return;
  const auto k = elementwise::make_sage_coeffs(lr, beta1, beta2, weight_decay, momentum_first);
  constexpr const char* op = "sage_dist::sage_update_";
  dispatch_param_and_grad(param.scalar_type(), grad.scalar_type(), op, [&](auto p_tag, auto g_tag) {
    using P = decltype(p_tag);
    using G = decltype(g_tag);
    sage_rows<P, G>(param.data_ptr<P>(), m.data_ptr<float>(), grad.const_data_ptr<G>(),
                    h.const_data_ptr<float>(), param.numel(), C, start, k);
  });
}

// ---------------------------------------------------------------------------
template <typename P, typename G>
void scaled_rows(P* param, const G* grad, const float* r, const float* c, int64_t n, int64_t C,
                 int64_t start, const elementwise::ScaledCoeffs& k) {
  for_each_row(n, C, start, [&](int64_t i, int64_t c0, int64_t c1, int64_t off) {
    P* pp = param + off;
    const G* gg = grad + off;
    const float ri = r ? r[i] : 1.f;
    const int64_t len = c1 - c0;
    if (c) {
      for (int64_t j = 0; j < len; ++j)
        pp[j] = static_cast<P>(elementwise::scaled_update(
            static_cast<float>(pp[j]), static_cast<float>(gg[j]), ri, c[c0 + j], k));
    } else {
      for (int64_t j = 0; j < len; ++j)
        pp[j] = static_cast<P>(elementwise::scaled_update(
            static_cast<float>(pp[j]), static_cast<float>(gg[j]), ri, 1.f, k));
    }
  });
}

void scaled_update_cpu(const at::Tensor& param, const at::Tensor& grad,
                       const std::optional<at::Tensor>& r, const std::optional<at::Tensor>& c,
                       int64_t C, int64_t start, double lr, double weight_decay, double step) {
  check_scaled_update_args(param, grad, r, c, C, start, kCPU);
  if (param.numel() == 0) return;
  const auto k = elementwise::make_scaled_coeffs(lr, weight_decay, step);
  constexpr const char* op = "sage_dist::scaled_update_";
  dispatch_param_and_grad(param.scalar_type(), grad.scalar_type(), op, [&](auto p_tag, auto g_tag) {
    using P = decltype(p_tag);
    using G = decltype(g_tag);
    scaled_rows<P, G>(param.data_ptr<P>(), grad.const_data_ptr<G>(), opt_ptr(r), opt_ptr(c),
                      param.numel(), C, start, k);
  });
}

// ---------------------------------------------------------------------------
void rescale(float* scale, const float* s, int64_t n, float target, float eps) {
  for (int64_t i = 0; i < n; ++i)
    scale[i] = elementwise::sinkhorn_rescale(scale[i], s[i], target, eps);
}

at::Tensor sinkhorn_rescale_cpu(const at::Tensor& scale, const at::Tensor& s, double target,
                                double eps) {
  check_sinkhorn_rescale_args(scale, s, kCPU);
  at::Tensor out = scale.clone();
  rescale(out.data_ptr<float>(), s.const_data_ptr<float>(), out.numel(),
          static_cast<float>(target), static_cast<float>(eps));
  return out;
}

std::tuple<at::Tensor, at::Tensor> sinkhorn_scales_cpu(const at::Tensor& grad, int64_t R,
                                                       int64_t C, int64_t iters, double eps,
                                                       double row_target, double col_target) {
  check_sinkhorn_scales_args(grad, R, C, iters, eps, kCPU);
  const auto f32 = grad.options().dtype(at::kFloat);
  at::Tensor r = at::ones({R}, f32), c = at::ones({C}, f32);
  at::Tensor rows = at::zeros({R}, f32), cols = at::zeros({C}, f32);
  float *rp = r.data_ptr<float>(), *cp = c.data_ptr<float>();
  float *rs = rows.data_ptr<float>(), *cs = cols.data_ptr<float>();
  const float e = static_cast<float>(eps);
  const float rt = static_cast<float>(row_target), ct = static_cast<float>(col_target);
  dispatch_float_or_bfloat16(grad.scalar_type(), "sage_dist::sinkhorn_scales", "grad",
                             [&](auto tag) {
    using G = decltype(tag);
    const GradSource<G> x{grad.const_data_ptr<G>()};
    const int64_t n = grad.numel();
    for (int64_t it = 0; it < iters; ++it) {
      square_sums<G>(x, nullptr, cp, n, C, 0, 1, rs);
      rescale(rp, rs, R, rt, e);
      square_sums<G>(x, rp, nullptr, n, C, 0, 0, cs);
      rescale(cp, cs, C, ct, e);
    }
  });
  return {r, c};
}

// ---------------------------------------------------------------------------
// Multi-tensor forms: on the CPU, the single-fragment kernels one after the other (each is
// already parallel over its rows); what they save is the per-call overhead.
void scaled_update_multi_cpu(at::TensorList params, at::TensorList grads, at::TensorList rs,
                             at::TensorList cs, at::IntArrayRef Cs, at::IntArrayRef starts,
                             double lr, double weight_decay, double step) {
  check_scaled_update_multi_args(params, grads, rs, cs, Cs, starts, kCPU);
  for (size_t i = 0; i < params.size(); ++i)
    scaled_update_cpu(params[i], grads[i], rs[i], cs[i], Cs[i], starts[i], lr, weight_decay,
                      step);
}

void sage_update_multi_cpu(at::TensorList params, at::TensorList ms, at::TensorList grads,
                           at::TensorList hs, at::IntArrayRef Cs, at::IntArrayRef starts,
                           double lr, double beta1, double beta2, double weight_decay,
                           bool momentum_first) {
  check_sage_update_multi_args(params, ms, grads, hs, Cs, starts, kCPU);
  for (size_t i = 0; i < params.size(); ++i)
    sage_update_cpu(params[i], ms[i], grads[i], hs[i], Cs[i], starts[i], lr, beta1, beta2,
                    weight_decay, momentum_first);
}

// ---------------------------------------------------------------------------
template <typename P, typename G>
void momentum_scaled_rows(P* param, float* m, const G* grad, const float* r, const float* c,
                          int64_t n, int64_t C, int64_t start,
                          const elementwise::MomentumCoeffs& km,
                          const elementwise::ScaledCoeffs& k) {
  for_each_row(n, C, start, [&](int64_t i, int64_t c0, int64_t c1, int64_t off) {
    P* pp = param + off;
    float* mm = m + off;
    const G* gg = grad + off;
    const float ri = r ? r[i] : 1.f;
    const int64_t len = c1 - c0;
    for (int64_t j = 0; j < len; ++j) {
      const float x = elementwise::momentum(mm[j], static_cast<float>(gg[j]), km);
      mm[j] = x;
      pp[j] = static_cast<P>(elementwise::scaled_update(static_cast<float>(pp[j]), x, ri,
                                                        c ? c[c0 + j] : 1.f, k));
    }
  });
}

void momentum_scaled_update_cpu(const at::Tensor& param, const at::Tensor& m,
                                const at::Tensor& grad, const std::optional<at::Tensor>& r,
                                const std::optional<at::Tensor>& c, int64_t C, int64_t start,
                                double beta, double lr, double weight_decay, double step) {
  check_momentum_scaled_update_args(param, m, grad, r, c, C, start, kCPU);
  if (param.numel() == 0) return;
  const auto km = elementwise::make_momentum_coeffs(beta);
  const auto k = elementwise::make_scaled_coeffs(lr, weight_decay, step);
  constexpr const char* op = "sage_dist::momentum_scaled_update_";
  dispatch_param_and_grad(param.scalar_type(), grad.scalar_type(), op, [&](auto p_tag, auto g_tag) {
    using P = decltype(p_tag);
    using G = decltype(g_tag);
    momentum_scaled_rows<P, G>(param.data_ptr<P>(), m.data_ptr<float>(),
                               grad.const_data_ptr<G>(), opt_ptr(r), opt_ptr(c),
                               param.numel(), C, start, km, k);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(sage_dist, CPU, m) {
  m.impl("scaled_update_multi_", &scaled_update_multi_cpu);
  m.impl("sage_update_multi_", &sage_update_multi_cpu);
  m.impl("sinkhorn_rescale", &sinkhorn_rescale_cpu);
  m.impl("sinkhorn_scales", &sinkhorn_scales_cpu);
  m.impl("momentum_scaled_update_", &momentum_scaled_update_cpu);
  m.impl("colsum_abs", &colsum_abs_cpu);
  m.impl("sq_sums", &sq_sums_cpu);
  m.impl("sage_update_", &sage_update_cpu);
  m.impl("scaled_update_", &scaled_update_cpu);
}

}  // namespace sage_dist
