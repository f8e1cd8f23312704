// Elementwise reduction of k equally long buffers into one: out[i] = in[0][i] op ... op in[k-1][i].
//
// Pure C++ (no torch headers): the ring all-reduce's CPU transport calls it on shared-memory
// buffers. Inputs are combined in index order 0, 1, ..., k-1 for every element, so the result
// does not depend on which process runs it. float16 and bfloat16 accumulate in float32 and round
// once at the end. `out` may alias any input: each block of elements is read completely into a
// local accumulator before it is written back.
#pragma once

#include <cstdint>

namespace fastpar {

enum class DType : int32_t {
  kFloat32 = 0,
  kFloat64 = 1,
  kFloat16 = 2,
  kBFloat16 = 3,
  kInt32 = 4,
  kInt64 = 5,
};

// Values match the order of torch.distributed.ReduceOp that the Python layer maps from; AVG is
// a SUM followed by a division, done by the caller.
enum class ReduceOp : int32_t {
  kSum = 0,
  kProduct = 1,
  kMin = 2,
  kMax = 3,
};

int64_t dtype_size(DType dtype);

// Reduces `num_inputs` (>= 1) buffers of `count` elements of `dtype` into `out`.
void reduce_buffers(const void* const* inputs, int num_inputs, void* out, int64_t count,
                    DType dtype, ReduceOp op);

}  // namespace fastpar
