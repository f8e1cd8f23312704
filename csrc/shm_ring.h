// The all-reduce of n processes on one host through one shared-memory segment (pure C++).
//
// Algorithm. A call is cut into chunks of at most `chunk_bytes`; chunk t of the call travels
// through slot t % S of a ring of S slots that every rank owns in the segment. For each chunk:
//   1. publish: rank r copies its chunk into its own slot s, except its own part (nobody else
//      reads it), and releases `ready` (with the call header: size, dtype, op);
//   2. reduce (the reduce-scatter): once every rank's `ready` is acquired, rank r reduces its
//      1/n part of the chunk by reading that part of all n inputs *in rank order 0..n-1* (the
//      peers' slots, its own tensor; fastpar::reduce_buffers) and writes the result into its own
//      slot's part; then releases `reduced`;
//   3. gather (the all-gather): rank r copies part q from rank q's slot into the caller's tensor
//      as soon as rank q's `reduced` is acquired, for every q; then releases `done`.
// A slot is written again (S chunks later) only when every rank's `done` for its previous use
// has been acquired. Steps are pipelined: in one pass rank r publishes chunk c, reduces chunk
// c-1 and gathers chunk c-2, so copying, reducing and handing on overlap and every flag has a
// whole phase of slack before anyone waits on it (this needs S >= 3).
//
// Each element is combined by exactly one rank, always in rank order, so all ranks get the same
// bits (float16/bfloat16 accumulate in float32 as reduce.h does). Per byte of tensor every rank
// reads 3 - 1/n bytes and writes 2 (copy in (n-1)/n, reduce 1/n of n inputs, copy out).
//
// Why not the neighbour ring (2(n-1) steps, each rank passing a part on to the next): in one
// shared segment every rank reads every rank's slots directly, so a part is read once by the
// rank that reduces it and once by each rank that gathers it, where the neighbour ring would copy
// it through n-1 intermediate ranks and take n-1 synchronisations per phase instead of one. The
// "ring" here is the ring of slots that the chunks flow through. The bus bandwidth of nccl-tests
// (algbw * 2(n-1)/n) still measures it: that is the data every rank must receive and send.
//
// Small calls (at most kOneShotBytes) take a shorter path where latency, not bandwidth, counts:
// after the publish, every rank reduces the whole tensor from all n slots in rank order straight
// into its tensor (the same fold, so the same bits everywhere): one wait for the peers instead
// of two, and no gather.
//
// Checks and failures. The header of the first chunk of a call is compared on every rank before
// anything else happens; on a difference every rank raises RingMismatchError listing each
// rank's call, and the ring stays usable (all ranks used the same one step). Every wait is
// bounded by the timeout; a rank that gives up marks itself aborted in the segment, so its
// peers give up too instead of waiting out their own timeouts, and the ring is unusable
// afterwards (RingClosedError says why).
//
// Flags are 64-bit step numbers (+1) that only grow, stored with release and loaded with
// acquire; steps continue across calls, so no flag is ever reset.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "reduce.h"
#include "ring.h"

namespace fastpar {

struct ShmFlags;  // one slot's flags of one rank (shm_ring.cpp)

class ShmRing {
 public:
  static constexpr int64_t kOneShotBytes = 64 * 1024;

  // Bytes of the segment for `world` ranks with `slots` slots of `chunk_bytes` each.
  static size_t segment_bytes(int world, int slots, int64_t chunk_bytes);
  // Writes the segment's description (by the rank that created it, before anyone else maps it).
  static void format(char* base, int world, int slots, int64_t chunk_bytes);

  // `base` is the mapped segment (formatted by its creator); it must outlive this object.
  // Raises std::invalid_argument for inconsistent sizes or a segment formatted differently.
  ShmRing(char* base, size_t bytes, int rank, int world, int slots, int64_t chunk_bytes,
          WaitPolicy policy);

  // In place: data (count elements of dtype) becomes the reduction over all ranks. `op` is a
  // ReduceOp code or kOpAvg; for kOpAvg the elements are summed (the caller divides). Not
  // thread-safe: one call at a time (the torch glue serialises).
  void all_reduce(void* data, int64_t count, DType dtype, int32_t op);

  // Why this ring is unusable (empty while it is usable).
  const std::string& failure() const { return failure_; }
  int rank() const { return rank_; }
  int world() const { return world_; }

 private:
  ShmFlags& flags(int rank, int slot) const;
  char* slot_data(int rank, int slot) const;
  uint64_t* abort_word(int rank) const;

  void one_shot(uint64_t step, char* data, int64_t count, DType dtype, ReduceOp op,
                const CallHeader& header);
  // Copies the chunk (but the bytes in `skip`) into the own slot and announces it.
  void publish(uint64_t step, const char* chunk, int64_t bytes, const CallHeader& header,
               Span skip);
  void check_headers(uint64_t step, const CallHeader& mine);
  void reduce(uint64_t step, const char* chunk, int64_t chunk_count, DType dtype, ReduceOp op);
  void gather(uint64_t step, char* chunk, int64_t chunk_count, int64_t element_size);

  // Waits until `word` of rank `peer` is at least `value`; throws RingTimeoutError (and leaves
  // the ring unusable) when the timeout passes or a peer has given up.
  void wait_for(int peer, const uint64_t* word, uint64_t value, const char* what, uint64_t step);
  [[noreturn]] void give_up(int culprit, const std::string& message);

  char* base_;
  int rank_;
  int world_;
  int slots_;
  int64_t chunk_bytes_;
  WaitPolicy policy_;
  uint64_t step_ = 0;  // next step; the same on every rank
  std::vector<const void*> inputs_;  // reduce's input pointers, allocated once
  std::string failure_;
};

}  // namespace fastpar
