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
// Small calls take a shorter path where latency, not bandwidth, counts: after the publish,
// every rank reduces the whole tensor from all n inputs in rank order straight into its tensor
// (the same fold, so the same bits everywhere): one wait for the peers instead of two, and no
// gather. "Small" is at most a chunk and kOneShotBytes * 2 / n: each rank reads all n inputs,
// so its traffic grows with n where the pipelined path's does not (2 ranks, measured: the
// one-shot call takes half the time at 64-128 KiB; at 256 KiB it was faster in a quiet C++
// loop but slower in bench/allreduce.py under load; a page multiple). Their inputs go to
// window t % W of a separate area for step t, not to the slots, and each rank reduces its own
// input from its tensor. The windows turn over slowly: between two writes of a window every
// peer has moved about kOneShotTurnoverBytes of other windows through its caches (calls of
// kOneShotTurnoverCallBytes; more for larger ones), so the lines a publish writes have left
// the peers' private caches, and the copy does not stall invalidating the peers' copies line
// by line (with one window per slot, a 64 KiB call of 2 ranks took twice as long). W >= S, so
// the wait for step t - S that frees slot t % S frees the window too: every rank finishes its
// steps in order.
//
// Tensors in registered areas. Memory that every rank allocated in the same order and every
// rank maps (fastpar.comm.empty_shared: one file per rank, registered with register_area) holds
// a rank's tensor at the same offset as its peers'. Such a call copies nothing in: the header
// names the area and the offset (so ranks at different places raise RingMismatchError like any
// other difference), publish only announces, and the chunks are reduced and gathered straight
// from the areas, with the same passes and flags as above:
//   reduce: rank r reduces its part of chunk c from all n areas in rank order (the same fold,
//     so the same bits as the copying path) into its own area, over its own input. Each rank
//     reads only its own part of the others' areas, so nobody reads what r overwrites;
//   gather: once rank q's `reduced` is acquired (q has read its part of r's area for the last
//     time), r copies part q from q's area into its own.
// The call returns only after every peer's `done` for the last chunk (peers finish steps in
// order): from then on nobody reads this rank's area, and the caller may write it again.
// Per byte every rank reads 2 - 1/n bytes (its part of n inputs, the others' parts of the
// result) and writes 1, instead of 3 - 1/n and 2. That pays once the lines it writes have left
// the peers' caches: every line written in place was read by a peer in this call or the last,
// so while a call fits the caches each write waits for the peers' copies to be invalidated,
// and the end of the call waits once more. Measured with 2 ranks on 2 cores (bench/allreduce.py,
// time of an ordinary tensor over a shared one, several runs): 0.5-0.7x at 256 KiB, 0.86-0.98x
// at 1 MiB, 1.1-1.3x at 2-4 MiB, 1.05-1.1x at 16-64 MiB. So calls of fewer than kAreaMinChunks
// chunks (2 MiB with 256 KiB chunks) take the copying paths above, one-shot included, whatever
// memory they are in; their header still names the area.
//
// Checks and failures. The header of the first chunk of a call is compared on every rank before
// anything else happens; on a difference every rank raises RingMismatchError listing each
// rank's call, and the ring stays usable (all ranks used the same one step). A rank whose call
// goes to torch.distributed announces it through `agree` (a header-only step), so ranks about
// to take different paths all raise RingMismatchError saying so, instead of one waiting in the
// ring and the other in torch.distributed until both time out blaming each other.
//
// Every wait is bounded by the timeout, and a peer whose process is gone (pid checked every
// kLivenessPeriod) is given up on at once. Giving up is agreed with the late peer itself: the
// waiting rank replaces the awaited flag, by compare-and-swap, with a poison value naming
// itself, and owners set their flags by compare-and-swap too. Either the flag arrived first
// (the wait succeeds after all), or the poison did, and then the owner can never set it: a rank
// that arrives after a peer gave up on it raises as well, never returns a result its peer did
// not get (a `done` flag poisoned after the call's data was complete only fails the next call).
// A rank that gives up also marks itself aborted in the segment, so its peers give up too
// instead of waiting out their own timeouts; the ring is unusable afterwards (RingClosedError
// says why).
//
// Flags are 64-bit step numbers (+1) that only grow, stored with release and loaded with
// acquire; steps continue across calls, so no flag is ever reset.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "reduce.h"
#include "ring.h"

namespace fastpar {

struct ShmFlags;  // one slot's flags of one rank (shm_ring_flags.h)

// Memory that every rank allocated in the same order and every rank maps: a tensor at byte
// `offset` of this rank's area is reduced straight from bases[p] + offset of every rank p.
struct ShmArea {
  std::vector<char*> bases;  // bases[p]: rank p's area as mapped in this process
  int64_t bytes = 0;         // of each rank's area
  std::shared_ptr<void> keeper;  // keeps the mappings alive while the ring may read them
};

class ShmRing {
 public:
  static constexpr int64_t kOneShotBytes = 128 * 1024;  // for 2 ranks; see "Small calls"
  static constexpr int64_t kOneShotTurnoverBytes = 4 << 20;  // see "Small calls"
  // The call size the windows' turnover is sized for (with 128 KiB windows sized for whole
  // windows, a 64 KiB call of 2 ranks took 1.4x as long).
  static constexpr int64_t kOneShotTurnoverCallBytes = 64 * 1024;
  static constexpr double kLivenessPeriod = 0.05;  // seconds between checks of a peer's pid
  // Calls in a registered area of fewer chunks than this copy as others do (see "Tensors in
  // registered areas").
  static constexpr int64_t kAreaMinChunks = 8;

  // Bytes of the segment for `world` ranks with `slots` slots of `chunk_bytes` each.
  static size_t segment_bytes(int world, int slots, int64_t chunk_bytes);
  // Writes the segment's description (by the rank that created it, before anyone else maps it).
  static void format(char* base, int world, int slots, int64_t chunk_bytes);

  // `base` is the mapped segment (formatted by its creator); it must outlive this object.
  // Raises std::invalid_argument for inconsistent sizes or a segment formatted differently.
  ShmRing(char* base, size_t bytes, int rank, int world, int slots, int64_t chunk_bytes,
          WaitPolicy policy);

  // In place: data (count elements of dtype) becomes the reduction over all ranks. `op` is a
  // ReduceOp code or kOpAvg; for kOpAvg the elements are summed (the caller divides). Data in
  // this rank's registered area is reduced without copies (see "Tensors in registered areas").
  // Not thread-safe: one call at a time (the torch glue serialises).
  void all_reduce(void* data, int64_t count, DType dtype, int32_t op);
  // Registers an area (bases.size() == world, each of `bytes`; bases[rank] is this rank's) and
  // returns its index: 0, 1, ... in registration order, the same on every rank when every rank
  // registers its areas in the same order. `keeper` is held until the ring is destroyed.
  int register_area(std::vector<char*> bases, int64_t bytes, std::shared_ptr<void> keeper);
  // A step that moves no data: every rank must pass the same header (RingMismatchError on
  // every rank otherwise, and the ring stays usable). Announces a call that goes elsewhere
  // (header with kTorchPath).
  void agree(const CallHeader& header);

  // Why this ring is unusable (empty while it is usable).
  const std::string& failure() const { return failure_; }
  int rank() const { return rank_; }
  int world() const { return world_; }

 private:
  ShmFlags& flags(int rank, int slot) const;
  char* slot_data(int rank, int slot) const;
  char* window_data(int rank, uint64_t step) const;  // the one-shot input of `step`
  uint64_t* abort_word(int rank) const;
  uint64_t* pid_word(int rank) const;  // the rank's pid, then its pid namespace

  void one_shot(uint64_t step, char* data, int64_t count, DType dtype, ReduceOp op,
                const CallHeader& header);
  // Copies the chunk (but the bytes in `skip`) to `destination` (the own slot or window of
  // `step`) once the slot is free, and announces it.
  void publish(uint64_t step, const char* chunk, int64_t bytes, const CallHeader& header,
               Span skip, char* destination);
  void check_headers(uint64_t step, const CallHeader& mine);
  void reduce(uint64_t step, const char* chunk, int64_t chunk_count, DType dtype, ReduceOp op);
  void gather(uint64_t step, char* chunk, int64_t chunk_count, int64_t element_size);

  // Sets this rank's flag `word` to `value` (step + 1); throws RingTimeoutError when a peer
  // gave up waiting for it (poisoned it), unless `complete` (the call's data is already
  // final): then the failure is kept for the next call.
  void arrive(uint64_t* word, uint64_t value, const char* what, bool complete = false);
  // Waits until `word` of rank `peer` is at least `value`; throws RingTimeoutError (and leaves
  // the ring unusable) when the timeout passes, the peer's process is gone, or a peer has
  // given up.
  void wait_for(int peer, uint64_t* word, uint64_t value, const char* what, uint64_t step);
  // Whether rank `peer`'s process is known to be gone (its pid is checked only where it means
  // the same process here: the same pid namespace).
  bool peer_dead(int peer) const;
  [[noreturn]] void give_up(int culprit, const std::string& message);

  void check_usable() const;

  // The registered area that holds `bytes` at `data` of this rank (-1: none); throws
  // std::invalid_argument when they start inside one and end past it.
  int find_area(const char* data, int64_t bytes) const;
  // The pipelined all-reduce of `count` elements at `offset` of area `area` (shm_ring_areas.cpp).
  void all_reduce_in_area(const ShmArea& area, int64_t offset, int64_t count, DType dtype,
                          ReduceOp op, const CallHeader& header);
  void reduce_in_area(uint64_t step, const ShmArea& area, int64_t offset, int64_t chunk_count,
                      DType dtype, ReduceOp op);
  void gather_in_area(uint64_t step, const ShmArea& area, int64_t offset, int64_t chunk_count,
                      int64_t element_size);

  char* base_;
  int rank_;
  int world_;
  int slots_;
  int64_t chunk_bytes_;
  int64_t window_bytes_ = 0;  // the largest one-shot call
  int windows_ = 0;           // one-shot windows per rank
  WaitPolicy policy_;
  uint64_t pid_namespace_;  // this process's (process.h)
  uint64_t step_ = 0;  // next step; the same on every rank
  std::vector<const void*> inputs_;  // reduce's input pointers, allocated once
  std::vector<ShmArea> areas_;
  std::string failure_;
};

}  // namespace fastpar
