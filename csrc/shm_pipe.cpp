// The shared-memory pipe between two processes (protocol in shm_pipe.h).
//
// Segment layout (page-aligned parts):
//   [ PipeControl: magic, capacity, each endpoint's pid / aborted flag / abort text ]
//   [ counters of side 0's ring: written (line 0), read (line 2) | side 0's ring: capacity bytes ]
//   [ counters of side 1's ring                                  | side 1's ring               ]
// Side s writes its own ring and `written`; the other side writes that ring's `read`.
#include "shm_pipe.h"

#include <errno.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <utility>

#include "process.h"
#include "shm_atomic.h"

namespace fastpar {
namespace {

using shm::kLine;
using shm::kPage;
using shm::load_acquire;
using shm::store_release;

constexpr uint64_t kMagic = 0x66617374706970ULL;  // "fastpip"

// Maps every page of the segment into this process now. Otherwise each page of a ring faults on
// its first write and first read (a few microseconds each, more in a VM), so the first lap around
// a ring, which for small messages is thousands of them, pays about a fault per 4 KB on both
// sides. The contents are left as they are (MADV_POPULATE_WRITE, or a locked add of zero per
// page on a kernel without it), so this is safe whatever the peer is doing.
void prefault(char* base, size_t bytes) {
#ifdef MADV_POPULATE_WRITE
  if (madvise(base, bytes, MADV_POPULATE_WRITE) == 0) return;
#endif
  for (size_t offset = 0; offset < bytes; offset += kPage) {
    __atomic_fetch_add(reinterpret_cast<uint64_t*>(base + offset), 0, __ATOMIC_RELAXED);
  }
}

}  // namespace

struct EndpointControl {
  alignas(kLine) uint64_t pid;
  uint64_t aborted;     // 1 once abort() wrote the text
  uint64_t text_bytes;  // of `text`, released by `aborted`
  char text[ShmPipe::kMaxAbortText];
};

struct PipeControl {
  uint64_t magic;
  int64_t capacity;
  EndpointControl endpoint[2];
};
static_assert(sizeof(PipeControl) <= kPage, "the control block must fit its page");

size_t ShmPipe::segment_bytes(int64_t capacity) {
  return kPage + 2 * (kPage + static_cast<size_t>(capacity));
}

void ShmPipe::format(char* base, int64_t capacity) {
  auto* control = reinterpret_cast<PipeControl*>(base);
  control->capacity = capacity;
  store_release(&control->magic, kMagic);
}

ShmPipe::ShmPipe(char* base, size_t bytes, int side, int64_t capacity, WaitPolicy policy)
    : base_(base),
      control_(reinterpret_cast<PipeControl*>(base)),
      side_(side),
      capacity_(capacity),
      policy_(policy),
      owner_pid_(getpid()) {
  if (side != 0 && side != 1)
    throw std::invalid_argument("side must be 0 or 1, got " + std::to_string(side));
  if (capacity <= 0 || capacity % static_cast<int64_t>(kPage) != 0)
    throw std::invalid_argument("capacity must be a positive multiple of " +
                                std::to_string(kPage) + ", got " + std::to_string(capacity));
  if (bytes != segment_bytes(capacity))
    throw std::invalid_argument("the segment has " + std::to_string(bytes) + " bytes; expected " +
                                std::to_string(segment_bytes(capacity)));
  if (load_acquire(&control_->magic) != kMagic || control_->capacity != capacity)
    throw std::invalid_argument("the shared segment was formatted for another pipe");
  prefault(base, bytes);
  store_release(&control_->endpoint[side].pid, static_cast<uint64_t>(owner_pid_));
}

ShmPipe::~ShmPipe() {
  {
    const std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  wake_sender_.notify_all();
  if (sender_.joinable()) {
    // A forked child has the object but not the thread: it must not wait for it.
    if (getpid() == owner_pid_) {
      sender_.join();
    } else {
      sender_.detach();
    }
  }
}

void ShmPipe::connect() {
  const auto pid = static_cast<pid_t>(load_acquire(&control_->endpoint[1 - side_].pid));
  if (pid > 0 && (kill(pid, 0) == 0 || errno == EPERM)) peer_pid_ = pid;
}

char* ShmPipe::ring(int side) const {
  return base_ + kPage + side * (kPage + capacity_) + kPage;
}

uint64_t* ShmPipe::written_word(int side) const {
  return reinterpret_cast<uint64_t*>(base_ + kPage + side * (kPage + capacity_));
}

// Two lines after `written`: the consumer's stores do not disturb the producer's line (nor its
// adjacent-line prefetch).
uint64_t* ShmPipe::read_word(int side) const { return written_word(side) + 2 * kLine / 8; }

void ShmPipe::put_locked(const char* source, int64_t bytes) {
  char* data = ring(side_);
  for (int64_t done = 0; done < bytes;) {  // at most two pieces: up to the ring's end, then on
    const auto offset = static_cast<int64_t>(written_ % static_cast<uint64_t>(capacity_));
    const int64_t piece = std::min(bytes - done, capacity_ - offset);
    std::memcpy(data + offset, source + done, static_cast<size_t>(piece));
    written_ += static_cast<uint64_t>(piece);
    done += piece;
  }
}

bool ShmPipe::try_send(const char* header, int64_t header_bytes, const char* payload,
                       int64_t payload_bytes) {
  throw_if_peer_aborted();  // nobody would receive it
  const std::lock_guard<std::mutex> lock(mutex_);
  if (!failure_.empty()) throw PipeBrokenError("this pipe is unusable: " + failure_);
  const int64_t room = capacity_ - static_cast<int64_t>(written_ - load_acquire(read_word(side_)));
  if (!queue_.empty() || header_bytes + payload_bytes > room) return false;
  put_locked(header, header_bytes);
  put_locked(payload, payload_bytes);
  store_release(written_word(side_), written_);
  return true;
}

void ShmPipe::send(std::string header, const char* payload, int64_t payload_bytes,
                   std::shared_ptr<void> keep) {
  throw_if_peer_aborted();  // nobody would receive it
  std::unique_lock<std::mutex> lock(mutex_);
  if (!failure_.empty()) throw PipeBrokenError("this pipe is unusable: " + failure_);
  queue_.push_back({std::move(header), payload, payload_bytes, 0, std::move(keep)});
  if (queue_.size() == 1) write_queued_locked();
  if (queue_.empty()) return;
  // The rest goes when the peer makes room, while the caller computes.
  ++deferred_;
  if (!sender_.joinable()) sender_ = std::thread(&ShmPipe::sender_loop, this);
  lock.unlock();
  wake_sender_.notify_one();
}

bool ShmPipe::write_queued_locked() {
  bool progress = false;
  uint64_t* written = written_word(side_);
  const uint64_t read = load_acquire(read_word(side_));
  while (!queue_.empty()) {
    Pending& item = queue_.front();
    const auto header_bytes = static_cast<int64_t>(item.header.size());
    const int64_t total = header_bytes + item.payload_bytes;
    while (item.done < total) {
      const int64_t room = capacity_ - static_cast<int64_t>(written_ - read);
      if (room == 0) {
        if (progress) store_release(written, written_);
        return progress;
      }
      // What fits of the rest of the header, or else of the payload.
      const bool in_header = item.done < header_bytes;
      const char* source =
          in_header ? item.header.data() + item.done : item.payload + (item.done - header_bytes);
      const int64_t left = in_header ? header_bytes - item.done : total - item.done;
      const int64_t piece = std::min(left, room);
      put_locked(source, piece);
      item.done += piece;
      progress = true;
    }
    queue_.pop_front();
  }
  if (progress) store_release(written, written_);
  flushed_.notify_all();
  return progress;
}

void ShmPipe::sender_loop() {
  auto next_liveness = std::chrono::steady_clock::now();
  std::unique_lock<std::mutex> lock(mutex_);
  for (;;) {
    wake_sender_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
    if (stopping_) return;
    write_queued_locked();
    if (queue_.empty()) continue;
    // The ring is full: wait, without the lock, until the peer has read something.
    const uint64_t full_at = written_;
    lock.unlock();
    bool room = false;
    std::string error;
    try {
      room = bounded_wait(
          policy_,
          [&] {
            return load_acquire(read_word(side_)) + capacity_ > full_at ||
                   stopping_.load(std::memory_order_relaxed);
          },
          [&] { check_peer(next_liveness, "sending"); });
      if (!room) {
        error = "timed out after " + format_seconds(policy_.timeout_s) +
                " waiting for the peer to receive what this process sent (the peer is hung or "
                "no longer receiving)";
      }
    } catch (const std::exception& caught) {
      error = caught.what();
    }
    lock.lock();
    if (!error.empty()) {
      if (failure_.empty()) failure_ = error;
      std::deque<Pending> dropped;
      dropped.swap(queue_);
      flushed_.notify_all();
      lock.unlock();
      dropped.clear();
      return;
    }
  }
}

void ShmPipe::flush() {
  {
    // Everything sent is in the ring: nothing to wait for, so a peer's abort is news for the
    // next send or recv. A stage that finished its step before a later one failed returns.
    const std::lock_guard<std::mutex> lock(mutex_);
    if (queue_.empty() && failure_.empty()) return;
  }
  throw_if_peer_aborted();
  std::unique_lock<std::mutex> lock(mutex_);
  flushed_.wait(lock, [&] { return queue_.empty() || !failure_.empty(); });
  if (!failure_.empty()) throw PipeBrokenError(failure_);
}

void ShmPipe::recv(char* out, int64_t bytes, const char* what) {
  throw_if_peer_aborted();  // what is left in the pipe belongs to a step that failed
  {
    const std::lock_guard<std::mutex> lock(mutex_);
    if (!failure_.empty()) throw PipeBrokenError("this pipe is unusable: " + failure_);
  }
  const int peer = 1 - side_;
  const char* data = ring(peer);
  const uint64_t* written = written_word(peer);
  uint64_t* read = read_word(peer);
  auto next_liveness = std::chrono::steady_clock::now();
  int64_t done = 0;
  while (done < bytes) {
    const int64_t available = static_cast<int64_t>(load_acquire(written) - read_);
    if (available == 0) {
      const bool arrived = bounded_wait(
          policy_, [&] { return load_acquire(written) != read_; },
          [&] { check_peer(next_liveness, what); });
      if (!arrived) {
        fail("timed out after " + format_seconds(policy_.timeout_s) + " waiting for " + what +
             " (the peer is hung, or is not sending it)");
      }
      continue;
    }
    const auto offset = static_cast<int64_t>(read_ % static_cast<uint64_t>(capacity_));
    const int64_t piece = std::min({available, bytes - done, capacity_ - offset});
    std::memcpy(out + done, data + offset, static_cast<size_t>(piece));
    read_ += static_cast<uint64_t>(piece);
    store_release(read, read_);  // the room is the peer's again
    done += piece;
  }
}

void ShmPipe::throw_if_peer_aborted() {
  EndpointControl& peer = control_->endpoint[1 - side_];
  if (load_acquire(&peer.aborted) == 0) return;
  const auto length = std::min<uint64_t>(peer.text_bytes, kMaxAbortText);
  const std::string text(peer.text, static_cast<size_t>(length));
  {
    const std::lock_guard<std::mutex> lock(mutex_);
    if (failure_.empty()) failure_ = "the peer aborted: " + text;
  }
  throw PipeAbortedError(text);
}

void ShmPipe::check_peer(std::chrono::steady_clock::time_point& next_liveness,
                         const char* doing) {
  throw_if_peer_aborted();
  const auto now = std::chrono::steady_clock::now();
  if (peer_pid_ == 0 || now < next_liveness) return;
  next_liveness = now + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                            std::chrono::duration<double>(kLivenessPeriod));
  if (!process_alive(peer_pid_)) {
    fail("the peer process (pid " + std::to_string(peer_pid_) + ") exited while this one was " +
         doing);
  }
}

void ShmPipe::fail(const std::string& message) {
  {
    const std::lock_guard<std::mutex> lock(mutex_);
    if (failure_.empty()) failure_ = message;
  }
  throw PipeBrokenError(message);
}

void ShmPipe::abort(const std::string& text) {
  std::deque<Pending> dropped;
  {
    const std::lock_guard<std::mutex> lock(mutex_);
    dropped.swap(queue_);
    if (failure_.empty()) failure_ = "this endpoint aborted: " + text;
    EndpointControl& mine = control_->endpoint[side_];
    if (load_acquire(&mine.aborted) == 0) {
      const size_t length = std::min<size_t>(text.size(), kMaxAbortText);
      std::memcpy(mine.text, text.data(), length);
      mine.text_bytes = length;
      store_release(&mine.aborted, 1);
    }
    flushed_.notify_all();
  }
}

std::string ShmPipe::failure() const {
  const std::lock_guard<std::mutex> lock(mutex_);
  return failure_;
}

int64_t ShmPipe::deferred_sends() const {
  const std::lock_guard<std::mutex> lock(mutex_);
  return deferred_;
}

}  // namespace fastpar
