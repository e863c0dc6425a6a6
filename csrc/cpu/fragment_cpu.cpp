// CPU kernels of the fragment ops: sage_dist::colsum_abs, colsum_abs_check, sq_sums,
// sage_update_, scaled_update_, momentum_scaled_update_, sinkhorn_rescale, sinkhorn_scales,
// sinkhorn_scales_multi_, sinkhorn_update_multi_ and the multi-tensor updates
// (math: csrc/include/sage_dist/elementwise.h).
//
// A fragment [start, start + n) of a global [R, C] matrix is walked row by row (a partial
// first row, whole rows, a partial last row). The hot loops are in csrc/cpu/kernels_impl.h,
// compiled per vector ISA and chosen at run time (csrc/cpu/isa.h); this file cuts the work
// into tasks and runs them on torch's intra-op threads, ONE parallel region per call, each
// thread taking the next task from a shared counter (a thread that the OS deschedules on a
// busy machine then delays only its current task, not a fixed half of the work).
//
// Sums do not depend on how tasks land on threads: column sums are cut into fixed chunks of
// rows whose double partials are added in chunk order, row sums are per row (isa.h). So the
// results are the same for any thread count and any ISA, and the whole-matrix Sinkhorn
// (one sweep per iteration) gets bit for bit the numbers of the phase-by-phase sq_sums path.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <numeric>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "isa.h"
#include "sage_dist/checks.h"
#include "sage_dist/elementwise.h"
#include "sage_dist/fragment_checks.h"

namespace sage_dist {
namespace {

constexpr c10::DeviceType kCPU = c10::DeviceType::CPU;
constexpr int64_t kTaskElems = 65536;  // elements per task of the element-wise updates

const float* opt_ptr(const std::optional<at::Tensor>& t) {
  return t ? t->const_data_ptr<float>() : nullptr;
}

// Runs f(task, slot) for task in [0, ntasks) on up to `threads` intra-op threads (one
// parallel region), each thread taking the next task; `slot` < threads is unique among the
// tasks running at one time (for per-thread scratch).
template <typename F>
void parallel_tasks_on(int threads, int64_t ntasks, const F& f) {
  if (ntasks <= 0) return;
  if (threads <= 1 || ntasks == 1) {
    for (int64_t k = 0; k < ntasks; ++k) f(k, 0);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s)
      for (int64_t k; (k = next.fetch_add(1, std::memory_order_relaxed)) < ntasks;)
        f(k, static_cast<int>(s));
  });
}

// Threads for `ntasks` tasks of `work` element-passes in all: at least kMinWork each (a
// parallel region costs microseconds on a quiet machine, and can cost a scheduler time slice on
// a busy one, waiting for a thread that is not running).
constexpr int64_t kMinWork = int64_t{1} << 17;

int threads_for(int64_t ntasks, int64_t work) {
  if (at::in_parallel_region()) return 1;
  const int64_t by_work = std::max<int64_t>(1, work / kMinWork);
  return static_cast<int>(
      std::max<int64_t>(1, std::min({int64_t{at::get_num_threads()}, ntasks, by_work})));
}

template <typename F>
void parallel_tasks(int64_t ntasks, int64_t work, const F& f) {
  parallel_tasks_on(threads_for(ntasks, work), ntasks, f);
}

struct RowRange {
  int64_t first, last;  // global rows the fragment touches (last inclusive); first > last: none
};
RowRange rows_of(int64_t n, int64_t C, int64_t start) {
  if (n == 0) return {0, -1};
  return {start / C, (start + n - 1) / C};
}

// Column sums over a fragment's rows in canonical chunks (isa.h): chunk(i0, i1, acc32, out64,
// slot) adds chunk [i0, i1)'s partials into out64 (zeroed); the partials are added in chunk
// order into out[C].
template <typename Chunk>
void chunked_column_sums(int64_t n, int64_t C, int64_t start, float* out, const Chunk& chunk) {
  const RowRange rr = rows_of(n, C, start);
  std::fill(out, out + C, 0.f);
  if (rr.first > rr.last) return;
  const int64_t K = cpu::rows_per_chunk(C);
  const int64_t chunks = (rr.last - rr.first + K) / K;
  const int threads = threads_for(chunks, n);
  std::vector<double> part(static_cast<size_t>(chunks * C), 0.0);
  std::vector<float> acc(static_cast<size_t>(threads * C));
  parallel_tasks_on(threads, chunks, [&](int64_t k, int slot) {
    const int64_t i0 = rr.first + k * K, i1 = std::min(rr.last + 1, i0 + K);
    chunk(i0, i1, acc.data() + slot * C, part.data() + k * C, slot);
  });
  std::vector<double> total(part.begin(), part.begin() + C);
  for (int64_t k = 1; k < chunks; ++k)
    for (int64_t j = 0; j < C; ++j) total[j] += part[k * C + j];
  for (int64_t j = 0; j < C; ++j) out[j] = static_cast<float>(total[j]);
}

// Per-thread maxima of |bits|, 64 bytes apart.
struct BitsPerThread {
  std::vector<uint32_t> v;
  explicit BitsPerThread(int threads) : v(static_cast<size_t>(threads) * 16, 0u) {}
  uint32_t* at(int slot) { return v.data() + 16 * slot; }
  bool nonfinite() const {
    return std::any_of(v.begin(), v.end(), [](uint32_t b) { return b >= cpu::kNonfiniteBits; });
  }
};

// ---------------------------------------------------------------------------
at::Tensor colsum_abs_into(const at::Tensor& grad, int64_t C, int64_t start, bool* nonfinite) {
  at::Tensor out = at::empty({C}, grad.options().dtype(at::kFloat));
  const cpu::Kernels& kern = cpu::kernels();
  const bool bf16 = grad.scalar_type() == at::kBFloat16;
  const void* g = grad.const_data_ptr();
  const int64_t n = grad.numel();
  BitsPerThread bits(std::max(1, at::get_num_threads()));
  chunked_column_sums(n, C, start, out.data_ptr<float>(),
                      [&](int64_t i0, int64_t i1, float* acc32, double* out64, int slot) {
                        kern.colsum_abs_chunk(g, bf16, n, C, start, i0, i1, acc32, out64,
                                              nonfinite ? bits.at(slot) : nullptr);
                      });
  if (nonfinite) *nonfinite = bits.nonfinite();
  return out;
}

at::Tensor colsum_abs_cpu(const at::Tensor& grad, int64_t C, int64_t start) {
  check_colsum_abs_args(grad, C, start, kCPU);
  return colsum_abs_into(grad, C, start, nullptr);
}

std::tuple<at::Tensor, at::Tensor> colsum_abs_check_cpu(const at::Tensor& grad, int64_t C,
                                                        int64_t start) {
  check_colsum_abs_args(grad, C, start, kCPU, "sage_dist::colsum_abs_check");
  bool bad = false;
  at::Tensor sums = colsum_abs_into(grad, C, start, &bad);
  return {sums, at::full({1}, bad ? 1.0 : 0.0, grad.options().dtype(at::kFloat))};
}

// ---------------------------------------------------------------------------
at::Tensor sq_sums_cpu(const at::Tensor& grad, const std::optional<at::Tensor>& r,
                       const std::optional<at::Tensor>& c, int64_t R, int64_t C, int64_t start,
                       int64_t dim, const std::optional<at::Tensor>& m, double beta) {
  check_sq_sums_args(grad, r, c, R, C, start, dim, m, kCPU);
  const cpu::Kernels& kern = cpu::kernels();
  const cpu::SqArgs a{grad.const_data_ptr(), grad.scalar_type() == at::kBFloat16,
                      m ? m->const_data_ptr<float>() : nullptr, beta, opt_ptr(r), opt_ptr(c),
                      grad.numel(), C, start};
  if (dim == 1) {
    at::Tensor out = at::zeros({R}, grad.options().dtype(at::kFloat));
    float* o = out.data_ptr<float>();
    const RowRange rr = rows_of(a.n, C, start);
    const int64_t per = std::max<int64_t>(1, kTaskElems / C);
    const int64_t tasks = rr.first > rr.last ? 0 : (rr.last - rr.first + per) / per;
    parallel_tasks(tasks, a.n, [&](int64_t k, int) {
      const int64_t i0 = rr.first + k * per;
      kern.sq_rows(a, i0, std::min(rr.last + 1, i0 + per), o);
    });
    return out;
  }
  at::Tensor out = at::empty({C}, grad.options().dtype(at::kFloat));
  chunked_column_sums(a.n, C, start, out.data_ptr<float>(),
                      [&](int64_t i0, int64_t i1, float* acc32, double* out64, int) {
                        kern.sq_cols_chunk(a, i0, i1, acc32, out64);
                      });
  return out;
}

// ---------------------------------------------------------------------------
// Element-wise updates on rows [i0, i1) of a fragment: the ISA's loops for fp32 storage, the
// base build's for bf16 parameters or gradients.
template <typename F>
void for_rows(int64_t n, int64_t C, int64_t start, int64_t i0, int64_t i1, const F& f) {
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t a = std::max(start, i * C), b = std::min(start + n, (i + 1) * C);
    f(i, a - i * C, b - i * C, a - start);
  }
}

template <typename P, typename G>
void sage_rows_any(P* param, float* m, const G* grad, const float* h, int64_t n, int64_t C,
                   int64_t start, int64_t i0, int64_t i1, const elementwise::SageCoeffs& k) {
  for_rows(n, C, start, i0, i1, [&](int64_t, int64_t c0, int64_t c1, int64_t off) {
    P* pp = param + off;
    float* mm = m + off;
    const G* gg = grad + off;
    const float* hh = h + c0;
    for (int64_t j = 0; j < c1 - c0; ++j) {
      float p = static_cast<float>(pp[j]);
      elementwise::sage_update(p, mm[j], static_cast<float>(gg[j]), hh[j], k);
      pp[j] = static_cast<P>(p);
    }
  });
}

template <typename P, typename G>
void scaled_rows_any(P* param, const G* grad, const float* r, const float* c, int64_t n,
                     int64_t C, int64_t start, int64_t i0, int64_t i1,
                     const elementwise::ScaledCoeffs& k) {
  for_rows(n, C, start, i0, i1, [&](int64_t i, int64_t c0, int64_t c1, int64_t off) {
    P* pp = param + off;
    const G* gg = grad + off;
    const float ri = r ? r[i] : 1.f;
    for (int64_t j = 0; j < c1 - c0; ++j)
      pp[j] = static_cast<P>(elementwise::scaled_update(
          static_cast<float>(pp[j]), static_cast<float>(gg[j]), ri, c ? c[c0 + j] : 1.f, k));
  });
}

// One task of a (multi-)fragment update: elements [e0, e1) of fragment `t`, itself a
// fragment (starting at start + e0), so tasks need not follow rows.
struct Task {
  size_t t;
  int64_t e0, e1;
};

int64_t total_numel(at::TensorList ts) {
  int64_t n = 0;
  for (const at::Tensor& t : ts) n += t.numel();
  return n;
}

template <typename Numel>
std::vector<Task> update_tasks(size_t count, const Numel& numel) {
  std::vector<Task> tasks;
  for (size_t t = 0; t < count; ++t)
    for (int64_t e = 0, n = numel(t); e < n; e += kTaskElems)
      tasks.push_back({t, e, std::min(n, e + kTaskElems)});
  return tasks;
}

void sage_task(const at::Tensor& param, const at::Tensor& m, const at::Tensor& grad,
               const at::Tensor& h, int64_t C, int64_t start, int64_t e0, int64_t e1, double lr,
               double beta1, double beta2, double wd, bool momentum_first) {
  const int64_t n = e1 - e0, s = start + e0;
  const RowRange rr = rows_of(n, C, s);
  if (param.scalar_type() == at::kFloat && grad.scalar_type() == at::kFloat) {
    cpu::kernels().sage_rows(param.data_ptr<float>() + e0, m.data_ptr<float>() + e0,
                             grad.const_data_ptr<float>() + e0, h.const_data_ptr<float>(), n, C,
                             s, rr.first, rr.last + 1, lr, beta1, beta2, wd, momentum_first);
    return;
  }
  const auto k = elementwise::make_sage_coeffs(lr, beta1, beta2, wd, momentum_first);
  dispatch_param_and_grad(param.scalar_type(), grad.scalar_type(), "sage_dist::sage_update_",
                          [&](auto p_tag, auto g_tag) {
    using P = decltype(p_tag);
    using G = decltype(g_tag);
    sage_rows_any<P, G>(param.data_ptr<P>() + e0, m.data_ptr<float>() + e0,
                        grad.const_data_ptr<G>() + e0, h.const_data_ptr<float>(), n, C, s,
                        rr.first, rr.last + 1, k);
  });
}

void scaled_task(const at::Tensor& param, const at::Tensor& grad, const float* r,
                 const float* c, int64_t C, int64_t start, int64_t e0, int64_t e1, double lr,
                 double wd, double step) {
  const int64_t n = e1 - e0, s = start + e0;
  const RowRange rr = rows_of(n, C, s);
  if (param.scalar_type() == at::kFloat && grad.scalar_type() == at::kFloat) {
    cpu::kernels().scaled_rows(param.data_ptr<float>() + e0, grad.const_data_ptr<float>() + e0,
                               r, c, n, C, s, rr.first, rr.last + 1, lr, wd, step);
    return;
  }
  const auto k = elementwise::make_scaled_coeffs(lr, wd, step);
  dispatch_param_and_grad(param.scalar_type(), grad.scalar_type(), "sage_dist::scaled_update_",
                          [&](auto p_tag, auto g_tag) {
    using P = decltype(p_tag);
    using G = decltype(g_tag);
    scaled_rows_any<P, G>(param.data_ptr<P>() + e0, grad.const_data_ptr<G>() + e0, r, c, n, C,
                          s, rr.first, rr.last + 1, k);
  });
}

void sage_update_cpu(const at::Tensor& param, const at::Tensor& m, const at::Tensor& grad,
                     const at::Tensor& h, int64_t C, int64_t start, double lr, double beta1,
                     double beta2, double weight_decay, bool momentum_first) {
  check_sage_update_args(param, m, grad, h, C, start, kCPU);
  const auto tasks = update_tasks(1, [&](size_t) { return param.numel(); });
  parallel_tasks(static_cast<int64_t>(tasks.size()), param.numel(), [&](int64_t k, int) {
    sage_task(param, m, grad, h, C, start, tasks[k].e0, tasks[k].e1, lr, beta1, beta2,
              weight_decay, momentum_first);
  });
}

void sage_update_multi_cpu(at::TensorList params, at::TensorList ms, at::TensorList grads,
                           at::TensorList hs, at::IntArrayRef Cs, at::IntArrayRef starts,
                           double lr, double beta1, double beta2, double weight_decay,
                           bool momentum_first) {
  check_sage_update_multi_args(params, ms, grads, hs, Cs, starts, kCPU);
  const auto tasks = update_tasks(params.size(), [&](size_t t) { return params[t].numel(); });
  parallel_tasks(static_cast<int64_t>(tasks.size()), total_numel(params), [&](int64_t k, int) {
    const Task& w = tasks[k];
    sage_task(params[w.t], ms[w.t], grads[w.t], hs[w.t], Cs[w.t], starts[w.t], w.e0, w.e1, lr,
              beta1, beta2, weight_decay, momentum_first);
  });
}

void scaled_update_cpu(const at::Tensor& param, const at::Tensor& grad,
                       const std::optional<at::Tensor>& r, const std::optional<at::Tensor>& c,
                       int64_t C, int64_t start, double lr, double weight_decay, double step) {
  check_scaled_update_args(param, grad, r, c, C, start, kCPU);
  const auto tasks = update_tasks(1, [&](size_t) { return param.numel(); });
  parallel_tasks(static_cast<int64_t>(tasks.size()), param.numel(), [&](int64_t k, int) {
    scaled_task(param, grad, opt_ptr(r), opt_ptr(c), C, start, tasks[k].e0, tasks[k].e1, lr,
                weight_decay, step);
  });
}

void scaled_update_multi_cpu(at::TensorList params, at::TensorList grads, at::TensorList rs,
                             at::TensorList cs, at::IntArrayRef Cs, at::IntArrayRef starts,
                             double lr, double weight_decay, double step) {
  check_scaled_update_multi_args(params, grads, rs, cs, Cs, starts, kCPU);
  const auto tasks = update_tasks(params.size(), [&](size_t t) { return params[t].numel(); });
  parallel_tasks(static_cast<int64_t>(tasks.size()), total_numel(params), [&](int64_t k, int) {
    const Task& w = tasks[k];
    scaled_task(params[w.t], grads[w.t], rs[w.t].const_data_ptr<float>(),
                cs[w.t].const_data_ptr<float>(), Cs[w.t], starts[w.t], w.e0, w.e1, lr,
                weight_decay, step);
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

// The whole-matrix Sinkhorn (ALGORITHMS.md §2-3) in one sweep per iteration: for each row its
// sum of (g c)^2 with the current c, its new r_i, and its terms (g r_i)^2 into the column
// sums, from which c is rescaled after the sweep. The row sums, the blocks and chunks of the
// column sums and the rescales are those of sq_sums + sinkhorn_rescale, so the phase-by-phase
// path gives the same r and c bit for bit. The first sweep also takes the max of |bits| of g.
struct Whole {
  const void* g;
  bool bf16;
  int64_t R, C;
  float rt, ct;
};

// Scratch of one thread working on one matrix at a time: acc32 [C], out64 [C], total [C].
struct SweepScratch {
  std::vector<float> acc32;
  std::vector<double> out64, total;
  void fit(int64_t C) {
    if (static_cast<int64_t>(acc32.size()) < C) {
      acc32.resize(C);
      out64.resize(C);
      total.resize(C);
    }
  }
};

void init_scales(const Whole& w, float* r, float* c) {
  std::fill(r, r + w.R, 1.f);
  std::fill(c, c + w.C, 1.f);
}

// On the calling thread alone.
uint32_t sinkhorn_serial(const cpu::Kernels& kern, const Whole& w, int64_t iters, float eps,
                         float* r, float* c, SweepScratch& s) {
  s.fit(w.C);
  init_scales(w, r, c);
  uint32_t bits = 0;
  const int64_t K = cpu::rows_per_chunk(w.C);
  for (int64_t it = 0; it < iters; ++it) {
    std::fill(s.total.begin(), s.total.begin() + w.C, 0.0);
    for (int64_t i0 = 0; i0 < w.R; i0 += K) {
      std::fill(s.out64.begin(), s.out64.begin() + w.C, 0.0);
      // (after the first sweep the matrix is in this core's cache: no prefetches)
      kern.sinkhorn_sweep(w.g, w.bf16, w.C, i0, std::min(w.R, i0 + K), it ? c : nullptr, r, w.rt,
                          eps, s.acc32.data(), s.out64.data(), it ? nullptr : &bits, it == 0);
      for (int64_t j = 0; j < w.C; ++j) s.total[j] += s.out64[j];
    }
    for (int64_t j = 0; j < w.C; ++j)
      c[j] = elementwise::sinkhorn_rescale(c[j], static_cast<float>(s.total[j]), w.ct, eps);
  }
  return bits;
}

// The chunks of each sweep spread over the threads (a large matrix); same numbers.
uint32_t sinkhorn_parallel(const cpu::Kernels& kern, const Whole& w, int64_t iters, float eps,
                           float* r, float* c) {
  init_scales(w, r, c);
  const int64_t K = cpu::rows_per_chunk(w.C);
  const int64_t chunks = (w.R + K - 1) / K;
  const int threads = threads_for(chunks, w.R * w.C);
  std::vector<double> part(static_cast<size_t>(chunks * w.C));
  std::vector<float> acc(static_cast<size_t>(threads * w.C));
  BitsPerThread bits(threads);
  for (int64_t it = 0; it < iters; ++it) {
    std::fill(part.begin(), part.end(), 0.0);
    parallel_tasks_on(threads, chunks, [&](int64_t k, int slot) {
      const int64_t i0 = k * K;
      kern.sinkhorn_sweep(w.g, w.bf16, w.C, i0, std::min(w.R, i0 + K), it ? c : nullptr, r, w.rt,
                          eps, acc.data() + slot * w.C, part.data() + k * w.C,
                          it ? nullptr : bits.at(slot), true);  // (larger than a cache)
    });
    std::vector<double> total(part.begin(), part.begin() + w.C);
    for (int64_t k = 1; k < chunks; ++k)
      for (int64_t j = 0; j < w.C; ++j) total[j] += part[k * w.C + j];
    for (int64_t j = 0; j < w.C; ++j)
      c[j] = elementwise::sinkhorn_rescale(c[j], static_cast<float>(total[j]), w.ct, eps);
  }
  return bits.nonfinite() ? cpu::kNonfiniteBits : 0u;
}

// One iteration of sinkhorn_sweep over a fragment of whole rows (rows complete locally, the
// column partials to be all-reduced): the chunks (isa.h) counted from the fragment's first row,
// as sq_sums counts them, spread over the threads; r is updated in place, row by row.
std::tuple<at::Tensor, at::Tensor> sinkhorn_sweep_cpu(const at::Tensor& grad, at::Tensor& r,
                                                      const std::optional<at::Tensor>& c,
                                                      int64_t C, double row_target, double eps,
                                                      bool check) {
  check_sinkhorn_sweep_args(grad, r, c, C, eps, kCPU);
  const auto f32 = grad.options().dtype(at::kFloat);
  at::Tensor cols = at::empty({C}, f32);
  const cpu::Kernels& kern = cpu::kernels();
  BitsPerThread bits(std::max(1, at::get_num_threads()));
  const void* g = grad.const_data_ptr();
  const bool bf16 = grad.scalar_type() == at::kBFloat16;
  const float* cp = opt_ptr(c);
  float* rp = r.data_ptr<float>();
  // rows [i0, i1) of the fragment (start 0): r is indexed by them as well
  chunked_column_sums(grad.numel(), C, 0, cols.data_ptr<float>(),
                      [&](int64_t i0, int64_t i1, float* acc32, double* out64, int slot) {
                        kern.sinkhorn_sweep(g, bf16, C, i0, i1, cp, rp,
                                            static_cast<float>(row_target),
                                            static_cast<float>(eps), acc32, out64,
                                            check ? bits.at(slot) : nullptr, true);
                      });
  return {cols, at::full({1}, check && bits.nonfinite() ? 1.0 : 0.0, f32)};
}

// A matrix is done by one thread when it is small enough to stay in that core's cache and
// there are others to keep the remaining threads busy; larger ones spread their sweeps.
constexpr int64_t kSerialMax = int64_t{1} << 21;  // elements (8 MB of fp32)

Whole whole_of(const at::Tensor& grad, int64_t R, int64_t C, double row_target,
               double col_target) {
  return {grad.const_data_ptr(), grad.scalar_type() == at::kBFloat16, R, C,
          static_cast<float>(row_target), static_cast<float>(col_target)};
}

std::tuple<at::Tensor, at::Tensor> sinkhorn_scales_cpu(const at::Tensor& grad, int64_t R,
                                                       int64_t C, int64_t iters, double eps,
                                                       double row_target, double col_target) {
  check_sinkhorn_scales_args(grad, R, C, iters, eps, kCPU);
  const auto f32 = grad.options().dtype(at::kFloat);
  at::Tensor r = at::empty({R}, f32), c = at::empty({C}, f32);
  const Whole w = whole_of(grad, R, C, row_target, col_target);
  const cpu::Kernels& kern = cpu::kernels();
  if (R * C <= kSerialMax / 8 || at::get_num_threads() == 1) {
    SweepScratch s;
    sinkhorn_serial(kern, w, iters, static_cast<float>(eps), r.data_ptr<float>(),
                    c.data_ptr<float>(), s);
  } else {
    sinkhorn_parallel(kern, w, iters, static_cast<float>(eps), r.data_ptr<float>(),
                      c.data_ptr<float>());
  }
  return {r, c};
}

// Many whole matrices: the small ones one per task (largest first), each thread with its own
// scratch; then the large ones one after the other, each spread over the threads. `done(t,
// bits, r, c, slot)` runs right after matrix t's scales, on the thread that computed them
// (for the update, while its gradient is still in that core's cache). r, c: its scales.
template <typename Done>
void sinkhorn_many(const std::vector<Whole>& mats, int64_t iters, float eps,
                   const std::vector<float*>& rs, const std::vector<float*>& cs,
                   const Done& done) {
  const cpu::Kernels& kern = cpu::kernels();
  std::vector<size_t> small, large;
  int64_t total = 0;
  for (const Whole& w : mats) total += w.R * w.C;
  const int threads_all = threads_for(static_cast<int64_t>(mats.size()), total * (iters + 1));
  for (size_t t = 0; t < mats.size(); ++t) {
    const int64_t n = mats[t].R * mats[t].C;
    (n > kSerialMax || (threads_all > 1 && n * 2 * threads_all > total && n > kSerialMax / 8)
         ? large
         : small)
        .push_back(t);
  }
  std::stable_sort(small.begin(), small.end(), [&](size_t a, size_t b) {
    return mats[a].R * mats[a].C > mats[b].R * mats[b].C;
  });
  int64_t small_work = 0;
  for (size_t t : small) small_work += mats[t].R * mats[t].C * (iters + 1);
  const int threads = threads_for(static_cast<int64_t>(small.size()), small_work);
  std::vector<SweepScratch> scratch(threads);
  parallel_tasks_on(threads, static_cast<int64_t>(small.size()), [&](int64_t k, int slot) {
    const size_t t = small[k];
    const uint32_t bits = sinkhorn_serial(kern, mats[t], iters, eps, rs[t], cs[t], scratch[slot]);
    done(t, bits, true);
  });
  for (size_t t : large) {
    const uint32_t bits = sinkhorn_parallel(kern, mats[t], iters, eps, rs[t], cs[t]);
    done(t, bits, false);
  }
}

void check_whole_list(const char* op, at::TensorList grads, at::TensorList flags,
                      at::IntArrayRef Rs, at::IntArrayRef Cs, at::ArrayRef<double> rts,
                      at::ArrayRef<double> cts, int64_t iters, double eps) {
  check_list_lengths(op, {grads.size(), flags.size(), Rs.size(), Cs.size(), rts.size(),
                          cts.size()});
  for (size_t t = 0; t < grads.size(); ++t) {
    check_sinkhorn_scales_args(grads[t], Rs[t], Cs[t], iters, eps, kCPU, op);
    check_device(grads[0], "grads[0]", grads[t], op, "grads[i]", kCPU);
    check_scale_vector(grads[t], flags[t], 1, op, "flags[i]", kCPU);
  }
}

void sinkhorn_scales_multi_cpu(at::TensorList grads, at::TensorList rs, at::TensorList cs,
                               at::TensorList flags, at::IntArrayRef Rs, at::IntArrayRef Cs,
                               at::ArrayRef<double> row_targets, at::ArrayRef<double> col_targets,
                               int64_t iters, double eps) {
  constexpr const char* op = "sage_dist::sinkhorn_scales_multi_";
  check_whole_list(op, grads, flags, Rs, Cs, row_targets, col_targets, iters, eps);
  check_list_lengths(op, {grads.size(), rs.size(), cs.size()});
  std::vector<Whole> mats;
  std::vector<float *> r, c;
  for (size_t t = 0; t < grads.size(); ++t) {
    check_scale_vector(grads[t], rs[t], Rs[t], op, "rs[i]", kCPU);
    check_scale_vector(grads[t], cs[t], Cs[t], op, "cs[i]", kCPU);
    mats.push_back(whole_of(grads[t], Rs[t], Cs[t], row_targets[t], col_targets[t]));
    r.push_back(rs[t].data_ptr<float>());
    c.push_back(cs[t].data_ptr<float>());
  }
  std::vector<float*> flag;
  for (const at::Tensor& f : flags) flag.push_back(f.data_ptr<float>());
  sinkhorn_many(mats, iters, static_cast<float>(eps), r, c, [&](size_t t, uint32_t bits, bool) {
    *flag[t] = bits >= cpu::kNonfiniteBits ? 1.f : 0.f;
  });
}

// The scales and, for a gradient that is finite, the update p <- p (1 - lr wd) - step (g r c),
// right after its scales (the gradient still in cache); a non-finite gradient leaves p as it
// is. flags[t] = 1 for those, else 0.
void sinkhorn_update_multi_cpu(at::TensorList params, at::TensorList grads, at::TensorList flags,
                               at::IntArrayRef Rs, at::IntArrayRef Cs,
                               at::ArrayRef<double> row_targets, at::ArrayRef<double> col_targets,
                               int64_t iters, double eps, double lr, double weight_decay,
                               double step) {
  constexpr const char* op = "sage_dist::sinkhorn_update_multi_";
  check_whole_list(op, grads, flags, Rs, Cs, row_targets, col_targets, iters, eps);
  check_list_lengths(op, {grads.size(), params.size()});
  std::vector<Whole> mats;
  std::vector<at::Tensor> r_store, c_store;
  std::vector<float *> r, c, flag;
  const auto f32 = grads.empty() ? at::TensorOptions() : grads[0].options().dtype(at::kFloat);
  for (size_t t = 0; t < grads.size(); ++t) {
    check_scaled_update_args(params[t], grads[t], std::nullopt, std::nullopt, Cs[t], 0, kCPU, op);
    mats.push_back(whole_of(grads[t], Rs[t], Cs[t], row_targets[t], col_targets[t]));
    r_store.push_back(at::empty({Rs[t]}, f32));
    c_store.push_back(at::empty({Cs[t]}, f32));
    r.push_back(r_store.back().data_ptr<float>());
    c.push_back(c_store.back().data_ptr<float>());
    flag.push_back(flags[t].data_ptr<float>());
  }
  sinkhorn_many(mats, iters, static_cast<float>(eps), r, c, [&](size_t t, uint32_t bits, bool serial) {
    const bool bad = bits >= cpu::kNonfiniteBits;
    *flag[t] = bad ? 1.f : 0.f;
    if (bad) return;
    const int64_t R = Rs[t], C = Cs[t];
    if (serial) {
      scaled_task(params[t], grads[t], r[t], c[t], C, 0, 0, R * C, lr, weight_decay, step);
      return;
    }
    const auto tasks = update_tasks(1, [&](size_t) { return R * C; });
    parallel_tasks(static_cast<int64_t>(tasks.size()), R * C, [&](int64_t k, int) {
      scaled_task(params[t], grads[t], r[t], c[t], C, 0, tasks[k].e0, tasks[k].e1, lr,
                  weight_decay, step);
    });
  });
}

// ---------------------------------------------------------------------------
template <typename P, typename G>
void momentum_scaled_rows(P* param, float* m, const G* grad, const float* r, const float* c,
                          int64_t n, int64_t C, int64_t start,
                          const elementwise::MomentumCoeffs& km,
                          const elementwise::ScaledCoeffs& k) {
  const RowRange rr = rows_of(n, C, start);
  const int64_t per = std::max<int64_t>(1, kTaskElems / C);
  const int64_t tasks = rr.first > rr.last ? 0 : (rr.last - rr.first + per) / per;
  parallel_tasks(tasks, n, [&](int64_t t, int) {
    const int64_t i0 = rr.first + t * per;
    for_rows(n, C, start, i0, std::min(rr.last + 1, i0 + per),
             [&](int64_t i, int64_t c0, int64_t c1, int64_t off) {
      P* pp = param + off;
      float* mm = m + off;
      const G* gg = grad + off;
      const float ri = r ? r[i] : 1.f;
      for (int64_t j = 0; j < c1 - c0; ++j) {
        const float x = elementwise::momentum(mm[j], static_cast<float>(gg[j]), km);
        mm[j] = x;
        pp[j] = static_cast<P>(elementwise::scaled_update(static_cast<float>(pp[j]), x, ri,
                                                          c ? c[c0 + j] : 1.f, k));
      }
    });
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
  m.impl("sinkhorn_sweep_", &sinkhorn_sweep_cpu);
  m.impl("sinkhorn_scales_multi_", &sinkhorn_scales_multi_cpu);
  m.impl("sinkhorn_update_multi_", &sinkhorn_update_multi_cpu);
  m.impl("momentum_scaled_update_", &momentum_scaled_update_cpu);
  m.impl("colsum_abs", &colsum_abs_cpu);
  m.impl("colsum_abs_check", &colsum_abs_check_cpu);
  m.impl("sq_sums", &sq_sums_cpu);
  m.impl("sage_update_", &sage_update_cpu);
  m.impl("scaled_update_", &scaled_update_cpu);
}

}  // namespace sage_dist
