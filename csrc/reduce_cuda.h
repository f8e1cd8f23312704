// The host interface of the CUDA elementwise reduction (reduce_kernels.cuh): what a host
// compiler reads (the CUDA runtime's headers only: no torch headers, no device code), for the
// torch glue (reduce_cuda_glue.cpp) and the CUDA IPC all-reduce (ipc_ring.h).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "reduce.h"

namespace fastpar {
namespace cuda {

constexpr int kMaxInputs = 8;  // peers on one host

struct InputPointers {
  const void* ptr[kMaxInputs];
};

// Enqueues out = in[0] op ... op in[k-1] on `stream`; 1 <= num_inputs <= kMaxInputs.
void launch_reduce(const InputPointers& in, int num_inputs, void* out, int64_t count, DType dtype,
                   ReduceOp op, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastpar
