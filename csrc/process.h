// Facts about processes that the shared-memory transports need (pure C++, Linux): whether a
// peer process still lives, and which pid namespace a pid belongs to (a pid means the same
// process to two processes only inside one namespace).
#pragma once

#include <sys/types.h>

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace fastpar {

// Whether `pid` is a live process: it exists and is not a zombie waiting to be reaped (a
// crashed rank stays a zombie until its launcher reaps it). Unknown counts as alive.
bool process_alive(pid_t pid);

// An id of this process's pid namespace (the inode of /proc/self/ns/pid; 0 when unknown).
uint64_t pid_namespace();

// "2 s", "0.5 s": seconds for messages, without trailing zeros.
std::string format_seconds(double value);

// The first rank in `pids` (rank -> pid; pid <= 0: not watched, e.g. another pid namespace)
// whose process `alive` says is gone, or -1. The watchdog's decision, apart from its thread.
int first_dead_rank(const std::vector<int64_t>& pids, const std::function<bool(pid_t)>& alive);

// A thread that checks the peers' pids every `period_s` and calls `on_dead(rank)` once, for the
// first peer found gone (then it stops checking). For waits it cannot interrupt itself: a
// kernel spinning in a GPU barrier, whose host thread sleeps in a CUDA synchronize.
class PeerWatchdog {
 public:
  PeerWatchdog(std::vector<int64_t> pids, double period_s, std::function<void(int)> on_dead,
               std::function<bool(pid_t)> alive = process_alive);
  ~PeerWatchdog();  // stops and joins the thread
  PeerWatchdog(const PeerWatchdog&) = delete;
  PeerWatchdog& operator=(const PeerWatchdog&) = delete;

  // The dead rank reported, or -1.
  int culprit() const;

 private:
  void run();

  std::vector<int64_t> pids_;
  double period_s_;
  std::function<void(int)> on_dead_;
  std::function<bool(pid_t)> alive_;
  mutable std::mutex mutex_;
  std::condition_variable wake_;
  bool stopping_ = false;
  int culprit_ = -1;
  std::thread thread_;  // last: starts once everything above is set
};

}  // namespace fastpar
