// The argument checks every torch-facing function shares (declared in glue.h): dtype mapping and
// the checks of an all-reduce call, so that the same mistake raises the same error everywhere.
#include <torch/types.h>

#include "glue.h"

namespace fastpar {

DType to_native_dtype(at::ScalarType type, const char* argument) {
  switch (type) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kInt: return DType::kInt32;
    case at::kLong: return DType::kInt64;
    default:
      TORCH_CHECK(false, argument, " has dtype ", type,
                  "; expected one of float32, float64, float16, bfloat16, int32, int64");
  }
  return DType::kFloat32;  // unreachable
}

DType check_ring_call(const at::Tensor& tensor, int64_t op) {
  TORCH_CHECK_VALUE(tensor.is_contiguous(), "tensor must be contiguous");
  TORCH_CHECK_VALUE(op >= 0 && op <= kMaxRingOp, "op must be 0..", kMaxRingOp, ", got ", op);
  TORCH_CHECK_VALUE(op != kOpAvg || at::isFloatingType(tensor.scalar_type()),
                    "op AVG needs a floating-point tensor, got ", tensor.scalar_type());
  return to_native_dtype(tensor.scalar_type(), "tensor");
}

}  // namespace fastpar
