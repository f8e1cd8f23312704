"""Imported by the fork server that `fastpar.launch` starts (the last module of its preload):
the SIGINT block the server was started with outlives neither its preload nor a child's start.

The launcher starts the server with SIGINT blocked (`launch._sigint_held`): a Ctrl-C while the
server imports torch then waits, and is dropped once the server ignores SIGINT, instead of
printing a KeyboardInterrupt traceback from it. But the server is shared by the whole process
and outlives the launch, and a block is inherited through fork: every process it forks later,
ranks but also a caller's own forkserver Pool or DataLoader workers, would never see Ctrl-C.

Unblocking at the end of the preload would reopen the window until the server ignores SIGINT
(CPython's `forkserver.main` does so only after the preload), so the block ends later:
- in the server, after its first fork, when it ignores SIGINT; it blocks SIGINT again around
  each fork, so that every process it forks starts with the block, as before;
- in a process it forks, just before its target runs (multiprocessing's after-fork hooks): a
  Ctrl-C during its start (where it imports the main module again, on a Python without the
  fix for CPython gh-126631, such as 3.11: the server never preloads it there) is dropped, as
  the server's is, and SIGINT is then as multiprocessing sets it, as without fastpar. A rank
  keeps the block until it ignores SIGINT itself (`launch._rank_main`): unblocked any earlier,
  a pending Ctrl-C would print a traceback from it.

Nothing happens when SIGINT is not blocked at import: a server started without the launcher's
hold (a caller's own start, after `stop_fork_server`) keeps the mask it was given.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from multiprocessing import util
from types import ModuleType

# Targets that end the block themselves, once they ignore SIGINT.
_ENDS_THE_BLOCK_ITSELF = ("fastpar.launch._rank_main",)


def _unblock_sigint_dropping_one_pending() -> None:
    handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, handler)


def _register(server_pid: int) -> None:
    # The hooks are inherited by what the server forks: they act in the server and in its own
    # children alone, not in the forks of a rank or a worker.
    def block_in_server() -> None:
        if os.getpid() == server_pid:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})

    def unblock_in_server() -> None:
        if os.getpid() == server_pid:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

    def before_the_target_runs(_module: ModuleType) -> None:
        if os.getppid() != server_pid:
            return
        target = getattr(multiprocessing.current_process(), "_target", None)
        name = f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', '')}"
        if name not in _ENDS_THE_BLOCK_ITSELF:
            _unblock_sigint_dropping_one_pending()

    os.register_at_fork(before=block_in_server, after_in_parent=unblock_in_server)
    util.register_after_fork(sys.modules[__name__], before_the_target_runs)


if signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, ()):
    _register(os.getpid())
