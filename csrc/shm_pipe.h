// A two-way byte pipe between two processes of one host through one shared-memory segment
// (pure C++): the point-to-point transport of pipeline stages on CPU.
//
// Each direction is a single-producer single-consumer ring of `capacity` bytes with two 64-bit
// counters that only grow: `written` (bytes the producer has put in, released after the copy)
// and `read` (bytes the consumer has taken out, released after its copy). A message is whatever
// the caller frames in the byte stream (the torch glue writes a shape header, then the payload).
//
// Sending never waits for the peer: `send` copies what fits into the ring at once; whatever does
// not fit is handed to a sender thread (started the first time it is needed) that writes it as
// the peer makes room, so two stages sending each other more than the capacity cannot deadlock,
// and a transfer larger than the ring still overlaps the caller's compute. `flush` waits until
// everything sent is in the ring (the caller's buffers may then be reused). Receiving copies the
// bytes out as they arrive, so a message larger than the ring streams through it.
//
// Failures. Every wait is bounded by the timeout. `abort(text)` marks this endpoint failed in the
// segment with a text; from then on every call of the peer (send, recv, a flush with something
// left to write, or one waiting already) raises PipeAbortedError carrying that text verbatim. A peer process that exits (or
// is a zombie) is noticed by its pid within about kLivenessPeriod; that and a timeout raise
// PipeBrokenError. Either leaves the pipe unusable.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <atomic>
#include <stdexcept>
#include <string>
#include <thread>

#include "ring.h"

namespace fastpar {

// The peer called abort(): what() is its text, unchanged.
class PipeAbortedError : public std::runtime_error {
  using std::runtime_error::runtime_error;
};
// The peer died or was silent for longer than the timeout, or this pipe failed earlier.
class PipeBrokenError : public std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct PipeControl;  // the segment's header (shm_pipe.cpp)

class ShmPipe {
 public:
  static constexpr int64_t kMaxAbortText = 1400;
  static constexpr double kLivenessPeriod = 0.05;  // seconds between checks of the peer's pid

  // Bytes of a segment whose two rings hold `capacity` bytes each (a multiple of 4096).
  static size_t segment_bytes(int64_t capacity);
  // Writes the segment's description (by its creator, before the peer maps it).
  static void format(char* base, int64_t capacity);

  // `base` is the mapped segment; it must outlive this object. `side` is 0 for the creator, 1
  // for the other endpoint. Raises std::invalid_argument for a segment formatted differently.
  ShmPipe(char* base, size_t bytes, int side, int64_t capacity, WaitPolicy policy);
  ~ShmPipe();
  ShmPipe(const ShmPipe&) = delete;
  ShmPipe& operator=(const ShmPipe&) = delete;

  // Records the peer's pid (published by the peer's constructor) for the liveness check; call
  // once both endpoints exist. A pid this process cannot see (another pid namespace) leaves
  // only the timeout to notice a dead peer.
  void connect();

  // Copies header then payload into the ring now and returns true when nothing is queued ahead
  // and both fit whole; otherwise does nothing and returns false (then call `send`). The common
  // case of a message smaller than the free room thus costs a memcpy: no allocation, no owner.
  bool try_send(const char* header, int64_t header_bytes, const char* payload,
                int64_t payload_bytes);
  // Queues header (copied) then `payload_bytes` from `payload`, which must stay valid until
  // written: `keep` owns it and is dropped then (at once when everything fits), under the pipe's
  // lock, so its last owner should be the caller.
  void send(std::string header, const char* payload, int64_t payload_bytes,
            std::shared_ptr<void> keep);
  // Waits (bounded) until everything sent is in the ring; returns at once when it is.
  void flush();
  // Copies the next `bytes` of the peer's stream into `out`, waiting (bounded) as they arrive.
  // `what` names them in errors.
  void recv(char* out, int64_t bytes, const char* what);
  // Marks this endpoint failed with `text` (cut to kMaxAbortText bytes) so the peer raises it;
  // pending sends are dropped. The first text stays.
  void abort(const std::string& text);

  // Why this pipe is unusable ("" while usable).
  std::string failure() const;
  int64_t capacity() const { return capacity_; }
  // Sends that did not fit in the ring when posted (they went through the sender thread).
  int64_t deferred_sends() const;

 private:
  struct Pending {
    std::string header;
    const char* payload;
    int64_t payload_bytes;
    int64_t done;  // bytes of header + payload already written
    std::shared_ptr<void> keep;
  };

  char* ring(int side) const;
  uint64_t* written_word(int side) const;
  uint64_t* read_word(int side) const;
  // Copies `bytes` (at most the free room) into this side's ring after what is written,
  // wrapping at its end, and counts them in written_ without publishing them; needs mutex_.
  void put_locked(const char* source, int64_t bytes);
  // Writes as much of the queue as fits now; needs mutex_. Returns whether anything was written.
  bool write_queued_locked();
  void sender_loop();
  // Raises PipeAbortedError when the peer aborted.
  void throw_if_peer_aborted();
  // Raises PipeAbortedError / PipeBrokenError when the peer gave up or died.
  void check_peer(std::chrono::steady_clock::time_point& next_liveness, const char* doing);
  [[noreturn]] void fail(const std::string& message);

  char* base_;
  PipeControl* control_;
  int side_;
  int64_t capacity_;
  WaitPolicy policy_;
  pid_t owner_pid_;      // the process that built this endpoint (a forked child must not join)
  pid_t peer_pid_ = 0;   // 0: not checked
  uint64_t read_ = 0;    // bytes taken from the peer's ring (only the caller's thread reads)

  mutable std::mutex mutex_;
  std::condition_variable wake_sender_;
  std::condition_variable flushed_;
  std::deque<Pending> queue_;
  uint64_t written_ = 0;  // bytes put in this side's ring (under mutex_)
  int64_t deferred_ = 0;
  std::atomic<bool> stopping_{false};
  std::string failure_;
  std::thread sender_;
};

}  // namespace fastpar
