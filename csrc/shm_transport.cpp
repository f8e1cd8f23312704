// POSIX shared-memory segments for the CPU all-reduce (see shm_transport.h).
#include "shm_transport.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <stdexcept>
#include <utility>

namespace fastpar {
namespace {

[[noreturn]] void fail(const std::string& what, const std::string& name, int error) {
  throw std::runtime_error("shared memory segment " + name + ": " + what + " failed: " +
                           std::strerror(error));
}

void* map(int fd, size_t bytes, const std::string& name) {
  void* data = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (data == MAP_FAILED) {
    const int error = errno;
    close(fd);
    fail("mmap of " + std::to_string(bytes) + " bytes", name, error);
  }
  close(fd);  // the mapping keeps the segment alive
  return data;
}

}  // namespace

SharedSegment SharedSegment::create(const std::string& name, size_t bytes) {
  const int fd = shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
  if (fd < 0) fail("shm_open(O_CREAT)", name, errno);
  // posix_fallocate reserves the pages now: on a full /dev/shm this fails with ENOSPC instead of
  // the first write far away raising SIGBUS.
  int error = ftruncate(fd, static_cast<off_t>(bytes)) == 0 ? 0 : errno;
  if (error == 0) error = posix_fallocate(fd, 0, static_cast<off_t>(bytes));
  if (error != 0) {
    close(fd);
    shm_unlink(name.c_str());
    fail("reserving " + std::to_string(bytes) + " bytes (is /dev/shm large enough?)", name,
         error);
  }
  void* data;
  try {
    data = map(fd, bytes, name);
  } catch (...) {
    shm_unlink(name.c_str());
    throw;
  }
  SharedSegment segment(name, data, bytes);
  segment.linked_ = true;
  return segment;
}

SharedSegment SharedSegment::open(const std::string& name, size_t bytes) {
  const int fd = shm_open(name.c_str(), O_RDWR, 0600);
  if (fd < 0) fail("shm_open (is every rank on the same host and IPC namespace?)", name, errno);
  struct stat info;
  if (fstat(fd, &info) != 0) {
    const int error = errno;
    close(fd);
    fail("fstat", name, error);
  }
  if (static_cast<size_t>(info.st_size) != bytes) {
    close(fd);
    throw std::runtime_error("shared memory segment " + name + " has " +
                             std::to_string(info.st_size) + " bytes; expected " +
                             std::to_string(bytes));
  }
  SharedSegment segment(name, map(fd, bytes, name), bytes);
  segment.linked_ = true;
  return segment;
}

void SharedSegment::remove(const std::string& name) {
  if (shm_unlink(name.c_str()) != 0 && errno != ENOENT) fail("shm_unlink", name, errno);
}

SharedSegment::SharedSegment(SharedSegment&& other) noexcept { *this = std::move(other); }

SharedSegment& SharedSegment::operator=(SharedSegment&& other) noexcept {
  if (this != &other) {
    unmap();
    name_ = std::move(other.name_);
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
    linked_ = std::exchange(other.linked_, false);
  }
  return *this;
}

SharedSegment::~SharedSegment() {
  if (linked_) shm_unlink(name_.c_str());  // a destructor must not throw: best effort here
  unmap();
}

void SharedSegment::unlink() {
  if (!linked_) return;
  linked_ = false;
  if (shm_unlink(name_.c_str()) != 0 && errno != ENOENT) fail("shm_unlink", name_, errno);
}

void SharedSegment::unmap() {
  if (data_ != nullptr) munmap(data_, size_);
  data_ = nullptr;
  size_ = 0;
}

}  // namespace fastpar
