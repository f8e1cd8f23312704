// Torch glue for the CUDA IPC all-reduce (ipc_ring.h; its kernels are in ipc_ring.cu): argument
// checks, the device guard, and the ring's own stream, ordered after the caller's current stream
// (or the capturing stream itself while a CUDA graph is captured). Compiled by the host compiler,
// and to nothing in a CPU build (no FASTPAR_WITH_CUDA).
#ifdef FASTPAR_WITH_CUDA
#include <Python.h>  // first, as Python asks: the drain after a host failure lets the GIL go

// c10 headers only: ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers this file needs not.
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/types.h>

#include <cstring>
#include <exception>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "glue.h"
#include "ipc_ring.h"

namespace fastpar {
namespace {

// Whether `stream` is capturing a CUDA graph (then the host cannot wait for what it enqueues).
bool capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  cuda::check_cuda(cudaStreamIsCapturing(stream, &capture), "cudaStreamIsCapturing");
  return capture != cudaStreamCaptureStatusNone;
}

// The rings' streams, never destroyed. A ring call ties the caller's tensor to the ring's
// stream (recordStream), and when that tensor is freed, even long after the ring is gone, torch's
// caching allocator records an event on the stream; on a destroyed stream that fails inside the
// tensor's destructor, and the process aborts (std::terminate). So a ring that ends hands its
// stream back here for the next ring of the same device: idle, or still draining (a ring
// dropped without stop() may have left a call running, even one waiting for peers that left):
// such a stream is reused only once an event recorded behind that call has completed.
class RingStreams {
 public:
  // Leaked on purpose: nothing to destroy while the CUDA runtime shuts down at exit.
  static RingStreams& get() {
    static RingStreams* streams = new RingStreams();
    return *streams;
  }

  // An idle stream of the current device (`device`), at normal priority: not one of torch's
  // pooled streams, which other work also draws from (a spinning barrier would hold up whatever
  // is queued behind it).
  cudaStream_t acquire(c10::DeviceIndex device) {
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      settle_drained_locked();
      for (auto it = idle_.begin(); it != idle_.end(); ++it) {
        if (it->first == device) {
          const cudaStream_t stream = it->second;
          idle_.erase(it);
          return stream;
        }
      }
    }
    cudaStream_t stream = nullptr;
    cuda::check_cuda(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking),
                     "cudaStreamCreate");
    return stream;
  }

  // `stream` has no work left (its ring synchronized it, or never used it).
  void release(c10::DeviceIndex device, cudaStream_t stream) {
    const std::lock_guard<std::mutex> lock(mutex_);
    idle_.emplace_back(device, stream);
  }

  // `stream` may still run its ring's last call: reusable once that call has ended. Never
  // throws (it runs in a destructor); a stream whose event cannot be recorded stays out.
  void release_draining(c10::DeviceIndex device, cudaStream_t stream) noexcept {
    cudaEvent_t drained = nullptr;
    if (cudaEventCreateWithFlags(&drained, cudaEventDisableTiming) != cudaSuccess) return;
    if (cudaEventRecord(drained, stream) != cudaSuccess) {
      cudaEventDestroy(drained);
      return;
    }
    const std::lock_guard<std::mutex> lock(mutex_);
    draining_.push_back({device, stream, drained});
  }

 private:
  struct Draining {
    c10::DeviceIndex device;
    cudaStream_t stream;
    cudaEvent_t drained;
  };

  // Moves the draining streams whose last call has ended to the idle ones.
  void settle_drained_locked() {
    for (auto it = draining_.begin(); it != draining_.end();) {
      const cudaError_t state = cudaEventQuery(it->drained);
      if (state == cudaSuccess) {
        cudaEventDestroy(it->drained);
        idle_.emplace_back(it->device, it->stream);
        it = draining_.erase(it);
        continue;
      }
      // Still running: not an error of the caller's (cleared as torch's stream query does);
      // any other answer is left for the caller's own checks to report.
      if (state == cudaErrorNotReady) cudaGetLastError();
      ++it;
    }
  }

  std::mutex mutex_;
  std::vector<std::pair<c10::DeviceIndex, cudaStream_t>> idle_;
  std::vector<Draining> draining_;
};

}  // namespace

struct IpcAllReduce::Impl {
  explicit Impl(c10::DeviceIndex device_index) : device(device_index) {
    raw_stream = RingStreams::get().acquire(device);
    try {
      cuda::check_cuda(cudaEventCreateWithFlags(&ready, cudaEventDisableTiming),
                       "cudaEventCreate");
      cuda::check_cuda(cudaEventCreateWithFlags(&done, cudaEventDisableTiming),
                       "cudaEventCreate");
    } catch (...) {
      if (ready != nullptr) cudaEventDestroy(ready);
      RingStreams::get().release(device, raw_stream);
      throw;
    }
  }
  ~Impl() {
    cudaEventDestroy(ready);
    cudaEventDestroy(done);
    // A stream whose last call may still run (a ring dropped without stop()) is reused only
    // once that call has ended: the next ring's calls would queue behind a kernel waiting for
    // peers that left.
    if (idle) {
      RingStreams::get().release(device, raw_stream);
    } else {
      RingStreams::get().release_draining(device, raw_stream);
    }
  }
  Impl(const Impl&) = delete;
  Impl& operator=(const Impl&) = delete;

  c10::cuda::CUDAStream stream() const {
    return c10::cuda::getStreamFromExternal(raw_stream, device);
  }

  // `waiter` runs its later work only after the work now on `stream_before`.
  void order(cudaEvent_t event, cudaStream_t stream_before, cudaStream_t waiter) {
    cuda::check_cuda(cudaEventRecord(event, stream_before), "cudaEventRecord");
    cuda::check_cuda(cudaStreamWaitEvent(waiter, event, 0), "cudaStreamWaitEvent");
  }

  // The host's part of a call once it takes its number: `take` enqueues the kernel and returns
  // the number, `then(number)` does the rest. What either raises is raised, and leaves the ring
  // unusable (fail_on_host) once the number was taken.
  template <typename Take, typename Then>
  int64_t numbered(Take&& take, Then&& then, bool drain) {
    int64_t call = -1;
    try {
      call = take();
      then(call);
      return call;
    } catch (const cuda::LaunchError& error) {
      fail_on_host(error.call(), error.what(), drain);
      throw;
    } catch (const c10::Error& error) {
      fail_on_host(call, error.what_without_backtrace(), drain);
      throw;
    } catch (const std::exception& error) {
      fail_on_host(call, error.what(), drain);
      throw;
    }
  }

  // Call `call` took its number and then failed on the host (`what`): its kernel may not have
  // been enqueued, so this rank's next call would meet the peers' call `call` at its barriers
  // (and reduce with it where the headers match), or the caller goes on without the call. The
  // ring becomes unusable, naming the call: the calls numbered before it ended as usual, none
  // after it runs. Unless the device failed an earlier call: the ring's stream is drained
  // first (`drain`; not while a graph is captured), bounded by the timeout as every barrier
  // is, so that the device's report stands where it names an earlier call (check()).
  void fail_on_host(int64_t call, const char* what, bool drain) {
    if (call < 0) return;
    if (drain) {
      // all_reduce keeps the GIL for its launch; this wait may last the ring's timeout, and
      // the process's other Python threads (a pipeline's links, a work handle's waiters) run
      // meanwhile.
      PyThreadState* const saved = PyGILState_Check() ? PyEval_SaveThread() : nullptr;
      const cudaError_t drained = cudaStreamSynchronize(raw_stream);
      if (saved != nullptr) PyEval_RestoreThread(saved);
      if (drained != cudaSuccess) {
        cudaGetLastError();  // the error being reported, or one that broke the context for good
      }
    }
    const std::lock_guard<std::mutex> lock(failure_mutex);
    // A failure known already stands; so does a device report (check() raises it).
    if (!failure.empty() || ring->failure().kind != 0) return;
    failure = "call " + std::to_string(call) + " of the ring failed on rank " +
              std::to_string(ring->rank()) + "'s host (" + what +
              "), so its later calls would no longer meet the peers' calls of the same number";
    failed_call = call;
  }

  c10::DeviceIndex device;
  cudaStream_t raw_stream = nullptr;
  cudaEvent_t ready = nullptr;  // the caller's stream reached the call
  cudaEvent_t done = nullptr;   // the ring's stream finished the call
  bool idle = true;  // nothing enqueued on raw_stream since it was last synchronized
  std::unique_ptr<cuda::IpcRing> ring;
  bool stopped = false;  // stop() ran: no more calls
  // `failure` and `failed_call` are read and written under `failure_mutex`: check() runs on
  // several threads at once (agree_torch_path's without the GIL, FirstFailure's with it).
  mutable std::mutex failure_mutex;
  std::string failure;  // why the ring is unusable ("" while it is usable)
  int64_t failed_call = -1;  // the number of the call that failed (-1: none yet)
  std::vector<int64_t> pids;  // the watched peers' pids, for messages
  std::unique_ptr<PeerWatchdog> watchdog;  // after `ring`: destroyed (joined) before it
};

// Seconds between two checks of the peers' pids: a dead peer is noticed within about this
// (plus a few barrier polls), far below any useful timeout, for N - 1 kill(0) calls and /proc
// reads per period.
constexpr double kWatchPeriodS = 0.1;

IpcAllReduce::IpcAllReduce(int64_t rank, int64_t world, int64_t device, int64_t chunk_bytes,
                           double timeout_s) {
  TORCH_CHECK_VALUE(world >= 1 && world <= cuda::kMaxRanks && rank >= 0 && rank < world,
                    "the CUDA IPC all-reduce supports 1..", cuda::kMaxRanks,
                    " ranks; got rank ", rank, " of ", world);
  TORCH_CHECK_VALUE(device >= 0 && device < c10::cuda::device_count(), "device must be in [0, ",
                    static_cast<int>(c10::cuda::device_count()), "), got ", device);
  TORCH_CHECK_VALUE(timeout_s > 0, "timeout must be positive, got ", timeout_s, " s");
  TORCH_CHECK_VALUE(chunk_bytes > 0 && chunk_bytes % 4096 == 0,
                    "chunk_bytes must be a positive multiple of 4096, got ", chunk_bytes);
  const auto index = static_cast<c10::DeviceIndex>(device);
  const c10::cuda::CUDAGuard guard(index);
  impl_ = std::make_unique<Impl>(index);
  impl_->ring = std::make_unique<cuda::IpcRing>(static_cast<int>(rank), static_cast<int>(world),
                                                chunk_bytes, timeout_s);
}

IpcAllReduce::~IpcAllReduce() {
  if (!impl_ || !impl_->ring) return;
  if (impl_->stopped || impl_->ring->connected()) {
    // Not freed by a collective close: a peer may still map this buffer, so it is left
    // allocated until the process ends (never freed under a peer's feet).
    (void)impl_->ring.release();
    return;
  }
  try {
    close();
  } catch (...) {  // a destructor must not throw
  }
}

at::Tensor IpcAllReduce::handle() const {
  TORCH_CHECK(impl_->ring, "this ring all-reduce was closed");
  const c10::cuda::CUDAGuard guard(impl_->device);
  const cudaIpcMemHandle_t handle = impl_->ring->handle();
  at::Tensor bytes = at::empty({static_cast<int64_t>(sizeof(handle))}, at::kByte);
  std::memcpy(bytes.data_ptr(), &handle, sizeof(handle));
  return bytes;
}

int64_t IpcAllReduce::buffer_address() const {
  TORCH_CHECK(impl_->ring, "this ring all-reduce was closed");
  return reinterpret_cast<int64_t>(impl_->ring->buffer());
}

void IpcAllReduce::connect(const std::vector<at::Tensor>& handles) {
  TORCH_CHECK(impl_->ring, "this ring all-reduce was closed");
  const int world = impl_->ring->world();
  TORCH_CHECK_VALUE(static_cast<int>(handles.size()) == world,
                    "handles must hold one handle per rank (", world, "), got ", handles.size());
  std::vector<cudaIpcMemHandle_t> native(handles.size());
  for (size_t p = 0; p < handles.size(); ++p) {
    const at::Tensor& h = handles[p];
    TORCH_CHECK_VALUE(h.device().is_cpu() && h.scalar_type() == at::kByte && h.is_contiguous() &&
                          h.numel() == static_cast<int64_t>(sizeof(cudaIpcMemHandle_t)),
                      "handles[", p, "] must be a contiguous CPU uint8 tensor of ",
                      sizeof(cudaIpcMemHandle_t), " bytes");
    std::memcpy(&native[p], h.data_ptr(), sizeof(cudaIpcMemHandle_t));
  }
  const c10::cuda::CUDAGuard guard(impl_->device);
  impl_->ring->connect(native.data());
}

void IpcAllReduce::connect_local(const std::vector<int64_t>& addresses) {
  TORCH_CHECK(impl_->ring, "this ring all-reduce was closed");
  const int world = impl_->ring->world();
  TORCH_CHECK_VALUE(static_cast<int>(addresses.size()) == world,
                    "addresses must hold one buffer address per rank (", world, "), got ",
                    addresses.size());
  std::vector<char*> buffers(addresses.size());
  for (size_t p = 0; p < addresses.size(); ++p) {
    TORCH_CHECK_VALUE(addresses[p] != 0, "addresses[", p, "] is null");
    buffers[p] = reinterpret_cast<char*>(addresses[p]);
  }
  impl_->ring->connect_local(buffers.data());
}

int64_t IpcAllReduce::stream_handle() const {
  return reinterpret_cast<int64_t>(impl_->raw_stream);
}

void IpcAllReduce::check() {
  const std::lock_guard<std::mutex> lock(impl_->failure_mutex);
  if (!impl_->failure.empty())
    throw RingClosedError("this ring all-reduce is unusable after an earlier failure: " +
                          impl_->failure);
  if (!impl_->ring || impl_->stopped) throw RingClosedError("this ring all-reduce was closed");
  const cuda::DeviceFailure failure = impl_->ring->failure();
  if (failure.kind == 0) return;
  impl_->failed_call = failure.call;
  const std::string rank = std::to_string(impl_->ring->rank());
  const std::string culprit = std::to_string(failure.culprit);
  if (failure.kind == cuda::kFailureTimeout) {
    impl_->failure = "rank " + rank + " (GPU) timed out waiting for rank " + culprit + "; rank " +
                     culprit + " is dead, hung, or not calling all_reduce";
    throw RingTimeoutError(impl_->failure);
  }
  if (failure.kind == cuda::kFailurePeerDead) {
    const int dead = failure.culprit;
    const bool known = dead >= 0 && dead < static_cast<int>(impl_->pids.size());
    impl_->failure = "rank " + rank + " (GPU) stopped waiting: rank " + culprit +
                     (known ? " (pid " + std::to_string(impl_->pids[dead]) + ")" : "") +
                     " exited while an all_reduce was in flight";
    throw RingTimeoutError(impl_->failure);
  }
  if (failure.kind == cuda::kFailurePeerAborted && failure.blamed == impl_->ring->rank()) {
    impl_->failure = "rank " + rank + " (GPU) arrived late: rank " + culprit +
                     " had given up waiting for it, so this call fails here too rather than "
                     "succeed where a peer failed";
    throw RingTimeoutError(impl_->failure);
  }
  if (failure.kind == cuda::kFailurePeerAborted) {
    const std::string cause = failure.blamed >= 0 && failure.blamed != failure.culprit
                                  ? "because of rank " + std::to_string(failure.blamed)
                                  : "after an error of its own";
    impl_->failure = "rank " + rank + " (GPU) stopped waiting for rank " + culprit +
                     ", which had given up on the ring " + cause;
    throw RingTimeoutError(impl_->failure);
  }
  impl_->failure = describe_mismatch(failure.headers, impl_->ring->world()) +
                   "; the GPU found it, so the tensors of that call were left as they were";
  throw RingMismatchError(impl_->failure);
}

int64_t IpcAllReduce::all_reduce(at::Tensor& tensor, int64_t op, bool block_current_stream) {
  TORCH_CHECK_VALUE(tensor.is_cuda() && tensor.device().index() == impl_->device,
                    "tensor must be on cuda:", static_cast<int>(impl_->device), ", got ",
                    tensor.device());
  const DType dtype = check_ring_call(tensor, op);
  check();
  TORCH_CHECK(impl_->ring->connected(), "this ring all-reduce is not connected to its peers");
  const c10::cuda::CUDAGuard guard(impl_->device);
  const c10::cuda::CUDAStream current = c10::cuda::getCurrentCUDAStream(impl_->device);
  if (capturing(current.stream())) {
    // Captured into a CUDA graph: the kernel goes on the capturing stream itself (the barrier
    // counters live on the device, so every replay meets fresh barriers).
    return impl_->numbered(
        [&] {
          return impl_->ring->all_reduce(tensor.data_ptr(), tensor.numel(), dtype,
                                         static_cast<int32_t>(op), current.stream());
        },
        [](int64_t) {}, /*drain=*/false);
  }
  impl_->idle = false;
  impl_->order(impl_->ready, current.stream(), impl_->raw_stream);  // no number taken yet
  return impl_->numbered(
      [&] {
        return impl_->ring->all_reduce(tensor.data_ptr(), tensor.numel(), dtype,
                                       static_cast<int32_t>(op), impl_->raw_stream);
      },
      [&](int64_t) {
        // The caller may free the tensor once its stream moves on: keep the memory until the
        // ring is done with it.
        c10::cuda::CUDACachingAllocator::recordStream(tensor.storage().data_ptr(),
                                                      impl_->stream());
        if (block_current_stream) impl_->order(impl_->done, impl_->raw_stream, current.stream());
      },
      /*drain=*/true);
}

void IpcAllReduce::agree_torch_path(const at::Tensor& tensor, int64_t op) {
  const CallHeader header =
      torch_path_header(tensor.numel(), static_cast<int32_t>(tensor.scalar_type()), op);
  check();
  TORCH_CHECK(impl_->ring->connected(), "this ring all-reduce is not connected to its peers");
  const c10::cuda::CUDAGuard guard(impl_->device);
  if (capturing(c10::cuda::getCurrentCUDAStream(impl_->device).stream())) return;
  // After the ring's earlier calls (its own stream), not after the caller's pending work: the
  // announcement reads no tensor.
  impl_->idle = false;
  impl_->numbered([&] { return impl_->ring->agree(header, impl_->raw_stream); },
                  [&](int64_t) {
                    // Bounded: every barrier poll ends by the timeout, or sooner when a peer
                    // gave up or died.
                    cuda::check_cuda(cudaStreamSynchronize(impl_->raw_stream),
                                     "cudaStreamSynchronize");
                  },
                  /*drain=*/true);
  impl_->idle = true;
  check();
}

void IpcAllReduce::watch_peers(const std::vector<int64_t>& pids) {
  TORCH_CHECK(impl_->ring && !impl_->stopped, "this ring all-reduce was closed");
  const int world = impl_->ring->world();
  TORCH_CHECK_VALUE(static_cast<int>(pids.size()) == world,
                    "pids must hold one pid per rank (", world, "), got ", pids.size());
  std::vector<int64_t> watched = pids;
  watched[impl_->ring->rank()] = 0;  // never this process
  impl_->watchdog.reset();
  impl_->pids = pids;
  cuda::IpcRing* ring = impl_->ring.get();  // outlives the watchdog (stop() joins it first)
  impl_->watchdog = std::make_unique<PeerWatchdog>(
      std::move(watched), kWatchPeriodS, [ring](int dead) { ring->report_dead_peer(dead); });
}

void IpcAllReduce::stop() {
  if (!impl_ || !impl_->ring || impl_->stopped) return;
  const c10::cuda::CUDAGuard guard(impl_->device);
  impl_->stopped = true;
  // The watchdog keeps running meanwhile: a peer that died ends this wait early.
  cuda::check_cuda(cudaStreamSynchronize(impl_->raw_stream), "cudaStreamSynchronize");
  impl_->idle = true;
  impl_->watchdog.reset();
  impl_->ring->unmap_peers();
}

void IpcAllReduce::free() {
  if (!impl_ || !impl_->ring) return;
  stop();
  const c10::cuda::CUDAGuard guard(impl_->device);
  impl_->ring.reset();
}

void IpcAllReduce::close() { free(); }

bool IpcAllReduce::closed() const { return !impl_->ring || impl_->stopped; }

std::string IpcAllReduce::failure() const {
  const std::lock_guard<std::mutex> lock(impl_->failure_mutex);
  return impl_->failure;
}

int64_t IpcAllReduce::failed_call() const {
  const std::lock_guard<std::mutex> lock(impl_->failure_mutex);
  return impl_->failed_call;
}

}  // namespace fastpar

#endif  // FASTPAR_WITH_CUDA
