// CPU implementation of reduce.h: blocked loops the compiler vectorises (-O3).
#include "reduce.h"

#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace fastpar {
namespace {

// Elements per block: the accumulator stays in L1 while every input streams through it once.
constexpr int64_t kBlock = 1024;

// --- 16-bit float conversions (bit exact with c10::Half / c10::BFloat16) ----------------------

inline float bf16_to_float(uint16_t bits) {
  uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);                     // round to nearest even
  return static_cast<uint16_t>(u >> 16);
}

struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

inline float load_as_float(Half h) {
  _Float16 v;
  std::memcpy(&v, &h.bits, sizeof(v));
  return static_cast<float>(v);
}
inline float load_as_float(BFloat16 b) { return bf16_to_float(b.bits); }
inline Half store_from_float(float f, Half) {
  _Float16 v = static_cast<_Float16>(f);
  Half h;
  std::memcpy(&h.bits, &v, sizeof(v));
  return h;
}
inline BFloat16 store_from_float(float f, BFloat16) { return BFloat16{float_to_bf16(f)}; }

// --- storage type -> accumulator type ----------------------------------------------------------

template <typename T>
struct Acc {
  using type = T;
  static type load(T v) { return v; }
  static T store(type v) { return v; }
};
template <>
struct Acc<Half> {
  using type = float;
  static float load(Half v) { return load_as_float(v); }
  static Half store(float v) { return store_from_float(v, Half{}); }
};
template <>
struct Acc<BFloat16> {
  using type = float;
  static float load(BFloat16 v) { return load_as_float(v); }
  static BFloat16 store(float v) { return store_from_float(v, BFloat16{}); }
};

// --- the combine functions (NaN propagates through MIN/MAX as in torch) ------------------------

template <typename A>
inline bool is_nan(A v) {
  if constexpr (std::is_floating_point_v<A>) {
    return v != v;
  } else {
    return false;
  }
}

struct SumOp {
  template <typename A>
  static A apply(A acc, A x) { return acc + x; }
};
struct ProductOp {
  template <typename A>
  static A apply(A acc, A x) { return acc * x; }
};
struct MinOp {
  template <typename A>
  static A apply(A acc, A x) { return (x < acc || is_nan(x)) ? x : acc; }
};
struct MaxOp {
  template <typename A>
  static A apply(A acc, A x) { return (x > acc || is_nan(x)) ? x : acc; }
};

template <typename T, typename Op>
void reduce_typed(const void* const* inputs, int num_inputs, void* out_raw, int64_t count) {
  using A = typename Acc<T>::type;
  T* out = static_cast<T*>(out_raw);
  A acc[kBlock];
  for (int64_t start = 0; start < count; start += kBlock) {
    const int64_t n = count - start < kBlock ? count - start : kBlock;
    const T* first = static_cast<const T*>(inputs[0]) + start;
    for (int64_t i = 0; i < n; ++i) acc[i] = Acc<T>::load(first[i]);
    for (int j = 1; j < num_inputs; ++j) {
      const T* in = static_cast<const T*>(inputs[j]) + start;
      for (int64_t i = 0; i < n; ++i) acc[i] = Op::apply(acc[i], Acc<T>::load(in[i]));
    }
    T* dst = out + start;
    for (int64_t i = 0; i < n; ++i) dst[i] = Acc<T>::store(acc[i]);
  }
}

template <typename T>
void reduce_dispatch_op(const void* const* inputs, int num_inputs, void* out, int64_t count,
                        ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum: return reduce_typed<T, SumOp>(inputs, num_inputs, out, count);
    case ReduceOp::kProduct: return reduce_typed<T, ProductOp>(inputs, num_inputs, out, count);
    case ReduceOp::kMin: return reduce_typed<T, MinOp>(inputs, num_inputs, out, count);
    case ReduceOp::kMax: return reduce_typed<T, MaxOp>(inputs, num_inputs, out, count);
  }
  throw std::invalid_argument("reduce_buffers: unknown op " +
                              std::to_string(static_cast<int>(op)));
}

}  // namespace

int64_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return 4;
    case DType::kFloat64: return 8;
    case DType::kFloat16: return 2;
    case DType::kBFloat16: return 2;
    case DType::kInt32: return 4;
    case DType::kInt64: return 8;
  }
  throw std::invalid_argument("unknown dtype " + std::to_string(static_cast<int>(dtype)));
}

void reduce_buffers(const void* const* inputs, int num_inputs, void* out, int64_t count,
                    DType dtype, ReduceOp op) {
  if (num_inputs < 1) throw std::invalid_argument("reduce_buffers: needs at least one input");
  if (count <= 0) return;
  switch (dtype) {
    case DType::kFloat32: return reduce_dispatch_op<float>(inputs, num_inputs, out, count, op);
    case DType::kFloat64: return reduce_dispatch_op<double>(inputs, num_inputs, out, count, op);
    case DType::kFloat16: return reduce_dispatch_op<Half>(inputs, num_inputs, out, count, op);
    case DType::kBFloat16:
      return reduce_dispatch_op<BFloat16>(inputs, num_inputs, out, count, op);
    case DType::kInt32: return reduce_dispatch_op<int32_t>(inputs, num_inputs, out, count, op);
    case DType::kInt64: return reduce_dispatch_op<int64_t>(inputs, num_inputs, out, count, op);
  }
  throw std::invalid_argument("reduce_buffers: unknown dtype " +
                              std::to_string(static_cast<int>(dtype)));
}

}  // namespace fastpar
