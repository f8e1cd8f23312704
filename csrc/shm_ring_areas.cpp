// The shared-memory all-reduce of tensors that lie in registered areas (algorithm in shm_ring.h,
// "Tensors in registered areas"): no copy in, each rank reduces its part straight from every
// rank's area into its own, then copies the other parts from their owners' areas.
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>

#include "shm_atomic.h"
#include "shm_ring.h"
#include "shm_ring_flags.h"

namespace fastpar {

int ShmRing::register_area(std::vector<char*> bases, int64_t bytes,
                           std::shared_ptr<void> keeper) {
  check_usable();
  if (static_cast<int>(bases.size()) != world_)
    throw std::invalid_argument("an area needs one base per rank: got " +
                                std::to_string(bases.size()) + " for a world of " +
                                std::to_string(world_));
  if (bytes <= 0) throw std::invalid_argument("an area needs bytes > 0, got " +
                                              std::to_string(bytes));
  areas_.push_back(ShmArea{std::move(bases), bytes, std::move(keeper)});
  return static_cast<int>(areas_.size()) - 1;
}

int ShmRing::find_area(const char* data, int64_t bytes) const {
  for (size_t index = 0; index < areas_.size(); ++index) {
    const ShmArea& area = areas_[index];
    const char* begin = area.bases[rank_];
    if (data < begin || data >= begin + area.bytes) continue;
    if (bytes > begin + area.bytes - data)
      throw std::invalid_argument(
          "the tensor starts in shared area " + std::to_string(index) + " but runs " +
          std::to_string(bytes - (begin + area.bytes - data)) + " bytes past its end");
    return static_cast<int>(index);
  }
  return -1;
}

void ShmRing::all_reduce_in_area(const ShmArea& area, int64_t offset, int64_t count, DType dtype,
                                 ReduceOp op, const CallHeader& header) {
  const int64_t element_size = dtype_size(dtype);
  const int64_t chunk_count = chunk_bytes_ / element_size;
  const int64_t chunks = (count + chunk_count - 1) / chunk_count;
  auto elements = [&](int64_t c) { return std::min(chunk_count, count - c * chunk_count); };
  auto offset_of = [&](int64_t c) { return offset + c * chunk_count * element_size; };
  const uint64_t first = step_;
  // The same passes as the copying path (shm_ring.cpp), but publishing only announces: every
  // rank's chunk is in its area already.
  for (int64_t c = 0; c < chunks + 2; ++c) {
    if (c < chunks) {
      publish(first + c, nullptr, 0, header, {0, 0}, nullptr);
      if (c == 0) check_headers(first, header);
    }
    if (c >= 1 && c <= chunks)
      reduce_in_area(first + c - 1, area, offset_of(c - 1), elements(c - 1), dtype, op);
    if (c >= 2)
      gather_in_area(first + c - 2, area, offset_of(c - 2), elements(c - 2), element_size);
  }
  step_ = first + chunks;
  // The peers read this rank's area until they have copied its parts out (their `done`, given
  // in step order): only then may the caller write it again.
  const uint64_t last = first + chunks - 1;
  for (int peer = 0; peer < world_; ++peer) {
    if (peer != rank_)
      wait_for(peer, &flags(peer, static_cast<int>(last % slots_)).done, last + 1,
               "finish reading this rank's shared area", last);
  }
}

void ShmRing::reduce_in_area(uint64_t step, const ShmArea& area, int64_t offset,
                             int64_t chunk_count, DType dtype, ReduceOp op) {
  const int slot = static_cast<int>(step % slots_);
  const int64_t element_size = dtype_size(dtype);
  const Span part = portion(chunk_count, rank_, world_, shm::kLine / element_size);
  const int64_t at = offset + part.begin * element_size;
  for (int peer = 0; peer < world_; ++peer) {
    if (peer != rank_)
      wait_for(peer, &flags(peer, slot).ready, step + 1, "publish its chunk", step);
    inputs_[peer] = area.bases[peer] + at;
  }
  // In place over this rank's own input (reduce_buffers allows `out` to alias an input): the
  // peers read only their own parts of this area until this rank's `reduced`.
  if (part.size() > 0)
    reduce_buffers(inputs_.data(), world_, area.bases[rank_] + at, part.size(), dtype, op);
  arrive(&flags(rank_, slot).reduced, step + 1, "reduce its part");
}

void ShmRing::gather_in_area(uint64_t step, const ShmArea& area, int64_t offset,
                             int64_t chunk_count, int64_t element_size) {
  const int slot = static_cast<int>(step % slots_);
  for (int i = 1; i < world_; ++i) {
    const int peer = (rank_ + i) % world_;
    // Rank `peer`'s `reduced` also says it has read its part of this rank's area for the last
    // time, so the result may overwrite it.
    wait_for(peer, &flags(peer, slot).reduced, step + 1, "reduce its part", step);
    const Span part = portion(chunk_count, peer, world_, shm::kLine / element_size);
    const int64_t at = offset + part.begin * element_size;
    if (part.size() > 0) {
      std::memcpy(area.bases[rank_] + at, area.bases[peer] + at,
                  static_cast<size_t>(part.size() * element_size));
    }
  }
  arrive(&flags(rank_, slot).done, step + 1, "finish a previous chunk", /*complete=*/true);
}

}  // namespace fastpar
