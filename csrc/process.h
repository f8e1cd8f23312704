// Facts about processes that the shared-memory transports need (pure C++, Linux): whether a
// peer process still lives, and which pid namespace a pid belongs to (a pid means the same
// process to two processes only inside one namespace).
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <string>

namespace fastpar {

// Whether `pid` is a live process: it exists and is not a zombie waiting to be reaped (a
// crashed rank stays a zombie until its launcher reaps it). Unknown counts as alive.
bool process_alive(pid_t pid);

// An id of this process's pid namespace (the inode of /proc/self/ns/pid; 0 when unknown).
uint64_t pid_namespace();

// "2 s", "0.5 s": seconds for messages, without trailing zeros.
std::string format_seconds(double value);

}  // namespace fastpar
