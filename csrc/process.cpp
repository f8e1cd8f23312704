// Process facts for the shared-memory transports (see process.h).
#include "process.h"

#include <errno.h>
#include <signal.h>
#include <sys/stat.h>

#include <chrono>
#include <fstream>
#include <stdexcept>

namespace fastpar {

bool process_alive(pid_t pid) {
  if (kill(pid, 0) != 0 && errno == ESRCH) return false;
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!std::getline(stat, line)) return true;
  const size_t name_end = line.rfind(')');  // the command name may itself hold ") "
  if (name_end == std::string::npos || name_end + 2 >= line.size()) return true;
  const char state = line[name_end + 2];
  return state != 'Z' && state != 'X';
}

uint64_t pid_namespace() {
  struct stat info;
  if (stat("/proc/self/ns/pid", &info) != 0) return 0;
  return static_cast<uint64_t>(info.st_ino);
}

std::string format_seconds(double value) {
  std::string text = std::to_string(value);
  text.erase(text.find_last_not_of('0') + 1);
  if (!text.empty() && text.back() == '.') text.pop_back();
  return text + " s";
}

namespace {

double positive_period(double period_s) {
  if (!(period_s > 0))
    throw std::invalid_argument("period_s must be positive, got " + std::to_string(period_s));
  return period_s;
}

}  // namespace

int first_dead_rank(const std::vector<int64_t>& pids, const std::function<bool(pid_t)>& alive) {
  for (size_t rank = 0; rank < pids.size(); ++rank) {
    if (pids[rank] > 0 && !alive(static_cast<pid_t>(pids[rank]))) return static_cast<int>(rank);
  }
  return -1;
}

PeerWatchdog::PeerWatchdog(std::vector<int64_t> pids, double period_s,
                           std::function<void(int)> on_dead, std::function<bool(pid_t)> alive)
    : pids_(std::move(pids)),
      period_s_(positive_period(period_s)),
      on_dead_(std::move(on_dead)),
      alive_(std::move(alive)),
      thread_([this] { run(); }) {}

PeerWatchdog::~PeerWatchdog() {
  {
    const std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  // join() throws when called from the thread itself (an on_dead_ that dropped the watchdog),
  // and a destructor that throws aborts the process: that thread ends on its own.
  if (thread_.get_id() == std::this_thread::get_id()) {
    thread_.detach();
  } else if (thread_.joinable()) {
    thread_.join();
  }
}

int PeerWatchdog::culprit() const {
  const std::lock_guard<std::mutex> lock(mutex_);
  return culprit_;
}

void PeerWatchdog::run() {
  // An exception leaving a thread's function aborts the process: none may. A check that throws
  // counts as "all alive" (the kernel's timeout still bounds the wait); a report that throws
  // ends the watch.
  const auto period = std::chrono::duration<double>(period_s_);
  std::unique_lock<std::mutex> lock(mutex_);
  while (!wake_.wait_for(lock, period, [this] { return stopping_; })) {
    lock.unlock();
    int dead = -1;
    try {
      dead = first_dead_rank(pids_, alive_);
    } catch (...) {
    }
    lock.lock();
    if (dead < 0) continue;
    culprit_ = dead;
    lock.unlock();
    try {
      on_dead_(dead);
    } catch (...) {
    }
    return;
  }
}

}  // namespace fastpar
