// Declarations of the torch-facing functions (argument checks, device guards, dtype mapping)
// that bindings.cpp exposes to Python. Files named *_glue.* implement them (torch headers,
// TORCH_CHECK); the others are the algorithms (pure C++/CUDA). Shared checks: checks_glue.cpp.
#pragma once

#include <torch/types.h>

#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "process.h"
#include "reduce.h"
#include "ring.h"
#include "shm_pipe.h"
#include "shm_ring.h"
#include "shm_transport.h"

namespace fastpar {

// Maps a torch dtype onto the native enum; raises (TORCH_CHECK) for anything unsupported.
DType to_native_dtype(at::ScalarType type, const char* argument);

// out = inputs[0] op inputs[1] op ... (fixed order), all CPU, contiguous, same dtype and size.
void reduce_buffers_cpu(const std::vector<at::Tensor>& inputs, at::Tensor& out, int64_t op);

#ifdef FASTPAR_WITH_CUDA
// The same on CUDA tensors of one device, enqueued on the current stream.
void reduce_buffers_cuda(const std::vector<at::Tensor>& inputs, at::Tensor& out, int64_t op);
#endif

// The checks every all-reduce transport makes: a contiguous tensor of a supported dtype, op a
// ReduceOp code or kOpAvg (floating dtypes only). Returns the native dtype.
DType check_ring_call(const at::Tensor& tensor, int64_t op);

// The shared-memory all-reduce of CPU tensors (shm_ring.h) behind torch checks. Rank 0 creates
// the segment `name`, the others open it; each unlinks it once all have mapped it.
class ShmAllReduce {
 public:
  ShmAllReduce(const std::string& name, bool create, int64_t rank, int64_t world, int64_t slots,
               int64_t chunk_bytes, double timeout_s);
  // Removes the segment's name; the mapping stays (call once every rank has mapped it).
  void unlink();
  // In place on a contiguous CPU tensor; op is a ReduceOp code or kOpAvg (which sums: the
  // caller divides).
  void all_reduce(at::Tensor& tensor, int64_t op);
  // Registers memory every rank maps (areas[p]: rank p's, contiguous CPU tensors of one size;
  // kept alive until close) and returns its index; tensors inside areas[rank] are then reduced
  // without copies.
  int64_t register_area(const std::vector<at::Tensor>& areas);
  // Announces that this rank's call of `tensor` with `op` (a c10d ReduceOp code) goes to
  // torch.distributed: returns when every rank announced the same call, raises
  // RingMismatchError on every rank when some take the ring or call differently.
  void agree_torch_path(const at::Tensor& tensor, int64_t op);
  // Unmaps; later calls raise RingClosedError. Idempotent.
  void close();
  bool closed() const;
  // Why the ring is unusable after a failure ("" while usable).
  std::string failure() const;

 private:
  mutable std::mutex mutex_;  // one call at a time; close waits for a running call
  SharedSegment segment_;
  std::unique_ptr<ShmRing> ring_;
};

// One endpoint of a shared-memory pipe carrying CPU tensors between two processes of one host
// (shm_pipe.h). Each message is a header (dtype, shape) and the tensor's bytes, so shapes may
// change from message to message. The creator (create=true) formats the segment `name`, the
// peer opens it; either unlinks it once both have mapped it. One thread uses an endpoint.
class ShmTensorPipe {
 public:
  // `max_dims` and `dtypes` (empty: any) bound what send accepts: the pipe carries any tensor,
  // but must refuse what the pipeline's other links cannot carry.
  ShmTensorPipe(const std::string& name, bool create, int64_t capacity, double timeout_s,
                int64_t max_dims, const std::vector<at::ScalarType>& dtypes);
  void unlink();
  // Call once both endpoints exist (records the peer's pid for the liveness check).
  void connect();
  // Posts a CPU tensor (a contiguous copy of it if it is not); it is read until flush()
  // returns (keep it alive until then). Never waits for the peer. A tensor outside the limits
  // raises ValueError (dimensions) or TypeError (dtype).
  void send(const at::Tensor& tensor);
  // Waits until everything sent is in the pipe; returns deferred_sends().
  int64_t flush();
  // The peer's next tensor; `what` names it in errors. With `leaf`, a floating or complex
  // tensor comes back requiring grad: a leaf of autograd, as it is this process's alone.
  at::Tensor recv(const std::string& what, bool leaf);
  // Makes the peer's waits raise PipeAbortedError(text); the pipe is unusable afterwards.
  void abort(const std::string& text);
  void close();
  bool closed() const;
  std::string failure() const;
  int64_t deferred_sends() const;
  int64_t capacity() const;

 private:
  ShmPipe& pipe() const;

  SharedSegment segment_;
  std::unique_ptr<ShmPipe> pipe_;
  int64_t max_dims_;
  std::vector<bool> sendable_;  // by scalar type; empty: every type
};

#ifdef FASTPAR_WITH_CUDA
// The CUDA IPC all-reduce (ipc_ring.h) behind torch checks, on its own stream of `device`.
// Python exchanges handle() through the store and passes every rank's to connect().
class IpcAllReduce {
 public:
  IpcAllReduce(int64_t rank, int64_t world, int64_t device, int64_t chunk_bytes,
               double timeout_s);
  ~IpcAllReduce();
  // This rank's buffer as a cudaIpcMemHandle_t in a CPU uint8 tensor.
  at::Tensor handle() const;
  // This rank's buffer's device address (for connect_local).
  int64_t buffer_address() const;
  // Maps the peers' buffers; handles[p] is rank p's handle().
  void connect(const std::vector<at::Tensor>& handles);
  // Uses other endpoints of this process as the peers: addresses[p] is rank p's
  // buffer_address() (several endpoints on streams of one GPU, for tests).
  void connect_local(const std::vector<int64_t>& addresses);
  // Enqueues the in-place all-reduce of a contiguous tensor as one kernel on the ring's stream
  // (op: a ReduceOp code or kOpAvg, which divides on the device), after the work already on
  // the current stream; with block_current_stream, later work on the current stream waits for
  // it. While the current stream is capturing a CUDA graph, the kernel is captured on it.
  // Raises (RingTimeoutError, RingMismatchError, RingClosedError) what the device reported
  // about earlier calls. Returns the call's number: the ring numbers the calls it enqueues
  // (1, 2, ...; the agreements of agree_torch_path too), and failed_call() names the one that
  // failed. A call that fails on the host once numbered (its launch: RuntimeError) leaves the
  // ring unusable, as a failure on the device does, and failed_call() names it.
  int64_t all_reduce(at::Tensor& tensor, int64_t op, bool block_current_stream);
  // Announces that this rank's call of `tensor` with `op` (a c10d ReduceOp code) goes to
  // torch.distributed: a kernel meets the peers' calls at a barrier and the host waits for it;
  // raises RingMismatchError on every rank when some take the ring or call differently. Does
  // nothing while the current stream captures a CUDA graph (the host cannot wait there).
  void agree_torch_path(const at::Tensor& tensor, int64_t op);
  // Watches the peers' processes (pids[p] is rank p's pid; <= 0: not watched) until stop():
  // when one is gone, this rank's kernels fail at their next barrier poll, naming it.
  void watch_peers(const std::vector<int64_t>& pids);
  // Raises what the device reported, if anything (does not wait for the device).
  void check();
  // The ring's cudaStream_t, for torch.cuda.ExternalStream.
  int64_t stream_handle() const;
  // First step of a collective close: waits for the ring's stream and unmaps the peers'
  // buffers; later calls raise RingClosedError. Idempotent.
  void stop();
  // Last step: frees this rank's buffer (after every rank has stopped). Idempotent.
  void free();
  // stop() and free() at once: only where no peer maps this buffer (never connected).
  void close();
  bool closed() const;
  std::string failure() const;
  // The number of the call whose failure check() raised (-1 until it raised one; at once for
  // a call that failed on the host, see all_reduce): the calls numbered before it had ended,
  // those after it returned at once without running or were never enqueued (replays of a call
  // captured in a CUDA graph keep its number: fastpar/comm/work.py's CudaRingWork).
  int64_t failed_call() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};
#endif

}  // namespace fastpar
