// Argument checks of the fragment ops (colsum_abs, colsum_abs_check, sq_sums, sage_update_,
// scaled_update_, momentum_scaled_update_, the Sinkhorn ops), shared by the CPU and CUDA kernels; sage_dist/ops.py mirrors them for the fake kernels
// and the pure-PyTorch fallbacks.
#pragma once

#include <initializer_list>
#include <optional>

#include "sage_dist/checks.h"

namespace sage_dist {

inline void check_colsum_abs_args(const at::Tensor& grad, int64_t C, int64_t start,
                                  c10::DeviceType dev, const char* op = "sage_dist::colsum_abs") {
  check_fragment_tensor(grad, "grad", grad, op, "grad", dev);
  check_geometry(grad.numel(), C, start, op);
}

// The momentum of SCALE's head: fp32 state beside `ref`, one value per element.
inline void check_momentum(const at::Tensor& ref, const char* ref_name, const at::Tensor& m,
                           const char* op, c10::DeviceType dev) {
  check_fp32_state(m, op, "m");
  check_device(ref, ref_name, m, op, "m", dev);
  check_contiguous(m, op, "m");
  check_same_numel(ref, ref_name, m, op, "m");
}

inline void check_sq_sums_args(const at::Tensor& grad, const std::optional<at::Tensor>& r,
                               const std::optional<at::Tensor>& c, int64_t R, int64_t C,
                               int64_t start, int64_t dim, const std::optional<at::Tensor>& m,
                               c10::DeviceType dev) {
  constexpr const char* op = "sage_dist::sq_sums";
  if (m) check_momentum(grad, "grad", *m, op, dev);
  check_fragment_tensor(grad, "grad", grad, op, "grad", dev);
  check_geometry(grad.numel(), C, start, op);
  TORCH_CHECK(R >= 1, op, ": R=", R, " is invalid; allowed: R >= 1");
  TORCH_CHECK(dim == 0 || dim == 1, op, ": dim=", dim, " is invalid; allowed: 0, 1");
  TORCH_CHECK(start + grad.numel() <= R * C, op, ": the fragment [", start, ", ",
              start + grad.numel(), ") is outside a [", R, ", ", C, "] matrix");
  if (r) check_scale_vector(grad, *r, R, op, "r", dev);
  if (c) check_scale_vector(grad, *c, C, op, "c", dev);
}

inline void check_sinkhorn_rescale_args(const at::Tensor& scale, const at::Tensor& s,
                                        c10::DeviceType dev) {
  constexpr const char* op = "sage_dist::sinkhorn_rescale";
  check_scale_vector(scale, scale, -1, op, "scale", dev);
  check_scale_vector(scale, s, scale.numel(), op, "s", dev);
}

inline void check_sinkhorn_scales_args(const at::Tensor& grad, int64_t R, int64_t C,
                                       int64_t iters, double eps, c10::DeviceType dev,
                                       const char* op = "sage_dist::sinkhorn_scales") {
  check_fragment_tensor(grad, "grad", grad, op, "grad", dev);
  TORCH_CHECK(R >= 1 && C >= 1, op, ": R=", R, ", C=", C, " is invalid; allowed: R, C >= 1");
  TORCH_CHECK(grad.numel() == R * C, op, ": grad has ", grad.numel(), " elements; the whole [",
              R, ", ", C, "] matrix has ", R * C);
  TORCH_CHECK(iters >= 1, op, ": iters=", iters, " is invalid; allowed: iters >= 1");
  TORCH_CHECK(eps > 0, op, ": eps=", eps, " is invalid; allowed: eps > 0");
}

// One Sinkhorn sweep over a fragment of whole rows (FSDP2's Shard(0)): r holds the scales of
// exactly its rows and is written in place; c is the current column scales or none (ones).
inline void check_sinkhorn_sweep_args(const at::Tensor& grad, const at::Tensor& r,
                                      const std::optional<at::Tensor>& c, int64_t C, double eps,
                                      c10::DeviceType dev) {
  constexpr const char* op = "sage_dist::sinkhorn_sweep_";
  check_fragment_tensor(grad, "grad", grad, op, "grad", dev);
  TORCH_CHECK(C >= 1, op, ": C=", C, " is invalid; allowed: C >= 1");
  TORCH_CHECK(grad.numel() % C == 0, op, ": grad has ", grad.numel(), " elements, not whole "
              "rows of ", C, " columns (the sweep needs a fragment of whole rows)");
  check_scale_vector(grad, r, grad.numel() / C, op, "r", dev);
  if (c) check_scale_vector(grad, *c, C, op, "c", dev);
  TORCH_CHECK(eps > 0, op, ": eps=", eps, " is invalid; allowed: eps > 0");
}

inline void check_sage_update_args(const at::Tensor& param, const at::Tensor& m,
                                   const at::Tensor& grad, const at::Tensor& h, int64_t C,
                                   int64_t start, c10::DeviceType dev) {
  constexpr const char* op = "sage_dist::sage_update_";
  check_fragment_tensor(param, "param", param, op, "param", dev);
  check_fragment_tensor(param, "param", grad, op, "grad", dev);
  check_fp32_state(m, op, "m");
  check_device(param, "param", m, op, "m", dev);
  check_contiguous(m, op, "m");
  check_same_numel(param, "param", m, op, "m");
  check_same_numel(param, "param", grad, op, "grad");
  check_geometry(param.numel(), C, start, op);
  check_scale_vector(param, h, C, op, "h", dev);
}

inline void check_scaled_update_args(const at::Tensor& param, const at::Tensor& grad,
                                     const std::optional<at::Tensor>& r,
                                     const std::optional<at::Tensor>& c, int64_t C,
                                     int64_t start, c10::DeviceType dev,
                                     const char* op = "sage_dist::scaled_update_") {
  check_fragment_tensor(param, "param", param, op, "param", dev);
  check_fragment_tensor(param, "param", grad, op, "grad", dev);
  check_same_numel(param, "param", grad, op, "grad");
  check_geometry(param.numel(), C, start, op);
  if (r) {
    check_scale_vector(param, *r, -1, op, "r", dev);
    check_rows_cover(*r, param.numel(), C, start, op, "r");
  }
  if (c) check_scale_vector(param, *c, C, op, "c", dev);
}

inline void check_momentum_scaled_update_args(const at::Tensor& param, const at::Tensor& m,
                                              const at::Tensor& grad,
                                              const std::optional<at::Tensor>& r,
                                              const std::optional<at::Tensor>& c, int64_t C,
                                              int64_t start, c10::DeviceType dev) {
  constexpr const char* op = "sage_dist::momentum_scaled_update_";
  check_scaled_update_args(param, grad, r, c, C, start, dev, op);
  check_momentum(param, "param", m, op, dev);
}

// The lists of a multi-tensor fragment op hold one entry per fragment.
inline void check_list_lengths(const char* op, std::initializer_list<size_t> sizes) {
  const size_t n = *sizes.begin();
  for (size_t k : sizes)
    TORCH_CHECK(k == n, op, ": the argument lists have different lengths (", n, " and ", k,
                "); they must have one entry per fragment");
}

inline void check_scaled_update_multi_args(at::TensorList params, at::TensorList grads,
                                           at::TensorList rs, at::TensorList cs,
                                           at::IntArrayRef Cs, at::IntArrayRef starts,
                                           c10::DeviceType dev) {
  constexpr const char* op = "sage_dist::scaled_update_multi_";
  check_list_lengths(op, {params.size(), grads.size(), rs.size(), cs.size(), Cs.size(),
                          starts.size()});
  for (size_t i = 0; i < params.size(); ++i) {
    check_scaled_update_args(params[i], grads[i], rs[i], cs[i], Cs[i], starts[i], dev, op);
    check_device(params[0], "params[0]", params[i], op, "params[i]", dev);
  }
}

inline void check_sage_update_multi_args(at::TensorList params, at::TensorList ms,
                                         at::TensorList grads, at::TensorList hs,
                                         at::IntArrayRef Cs, at::IntArrayRef starts,
                                         c10::DeviceType dev) {
  constexpr const char* op = "sage_dist::sage_update_multi_";
  check_list_lengths(op, {params.size(), ms.size(), grads.size(), hs.size(), Cs.size(),
                          starts.size()});
  for (size_t i = 0; i < params.size(); ++i) {
    check_sage_update_args(params[i], ms[i], grads[i], hs[i], Cs[i], starts[i], dev);
    check_device(params[0], "params[0]", params[i], op, "params[i]", dev);
  }
}

}  // namespace sage_dist
