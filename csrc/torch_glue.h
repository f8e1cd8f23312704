// Declarations of the torch-facing functions (argument checks, device guards, dtype mapping)
// that bindings.cpp exposes to Python. Each implementation file includes this header.
#pragma once

#include <torch/types.h>

#include <vector>

#include "reduce.h"

namespace fastpar {

// Maps a torch dtype onto the native enum; raises (TORCH_CHECK) for anything unsupported.
DType to_native_dtype(at::ScalarType type, const char* argument);

// out = inputs[0] op inputs[1] op ... (fixed order), all CPU, contiguous, same dtype and size.
void reduce_buffers_cpu(const std::vector<at::Tensor>& inputs, at::Tensor& out, int64_t op);

#ifdef FASTPAR_WITH_CUDA
// The same on CUDA tensors of one device, enqueued on the current stream.
void reduce_buffers_cuda(const std::vector<at::Tensor>& inputs, at::Tensor& out, int64_t op);
#endif

}  // namespace fastpar
