// A POSIX shared-memory segment (pure C++): created by one rank, opened by the others, unlinked
// as soon as every rank has mapped it, so that nothing stays in /dev/shm even if a process dies
// later. The mapping itself lives until the last process unmaps it (or exits).
#pragma once

#include <cstddef>
#include <string>

namespace fastpar {

class SharedSegment {
 public:
  // Creates `name` ("/fastpar-..."), sized `bytes` (backed by reserved pages: a full /dev/shm
  // fails here with a clear error, not later with SIGBUS), zero-filled, and maps it.
  static SharedSegment create(const std::string& name, size_t bytes);
  // Maps an existing segment; fails when it is missing or its size is not `bytes`.
  static SharedSegment open(const std::string& name, size_t bytes);
  // Removes the name `name` (one a crashed creator left); a name that is gone already is fine.
  static void remove(const std::string& name);

  SharedSegment() = default;
  SharedSegment(SharedSegment&& other) noexcept;
  SharedSegment& operator=(SharedSegment&& other) noexcept;
  SharedSegment(const SharedSegment&) = delete;
  SharedSegment& operator=(const SharedSegment&) = delete;
  ~SharedSegment();

  // Removes the name (idempotent; a name another rank removed already is fine). The mapping
  // stays valid.
  void unlink();
  // Unmaps (idempotent).
  void unmap();

  char* data() const { return static_cast<char*>(data_); }
  size_t size() const { return size_; }
  const std::string& name() const { return name_; }

 private:
  SharedSegment(std::string name, void* data, size_t size)
      : name_(std::move(name)), data_(data), size_(size) {}

  std::string name_;
  void* data_ = nullptr;
  size_t size_ = 0;
  bool linked_ = false;
};

}  // namespace fastpar
