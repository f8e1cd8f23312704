// Torch glue for the shared-memory all-reduce: argument checks and dtype mapping around the pure
// C++ ring (shm_ring.h).
#include <torch/types.h>

#include "glue.h"

namespace fastpar {

ShmAllReduce::ShmAllReduce(const std::string& name, bool create, int64_t rank, int64_t world,
                           int64_t slots, int64_t chunk_bytes, double timeout_s) {
  TORCH_CHECK_VALUE(world >= 1 && rank >= 0 && rank < world,
                    "rank must be in [0, world), got rank ", rank, " of world ", world);
  TORCH_CHECK_VALUE(slots >= 3 && slots <= 64, "slots must be in [3, 64], got ", slots);
  TORCH_CHECK_VALUE(chunk_bytes > 0 && chunk_bytes % 4096 == 0,
                    "chunk_bytes must be a positive multiple of 4096, got ", chunk_bytes);
  TORCH_CHECK_VALUE(timeout_s > 0, "timeout must be positive, got ", timeout_s, " s");
  const size_t bytes = ShmRing::segment_bytes(static_cast<int>(world), static_cast<int>(slots),
                                              chunk_bytes);
  if (create) {
    segment_ = SharedSegment::create(name, bytes);
    ShmRing::format(segment_.data(), static_cast<int>(world), static_cast<int>(slots),
                    chunk_bytes);
  } else {
    segment_ = SharedSegment::open(name, bytes);
  }
  WaitPolicy policy;
  policy.timeout_s = timeout_s;
  ring_ = std::make_unique<ShmRing>(segment_.data(), segment_.size(), static_cast<int>(rank),
                                    static_cast<int>(world), static_cast<int>(slots), chunk_bytes,
                                    policy);
}

void ShmAllReduce::unlink() {
  const std::lock_guard<std::mutex> lock(mutex_);
  segment_.unlink();
}

void ShmAllReduce::all_reduce(at::Tensor& tensor, int64_t op) {
  TORCH_CHECK_VALUE(tensor.device().is_cpu(), "tensor must be a CPU tensor, got ",
                    tensor.device());
  const DType dtype = check_ring_call(tensor, op);
  const std::lock_guard<std::mutex> lock(mutex_);
  if (!ring_) throw RingClosedError("this ring all-reduce was closed");
  ring_->all_reduce(tensor.data_ptr(), tensor.numel(), dtype, static_cast<int32_t>(op));
}

int64_t ShmAllReduce::register_area(const std::vector<at::Tensor>& areas) {
  TORCH_CHECK_VALUE(!areas.empty(), "areas must hold one tensor per rank, got none");
  const int64_t bytes = static_cast<int64_t>(areas[0].nbytes());
  std::vector<char*> bases;
  for (size_t p = 0; p < areas.size(); ++p) {
    const at::Tensor& area = areas[p];
    TORCH_CHECK_VALUE(area.device().is_cpu() && area.is_contiguous(), "areas[", p,
                      "] must be a contiguous CPU tensor");
    TORCH_CHECK_VALUE(static_cast<int64_t>(area.nbytes()) == bytes, "areas[", p, "] has ",
                      area.nbytes(), " bytes; areas[0] has ", bytes);
    bases.push_back(static_cast<char*>(area.data_ptr()));
  }
  // The tensors own the mappings: the ring holds them while it may read the areas.
  auto keeper = std::make_shared<std::vector<at::Tensor>>(areas);
  const std::lock_guard<std::mutex> lock(mutex_);
  if (!ring_) throw RingClosedError("this ring all-reduce was closed");
  return ring_->register_area(std::move(bases), bytes, std::move(keeper));
}

void ShmAllReduce::agree_torch_path(const at::Tensor& tensor, int64_t op) {
  TORCH_CHECK_VALUE(op >= 0 && op < kTorchPath, "op must be a ReduceOp code, got ", op);
  const int32_t dtype = static_cast<int32_t>(tensor.scalar_type());
  const CallHeader header{tensor.numel(), kTorchPath | dtype,
                          kTorchPath | static_cast<int32_t>(op)};
  const std::lock_guard<std::mutex> lock(mutex_);
  if (!ring_) throw RingClosedError("this ring all-reduce was closed");
  ring_->agree(header);
}

void ShmAllReduce::close() {
  const std::lock_guard<std::mutex> lock(mutex_);
  ring_.reset();
  segment_.unlink();
  segment_.unmap();
}

bool ShmAllReduce::closed() const {
  const std::lock_guard<std::mutex> lock(mutex_);
  return !ring_;
}

std::string ShmAllReduce::failure() const {
  const std::lock_guard<std::mutex> lock(mutex_);
  return ring_ ? ring_->failure() : std::string();
}

}  // namespace fastpar
