// Pieces of the all-reduce shared by its transports (pure C++, no torch headers): the errors it
// raises, the call header every rank checks, how a chunk is split among the ranks, and the
// bounded wait that every flag poll goes through.
//
// Glossary: n = world size (ranks of the group), r = this rank, t = step (one chunk of one call;
// steps are numbered across calls so that flags only grow), S = slots in the ring of buffers.
#pragma once

#include <sched.h>
#include <time.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "reduce.h"

namespace fastpar {

// Reduce operations of the all-reduce: ReduceOp's codes, plus AVG (a SUM divided by n).
constexpr int32_t kOpAvg = 4;
constexpr int32_t kMaxRingOp = kOpAvg;

// A peer did not arrive in time (dead, hung, or not calling): the object is unusable afterwards.
class RingTimeoutError : public std::runtime_error {
  using std::runtime_error::runtime_error;
};
// Ranks called with different sizes, dtypes or ops: every rank raises, the object stays usable.
class RingMismatchError : public std::runtime_error {
  using std::runtime_error::runtime_error;
};
// The object was closed, or an earlier failure left it unusable.
class RingClosedError : public std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A call header whose op has this bit is a rank's announcement that its call goes to
// torch.distributed (a dtype or op the ring does not serve): dtype is then
// kTorchPath | c10::ScalarType and op kTorchPath | c10d::ReduceOp::RedOpType, so that ranks
// about to take different paths (ring vs torch.distributed) find out and all raise.
constexpr int32_t kTorchPath = 1 << 16;

// What each rank announces with its first chunk; all ranks must announce the same. A tensor in
// a registered area (memory every peer maps, allocated in the same order on every rank) names
// the area and its byte offset there: peers read it at that place, so it must be the same.
struct CallHeader {
  int64_t count;
  int32_t dtype;
  int32_t op;
  int32_t area = -1;    // index of the registered area holding the tensor; -1: none
  int64_t offset = 0;   // the tensor's byte offset in that area
};

inline bool operator==(const CallHeader& a, const CallHeader& b) {
  return a.count == b.count && a.dtype == b.dtype && a.op == b.op && a.area == b.area &&
         a.offset == b.offset;
}

inline const char* dtype_name(int32_t dtype) {
  switch (static_cast<DType>(dtype)) {
    case DType::kFloat32: return "float32";
    case DType::kFloat64: return "float64";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kInt32: return "int32";
    case DType::kInt64: return "int64";
  }
  return "unknown dtype";
}

inline const char* op_name(int32_t op) {
  static const char* const kNames[] = {"SUM", "PRODUCT", "MIN", "MAX", "AVG"};
  return op >= 0 && op <= kMaxRingOp ? kNames[op] : "unknown op";
}

// Names of c10::ScalarType 0..15 and c10d's RedOpType 0..8 (both enums' values are fixed: they
// are serialised), for the announcements of calls that go to torch.distributed.
inline const char* torch_dtype_name(int32_t type) {
  static const char* const kNames[] = {
      "uint8", "int8",       "int16", "int32", "int64", "float16", "float32", "float64",
      "complex32", "complex64", "complex128", "bool", "qint8", "quint8", "qint32", "bfloat16"};
  return type >= 0 && type < 16 ? kNames[type] : "another dtype";
}

inline const char* torch_op_name(int32_t op) {
  static const char* const kNames[] = {"SUM", "AVG",  "PRODUCT", "MIN",       "MAX",
                                       "BAND", "BOR", "BXOR",    "PREMUL_SUM"};
  return op >= 0 && op < 9 ? kNames[op] : "another op";
}

inline bool takes_torch_path(const CallHeader& h) { return (h.op & kTorchPath) != 0; }

inline std::string describe(const CallHeader& h) {
  if (takes_torch_path(h)) {
    return std::to_string(h.count) + " x " + torch_dtype_name(h.dtype & ~kTorchPath) + " " +
           torch_op_name(h.op & ~kTorchPath) + " via torch.distributed";
  }
  std::string call = std::to_string(h.count) + " x " + dtype_name(h.dtype) + " " + op_name(h.op);
  if (h.area >= 0) {
    call += " in shared area " + std::to_string(h.area) + " at byte " + std::to_string(h.offset);
  }
  return call;
}

// The announcement of a call of `count` elements of c10::ScalarType `scalar_type` with c10d op
// `op` that goes to torch.distributed.
inline CallHeader torch_path_header(int64_t count, int32_t scalar_type, int64_t op) {
  if (op < 0 || op >= kTorchPath)
    throw std::invalid_argument("op must be a ReduceOp code, got " + std::to_string(op));
  return CallHeader{count, kTorchPath | scalar_type, kTorchPath | static_cast<int32_t>(op)};
}

// Why the calls of ranks 0..world-1 (not all equal) fail: every rank's call, and whether some
// would take fastpar's ring and others torch.distributed.
inline std::string describe_mismatch(const CallHeader* calls, int world) {
  std::string list;
  bool ring_path = false;
  bool torch_path = false;
  for (int p = 0; p < world; ++p) {
    (takes_torch_path(calls[p]) ? torch_path : ring_path) = true;
    list += (p ? "; rank " : "rank ") + std::to_string(p) + ": " + describe(calls[p]);
  }
  if (ring_path && torch_path) {
    return "all_reduce would take different paths on different ranks: fastpar's ring on some, "
           "torch.distributed on others (" + list + ")";
  }
  return "all_reduce was called with different arguments on different ranks (" + list + ")";
}

// Elements [begin, end) of a chunk.
struct Span {
  int64_t begin;
  int64_t end;
  int64_t size() const { return end - begin; }
};

// The part of a chunk of `count` elements that rank `rank` of `world` reduces: equal parts
// rounded up to `align` elements (whole cache lines), so some trailing parts may be empty. Every
// rank computes the same split, so each element is reduced by exactly one rank.
inline Span portion(int64_t count, int rank, int world, int64_t align) {
  int64_t per = (count + world - 1) / world;
  per = (per + align - 1) / align * align;
  const int64_t begin = std::min(count, per * rank);
  return {begin, std::min(count, begin + per)};
}

// How a waiting rank behaves: spin (the peer is usually running on another core and arrives in
// microseconds), then yield the core (more ranks than cores: the peer may need ours), then
// sleep briefly; give up after `timeout`.
struct WaitPolicy {
  double timeout_s = 300.0;
  double spin_s = 2e-6;
  double yield_s = 2e-3;
  long sleep_ns = 20000;
};

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}

// Polls `ready()` until it holds (returns true) or the timeout passes (returns false). In the
// yield and sleep phases it also calls `check()`, which may throw to end the wait early (a peer
// that has given up already).
template <typename Ready, typename Check>
bool bounded_wait(const WaitPolicy& policy, Ready&& ready, Check&& check) {
  if (ready()) return true;
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  for (;;) {
    for (int i = 0; i < 64; ++i) {
      cpu_relax();
      if (ready()) return true;
    }
    const double elapsed = std::chrono::duration<double>(Clock::now() - start).count();
    if (elapsed < policy.spin_s) continue;
    check();
    if (elapsed > policy.timeout_s) return ready();
    if (elapsed < policy.yield_s) {
      sched_yield();
    } else {
      const timespec pause{0, policy.sleep_ns};
      nanosleep(&pause, nullptr);
    }
  }
}

}  // namespace fastpar
