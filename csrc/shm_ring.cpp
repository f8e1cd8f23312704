// The shared-memory all-reduce (algorithm in shm_ring.h).
//
// Segment layout (every offset page-aligned, so data slots start on cache lines):
//   [ SegmentInfo | control of rank 0 | ... | control of rank n-1 | data: rank 0 slots 0..S-1,
//     rank 1 slots 0..S-1, ... ]
// A rank's control block holds its abort word, then one Flags record per slot. Only the owner
// writes its control block and its data slots (the reduce writes its result over the owner's
// own slot); everyone reads everyone's.
#include "shm_ring.h"

#include <cstring>
#include <stdexcept>

namespace fastpar {
namespace {

constexpr size_t kPage = 4096;
constexpr size_t kLine = 64;
constexpr uint64_t kMagic = 0x66617374706172ULL;  // "fastpar"

struct SegmentInfo {
  uint64_t magic;
  int32_t world;
  int32_t slots;
  int64_t chunk_bytes;
};

size_t round_up(size_t value, size_t to) { return (value + to - 1) / to * to; }

uint64_t load_acquire(const uint64_t* word) { return __atomic_load_n(word, __ATOMIC_ACQUIRE); }
void store_release(uint64_t* word, uint64_t value) {
  __atomic_store_n(word, value, __ATOMIC_RELEASE);
}

}  // namespace

// Each flag on its own cache line: the owner's stores to one do not disturb readers of another.
struct ShmFlags {
  alignas(kLine) uint64_t ready;  // step + 1 once the slot holds this rank's chunk of the step
  CallHeader header;              // of the call that step belongs to; released by `ready`
  alignas(kLine) uint64_t reduced;  // step + 1 once this rank's part of the slot is reduced
  alignas(kLine) uint64_t done;     // step + 1 once this rank has copied every part out
};

namespace {

size_t control_bytes(int slots) {
  return round_up(kLine + slots * sizeof(ShmFlags), kPage);
}

}  // namespace

size_t ShmRing::segment_bytes(int world, int slots, int64_t chunk_bytes) {
  return kPage + world * control_bytes(slots) +
         static_cast<size_t>(world) * slots * static_cast<size_t>(chunk_bytes);
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
  if (bytes != segment_bytes(world, slots, chunk_bytes))
    throw std::invalid_argument("the segment has " + std::to_string(bytes) + " bytes; expected " +
                                std::to_string(segment_bytes(world, slots, chunk_bytes)));
  const auto* info = reinterpret_cast<const SegmentInfo*>(base);
  if (load_acquire(&info->magic) != kMagic || info->world != world || info->slots != slots ||
      info->chunk_bytes != chunk_bytes)
    throw std::invalid_argument(
        "the shared segment was formatted for another ring (world, slots or chunk_bytes differ)");
}

ShmFlags& ShmRing::flags(int rank, int slot) const {
  char* control = base_ + kPage + rank * control_bytes(slots_);
  return reinterpret_cast<ShmFlags*>(control + kLine)[slot];
}

uint64_t* ShmRing::abort_word(int rank) const {
  return reinterpret_cast<uint64_t*>(base_ + kPage + rank * control_bytes(slots_));
}

char* ShmRing::slot_data(int rank, int slot) const {
  const size_t data = kPage + world_ * control_bytes(slots_);
  return base_ + data + (static_cast<size_t>(rank) * slots_ + slot) * chunk_bytes_;
}

void ShmRing::all_reduce(void* data, int64_t count, DType dtype, int32_t op) {
  if (!failure_.empty())
    throw RingClosedError("this ring all-reduce is unusable after an earlier failure: " +
                          failure_);
  if (count < 0) throw std::invalid_argument("count must be >= 0, got " + std::to_string(count));
  if (op < 0 || op > kMaxRingOp)
    throw std::invalid_argument("op must be 0..4, got " + std::to_string(op));
  const int64_t element_size = dtype_size(dtype);
  const int64_t chunk_count = chunk_bytes_ / element_size;
  const int64_t chunks = count == 0 ? 1 : (count + chunk_count - 1) / chunk_count;
  const ReduceOp reduce_op = op == kOpAvg ? ReduceOp::kSum : static_cast<ReduceOp>(op);
  const CallHeader header{count, static_cast<int32_t>(dtype), op};
  char* bytes = static_cast<char*>(data);
  auto elements = [&](int64_t c) { return std::min(chunk_count, count - c * chunk_count); };
  auto chunk_at = [&](int64_t c) { return bytes + c * chunk_count * element_size; };

  const uint64_t first = step_;
  if (count * element_size <= std::min<int64_t>(kOneShotBytes, chunk_bytes_)) {
    one_shot(first, bytes, count, dtype, reduce_op, header);
    return;
  }
  for (int64_t c = 0; c < chunks + 2; ++c) {
    if (c < chunks) {
      // The own part stays out of the slot: only this rank reduces it, from the tensor itself.
      const Span own = portion(elements(c), rank_, world_, kLine / element_size);
      publish(first + c, chunk_at(c), elements(c) * element_size, header,
              {own.begin * element_size, own.end * element_size});
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
  const int slot = static_cast<int>(step % slots_);
  publish(step, data, count * dtype_size(dtype), header, {0, 0});  // peers read all of it
  check_headers(step, header);  // also waits until every rank's input is there
  for (int peer = 0; peer < world_; ++peer) inputs_[peer] = slot_data(peer, slot);
  if (count > 0) reduce_buffers(inputs_.data(), world_, data, count, dtype, op);
  ShmFlags& mine = flags(rank_, slot);
  store_release(&mine.reduced, step + 1);
  store_release(&mine.done, step + 1);
  step_ = step + 1;
}

void ShmRing::publish(uint64_t step, const char* chunk, int64_t bytes, const CallHeader& header,
                      Span skip) {
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
  char* slot_bytes = slot_data(rank_, slot);
  const int64_t skip_begin = std::min(skip.begin, bytes);
  const int64_t skip_end = std::max(skip_begin, std::min(skip.end, bytes));
  if (skip_begin > 0) std::memcpy(slot_bytes, chunk, static_cast<size_t>(skip_begin));
  if (bytes > skip_end)
    std::memcpy(slot_bytes + skip_end, chunk + skip_end, static_cast<size_t>(bytes - skip_end));
  mine.header = header;
  store_release(&mine.ready, step + 1);
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
  for (int peer = 0; peer < world_; ++peer) {
    calls += (peer ? "; rank " : "rank ") + std::to_string(peer) + ": " +
             describe(flags(peer, slot).header);
  }
  // Every rank saw the same headers and gives up the same single step, so the ring stays in
  // step and usable. Nobody reads this step's data; `done` lets the slot be reused.
  ShmFlags& mine = flags(rank_, slot);
  store_release(&mine.reduced, step + 1);
  store_release(&mine.done, step + 1);
  step_ = step + 1;
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
  store_release(&flags(rank_, slot).reduced, step + 1);
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
  store_release(&flags(rank_, slot).done, step + 1);
}

void ShmRing::wait_for(int peer, const uint64_t* word, uint64_t value, const char* what,
                       uint64_t step) {
  auto arrived = [&] { return load_acquire(word) >= value; };
  auto check_peers = [&] {
    for (int other = 0; other < world_; ++other) {
      if (other == rank_) continue;
      const uint64_t aborted = load_acquire(abort_word(other));
      if (aborted != 0) {
        const int culprit = static_cast<int>(aborted - 1);
        give_up(culprit, "rank " + std::to_string(rank_) + " stopped waiting for rank " +
                             std::to_string(peer) + " to " + what + " because rank " +
                             std::to_string(other) + " gave up waiting for rank " +
                             std::to_string(culprit) + " (dead, hung, or not calling all_reduce)");
      }
    }
  };
  if (bounded_wait(policy_, arrived, check_peers)) return;
  give_up(peer, "rank " + std::to_string(rank_) + " timed out after " +
                    std::to_string(policy_.timeout_s) + " s waiting for rank " +
                    std::to_string(peer) + " to " + what + " (step " + std::to_string(step) +
                    "); rank " + std::to_string(peer) +
                    " is dead, hung, or not calling all_reduce");
}

void ShmRing::give_up(int culprit, const std::string& message) {
  store_release(abort_word(rank_), static_cast<uint64_t>(culprit) + 1);
  failure_ = message;
  throw RingTimeoutError(message);
}

}  // namespace fastpar
