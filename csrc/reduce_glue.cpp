// Torch glue for the CPU reduction: checks arguments, then calls the pure C++ kernel.
#include <torch/types.h>

#include "glue.h"

namespace fastpar {

void reduce_buffers_cpu(const std::vector<at::Tensor>& inputs, at::Tensor& out, int64_t op) {
  TORCH_CHECK(!inputs.empty(), "inputs must hold at least one tensor");
  TORCH_CHECK(op >= 0 && op <= static_cast<int64_t>(ReduceOp::kMax), "op must be 0..3, got ", op);
  TORCH_CHECK(out.device().is_cpu(), "out must be a CPU tensor, got ", out.device());
  TORCH_CHECK(out.is_contiguous(), "out must be contiguous");
  const DType dtype = to_native_dtype(out.scalar_type(), "out");
  std::vector<const void*> pointers;
  pointers.reserve(inputs.size());
  for (size_t j = 0; j < inputs.size(); ++j) {
    const at::Tensor& t = inputs[j];
    TORCH_CHECK(t.device().is_cpu(), "inputs[", j, "] must be a CPU tensor, got ", t.device());
    TORCH_CHECK(t.is_contiguous(), "inputs[", j, "] must be contiguous");
    TORCH_CHECK(t.scalar_type() == out.scalar_type(), "inputs[", j, "] has dtype ",
                t.scalar_type(), "; expected ", out.scalar_type(), " like out");
    TORCH_CHECK(t.numel() == out.numel(), "inputs[", j, "] has ", t.numel(),
                " elements; expected ", out.numel(), " like out");
    pointers.push_back(t.data_ptr());
  }
  reduce_buffers(pointers.data(), static_cast<int>(pointers.size()), out.data_ptr(), out.numel(),
                 dtype, static_cast<ReduceOp>(op));
}

}  // namespace fastpar
