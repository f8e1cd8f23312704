// CUDA elementwise reduction of k buffers (pure CUDA, no torch headers): the GPU counterpart of
// reduce.h. Its host interface (what the torch glue calls, readable by the host compiler) is
// reduce_cuda.h; launch_reduce, which instantiates the kernels, is in reduce_cuda.cu.
//
// The CUDA IPC all-reduce (ipc_ring.cu) launches none of these kernels: it combines the peers'
// chunks inside its own kernel (reduce_pack, past L1, between its barriers) and takes from here
// only the element-level parts, so that both reductions round alike: AccType, to_acc and
// from_acc (float16/bfloat16 accumulated in float32), and the ops SumOp, ProductOp, MinOp and
// MaxOp (the last two keep a NaN, through is_nan).
//
// Same contract as the CPU kernel: inputs combined in index order, float16/bfloat16 accumulated
// in float32, `out` may alias an input. Loads and stores are 16 bytes wide where every pointer is
// 16-byte aligned; the tail (and unaligned buffers) take the scalar path.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "reduce.h"
#include "reduce_cuda.h"

namespace fastpar {
namespace cuda {

template <typename T>
struct AccType {
  using type = T;
};
template <>
struct AccType<__half> {
  using type = float;
};
template <>
struct AccType<__nv_bfloat16> {
  using type = float;
};

template <typename T>
__device__ __forceinline__ typename AccType<T>::type to_acc(T v) {
  return v;
}
template <>
__device__ __forceinline__ float to_acc<__half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float to_acc<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_acc(typename AccType<T>::type v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename A>
__device__ __forceinline__ bool is_nan(A v) {
  return v != v;  // false for integers
}

struct SumOp {
  template <typename A>
  __device__ __forceinline__ static A apply(A acc, A x) { return acc + x; }
};
struct ProductOp {
  template <typename A>
  __device__ __forceinline__ static A apply(A acc, A x) { return acc * x; }
};
struct MinOp {
  template <typename A>
  __device__ __forceinline__ static A apply(A acc, A x) {
    return (x < acc || is_nan(x)) ? x : acc;
  }
};
struct MaxOp {
  template <typename A>
  __device__ __forceinline__ static A apply(A acc, A x) {
    return (x > acc || is_nan(x)) ? x : acc;
  }
};

template <typename T, int N>
struct alignas(sizeof(T) * N) Packed {
  T v[N];
};

// Each thread reduces packs of N elements starting at element `offset`; grid-stride loop.
template <typename T, typename Op, int N>
__global__ void reduce_kernel(InputPointers in, int num_inputs, T* out, int64_t offset,
                              int64_t num_packs) {
  using A = typename AccType<T>::type;
  using P = Packed<T, N>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < num_packs;
       p += stride) {
    const int64_t element = offset + p * N;
    P first = *reinterpret_cast<const P*>(static_cast<const T*>(in.ptr[0]) + element);
    A acc[N];
#pragma unroll
    for (int i = 0; i < N; ++i) acc[i] = to_acc(first.v[i]);
    for (int j = 1; j < num_inputs; ++j) {
      P next = *reinterpret_cast<const P*>(static_cast<const T*>(in.ptr[j]) + element);
#pragma unroll
      for (int i = 0; i < N; ++i) acc[i] = Op::apply(acc[i], to_acc(next.v[i]));
    }
    P result;
#pragma unroll
    for (int i = 0; i < N; ++i) result.v[i] = from_acc<T>(acc[i]);
    *reinterpret_cast<P*>(out + element) = result;
  }
}

inline int grid_for(int64_t work, int threads) {
  const int64_t blocks = (work + threads - 1) / threads;
  return static_cast<int>(blocks < 1024 ? (blocks > 0 ? blocks : 1) : 1024);
}

template <typename T, typename Op>
void launch_typed(const InputPointers& in, int num_inputs, void* out_raw, int64_t count,
                  cudaStream_t stream) {
  constexpr int kPack = 16 / sizeof(T);
  constexpr int kThreads = 256;
  T* out = static_cast<T*>(out_raw);
  bool aligned = reinterpret_cast<uintptr_t>(out) % 16 == 0;
  for (int j = 0; j < num_inputs; ++j)
    aligned = aligned && reinterpret_cast<uintptr_t>(in.ptr[j]) % 16 == 0;
  int64_t vector_packs = aligned ? count / kPack : 0;
  if (vector_packs > 0) {
    reduce_kernel<T, Op, kPack><<<grid_for(vector_packs, kThreads), kThreads, 0, stream>>>(
        in, num_inputs, out, 0, vector_packs);
  }
  const int64_t done = vector_packs * kPack;
  if (count > done) {
    reduce_kernel<T, Op, 1><<<grid_for(count - done, kThreads), kThreads, 0, stream>>>(
        in, num_inputs, out, done, count - done);
  }
}

template <typename T>
void launch_op(const InputPointers& in, int num_inputs, void* out, int64_t count, ReduceOp op,
               cudaStream_t stream) {
  switch (op) {
    case ReduceOp::kSum: return launch_typed<T, SumOp>(in, num_inputs, out, count, stream);
    case ReduceOp::kProduct: return launch_typed<T, ProductOp>(in, num_inputs, out, count, stream);
    case ReduceOp::kMin: return launch_typed<T, MinOp>(in, num_inputs, out, count, stream);
    case ReduceOp::kMax: return launch_typed<T, MaxOp>(in, num_inputs, out, count, stream);
  }
  throw std::invalid_argument("unknown reduce op " + std::to_string(static_cast<int>(op)));
}

}  // namespace cuda
}  // namespace fastpar
