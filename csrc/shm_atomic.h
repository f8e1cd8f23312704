// The page and cache-line sizes and the acquire/release word accesses shared by the two
// shared-memory transports: the pipe (shm_pipe.cpp) and the ring all-reduce (shm_ring*.cpp).
// Internal to those files.
#pragma once

#include <cstddef>
#include <cstdint>

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
}  // namespace fastpar
