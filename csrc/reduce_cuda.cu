// Launches the CUDA elementwise reduction (reduce_kernels.cuh) for the torch glue
// (reduce_cuda_glue.cpp), which reads its declaration in reduce_cuda.h.
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "reduce.h"
#include "reduce_cuda.h"
#include "reduce_kernels.cuh"

namespace fastpar {
namespace cuda {

// Enqueues out = in[0] op ... op in[k-1] on `stream`; 1 <= num_inputs <= kMaxInputs.
void launch_reduce(const InputPointers& in, int num_inputs, void* out, int64_t count,
                   DType dtype, ReduceOp op, cudaStream_t stream) {
  if (count <= 0) return;
  switch (dtype) {
    case DType::kFloat32: return launch_op<float>(in, num_inputs, out, count, op, stream);
    case DType::kFloat64: return launch_op<double>(in, num_inputs, out, count, op, stream);
    case DType::kFloat16: return launch_op<__half>(in, num_inputs, out, count, op, stream);
    case DType::kBFloat16:
      return launch_op<__nv_bfloat16>(in, num_inputs, out, count, op, stream);
    case DType::kInt32: return launch_op<int32_t>(in, num_inputs, out, count, op, stream);
    case DType::kInt64: return launch_op<int64_t>(in, num_inputs, out, count, op, stream);
  }
  throw std::invalid_argument("unknown dtype " + std::to_string(static_cast<int>(dtype)));
}

}  // namespace cuda
}  // namespace fastpar
