// The shared segment's flag records and atomics, used by shm_ring.cpp (the copying paths) and
// shm_ring_areas.cpp (tensors in registered areas). Internal to those files.
#pragma once

#include <cstddef>
#include <cstdint>

#include "ring.h"

namespace fastpar {
namespace shm {

constexpr size_t kPage = 4096;
constexpr size_t kLine = 64;

inline uint64_t load_acquire(const uint64_t* word) {
  return __atomic_load_n(word, __ATOMIC_ACQUIRE);
}
inline void store_release(uint64_t* word, uint64_t value) {
  __atomic_store_n(word, value, __ATOMIC_RELEASE);
}

}  // namespace shm

// Each flag on its own cache line: the owner's stores to one do not disturb readers of another.
struct ShmFlags {
  alignas(shm::kLine) uint64_t ready;  // step + 1 once the slot holds this rank's chunk of the step
  CallHeader header;                   // of the call that step belongs to; released by `ready`
  alignas(shm::kLine) uint64_t reduced;  // step + 1 once this rank's part of the step is reduced
  alignas(shm::kLine) uint64_t done;     // step + 1 once this rank has copied every part out
};

}  // namespace fastpar
