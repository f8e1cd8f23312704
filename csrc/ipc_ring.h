// The host side of the CUDA IPC all-reduce (the CUDA runtime's headers only: no torch headers
// and no device code, so the host compiler reads it): the IpcRing class, which owns this rank's
// buffer and maps the peers', and what the device reports to the host. The design (buffer
// layout, barriers, failures) is described in ipc_ring.cu, which holds the kernels and the
// members of IpcRing that launch them (all_reduce, agree).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <string>

#include "reduce.h"
#include "reduce_cuda.h"
#include "ring.h"

namespace fastpar {
namespace cuda {

constexpr int kMaxRanks = kMaxInputs;

// What the device reports to the host; lives in mapped pinned memory. Written once, by the
// call that fails first (the ring's later kernels return at once without reporting), `kind`
// last, after a system-scope fence: the host reads `kind` with acquire, then the rest
// (IpcRing::failure).
struct DeviceFailure {
  int32_t kind;     // 0 none, or one of kFailure*
  int32_t culprit;  // the rank waited for (timeout, peer aborted), or the dead rank
  int32_t blamed;   // peer aborted: the rank that peer blamed (-1: none, e.g. a mismatch)
  int64_t call;     // the failing call's number (IpcRing numbers the calls it enqueues: 1, 2, ...)
  CallHeader headers[kMaxRanks];  // every rank's call (mismatch)
  int32_t dead_peer;  // written by the host: 1 + a rank whose process is gone (0: none)
};
constexpr int32_t kFailureTimeout = 1;
constexpr int32_t kFailureMismatch = 2;
constexpr int32_t kFailurePeerAborted = 3;
constexpr int32_t kFailurePeerDead = 4;
// Bytes of the control block (Control, in ipc_ring.cu) at the start of every rank's buffer.
constexpr size_t kControlBytes = 4096;

struct RankPointers {
  char* ptr[kMaxRanks];  // each rank's buffer (control block, then data), mapped in this process
};

inline void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    throw std::runtime_error(std::string("CUDA IPC all-reduce: ") + what + " failed: " +
                             cudaGetErrorString(status));
}

// A call that took its number (IpcRing::calls_) but whose kernel could not be enqueued: this
// rank's numbering now has a call that its peers' have and its stream has not.
class LaunchError : public std::runtime_error {
 public:
  LaunchError(const std::string& what, int64_t call) : std::runtime_error(what), call_(call) {}
  int64_t call() const { return call_; }

 private:
  int64_t call_;
};

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
    check_cuda(cudaMalloc(&own_, kControlBytes + 2 * chunk_bytes), "cudaMalloc");
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

  // Frees this rank's buffer. The caller has made sure no rank uses it any more (close()).
  ~IpcRing() {
    unmap_peers();
    cudaFree(own_);
    cudaFreeHost(failure_);
  }

  cudaIpcMemHandle_t handle() const {
    cudaIpcMemHandle_t handle;
    check_cuda(cudaIpcGetMemHandle(&handle, own_), "cudaIpcGetMemHandle");
    return handle;
  }

  char* buffer() const { return own_; }

  // Maps every peer's buffer; handles[p] is rank p's (handles[rank] is ignored).
  void connect(const cudaIpcMemHandle_t* handles) {
    for (int p = 0; p < world_; ++p) {
      if (p == rank_ || ranks_.ptr[p] != nullptr) continue;
      void* peer = nullptr;
      check_cuda(cudaIpcOpenMemHandle(&peer, handles[p], cudaIpcMemLazyEnablePeerAccess),
                 "cudaIpcOpenMemHandle (are all ranks on one host?)");
      ranks_.ptr[p] = static_cast<char*>(peer);
      opened_[p] = true;
    }
  }

  // Uses buffers of other rings of this process as the peers' (several endpoints of one
  // process, each on its own stream: tests of the barrier's memory ordering).
  void connect_local(char* const* buffers) {
    for (int p = 0; p < world_; ++p) {
      if (p != rank_) ranks_.ptr[p] = buffers[p];
    }
  }

  // Stops using the peers' buffers; the caller has waited for this ring's last kernel.
  void unmap_peers() {
    for (int p = 0; p < world_; ++p) {
      if (p == rank_) continue;
      if (opened_[p]) cudaIpcCloseMemHandle(ranks_.ptr[p]);
      opened_[p] = false;
      ranks_.ptr[p] = nullptr;
    }
  }

  bool connected() const {
    for (int p = 0; p < world_; ++p) {
      if (ranks_.ptr[p] == nullptr) return false;
    }
    return true;
  }

  // Enqueues the in-place all-reduce of `data` (count elements, device memory, aligned to its
  // element size) on `stream` as one kernel. kOpAvg needs a floating dtype. Failures found on
  // the device show in failure(). Returns the call's number (see calls_); a launch that fails
  // raises LaunchError with it.
  int64_t all_reduce(void* data, int64_t count, DType dtype, int32_t op, cudaStream_t stream);

  // Enqueues a call that moves no data but meets the peers' calls at a first barrier with
  // `header` (a kTorchPath announcement): a peer whose call differs fails, as this one does.
  // Returns the call's number, as all_reduce does.
  int64_t agree(const CallHeader& header, cudaStream_t stream);

  // Makes this rank's barriers fail naming `rank`, whose process is gone (any thread; the
  // spinning kernel sees it within kHostPollSpins spins).
  void report_dead_peer(int rank) {
    __atomic_store_n(&failure_->dead_peer, rank + 1, __ATOMIC_RELEASE);
  }

  // What the device reported (kind 0: nothing). Read without synchronising, so possibly while
  // the device writes it: the device writes the rest, then a system-scope fence, then `kind`
  // (meet() in ipc_ring.cu). The acquire load of `kind` pairs with that fence, so once a kind
  // is seen the loads after it see the rest. Volatile loads alone keep the compiler's order,
  // not the CPU's: a weakly ordered host (aarch64, e.g. Grace) could see the kind beside a
  // stale call number or culprit. The rest is written once, before `kind`: plain loads.
  DeviceFailure failure() const {
    DeviceFailure copy{};
    copy.kind = __atomic_load_n(&failure_->kind, __ATOMIC_ACQUIRE);
    if (copy.kind == 0) return copy;
    copy.culprit = failure_->culprit;
    copy.blamed = failure_->blamed;
    copy.call = failure_->call;
    for (int p = 0; p < kMaxRanks; ++p) {
      copy.headers[p].count = failure_->headers[p].count;
      copy.headers[p].dtype = failure_->headers[p].dtype;
      copy.headers[p].op = failure_->headers[p].op;
    }
    return copy;
  }

  int rank() const { return rank_; }
  int world() const { return world_; }

 private:
  int rank_;
  int world_;
  int64_t chunk_bytes_;
  uint64_t timeout_ns_ = 0;
  char* own_ = nullptr;
  RankPointers ranks_{};
  bool opened_[kMaxRanks] = {};  // ranks_.ptr[p] came from cudaIpcOpenMemHandle
  DeviceFailure* failure_ = nullptr;  // host view of the mapped record
  DeviceFailure* failure_device_ = nullptr;
  // Every enqueued call gets the next number, 1, 2, ..., one captured in a CUDA graph too (its
  // replays run with the number it got at capture): the kernel that fails reports its number,
  // which tells the calls before it from those after it. Numbered and launched under the mutex,
  // so that the numbers follow the order of the stream even when two threads enqueue at once.
  std::mutex enqueue_mutex_;
  int64_t calls_ = 0;  // calls enqueued so far: the last one's number
};

}  // namespace cuda
}  // namespace fastpar
