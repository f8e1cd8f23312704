// Torch glue for the CUDA IPC all-reduce (ipc_ring.cuh): argument checks, the device guard, and
// the ring's own stream, ordered after the caller's current stream.
// c10 headers only: ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers this file needs not.
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/types.h>

#include <cstring>

#include "ipc_ring.cuh"
#include "torch_glue.h"

namespace fastpar {

struct IpcAllReduce::Impl {
  Impl(c10::DeviceIndex device_index, c10::cuda::CUDAStream ring_stream)
      : device(device_index), stream(ring_stream) {
    cuda::check_cuda(cudaEventCreateWithFlags(&ready, cudaEventDisableTiming), "cudaEventCreate");
    cuda::check_cuda(cudaEventCreateWithFlags(&done, cudaEventDisableTiming), "cudaEventCreate");
  }
  ~Impl() {
    cudaEventDestroy(ready);
    cudaEventDestroy(done);
  }
  Impl(const Impl&) = delete;
  Impl& operator=(const Impl&) = delete;

  // `waiter` runs its later work only after the work now on `stream_before`.
  void order(cudaEvent_t event, cudaStream_t stream_before, cudaStream_t waiter) {
    cuda::check_cuda(cudaEventRecord(event, stream_before), "cudaEventRecord");
    cuda::check_cuda(cudaStreamWaitEvent(waiter, event, 0), "cudaStreamWaitEvent");
  }

  c10::DeviceIndex device;
  c10::cuda::CUDAStream stream;
  cudaEvent_t ready = nullptr;  // the caller's stream reached the call
  cudaEvent_t done = nullptr;   // the ring's stream finished the call
  std::unique_ptr<cuda::IpcRing> ring;
  std::string failure;  // why the ring is unusable ("" while it is usable)
};

IpcAllReduce::IpcAllReduce(int64_t rank, int64_t world, int64_t device, int64_t chunk_bytes,
                           double timeout_s) {
  TORCH_CHECK_VALUE(world >= 1 && world <= cuda::kMaxRanks && rank >= 0 && rank < world,
                    "the CUDA IPC all-reduce supports 1..", cuda::kMaxRanks,
                    " ranks; got rank ", rank, " of ", world);
  TORCH_CHECK_VALUE(device >= 0 && device < c10::cuda::device_count(), "device must be in [0, ",
                    static_cast<int>(c10::cuda::device_count()), "), got ", device);
  TORCH_CHECK_VALUE(timeout_s > 0, "timeout must be positive, got ", timeout_s, " s");
  const auto index = static_cast<c10::DeviceIndex>(device);
  const c10::cuda::CUDAGuard guard(index);
  impl_ = std::make_unique<Impl>(index,
                                 c10::cuda::getStreamFromPool(/*isHighPriority=*/true, index));
  impl_->ring = std::make_unique<cuda::IpcRing>(static_cast<int>(rank), static_cast<int>(world),
                                                chunk_bytes, timeout_s);
}

IpcAllReduce::~IpcAllReduce() {
  try {
    close();
  } catch (...) {  // a destructor must not throw; close() reports errors when called directly
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

int64_t IpcAllReduce::stream_handle() const {
  return reinterpret_cast<int64_t>(impl_->stream.stream());
}

void IpcAllReduce::check() {
  if (!impl_->failure.empty())
    throw RingClosedError("this ring all-reduce is unusable after an earlier failure: " +
                          impl_->failure);
  if (!impl_->ring) throw RingClosedError("this ring all-reduce was closed");
  const cuda::DeviceFailure failure = impl_->ring->failure();
  if (failure.kind == 0) return;
  const int rank = impl_->ring->rank();
  if (failure.kind == cuda::kFailureTimeout) {
    impl_->failure = "rank " + std::to_string(rank) + " (GPU) timed out waiting for rank " +
                     std::to_string(failure.culprit) + "; rank " +
                     std::to_string(failure.culprit) +
                     " is dead, hung, or not calling all_reduce";
    throw RingTimeoutError(impl_->failure);
  }
  std::string calls;
  for (int p = 0; p < impl_->ring->world(); ++p)
    calls += (p ? "; rank " : "rank ") + std::to_string(p) + ": " + describe(failure.headers[p]);
  impl_->failure =
      "an earlier all_reduce was called with different arguments on different ranks (" + calls +
      "); the GPU found it, so the tensors of that call were left as they were";
  throw RingMismatchError(impl_->failure);
}

void IpcAllReduce::all_reduce(at::Tensor& tensor, int64_t op, bool block_current_stream) {
  TORCH_CHECK_VALUE(tensor.is_cuda() && tensor.device().index() == impl_->device,
                    "tensor must be on cuda:", static_cast<int>(impl_->device), ", got ",
                    tensor.device());
  const DType dtype = check_ring_call(tensor, op);
  check();
  const c10::cuda::CUDAGuard guard(impl_->device);
  const c10::cuda::CUDAStream current = c10::cuda::getCurrentCUDAStream(impl_->device);
  impl_->order(impl_->ready, current.stream(), impl_->stream.stream());
  impl_->ring->all_reduce(tensor.data_ptr(), tensor.numel(), dtype, static_cast<int32_t>(op),
                          impl_->stream.stream());
  // The caller may free the tensor once its stream moves on: keep the memory until the ring is
  // done with it.
  c10::cuda::CUDACachingAllocator::recordStream(tensor.storage().data_ptr(), impl_->stream);
  if (block_current_stream) impl_->order(impl_->done, impl_->stream.stream(), current.stream());
}

void IpcAllReduce::close() {
  if (!impl_ || !impl_->ring) return;
  const c10::cuda::CUDAGuard guard(impl_->device);
  impl_->stream.synchronize();
  impl_->ring.reset();
}

bool IpcAllReduce::closed() const { return !impl_->ring; }

std::string IpcAllReduce::failure() const { return impl_->failure; }

}  // namespace fastpar
