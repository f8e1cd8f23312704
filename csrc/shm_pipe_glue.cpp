// Torch glue for the shared-memory pipe: frames each tensor as a header and its bytes.
//
// Header: int64 words [kTensorMagic, scalar type, ndim, size 0, ..., size ndim-1]. Both ends run
// the same torch build (one host, one installation), so scalar type codes agree.
#include <ATen/EmptyTensor.h>
#include <torch/types.h>

#include <cstring>

#include "glue.h"

namespace fastpar {
namespace {

constexpr int64_t kTensorMagic = 0x74656e736f72LL;  // "tensor"
constexpr int64_t kMaxDims = 64;
constexpr double kYieldSeconds = 0.05;

}  // namespace

ShmTensorPipe::ShmTensorPipe(const std::string& name, bool create, int64_t capacity,
                             double timeout_s, int64_t max_dims,
                             const std::vector<at::ScalarType>& dtypes)
    : max_dims_(max_dims) {
  TORCH_CHECK_VALUE(capacity > 0 && capacity % 4096 == 0,
                    "capacity must be a positive multiple of 4096, got ", capacity);
  TORCH_CHECK_VALUE(timeout_s > 0, "timeout must be positive, got ", timeout_s, " s");
  TORCH_CHECK_VALUE(max_dims >= 0 && max_dims <= kMaxDims, "max_dims must be in [0, ",
                    kMaxDims, "], got ", max_dims);
  if (!dtypes.empty()) {
    sendable_.assign(static_cast<size_t>(at::ScalarType::NumOptions), false);
    for (const at::ScalarType dtype : dtypes) sendable_[static_cast<size_t>(dtype)] = true;
  }
  const size_t bytes = ShmPipe::segment_bytes(capacity);
  if (create) {
    segment_ = SharedSegment::create(name, bytes);
    ShmPipe::format(segment_.data(), capacity);
  } else {
    segment_ = SharedSegment::open(name, bytes);
  }
  WaitPolicy policy;
  policy.timeout_s = timeout_s;
  // A stage waits for its neighbour up to about the other stages' compute of a step (GPipe's
  // first backward: half of it). Past yield_s every check sleeps, and a sleep ends tens of
  // microseconds late (the kernel's timer slack), on the pipeline's critical path each time;
  // yielding instead leaves the core to anything else that is runnable.
  policy.yield_s = kYieldSeconds;
  pipe_ = std::make_unique<ShmPipe>(segment_.data(), segment_.size(), create ? 0 : 1, capacity,
                                    policy);
}

ShmPipe& ShmTensorPipe::pipe() const {
  if (!pipe_) throw PipeBrokenError("this pipe was closed");
  return *pipe_;
}

void ShmTensorPipe::unlink() { segment_.unlink(); }

void ShmTensorPipe::connect() { pipe().connect(); }

// One native call per message, checks included: right after a stage's compute every line of
// Python or dispatcher code on the way costs microseconds (its caches are cold), and a peer waits.
void ShmTensorPipe::send(const at::Tensor& input) {
  TORCH_CHECK_VALUE(input.device().is_cpu(), "tensor must be a CPU tensor, got ", input.device());
  TORCH_CHECK_VALUE(input.dim() <= max_dims_, "tensor may have at most ", max_dims_,
                    " dimensions, got ", input.dim());
  TORCH_CHECK_TYPE(sendable_.empty() || sendable_[static_cast<size_t>(input.scalar_type())],
                   "tensors of dtype ", input.scalar_type(), " are not sendable");
  const at::Tensor tensor = input.is_contiguous() ? input : input.contiguous();
  int64_t words[3 + kMaxDims];
  words[0] = kTensorMagic;
  words[1] = static_cast<int64_t>(tensor.scalar_type());
  words[2] = tensor.dim();
  for (int64_t d = 0; d < tensor.dim(); ++d) words[3 + d] = tensor.size(d);
  const auto header = reinterpret_cast<const char*>(words);
  const auto header_bytes = static_cast<int64_t>((3 + tensor.dim()) * sizeof(int64_t));
  const auto* payload = static_cast<const char*>(tensor.const_data_ptr());
  const auto bytes = static_cast<int64_t>(tensor.nbytes());
  ShmPipe& sink = pipe();
  if (sink.try_send(header, header_bytes, payload, bytes)) return;
  // Kept without its autograd graph, which the sender thread must not be the one to free.
  sink.send(std::string(header, static_cast<size_t>(header_bytes)), payload, bytes,
            std::make_shared<at::Tensor>(tensor.detach()));
}

int64_t ShmTensorPipe::flush() {
  ShmPipe& sink = pipe();
  sink.flush();
  return sink.deferred_sends();
}

at::Tensor ShmTensorPipe::recv(const std::string& what, bool leaf) {
  ShmPipe& source = pipe();
  int64_t words[3];
  source.recv(reinterpret_cast<char*>(words), sizeof(words), what.c_str());
  if (words[0] != kTensorMagic || words[2] < 0 || words[2] > kMaxDims ||
      words[1] < 0 || words[1] >= static_cast<int64_t>(at::ScalarType::NumOptions)) {
    throw PipeBrokenError("corrupt message header in the pipe while receiving " + what);
  }
  std::vector<int64_t> sizes(static_cast<size_t>(words[2]));
  source.recv(reinterpret_cast<char*>(sizes.data()),
              static_cast<int64_t>(sizes.size() * sizeof(int64_t)), what.c_str());
  // The CPU allocation itself, not at::empty: the dispatcher's way there (op lookup, dispatch
  // keys, profiler hook) costs more than the copy of a small message when its code is cold, as it
  // is after every stage's compute.
  at::Tensor tensor(at::detail::empty_cpu(sizes, static_cast<at::ScalarType>(words[1])));
  source.recv(static_cast<char*>(tensor.data_ptr()), static_cast<int64_t>(tensor.nbytes()),
              what.c_str());
  const at::ScalarType dtype = tensor.scalar_type();
  if (leaf && (at::isFloatingType(dtype) || at::isComplexType(dtype))) {
    tensor.set_requires_grad(true);
  }
  return tensor;
}

void ShmTensorPipe::abort(const std::string& text) { pipe().abort(text); }

void ShmTensorPipe::close() {
  pipe_.reset();  // joins the sender thread
  segment_.unlink();
  segment_.unmap();
}

bool ShmTensorPipe::closed() const { return !pipe_; }

std::string ShmTensorPipe::failure() const { return pipe_ ? pipe_->failure() : std::string(); }

int64_t ShmTensorPipe::deferred_sends() const { return pipe().deferred_sends(); }

int64_t ShmTensorPipe::capacity() const { return pipe().capacity(); }

}  // namespace fastpar
