// Multi-tensor apply for the CUDA kernels: ONE launch over a list of tensors; and what every
// CUDA kernel shares (sm_count; AliasCheck: nothing a kernel writes overlaps another
// argument; check_not_capturing: no CUDA graph capture of a multi-tensor call).
//
// The host writes, in pinned memory, one record of K int64 words per tensor (pointers, sizes,
// geometry: whatever the op needs) followed by a chunk table of (tensor, first element)
// pairs, copies it to the device once on the current stream, and launches one block per
// chunk (launch::kChunk elements). Thread t of a block calls op(record, i0, end, stride) once
// for its elements i0 = first + t, i0 + stride, ... < end, so an op can set up its index
// arithmetic once per thread (launch::Pos) instead of once per element.
//
// The table lives in pinned host memory that the caching host allocator recycles once the
// copy is done; a CUDA graph replaying the copy would read whatever is there by then, so a
// multi-tensor call refuses to run while its stream is being captured (the single-tensor ops
// need no table and can be captured).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "sage_dist/launch.h"

namespace sage_dist {

// The device's SM count, queried once per device (no driver call per launch, none during a
// CUDA graph capture after the first eager call).
inline int sm_count(int device) {
  static std::atomic<int> cache[64] = {};
  if (device >= 0 && device < 64) {
    const int known = cache[device].load(std::memory_order_relaxed);
    if (known > 0) return known;
  }
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  if (device >= 0 && device < 64) cache[device].store(count, std::memory_order_relaxed);
  return count;
}

// Refuses a call whose written tensors share memory with any other tensor it touches (the
// kernels' pointers are __restrict__: such a call would give undefined results). Add every
// tensor of the call, then check(); names are formatted only for the error.
class AliasCheck {
 public:
  explicit AliasCheck(const char* op) : op_(op) {}

  // `index` >= 0 names list entries: "params[3]".
  void add(const char* name, const at::Tensor& t, bool written, int64_t index = -1) {
    if (!t.defined()) return;
    ranges_.push_back({reinterpret_cast<uintptr_t>(t.data_ptr()),
                       static_cast<int64_t>(t.numel()) * static_cast<int64_t>(t.element_size()),
                       written});
    names_.push_back({name, index});
  }
  void add(const char* name, const std::optional<at::Tensor>& t, bool written,
           int64_t index = -1) {
    if (t) add(name, *t, written, index);
  }

  void check() const {
    const launch::Clash c = launch::find_write_overlap(ranges_);
    // Named in argument order, whichever the address order found first.
    TORCH_CHECK(c.a < 0, op_, ": ", name(std::min(c.a, c.b)), " and ", name(std::max(c.a, c.b)),
                " share memory; this kernel needs what it writes to overlap no other argument "
                "(pass separate tensors)");
  }

 private:
  std::string name(int64_t i) const {
    if (i < 0) return "";
    const auto& n = names_[static_cast<size_t>(i)];
    return n.second < 0 ? std::string(n.first)
                        : std::string(n.first) + "[" + std::to_string(n.second) + "]";
  }

  const char* op_;
  std::vector<launch::Range> ranges_;
  std::vector<std::pair<const char*, int64_t>> names_;
};

namespace multi_tensor {

constexpr int kThreads = launch::kThreads;
constexpr int64_t kChunk = launch::kChunk;

// Refuses while `stream` is being captured into a CUDA graph (see the top of this file).
inline void check_not_capturing(const char* op, cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  TORCH_CHECK(status == cudaStreamCaptureStatusNone, op,
              ": cannot be captured in a CUDA graph (its pointer table is copied from pinned "
              "host memory that is recycled after the call, so a replay would read a stale "
              "table); run the optimizer step outside graph capture, or call the "
              "single-tensor op per tensor");
}

// Word K-1 of every record is the tensor's element count.
template <int K, typename Op>
__global__ void apply_kernel(const int64_t* __restrict__ meta, int64_t ntensors, Op op) {
  const int64_t* chunk = meta + K * ntensors + 2 * static_cast<int64_t>(blockIdx.x);
  const int64_t* rec = meta + K * chunk[0];
  const int64_t end = min(rec[K - 1], chunk[1] + kChunk);
  op(rec, chunk[1] + threadIdx.x, end, static_cast<int64_t>(blockDim.x));
}

template <int K, typename Op>
void apply(const char* op_name, const std::vector<std::array<int64_t, K>>& records,
           const at::Device& device, Op op) {
  if (records.empty()) return;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  check_not_capturing(op_name, stream);
  const int64_t nt = static_cast<int64_t>(records.size());
  int64_t nchunks = 0;
  for (const auto& r : records) nchunks += launch::chunks_of(r[K - 1]);
  if (nchunks == 0) return;
  TORCH_CHECK(nchunks <= launch::kMaxGridX, op_name, ": ", nchunks, " chunks of ", kChunk,
              " elements exceed the grid limit of ", launch::kMaxGridX, " blocks");
  at::Tensor meta = at::empty({K * nt + 2 * nchunks},
                              at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* h = meta.data_ptr<int64_t>();
  int64_t* table = h + K * nt;
  for (int64_t t = 0; t < nt; ++t) {
    for (int k = 0; k < K; ++k) h[K * t + k] = records[t][k];
    for (int64_t b = 0; b < records[t][K - 1]; b += kChunk) {
      *table++ = t;
      *table++ = b;
    }
  }
  // The caching host allocator keeps the pinned block until this copy is done.
  const at::Tensor dmeta = meta.to(at::TensorOptions().device(device), /*non_blocking=*/true);
  apply_kernel<K, Op><<<static_cast<unsigned>(nchunks), kThreads, 0, stream>>>(
      dmeta.const_data_ptr<int64_t>(), nt, op);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
__device__ inline T* ptr(int64_t word) {
  return reinterpret_cast<T*>(word);
}

inline int64_t word(const void* p) { return reinterpret_cast<int64_t>(p); }

// Calls f(param dtype, grad dtype, indices) once per dtype pair present in the lists, so that
// each launch has one kernel instantiation.
template <typename F>
void for_each_dtype_pair(at::TensorList params, at::TensorList grads, F&& f) {
  for (const auto pt : {at::kFloat, at::kBFloat16}) {
    for (const auto gt : {at::kFloat, at::kBFloat16}) {
      std::vector<size_t> idx;
      for (size_t i = 0; i < params.size(); ++i)
        if (params[i].scalar_type() == pt && grads[i].scalar_type() == gt) idx.push_back(i);
      if (!idx.empty()) f(pt, gt, idx);
    }
  }
}

}  // namespace multi_tensor
}  // namespace sage_dist
