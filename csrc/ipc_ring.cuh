// The all-reduce of n GPUs (or n processes sharing a GPU) on one host through CUDA IPC (pure
// CUDA, no torch headers): the GPU counterpart of shm_ring.h.
//
// Every rank allocates one device buffer: a control block (flags written by the peers, their
// call headers, an abort word) and a data area of `chunk_bytes`. The buffers are exchanged as
// cudaIpcMemHandle_t (by the Python layer, through the process group's store, once), so every
// rank can load and store every rank's buffer. A call is enqueued on one stream as, per chunk:
//   copy in  : the chunk of the caller's tensor -> own data area (cudaMemcpyAsync);
//   barrier  : every rank has copied (and, on a call's first chunk, announced the same header);
//   reduce   : own 1/n part of the chunk = part of rank 0 op part of rank 1 op ... (rank order,
//              fastpar::cuda::launch_reduce: 16-byte vector loads, float32 accumulation for
//              16-bit floats), written over the own data area's part;
//   barrier  : every part is reduced;
//   gather   : every rank's part -> the caller's tensor (16-byte loads from the peers' buffers);
//   barrier  : nobody reads a data area any more, so the next chunk may overwrite it.
// Results are bitwise identical on all ranks: each element is combined once, in rank order.
// Like the CPU transport (shm_ring.h says why), this is a direct reduce-scatter and all-gather
// over buffers every rank can address, not a neighbour ring, as vLLM's custom all-reduce does.
//
// A barrier is one block of n threads: thread p stores the barrier's number into rank p's flag
// slot for this rank with st.release.sys (after __threadfence_system), then polls this rank's
// slot for rank p with ld.acquire.sys until it reaches the number. Barrier numbers only grow.
// Each poll is bounded by the timeout (%globaltimer); a timeout, or different headers, sets the
// own abort word (later kernels of this ring return at once, and the caller's tensor is never
// written) and writes what happened into a host-mapped record that the host reads before the
// next call (the host never blocks on the device for this).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "reduce.h"
#include "reduce_kernels.cuh"
#include "ring.h"

namespace fastpar {
namespace cuda {

constexpr int kMaxRanks = kMaxInputs;

// What the device reports to the host; lives in mapped pinned memory.
struct DeviceFailure {
  int32_t kind;     // 0 none, kFailureTimeout, kFailureMismatch
  int32_t culprit;  // the rank waited for (timeout)
  CallHeader headers[kMaxRanks];  // every rank's call (mismatch)
};
constexpr int32_t kFailureTimeout = 1;
constexpr int32_t kFailureMismatch = 2;

// Start of every rank's buffer.
struct Control {
  uint64_t flags[kMaxRanks];      // [p]: the last barrier rank p has reached, stored by rank p
  CallHeader headers[kMaxRanks];  // [p]: rank p's call, stored by rank p before its flag
  uint32_t abort;                 // set by this rank's own kernels only
};
constexpr size_t kControlBytes = 4096;
static_assert(sizeof(Control) <= kControlBytes, "control block too large");

struct RankPointers {
  char* ptr[kMaxRanks];  // each rank's buffer (control block, then data), mapped in this process
};

__device__ __forceinline__ void store_release_sys(uint64_t* address, uint64_t value) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(address), "l"(value) : "memory");
}

__device__ __forceinline__ uint64_t load_acquire_sys(const uint64_t* address) {
  uint64_t value;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(value) : "l"(address) : "memory");
  return value;
}

__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  return now;
}

__device__ __forceinline__ bool aborted(const uint32_t* abort) {
  return *static_cast<const volatile uint32_t*>(abort) != 0;
}

// One block of kMaxRanks threads; thread p talks to rank p. What goes wrong is gathered in
// shared memory first: atomics on host-mapped memory are not portable, plain stores are.
__global__ void barrier_kernel(RankPointers ranks, int rank, int world, uint64_t barrier,
                               CallHeader header, bool check_headers, uint64_t timeout_ns,
                               DeviceFailure* failure) {
  Control* own = reinterpret_cast<Control*>(ranks.ptr[rank]);
  if (aborted(&own->abort)) return;
  __shared__ int kind;
  __shared__ int culprit;
  if (threadIdx.x == 0) {
    kind = 0;
    culprit = -1;
  }
  __syncthreads();
  const int peer = threadIdx.x;
  if (peer < world && peer != rank) {
    Control* theirs = reinterpret_cast<Control*>(ranks.ptr[peer]);
    if (check_headers) theirs->headers[rank] = header;
    // Everything this rank wrote before (the copied chunk, the reduced part, by earlier work on
    // the stream) becomes visible to the peer that acquires the flag.
    __threadfence_system();
    store_release_sys(&theirs->flags[rank], barrier);
    const uint64_t start = global_timer_ns();
    while (load_acquire_sys(&own->flags[peer]) < barrier) {
      if (*static_cast<volatile int*>(&kind) != 0) break;  // another peer timed out already
      if (global_timer_ns() - start > timeout_ns) {
        if (atomicCAS(&kind, 0, kFailureTimeout) == 0) culprit = peer;
        break;
      }
      __nanosleep(64);
    }
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  // The peers' headers were stored before the flags acquired above; volatile loads read them
  // from memory, never from a cache line of an earlier call.
  auto header_of = [&](int p) {
    if (p == rank) return header;
    const volatile CallHeader* stored = &own->headers[p];
    return CallHeader{stored->count, stored->dtype, stored->op};
  };
  if (kind == 0 && check_headers) {
    for (int p = 0; p < world; ++p) {
      const CallHeader call = header_of(p);
      if (call.count != header.count || call.dtype != header.dtype || call.op != header.op)
        kind = kFailureMismatch;
    }
  }
  if (kind == 0) return;
  volatile DeviceFailure* report = failure;
  report->culprit = culprit;
  for (int p = 0; p < world; ++p) {
    const CallHeader call = header_of(p);
    report->headers[p].count = call.count;
    report->headers[p].dtype = call.dtype;
    report->headers[p].op = call.op;
  }
  __threadfence_system();
  report->kind = kind;  // last: the host reads the rest once it sees this
  atomicExch(&own->abort, 1u);
  __threadfence_system();
}

// out[0, bytes) = the parts of the chunk: bytes [q * part_bytes, (q + 1) * part_bytes) come from
// rank q's data area. part_bytes is a multiple of 64, so no 16-byte pack spans two ranks.
__global__ void gather_kernel(RankPointers ranks, int rank, int world, char* out, int64_t bytes,
                              int64_t part_bytes, bool vectorized) {
  const Control* own = reinterpret_cast<const Control*>(ranks.ptr[rank]);
  if (aborted(&own->abort)) return;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  auto source = [&](int64_t offset) {
    int owner = static_cast<int>(offset / part_bytes);
    owner = owner < world ? owner : world - 1;
    return ranks.ptr[owner] + kControlBytes + offset;
  };
  int64_t done = 0;
  if (vectorized) {
    const int64_t packs = bytes / 16;
    for (int64_t p = first; p < packs; p += stride) {
      *reinterpret_cast<uint4*>(out + p * 16) = *reinterpret_cast<const uint4*>(source(p * 16));
    }
    done = packs * 16;
  }
  for (int64_t i = done + first; i < bytes; i += stride) out[i] = *source(i);
}

// IEEE division even under --use_fast_math, so the quotient is the one torch computes.
__device__ __forceinline__ float divide_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double divide_rn(double a, double b) { return __ddiv_rn(a, b); }

// AVG: the owner of a part divides it in place (in the accumulation type, rounded once), so
// every rank gathers the same quotient.
template <typename T>
__global__ void divide_kernel(RankPointers ranks, int rank, T* part, int64_t count, int divisor) {
  const Control* own = reinterpret_cast<const Control*>(ranks.ptr[rank]);
  if (aborted(&own->abort)) return;
  using A = typename AccType<T>::type;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += stride) {
    part[i] = from_acc<T>(divide_rn(to_acc(part[i]), static_cast<A>(divisor)));
  }
}

inline void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    throw std::runtime_error(std::string("CUDA IPC all-reduce: ") + what + " failed: " +
                             cudaGetErrorString(status));
}

class IpcRing {
 public:
  // Allocates this rank's buffer on the current device (zeroed before anyone can map it).
  IpcRing(int rank, int world, int64_t chunk_bytes, double timeout_s)
      : rank_(rank), world_(world), chunk_bytes_(chunk_bytes) {
    if (world < 1 || world > kMaxRanks || rank < 0 || rank >= world)
      throw std::invalid_argument("the CUDA IPC all-reduce supports 1.." +
                                  std::to_string(kMaxRanks) + " ranks; got rank " +
                                  std::to_string(rank) + " of " + std::to_string(world));
    if (chunk_bytes <= 0 || chunk_bytes % 4096 != 0)
      throw std::invalid_argument("chunk_bytes must be a positive multiple of 4096, got " +
                                  std::to_string(chunk_bytes));
    timeout_ns_ = static_cast<uint64_t>(timeout_s * 1e9);
    check_cuda(cudaMalloc(&own_, kControlBytes + chunk_bytes), "cudaMalloc");
    check_cuda(cudaMemset(own_, 0, kControlBytes), "cudaMemset");
    check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    check_cuda(cudaHostAlloc(&failure_, sizeof(DeviceFailure), cudaHostAllocMapped),
               "cudaHostAlloc");
    *failure_ = DeviceFailure{};
    check_cuda(cudaHostGetDevicePointer(&failure_device_, failure_, 0),
               "cudaHostGetDevicePointer");
    for (int p = 0; p < kMaxRanks; ++p) ranks_.ptr[p] = nullptr;
    ranks_.ptr[rank] = own_;
  }

  IpcRing(const IpcRing&) = delete;
  IpcRing& operator=(const IpcRing&) = delete;

  // Frees this rank's buffer and unmaps the peers'. The caller has synchronised the stream.
  ~IpcRing() {
    for (int p = 0; p < world_; ++p) {
      if (p != rank_ && ranks_.ptr[p] != nullptr) cudaIpcCloseMemHandle(ranks_.ptr[p]);
    }
    cudaFree(own_);
    cudaFreeHost(failure_);
  }

  cudaIpcMemHandle_t handle() const {
    cudaIpcMemHandle_t handle;
    check_cuda(cudaIpcGetMemHandle(&handle, own_), "cudaIpcGetMemHandle");
    return handle;
  }

  // Maps every peer's buffer; handles[p] is rank p's (handles[rank] is ignored).
  void connect(const cudaIpcMemHandle_t* handles) {
    for (int p = 0; p < world_; ++p) {
      if (p == rank_ || ranks_.ptr[p] != nullptr) continue;
      void* peer = nullptr;
      check_cuda(cudaIpcOpenMemHandle(&peer, handles[p], cudaIpcMemLazyEnablePeerAccess),
                 "cudaIpcOpenMemHandle (are all ranks on one host?)");
      ranks_.ptr[p] = static_cast<char*>(peer);
    }
  }

  // Enqueues the in-place all-reduce of `data` (count elements, device memory) on `stream`.
  // kOpAvg needs a floating dtype. Failures found on the device show in failure().
  void all_reduce(void* data, int64_t count, DType dtype, int32_t op, cudaStream_t stream) {
    const int64_t element_size = dtype_size(dtype);
    const int64_t chunk_count = chunk_bytes_ / element_size;
    const int64_t chunks = count == 0 ? 1 : (count + chunk_count - 1) / chunk_count;
    const ReduceOp reduce_op = op == kOpAvg ? ReduceOp::kSum : static_cast<ReduceOp>(op);
    const CallHeader header{count, static_cast<int32_t>(dtype), op};
    const int64_t align = 64 / element_size;
    char* own_data = own_ + kControlBytes;
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t elements = std::min(chunk_count, count - c * chunk_count);
      const int64_t bytes = elements * element_size;
      char* chunk = static_cast<char*>(data) + c * chunk_count * element_size;
      if (bytes > 0)
        check_cuda(cudaMemcpyAsync(own_data, chunk, bytes, cudaMemcpyDeviceToDevice, stream),
                   "cudaMemcpyAsync");
      barrier(header, c == 0, stream);
      const Span part = portion(elements, rank_, world_, align);
      if (part.size() > 0) {
        InputPointers inputs{};
        for (int p = 0; p < world_; ++p)
          inputs.ptr[p] = ranks_.ptr[p] + kControlBytes + part.begin * element_size;
        char* result = own_data + part.begin * element_size;
        launch_reduce(inputs, world_, result, part.size(), dtype, reduce_op, stream);
        if (op == kOpAvg) divide(result, part.size(), dtype, stream);
        check_cuda(cudaGetLastError(), "the reduce kernel launch");
      }
      barrier(header, false, stream);
      if (bytes > 0) {
        const int64_t part_bytes = portion(elements, 0, world_, align).size() * element_size;
        const bool vectorized = reinterpret_cast<uintptr_t>(chunk) % 16 == 0;
        const int64_t work = vectorized ? (bytes + 15) / 16 : bytes;
        gather_kernel<<<grid_for(work, 256), 256, 0, stream>>>(ranks_, rank_, world_, chunk,
                                                                bytes, part_bytes, vectorized);
        check_cuda(cudaGetLastError(), "the gather kernel launch");
      }
      barrier(header, false, stream);
    }
  }

  // What the device reported (kind 0: nothing). Read without synchronising.
  DeviceFailure failure() const {
    DeviceFailure copy;
    const volatile DeviceFailure* source = failure_;
    copy.kind = source->kind;
    copy.culprit = source->culprit;
    for (int p = 0; p < kMaxRanks; ++p) {
      copy.headers[p].count = source->headers[p].count;
      copy.headers[p].dtype = source->headers[p].dtype;
      copy.headers[p].op = source->headers[p].op;
    }
    return copy;
  }

  int rank() const { return rank_; }
  int world() const { return world_; }

 private:
  void divide(char* part, int64_t count, DType dtype, cudaStream_t stream) {
    const int grid = grid_for(count, 256);
    switch (dtype) {
      case DType::kFloat32:
        return divide_kernel<<<grid, 256, 0, stream>>>(ranks_, rank_, reinterpret_cast<float*>(part),
                                                       count, world_);
      case DType::kFloat64:
        return divide_kernel<<<grid, 256, 0, stream>>>(
            ranks_, rank_, reinterpret_cast<double*>(part), count, world_);
      case DType::kFloat16:
        return divide_kernel<<<grid, 256, 0, stream>>>(
            ranks_, rank_, reinterpret_cast<__half*>(part), count, world_);
      case DType::kBFloat16:
        return divide_kernel<<<grid, 256, 0, stream>>>(
            ranks_, rank_, reinterpret_cast<__nv_bfloat16*>(part), count, world_);
      default:
        throw std::invalid_argument("AVG needs a floating-point dtype");
    }
  }

  void barrier(const CallHeader& header, bool check_headers, cudaStream_t stream) {
    barrier_kernel<<<1, kMaxRanks, 0, stream>>>(ranks_, rank_, world_, ++barriers_, header,
                                                check_headers, timeout_ns_, failure_device_);
    check_cuda(cudaGetLastError(), "the barrier kernel launch");
  }

  int rank_;
  int world_;
  int64_t chunk_bytes_;
  uint64_t timeout_ns_ = 0;
  uint64_t barriers_ = 0;  // the same on every rank while the ring is in step
  char* own_ = nullptr;
  RankPointers ranks_{};
  DeviceFailure* failure_ = nullptr;  // host view of the mapped record
  DeviceFailure* failure_device_ = nullptr;
};

}  // namespace cuda
}  // namespace fastpar
