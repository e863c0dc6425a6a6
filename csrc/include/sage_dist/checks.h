// Host-side argument checks and dtype dispatch shared by every backend, so that the
// CPU and CUDA kernels reject the same inputs with the same messages (the Python
// fallback in sage_dist/ops.py mirrors these rules).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

namespace sage_dist {

inline void check_storage_dtype(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, op, ": ",
              name, " has dtype ", t.scalar_type(), "; allowed: Float, BFloat16");
}

inline void check_fp32_state(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " (optimizer state) has dtype ",
              t.scalar_type(), "; allowed: Float");
}

inline void check_contiguous(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (got sizes ", t.sizes(),
              ", strides ", t.strides(), ")");
}

inline void check_same_numel(const at::Tensor& ref, const char* ref_name, const at::Tensor& t,
                             const char* op, const char* name) {
  TORCH_CHECK(t.numel() == ref.numel(), op, ": ", name, " has ", t.numel(), " elements (sizes ",
              t.sizes(), ") but ", ref_name, " has ", ref.numel(), " (sizes ", ref.sizes(),
              "); they must have the same number of elements");
}

inline void check_device(const at::Tensor& ref, const char* ref_name, const at::Tensor& t,
                         const char* op, const char* name, c10::DeviceType expected) {
  TORCH_CHECK(t.device().type() == expected, op, ": ", name, " is on ", t.device(),
              "; this kernel needs ", c10::DeviceTypeName(expected), " tensors");
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ",
              ref_name, " is on ", ref.device(), "; all tensors must be on one device");
}

// Calls f(P{}) with P = float or c10::BFloat16 according to `type`.
template <typename F>
void dispatch_float_or_bfloat16(at::ScalarType type, const char* op, const char* name, F&& f) {
  switch (type) {
    case at::kFloat:
      f(float{});
      break;
    case at::kBFloat16:
      f(c10::BFloat16{});
      break;
    default:
      TORCH_CHECK(false, op, ": ", name, " has dtype ", type, "; allowed: Float, BFloat16");
  }
}

// Calls f(P{}, G{}) with the storage types of a parameter (P) and its gradient (G).
template <typename F>
void dispatch_param_and_grad(at::ScalarType param, at::ScalarType grad, const char* op, F&& f) {
  dispatch_float_or_bfloat16(param, op, "param", [&](auto p_tag) {
    dispatch_float_or_bfloat16(grad, op, "grad", [&](auto g_tag) { f(p_tag, g_tag); });
  });
}

// Checks shared by every lion_update_ kernel.
inline void check_lion_args(const at::Tensor& param, const at::Tensor& exp_avg,
                            const at::Tensor& grad, c10::DeviceType device_type) {
  constexpr const char* op = "sage_dist::lion_update_";
  check_storage_dtype(param, op, "param");
  check_storage_dtype(grad, op, "grad");
  check_fp32_state(exp_avg, op, "exp_avg");
  check_same_numel(param, "param", exp_avg, op, "exp_avg");
  check_same_numel(param, "param", grad, op, "grad");
  check_device(param, "param", param, op, "param", device_type);
  check_device(param, "param", exp_avg, op, "exp_avg", device_type);
  check_device(param, "param", grad, op, "grad", device_type);
  check_contiguous(param, op, "param");
  check_contiguous(exp_avg, op, "exp_avg");
  check_contiguous(grad, op, "grad");
}

// Checks shared by every lion_update_multi_ kernel: equal list lengths, then each triple as
// lion_update_ checks it.
inline void check_lion_multi_args(const at::TensorList& params, const at::TensorList& exp_avgs,
                                  const at::TensorList& grads, c10::DeviceType device_type) {
  TORCH_CHECK(params.size() == exp_avgs.size() && params.size() == grads.size(),
              "sage_dist::lion_update_multi_: params, exp_avgs and grads have ", params.size(),
              ", ", exp_avgs.size(), " and ", grads.size(), " tensors; they must have as many");
  for (size_t i = 0; i < params.size(); ++i) {
    check_lion_args(params[i], exp_avgs[i], grads[i], device_type);
    TORCH_CHECK(params[i].device() == params[0].device(), "sage_dist::lion_update_multi_: ",
                "params[", i, "] is on ", params[i].device(), " but params[0] is on ",
                params[0].device(), "; all tensors must be on one device");
  }
}

// Checks shared by every round_bf16_ kernel.
inline void check_round_bf16_args(const at::Tensor& out, const at::Tensor& src, int64_t offset,
                                  c10::DeviceType device_type) {
  constexpr const char* op = "sage_dist::round_bf16_";
  TORCH_CHECK(out.scalar_type() == at::kBFloat16, op, ": out has dtype ", out.scalar_type(),
              "; allowed: BFloat16");
  TORCH_CHECK(src.scalar_type() == at::kFloat, op, ": src has dtype ", src.scalar_type(),
              "; allowed: Float");
  TORCH_CHECK(offset >= 0, op, ": offset=", offset, " is invalid; allowed: offset >= 0");
  check_same_numel(out, "out", src, op, "src");
  check_device(out, "out", out, op, "out", device_type);
  check_device(out, "out", src, op, "src", device_type);
  check_contiguous(out, op, "out");
  check_contiguous(src, op, "src");
}

// ---------------------------------------------------------------------------
// Fragment ops: a fragment is elements [start, start + n) of the row-major flat index of
// a global [R, C] matrix; element k sits at row (start + k) / C, column (start + k) % C.
// ---------------------------------------------------------------------------
inline void check_geometry(int64_t n, int64_t C, int64_t start, const char* op) {
  TORCH_CHECK(C >= 1, op, ": C=", C, " is invalid; allowed: C >= 1");
  TORCH_CHECK(start >= 0, op, ": start=", start, " is invalid; allowed: start >= 0");
  (void)n;
}

// A per-row or per-column fp32 vector of `len` entries (any len when len < 0: checked later).
inline void check_scale_vector(const at::Tensor& ref, const at::Tensor& v, int64_t len,
                               const char* op, const char* name, c10::DeviceType device_type) {
  check_fp32_state(v, op, name);
  check_device(ref, "grad", v, op, name, device_type);
  check_contiguous(v, op, name);
  TORCH_CHECK(v.dim() == 1, op, ": ", name, " must be 1-D (got sizes ", v.sizes(), ")");
  TORCH_CHECK(len < 0 || v.numel() == len, op, ": ", name, " has ", v.numel(),
              " entries; it must have ", len);
}

// The row vector must reach the last row the fragment touches.
inline void check_rows_cover(const at::Tensor& r, int64_t n, int64_t C, int64_t start,
                             const char* op, const char* name) {
  if (n == 0) return;
  const int64_t last = (start + n - 1) / C;
  TORCH_CHECK(r.numel() > last, op, ": ", name, " has ", r.numel(),
              " entries but the fragment reaches row ", last);
}

inline void check_fragment_tensor(const at::Tensor& ref, const char* ref_name,
                                  const at::Tensor& t, const char* op, const char* name,
                                  c10::DeviceType device_type) {
  check_storage_dtype(t, op, name);
  check_device(ref, ref_name, t, op, name, device_type);
  check_contiguous(t, op, name);
}

}  // namespace sage_dist
