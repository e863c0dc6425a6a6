// Multi-tensor apply for the CUDA kernels: ONE launch over a list of tensors.
//
// The host writes, in pinned memory, one record of K int64 words per tensor (pointers, sizes,
// geometry: whatever the op needs) followed by a chunk table of (tensor, first element)
// pairs, copies it to the device once on the current stream, and launches one block per
// chunk. Each thread of a block calls op(record, i) for its elements i of the chunk.
// COMPILED, NEVER RUN: no GPU was available where this was written (see README).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <array>
#include <vector>

namespace sage_dist {
namespace multi_tensor {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 16384;  // elements per block

// Word K-1 of every record is the tensor's element count.
template <int K, typename Op>
__global__ void apply_kernel(const int64_t* __restrict__ meta, int64_t ntensors, Op op) {
  const int64_t* chunk = meta + K * ntensors + 2 * static_cast<int64_t>(blockIdx.x);
  const int64_t* rec = meta + K * chunk[0];
  const int64_t end = min(rec[K - 1], chunk[1] + kChunk);
  for (int64_t i = chunk[1] + threadIdx.x; i < end; i += blockDim.x) op(rec, i);
}

template <int K, typename Op>
void apply(const std::vector<std::array<int64_t, K>>& records, const at::Device& device, Op op) {
  if (records.empty()) return;
  const int64_t nt = static_cast<int64_t>(records.size());
  int64_t nchunks = 0;
  for (const auto& r : records) nchunks += (r[K - 1] + kChunk - 1) / kChunk;
  if (nchunks == 0) return;
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
  apply_kernel<K, Op><<<static_cast<unsigned>(nchunks), kThreads, 0,
                        c10::cuda::getCurrentCUDAStream()>>>(dmeta.const_data_ptr<int64_t>(),
                                                             nt, op);
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
