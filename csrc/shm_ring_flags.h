// The shared segment's flag records, used by shm_ring.cpp (the copying paths) and
// shm_ring_areas.cpp (tensors in registered areas). Internal to those files.
#pragma once

#include <cstdint>

#include "ring.h"
#include "shm_atomic.h"

namespace fastpar {

// Each flag on its own cache line: the owner's stores to one do not disturb readers of another.
struct ShmFlags {
  alignas(shm::kLine) uint64_t ready;  // step + 1 once the slot holds this rank's chunk of the step
  CallHeader header;                   // of the call that step belongs to; released by `ready`
  alignas(shm::kLine) uint64_t reduced;  // step + 1 once this rank's part of the step is reduced
  alignas(shm::kLine) uint64_t done;     // step + 1 once this rank has copied every part out
};

}  // namespace fastpar
