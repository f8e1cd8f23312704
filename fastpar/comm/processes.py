"""Which peer processes still live: ranks on one host watch each other's pids, so a wait for a
peer whose process is gone ends at once instead of at the timeout (csrc/process.h does the same
for the native waits)."""

from __future__ import annotations

import os


def pid_namespace() -> str:
    """An id of this process's pid namespace: a pid names the same process only inside it."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


def process_alive(pid: int) -> bool:
    """Whether `pid` is a live process (not gone, not a zombie waiting to be reaped); unknown
    counts as alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            line = f.read()
    except OSError:
        return True
    state = line[line.rfind(")") + 2 : line.rfind(")") + 3]
    return state not in ("Z", "X")


def identity() -> str:
    """This process as "<pid namespace>:<pid>", published for the peers' `watchable_pids`."""
    return f"{pid_namespace()}:{os.getpid()}"


def watchable_pids(identities: dict[int, str]) -> dict[int, int]:
    """rank -> pid of the peers (from their `identity()`) whose pid means the same process
    here: those in this process's pid namespace."""
    mine = pid_namespace()
    pids = {}
    for rank, text in identities.items():
        namespace, _, pid = text.rpartition(":")
        if mine and namespace == mine and pid.isdigit():
            pids[rank] = int(pid)
    return pids
