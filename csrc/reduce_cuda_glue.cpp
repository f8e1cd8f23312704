// Torch glue for the CUDA reduction (reduce_cuda.h; its kernels are in reduce_kernels.cuh and
// reduce_cuda.cu): argument checks, device guard, current stream. Compiled by the host compiler,
// and to nothing in a CPU build (no FASTPAR_WITH_CUDA).
#ifdef FASTPAR_WITH_CUDA
// c10 headers only: ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers this file needs not.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/types.h>

#include "glue.h"
#include "reduce_cuda.h"

namespace fastpar {

void reduce_buffers_cuda(const std::vector<at::Tensor>& inputs, at::Tensor& out, int64_t op) {
  TORCH_CHECK(!inputs.empty(), "inputs must hold at least one tensor");
  TORCH_CHECK(static_cast<int>(inputs.size()) <= cuda::kMaxInputs, "at most ",
              cuda::kMaxInputs, " inputs, got ", inputs.size());
  TORCH_CHECK(op >= 0 && op <= static_cast<int64_t>(ReduceOp::kMax), "op must be 0..3, got ", op);
  TORCH_CHECK(out.is_cuda(), "out must be a CUDA tensor, got ", out.device());
  TORCH_CHECK(out.is_contiguous(), "out must be contiguous");
  const DType dtype = to_native_dtype(out.scalar_type(), "out");
  cuda::InputPointers pointers{};
  for (size_t j = 0; j < inputs.size(); ++j) {
    const at::Tensor& t = inputs[j];
    TORCH_CHECK(t.device() == out.device(), "inputs[", j, "] is on ", t.device(),
                "; expected ", out.device(), " like out");
    TORCH_CHECK(t.is_contiguous(), "inputs[", j, "] must be contiguous");
    TORCH_CHECK(t.scalar_type() == out.scalar_type(), "inputs[", j, "] has dtype ",
                t.scalar_type(), "; expected ", out.scalar_type(), " like out");
    TORCH_CHECK(t.numel() == out.numel(), "inputs[", j, "] has ", t.numel(),
                " elements; expected ", out.numel(), " like out");
    pointers.ptr[j] = t.data_ptr();
  }
  const c10::cuda::CUDAGuard guard(out.device());
  cuda::launch_reduce(pointers, static_cast<int>(inputs.size()), out.data_ptr(), out.numel(),
                      dtype, static_cast<ReduceOp>(op), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace fastpar

#endif  // FASTPAR_WITH_CUDA
