// The shared-memory all-reduce (algorithm in shm_ring.h).
//
// Segment layout (every offset page-aligned, so data slots start on cache lines):
//   [ SegmentInfo | control of rank 0 | ... | control of rank n-1 | data: rank 0 slots 0..S-1,
//     rank 1 slots 0..S-1, ... | one-shot windows: rank 0 windows 0..W-1, rank 1 ... ]
// A rank's control block holds its abort word, pid and pid namespace (one line), then one Flags
// record per slot. Only the owner writes its control block, its data slots (the reduce writes
// its result over the owner's own slot) and its windows; everyone reads everyone's.
#include "shm_ring.h"

#include <unistd.h>

#include <chrono>
#include <cstring>
#include <stdexcept>

#include "process.h"
#include "shm_atomic.h"
#include "shm_ring_flags.h"

namespace fastpar {
namespace {

using shm::kLine;
using shm::kPage;
using shm::load_acquire;
using shm::store_release;

constexpr uint64_t kMagic = 0x66617374706172ULL;  // "fastpar"

struct SegmentInfo {
  uint64_t magic;
  int32_t world;
  int32_t slots;
  int64_t chunk_bytes;
};

// A flag holding kPoison | r: rank r gave up waiting for it; its owner can no longer set it.
constexpr uint64_t kPoison = 1ULL << 63;

bool poisoned(uint64_t value) { return (value & kPoison) != 0; }
int poisoner(uint64_t value) { return static_cast<int>(value & ~kPoison); }

// Thrown by a wait's check when the awaited peer's process is gone (caught by wait_for).
struct PeerGone {};

size_t round_up(size_t value, size_t to) { return (value + to - 1) / to * to; }

size_t control_bytes(int slots) {
  return round_up(kLine + slots * sizeof(ShmFlags), kPage);
}

// The largest one-shot call of `world` ranks (see "Small calls" in shm_ring.h).
int64_t one_shot_window_bytes(int world, int64_t chunk_bytes) {
  const int64_t page = static_cast<int64_t>(kPage);
  const int64_t scaled = ShmRing::kOneShotBytes * 2 / std::max(world, 2) / page * page;
  return std::min(std::max(scaled, page), chunk_bytes);
}

// Windows per rank: at least S (see "Small calls" in shm_ring.h), and enough that calls of
// kOneShotTurnoverCallBytes (or whole windows, if smaller) move kOneShotTurnoverBytes across
// the ranks before a window comes round again.
int one_shot_windows(int world, int slots, int64_t chunk_bytes) {
  const int64_t call =
      std::min(ShmRing::kOneShotTurnoverCallBytes, one_shot_window_bytes(world, chunk_bytes));
  const int64_t fill = ShmRing::kOneShotTurnoverBytes / world / call;
  return static_cast<int>(std::max<int64_t>(slots, fill));
}

}  // namespace

size_t ShmRing::segment_bytes(int world, int slots, int64_t chunk_bytes) {
  const size_t per_rank =
      static_cast<size_t>(slots) * static_cast<size_t>(chunk_bytes) +
      static_cast<size_t>(one_shot_windows(world, slots, chunk_bytes)) *
          static_cast<size_t>(one_shot_window_bytes(world, chunk_bytes));
  return kPage + world * control_bytes(slots) + static_cast<size_t>(world) * per_rank;
}

void ShmRing::format(char* base, int world, int slots, int64_t chunk_bytes) {
  auto* info = reinterpret_cast<SegmentInfo*>(base);
  info->world = world;
  info->slots = slots;
  info->chunk_bytes = chunk_bytes;
  store_release(&info->magic, kMagic);
}

ShmRing::ShmRing(char* base, size_t bytes, int rank, int world, int slots, int64_t chunk_bytes,
                 WaitPolicy policy)
    : base_(base),
      rank_(rank),
      world_(world),
      slots_(slots),
      chunk_bytes_(chunk_bytes),
      policy_(policy),
      pid_namespace_(pid_namespace()),
      inputs_(world > 0 ? world : 0) {
  if (world < 1 || rank < 0 || rank >= world)
    throw std::invalid_argument("rank " + std::to_string(rank) + " is not in a world of " +
                                std::to_string(world));
  if (slots < 3)
    throw std::invalid_argument("slots must be >= 3 (the pipeline keeps 3 chunks in flight), got " +
                                std::to_string(slots));
  if (chunk_bytes <= 0 || chunk_bytes % kPage != 0)
    throw std::invalid_argument("chunk_bytes must be a positive multiple of " +
                                std::to_string(kPage) + ", got " + std::to_string(chunk_bytes));
  window_bytes_ = one_shot_window_bytes(world, chunk_bytes);
  windows_ = one_shot_windows(world, slots, chunk_bytes);
  if (bytes != segment_bytes(world, slots, chunk_bytes))
    throw std::invalid_argument("the segment has " + std::to_string(bytes) + " bytes; expected " +
                                std::to_string(segment_bytes(world, slots, chunk_bytes)));
  const auto* info = reinterpret_cast<const SegmentInfo*>(base);
  if (load_acquire(&info->magic) != kMagic || info->world != world || info->slots != slots ||
      info->chunk_bytes != chunk_bytes)
    throw std::invalid_argument(
        "the shared segment was formatted for another ring (world, slots or chunk_bytes differ)");
  uint64_t* mine = pid_word(rank_);
  store_release(&mine[1], pid_namespace_);
  store_release(&mine[0], static_cast<uint64_t>(getpid()));  // releases the namespace too
}

ShmFlags& ShmRing::flags(int rank, int slot) const {
  char* control = base_ + kPage + rank * control_bytes(slots_);
  return reinterpret_cast<ShmFlags*>(control + kLine)[slot];
}

uint64_t* ShmRing::abort_word(int rank) const {
  return reinterpret_cast<uint64_t*>(base_ + kPage + rank * control_bytes(slots_));
}

uint64_t* ShmRing::pid_word(int rank) const { return abort_word(rank) + 1; }

char* ShmRing::slot_data(int rank, int slot) const {
  const size_t data = kPage + world_ * control_bytes(slots_);
  return base_ + data + (static_cast<size_t>(rank) * slots_ + slot) * chunk_bytes_;
}

char* ShmRing::window_data(int rank, uint64_t step) const {
  const size_t windows = slot_data(world_, 0) - base_;  // after the last rank's slots
  const size_t window = static_cast<size_t>(rank) * windows_ + step % windows_;
  return base_ + windows + window * window_bytes_;
}

void ShmRing::check_usable() const {
  if (!failure_.empty())
    throw RingClosedError("this ring all-reduce is unusable after an earlier failure: " +
                          failure_);
}

void ShmRing::agree(const CallHeader& header) {
  check_usable();
  const uint64_t step = step_;
  publish(step, nullptr, 0, header, {0, 0}, nullptr);
  check_headers(step, header);
  ShmFlags& mine = flags(rank_, static_cast<int>(step % slots_));
  arrive(&mine.reduced, step + 1, "agree on a call", /*complete=*/true);
  arrive(&mine.done, step + 1, "agree on a call", /*complete=*/true);
  step_ = step + 1;
}

void ShmRing::all_reduce(void* data, int64_t count, DType dtype, int32_t op) {
  check_usable();
  if (count < 0) throw std::invalid_argument("count must be >= 0, got " + std::to_string(count));
  if (op < 0 || op > kMaxRingOp)
    throw std::invalid_argument("op must be 0..4, got " + std::to_string(op));
  const int64_t element_size = dtype_size(dtype);
  const int64_t chunk_count = chunk_bytes_ / element_size;
  const int64_t chunks = count == 0 ? 1 : (count + chunk_count - 1) / chunk_count;
  const ReduceOp reduce_op = op == kOpAvg ? ReduceOp::kSum : static_cast<ReduceOp>(op);
  char* bytes = static_cast<char*>(data);
  CallHeader header{count, static_cast<int32_t>(dtype), op};
  header.area = find_area(bytes, count * element_size);
  if (header.area >= 0) header.offset = bytes - areas_[header.area].bases[rank_];
  auto elements = [&](int64_t c) { return std::min(chunk_count, count - c * chunk_count); };
  auto chunk_at = [&](int64_t c) { return bytes + c * chunk_count * element_size; };

  const uint64_t first = step_;
  if (count * element_size <= window_bytes_) {
    one_shot(first, bytes, count, dtype, reduce_op, header);
    return;
  }
  if (header.area >= 0 && chunks >= kAreaMinChunks) {
    all_reduce_in_area(areas_[header.area], header.offset, count, dtype, reduce_op, header);
    return;
  }
  for (int64_t c = 0; c < chunks + 2; ++c) {
    if (c < chunks) {
      // The own part stays out of the slot: only this rank reduces it, from the tensor itself.
      const Span own = portion(elements(c), rank_, world_, kLine / element_size);
      const uint64_t step = first + c;
      publish(step, chunk_at(c), elements(c) * element_size, header,
              {own.begin * element_size, own.end * element_size},
              slot_data(rank_, static_cast<int>(step % slots_)));
      // Nothing of the call moves before every rank agrees on it.
      if (c == 0) check_headers(first, header);
    }
    if (c >= 1 && c <= chunks)
      reduce(first + c - 1, chunk_at(c - 1), elements(c - 1), dtype, reduce_op);
    if (c >= 2) gather(first + c - 2, chunk_at(c - 2), elements(c - 2), element_size);
  }
  step_ = first + chunks;
}

void ShmRing::one_shot(uint64_t step, char* data, int64_t count, DType dtype, ReduceOp op,
                       const CallHeader& header) {
  // Nothing to skip: the peers read all of it.
  publish(step, data, count * dtype_size(dtype), header, {0, 0}, window_data(rank_, step));
  check_headers(step, header);  // also waits until every rank's input is there
  for (int peer = 0; peer < world_; ++peer)
    inputs_[peer] = peer == rank_ ? data : window_data(peer, step);
  if (count > 0) reduce_buffers(inputs_.data(), world_, data, count, dtype, op);
  ShmFlags& mine = flags(rank_, static_cast<int>(step % slots_));
  // The result is in `data`: a peer that gave up on these flags only fails the next call.
  arrive(&mine.reduced, step + 1, "reduce its part", /*complete=*/true);
  arrive(&mine.done, step + 1, "finish a previous chunk", /*complete=*/true);
  step_ = step + 1;
}

void ShmRing::publish(uint64_t step, const char* chunk, int64_t bytes, const CallHeader& header,
                      Span skip, char* destination) {
  const int slot = static_cast<int>(step % slots_);
  if (step >= static_cast<uint64_t>(slots_)) {
    // The slot's previous chunk (step - S) must have been copied out by everyone.
    for (int peer = 0; peer < world_; ++peer) {
      if (peer != rank_)
        wait_for(peer, &flags(peer, slot).done, step - slots_ + 1, "finish a previous chunk",
                 step);
    }
  }
  ShmFlags& mine = flags(rank_, slot);
  const int64_t skip_begin = std::min(skip.begin, bytes);
  const int64_t skip_end = std::max(skip_begin, std::min(skip.end, bytes));
  if (skip_begin > 0) std::memcpy(destination, chunk, static_cast<size_t>(skip_begin));
  if (bytes > skip_end)
    std::memcpy(destination + skip_end, chunk + skip_end, static_cast<size_t>(bytes - skip_end));
  mine.header = header;
  arrive(&mine.ready, step + 1, "start the same all_reduce call");
}

void ShmRing::check_headers(uint64_t step, const CallHeader& header) {
  const int slot = static_cast<int>(step % slots_);
  bool same = true;
  for (int peer = 0; peer < world_; ++peer) {
    if (peer == rank_) continue;
    wait_for(peer, &flags(peer, slot).ready, step + 1, "start the same all_reduce call", step);
    same = same && flags(peer, slot).header == header;
  }
  if (same) return;
  std::string calls;
  bool ring_path = false;
  bool torch_path = false;
  for (int peer = 0; peer < world_; ++peer) {
    const CallHeader& call = peer == rank_ ? header : flags(peer, slot).header;
    (takes_torch_path(call) ? torch_path : ring_path) = true;
    calls += (peer ? "; rank " : "rank ") + std::to_string(peer) + ": " + describe(call);
  }
  // Every rank saw the same headers and gives up the same single step, so the ring stays in
  // step and usable. Nobody reads this step's data; `done` lets the slot be reused.
  ShmFlags& mine = flags(rank_, slot);
  arrive(&mine.reduced, step + 1, "reduce its part", /*complete=*/true);
  arrive(&mine.done, step + 1, "finish a previous chunk", /*complete=*/true);
  step_ = step + 1;
  if (ring_path && torch_path) {
    throw RingMismatchError(
        "all_reduce would take different paths on different ranks: fastpar's ring on some, "
        "torch.distributed (a dtype or op the ring does not serve) on others (" + calls + ")");
  }
  throw RingMismatchError("all_reduce was called with different arguments on different ranks (" +
                          calls + ")");
}

void ShmRing::reduce(uint64_t step, const char* chunk, int64_t chunk_count, DType dtype,
                     ReduceOp op) {
  const int slot = static_cast<int>(step % slots_);
  const int64_t element_size = dtype_size(dtype);
  const Span part = portion(chunk_count, rank_, world_, kLine / element_size);
  for (int peer = 0; peer < world_; ++peer) {
    if (peer != rank_)
      wait_for(peer, &flags(peer, slot).ready, step + 1, "publish its chunk", step);
    const char* source = peer == rank_ ? chunk : slot_data(peer, slot);
    inputs_[peer] = source + part.begin * element_size;
  }
  if (part.size() > 0) {
    reduce_buffers(inputs_.data(), world_, slot_data(rank_, slot) + part.begin * element_size,
                   part.size(), dtype, op);
  }
  arrive(&flags(rank_, slot).reduced, step + 1, "reduce its part");
}

void ShmRing::gather(uint64_t step, char* chunk, int64_t chunk_count, int64_t element_size) {
  const int slot = static_cast<int>(step % slots_);
  // Own part first (it is in this core's cache and needs no wait), then the peers in turn.
  for (int i = 0; i < world_; ++i) {
    const int peer = (rank_ + i) % world_;
    if (peer != rank_)
      wait_for(peer, &flags(peer, slot).reduced, step + 1, "reduce its part", step);
    const Span part = portion(chunk_count, peer, world_, kLine / element_size);
    if (part.size() > 0) {
      std::memcpy(chunk + part.begin * element_size,
                  slot_data(peer, slot) + part.begin * element_size,
                  static_cast<size_t>(part.size() * element_size));
    }
  }
  // Everything is copied out: a peer that gave up on this flag fails this call only where the
  // call still needs that peer (the wait for it then raises), else the next one.
  arrive(&flags(rank_, slot).done, step + 1, "finish a previous chunk", /*complete=*/true);
}

void ShmRing::arrive(uint64_t* word, uint64_t value, const char* what, bool complete) {
  uint64_t current = load_acquire(word);
  while (!poisoned(current)) {
    if (__atomic_compare_exchange_n(word, &current, value, false, __ATOMIC_ACQ_REL,
                                    __ATOMIC_ACQUIRE))
      return;
  }
  failure_ = "rank " + std::to_string(rank_) + " arrived late: rank " +
             std::to_string(poisoner(current)) + " had given up waiting for it to " + what +
             " (timeout " + format_seconds(policy_.timeout_s) +
             "), so this call fails here too rather than succeed where a peer failed";
  if (!complete) throw RingTimeoutError(failure_);
}

bool ShmRing::peer_dead(int peer) const {
  const uint64_t* word = pid_word(peer);
  const uint64_t pid = load_acquire(&word[0]);
  if (pid == 0 || pid_namespace_ == 0 || load_acquire(&word[1]) != pid_namespace_) return false;
  return !process_alive(static_cast<pid_t>(pid));
}

void ShmRing::wait_for(int peer, uint64_t* word, uint64_t value, const char* what,
                       uint64_t step) {
  auto arrived = [&] {
    const uint64_t current = load_acquire(word);
    return current >= value && !poisoned(current);
  };
  // Usually the flag is there already: return before building the failure messages (their
  // strings cost about as much as the rest of a small call's bookkeeping).
  if (arrived()) return;
  const std::string waiting = "rank " + std::to_string(rank_) + " stopped waiting for rank " +
                              std::to_string(peer) + " to " + what + " because rank ";
  auto given_up_by = [&](int other) {
    give_up(other, waiting + std::to_string(other) + " gave up waiting for rank " +
                       std::to_string(peer) + " (dead, hung, or not calling all_reduce)");
  };
  using Clock = std::chrono::steady_clock;
  const auto period = std::chrono::duration_cast<Clock::duration>(
      std::chrono::duration<double>(kLivenessPeriod));
  auto next_liveness = Clock::now() + period;
  auto check_peers = [&] {
    const uint64_t current = load_acquire(word);
    if (poisoned(current)) given_up_by(poisoner(current));
    for (int other = 0; other < world_; ++other) {
      if (other == rank_) continue;
      const uint64_t aborted = load_acquire(abort_word(other));
      if (aborted != 0) {
        const int culprit = static_cast<int>(aborted - 1);
        give_up(culprit, waiting + std::to_string(other) + " gave up waiting for rank " +
                             std::to_string(culprit) +
                             " (dead, hung, or not calling all_reduce)");
      }
    }
    const auto now = Clock::now();
    if (now >= next_liveness) {
      next_liveness = now + period;
      if (peer_dead(peer)) throw PeerGone{};
    }
  };
  bool gone = false;
  try {
    if (bounded_wait(policy_, arrived, check_peers)) return;
  } catch (const PeerGone&) {
    gone = true;
  }
  // Give up only if the flag has not arrived meanwhile: the poison and the owner's store are
  // both compare-and-swaps, so exactly one of them wins.
  uint64_t current = load_acquire(word);
  for (;;) {
    if (poisoned(current)) given_up_by(poisoner(current));
    if (current >= value) return;
    if (__atomic_compare_exchange_n(word, &current, kPoison | static_cast<uint64_t>(rank_), false,
                                    __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
      break;
  }
  const std::string who = "rank " + std::to_string(peer);
  if (gone) {
    give_up(peer, who + " (pid " + std::to_string(load_acquire(pid_word(peer))) +
                      ") exited while rank " + std::to_string(rank_) + " waited for it to " +
                      what + " (step " + std::to_string(step) + ")");
  }
  give_up(peer, "rank " + std::to_string(rank_) + " timed out after " +
                    format_seconds(policy_.timeout_s) + " waiting for " + who + " to " + what +
                    " (step " + std::to_string(step) + "); " + who +
                    " is dead, hung, or not calling all_reduce");
}

void ShmRing::give_up(int culprit, const std::string& message) {
  store_release(abort_word(rank_), static_cast<uint64_t>(culprit) + 1);
  failure_ = message;
  throw RingTimeoutError(message);
}

}  // namespace fastpar
