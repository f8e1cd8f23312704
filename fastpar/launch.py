"""Start N local processes that form a torch.distributed group and run a function in each.

`spawn_ranks(fn, world_size)` spawns one process per rank, creates the default process group in
each (gloo on CPU, NCCL when CUDA is available, rendezvous through a TCPStore that the parent
hosts on a free port, so there is no port race), calls `fn(rank, world_size, *args)` and
returns the ranks' results. When a rank raises, dies or outlives the timeout, the remaining
ranks are killed and the call raises `RankFailure` naming the first rank that failed, with its
traceback, or for a rank that died (a signal, an abort in native code) the last lines it wrote
to stderr; no child outlives the call (each child is also tied to its parent with
PR_SET_PDEATHSIG, so even a killed parent leaves no orphans).

Each rank's stderr goes to a file, which the parent relays line by line to its own stderr: a
file keeps what a dying process wrote last, which a pipe read by that process would lose.

`fastpar train --nproc N` launches through it; the tests use it as `run_multiprocess`, with
`start_method="forkserver"`: importing torch costs a spawned rank seconds of CPU, and a suite
starts hundreds of ranks, while a rank forked from the server (which imported torch once) starts
in a fraction of a second. Either way a rank sees the launcher's environment as it is at the
call, and imports `fn`'s module only after that environment is in place.

This module imports torch only where it is used: a launcher that did not import it yet (`fastpar
train`) imports torch.distributed, for the store, in a thread while the ranks (or the fork
server) import torch themselves, and opens the store once they started; a rank waits for the
store's port before it joins the group.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import faulthandler
import importlib
import math
import multiprocessing as mp
import os
import pickle
import queue
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any

from fastpar._checks import check_int, check_timeout_s
from fastpar._machine import usable_cores

_PR_SET_PDEATHSIG = 1
START_METHODS = ("spawn", "forkserver")
# What the fork server imports once for every rank it forks: the launcher's main module (as
# multiprocessing does by default; under pytest, pytest), torch and fastpar's packages. None of
# them touches CUDA, which a forked rank initialises itself; torch's import starts OpenMP's
# pool, and a forked rank still runs parallel CPU ops on several threads (tests/test_launch_start).
FORKSERVER_PRELOAD = (
    "__main__", "torch", "torch.distributed",
    "fastpar.launch", "fastpar.comm", "fastpar.data", "fastpar.nn", "fastpar.parallel",
    "fastpar.training",
)  # fmt: skip
# Imported last by every fork server this module starts, whatever the preload: it ends the SIGINT
# block the server starts with (see _sigint_held) in the server and in what it forks later.
_FORKSERVER_SIGINT = "fastpar._forkserver_sigint"
STDERR_TAIL_LINES = 60  # of a rank that died, quoted in RankFailure (faulthandler's included)
_STDERR_TAIL_BYTES = 64 * 1024


class RankFailure(RuntimeError):
    """A rank raised, died or hung; the message names the rank and carries its traceback.

    `summary` is the same without tracebacks: one line per failed rank ("rank 1: ValueError:
    ..."), for a command line that shows tracebacks only on request.
    """

    def __init__(self, message: str, summary: str | None = None) -> None:
        super().__init__(message)
        self.summary = message if summary is None else summary


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # not Linux: the parent's kill on failure still applies
        pass


def _release_fork_server() -> None:
    """Close this rank's copy of the fork server's "alive" pipe (it has one when forked from the
    server). The server lives until every holder has closed it, so a rank holding it would keep
    the server, and with it the rank itself (its PR_SET_PDEATHSIG parent), alive after the
    launcher was killed."""
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    fd = getattr(server, "_forkserver_alive_fd", None)
    if isinstance(fd, int) and mp.parent_process() is not None:
        os.close(fd)
        server._forkserver_alive_fd = None


@contextlib.contextmanager
def _sigint_held() -> Iterator[None]:
    """Hold Ctrl-C off while this thread starts a child (the fork server, a spawned rank, a
    thread), and deliver it once the start is done: this process handles Ctrl-C for all of
    them, and a start cut short would leave a half-started child.

    SIGINT is blocked in this thread, and the child inherits the block through fork and exec:
    a Ctrl-C that reaches it while it imports torch stays pending, and is dropped when it
    ignores SIGINT (the server after its preload, a rank as it runs), where it would otherwise
    print a KeyboardInterrupt traceback. The fork server outlives the launch, and its block
    must not outlive its preload: fastpar._forkserver_sigint ends it in the server once it
    ignores SIGINT, and in each process it forks once that has started.

    A block holds only this thread's share: another thread of this process (torch's, a
    caller's) may take the signal, and Python would raise in the main thread mid-start, so the
    main thread's handler only notes it meanwhile. Ignoring it instead (SIG_IGN) would lose
    it."""
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()  # a start of the tracker unblocks SIGINT in this thread
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    noted: list[int] = []
    in_main = threading.current_thread() is threading.main_thread()  # only it sets handlers
    if in_main:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: noted.append(signum))
    try:
        yield
    finally:
        if in_main:
            # None: a handler set outside Python, which cannot be set back; the default.
            signal.signal(
                signal.SIGINT, signal.default_int_handler if previous is None else previous
            )
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)  # delivers one still pending
        if noted:
            signal.raise_signal(signal.SIGINT)


def stop_fork_server() -> None:
    """End this process's fork server now, if it started one, instead of at this process's
    exit (for a launcher done with its ranks): a server that imported torch takes seconds to
    exit, and whoever reads this process's output waits for it too, since the server holds the
    same stdout and stderr. SIGKILL: it holds nothing to save. A later "forkserver" call starts
    a new one."""
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    pid = getattr(server, "_forkserver_pid", None)
    if server is None or not isinstance(pid, int):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    server._stop()  # closes its pipe, reaps it, removes its socket


def _rank_main(
    job: bytes,
    rank: int,
    world_size: int,
    backend: str,
    port: Any,  # a shared c_int: the store's port, set before `port_ready`
    port_ready: Any,  # a multiprocessing Event
    timeout_s: float,
    env: dict[str, str],
    results: mp.Queue,
    stderr_path: str,
) -> None:
    _release_fork_server()
    _die_with_parent()
    _send_stderr_to(stderr_path)
    # Ctrl-C reaches every process of the terminal's group: the parent alone handles it and
    # stops the ranks, so they do not each print a KeyboardInterrupt traceback. Ignoring it
    # drops one pending since this rank started with SIGINT blocked (by the launcher, or by the
    # fork server, which leaves a rank's block to this; see fastpar._forkserver_sigint).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    # The launcher's environment at the call (a forked rank inherited the fork server's), in
    # place before `job` imports fn's module.
    os.environ.clear()
    os.environ.update(env)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size))  # fmt: skip
    # Ranks share the cores this process may use (taskset, a cpuset, Slurm leave fewer than the
    # machine has): more intra-op threads than cores only adds contention.
    import torch
    import torch.distributed as dist

    torch.set_num_threads(max(1, usable_cores() // world_size))
    if backend == "auto":
        backend = default_backend()
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())

    try:
        # The launcher opens the store after starting the ranks (see the module docstring).
        if not port_ready.wait(timeout_s):
            raise RuntimeError(f"the launcher's store did not open within {timeout_s:.0f}s")
        store = dist.TCPStore(
            "127.0.0.1",
            port.value,
            world_size,
            is_master=False,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        dist.init_process_group(
            backend,
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        fn, args = pickle.loads(job)
        # Pickled here, by value: the queue's pickler would hand a tensor's storage over through
        # a file descriptor that this process, gone by then, must serve; and a value that does
        # not pickle fails this rank with its traceback instead of the queue's feeder thread.
        value = pickle.dumps(fn(rank, world_size, *args))
    except BaseException:
        # Report before tearing the group down: the teardown makes peers fail too, and the
        # parent must see this, the first failure, with the earliest time.
        results.put((rank, False, (time.time(), traceback.format_exc(), _one_line())))
        destroy_group()
        return
    # The result first: a rank waiting in the barrier below for a hung peer has returned, and
    # a timeout names only that peer.
    results.put((rank, True, value))
    destroy_group(after_every_rank=True)


def _send_stderr_to(path: str) -> None:
    """Point this process's stderr (fd 2, which native code writes too) at the file `path`, and
    have a fatal signal print every thread's Python stack there (faulthandler)."""
    if sys.stderr is not None:
        sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 2)
    os.close(fd)
    faulthandler.enable(file=2, all_threads=True)


_RELAY_PREFIX = "fastpar-ranks-"


def _remove_orphaned_relays() -> None:
    """Remove the stderr folders of launchers that died without closing them (killed): each
    is named after its launcher's process id."""
    for entry in os.scandir(tempfile.gettempdir()):
        match = re.fullmatch(rf"{_RELAY_PREFIX}(\d+)-\w+", entry.name)
        if match is None or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(entry.path, ignore_errors=True)
        except OSError:  # alive, another user's
            pass


class _StderrRelay:
    """The ranks' stderr files: relayed to this process's stderr in whole lines, and the last
    lines of a rank that died quoted in its failure."""

    def __init__(self, world_size: int) -> None:
        _remove_orphaned_relays()
        self.directory = tempfile.mkdtemp(prefix=f"{_RELAY_PREFIX}{os.getpid()}-")
        self.paths = [os.path.join(self.directory, f"rank{r}.stderr") for r in range(world_size)]
        self._offsets = [0] * world_size
        self._partial = [b""] * world_size  # a line not yet ended, held back

    def pump(self, final: bool = False) -> None:
        """Relay what the ranks wrote since the last call (with `final`, unended lines too)."""
        for rank, path in enumerate(self.paths):
            try:
                with open(path, "rb") as f:
                    f.seek(self._offsets[rank])
                    data = f.read()
            except OSError:  # not created yet
                continue
            self._offsets[rank] += len(data)
            text = self._partial[rank] + data
            cut = len(text) if final else text.rfind(b"\n") + 1
            self._partial[rank] = text[cut:]
            if cut and sys.stderr is not None:
                sys.stderr.write(text[:cut].decode("utf-8", "replace"))
                sys.stderr.flush()

    def tail(self, rank: int) -> str:
        """The last STDERR_TAIL_LINES lines rank `rank` wrote to stderr, indented, under a
        heading ("" when it wrote nothing)."""
        try:
            with open(self.paths[rank], "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - _STDERR_TAIL_BYTES))
                lines = f.read().decode("utf-8", "replace").splitlines()
        except OSError:
            return ""
        lines = [line for line in lines if line.strip()][-STDERR_TAIL_LINES:]
        if not lines:
            return ""
        body = "\n".join(f"    {line}" for line in lines)
        return f"\n  the last lines rank {rank} wrote to stderr:\n{body}"

    def close(self) -> None:
        self.pump(final=True)
        shutil.rmtree(self.directory, ignore_errors=True)


def _one_line() -> str:
    """The exception being handled as "TypeName: first line of its message"."""
    error = sys.exc_info()[1]
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def destroy_group(after_every_rank: bool = False) -> None:
    """Destroy the default group, if any; with `after_every_rank`, once every rank is done with
    it (a barrier): gloo tears a rank's connections down at once, and a peer still completing
    its own init or last collective then fails with "Connection closed by peer"."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    if after_every_rank:
        # A peer that failed or exited breaks the barrier: the launcher reports that peer.
        with contextlib.suppress(Exception):
            dist.barrier()
    dist.destroy_process_group()


def default_backend() -> str:
    """The backend for this machine: "nccl" where CUDA and NCCL are available, else "gloo"."""
    import torch

    return "nccl" if torch.cuda.is_available() and torch.distributed.is_nccl_available() else "gloo"


def spawn_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *,
    args: Sequence[Any] = (),
    timeout: float | None = 60.0,
    group_timeout: float | None = None,
    backend: str = "gloo",
    may_die: Collection[int] = (),
    env: dict[str, str] | None = None,
    start_method: str = "spawn",
    preload: Sequence[str] = FORKSERVER_PRELOAD,
) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` spawned processes.

    Arguments:
        fn: a module-level (picklable) function; the default process group is initialised when
            it runs, and destroyed after it returns.
        world_size: number of processes, >= 1.
        args: extra picklable arguments for every rank.
        timeout: seconds for the whole run; None for no bound on the run as a whole.
        group_timeout: the process group's timeout, which bounds every collective (default:
            `timeout`, or 300 s when that is None).
        backend: torch.distributed backend ("gloo" on CPU), or "auto": `default_backend()`,
            decided by the ranks (so that a launcher without torch need not import it).
        may_die: ranks allowed to end without a result (for tests that kill a rank); their
            entry in the returned list is None.
        env: extra environment variables for the children (on top of this process's).
        start_method: "spawn" (a fresh interpreter per rank) or "forkserver" (ranks forked
            from a server that imported `preload` once; see the module docstring).
        preload: the modules the fork server imports, when this call starts it (the first
            "forkserver" call of this process; a later call's is ignored); fastpar adds one
            of its own, which leaves the server and what it forks later SIGINT as without it.

    Returns:
        The ranks' return values, indexed by rank.

    Raises:
        TypeError, ValueError: a bad argument (named in the message).
        RankFailure: a rank raised, died or exited without returning (its traceback or exit
            code is in the message), or the run outlived `timeout` (the ranks still running
            are named).
    """
    check_int("world_size", world_size, 1)
    # Checked here: the store would fail on them with a socket error, a rank with its death.
    for name, seconds in (("timeout", timeout), ("group_timeout", group_timeout)):
        if seconds is not None:
            check_timeout_s(name, seconds)
    for key, value in (env or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"env must map str to str, got {key!r}: {value!r}")
    if start_method not in START_METHODS:
        raise ValueError(f"start_method must be one of {START_METHODS}, got {start_method!r}")
    if group_timeout is None:
        group_timeout = timeout if timeout is not None else 300.0

    context = mp.get_context(start_method)
    if start_method == "forkserver":  # takes effect when the server starts (the first call)
        context.set_forkserver_preload([*preload, _FORKSERVER_SIGINT])
    job = pickle.dumps((fn, tuple(args)))
    environment = {**os.environ, **(env or {})}
    port = context.RawValue("i", 0)
    port_ready = context.Event()
    results: mp.Queue = context.Queue()
    relay = _StderrRelay(world_size)
    processes = [
        context.Process(
            target=_rank_main,
            args=(
                job,
                rank,
                world_size,
                backend,
                port,
                port_ready,
                group_timeout,
                environment,
                results,
                relay.paths[rank],
            ),
            name=f"fastpar-rank{rank}",
            daemon=True,
        )
        for rank in range(world_size)
    ]
    outcomes: dict[int, Any] = {}
    exited: set[int] = set()  # ranks seen ended with exit code 0 and no result yet
    failures: list[tuple[float, int, str, str]] = []
    deadline = time.monotonic() + timeout if timeout is not None else math.inf
    store = None
    # A launcher without torch (`fastpar train`) imports it while the ranks start: starting a
    # rank from the fork server waits until the server has imported the preload. A launcher
    # that has it (a test, a caller in-process) would only start and join a thread.
    importer = None
    if "torch.distributed" not in sys.modules:
        importer = threading.Thread(target=importlib.import_module, args=("torch.distributed",),
                                    name="fastpar-import-torch", daemon=True)  # fmt: skip
        # It takes no SIGINT (its mask is inherited): Ctrl-C stays the main thread's.
        with _sigint_held():
            importer.start()
    try:
        if start_method == "forkserver":
            from multiprocessing import forkserver

            with _sigint_held():
                forkserver.ensure_running()
        # A spawned rank starts at once; a forked one waits for the server's preload, and
        # Ctrl-C must stay the launcher's meanwhile.
        spawned = start_method == "spawn"
        for process in processes:
            with _sigint_held() if spawned else contextlib.nullcontext():
                process.start()
        if importer is not None:
            importer.join()
        import torch.distributed as dist

        store = dist.TCPStore(
            "127.0.0.1",
            0,
            world_size + 1,
            is_master=True,
            wait_for_workers=False,
            timeout=datetime.timedelta(seconds=group_timeout),
        )
        port.value = store.port
        port_ready.set()
        while len(outcomes) < world_size:
            relay.pump()
            try:
                rank, ok, value = results.get(timeout=0.05)
            except queue.Empty:
                _check_dead(processes, outcomes, set(may_die), relay, exited)
                if time.monotonic() > deadline:
                    missing = [r for r in range(world_size) if r not in outcomes]
                    raise RankFailure(
                        f"timed out after {timeout:.0f}s waiting for rank(s) {missing}"
                    ) from None
                continue
            if ok:
                outcomes[rank] = pickle.loads(value)
                continue
            failures.append((value[0], rank, f"rank {rank} raised:\n{value[1]}", value[2]))
            _collect_more_failures(results, failures, grace_s=2.0)
            # A rank that died without a word (killed) is the likely cause of its peers'
            # errors (connections closed), so deaths are named first.
            for dead, process in enumerate(processes):
                if process.exitcode not in (None, 0) and dead not in may_die:
                    death = _death(dead, process.exitcode)
                    failures.append((-math.inf, dead, death + relay.tail(dead),
                                     death.removeprefix(f"rank {dead} ")))  # fmt: skip
            # A stopped rank (SIGSTOP, a debugger) is silent, and likely why its peers timed
            # out: it is named first too.
            for silent, process in enumerate(processes):
                reported = silent in outcomes or any(f[1] == silent for f in failures)
                if not reported and _is_stopped(process):
                    note = f"rank {silent} is stopped (SIGSTOP or a debugger) and never answered"
                    failures.append((-math.inf, silent, note, note.removeprefix(f"rank {silent} ")))
            failures.sort(key=lambda failure: failure[:2])
            raise RankFailure(
                "\n--- then ".join(message for _, _, message, _ in failures),
                "\n".join(f"rank {rank}: {line}" for _, rank, _, line in failures),
            )
    finally:
        _stop_all(processes)
        results.close()
        relay.close()
        del store
    return [outcomes.get(rank) for rank in range(world_size)]


def _collect_more_failures(
    results: mp.Queue, failures: list[tuple[float, int, str, str]], grace_s: float
) -> None:
    """After a first failure, give the other ranks a moment to report theirs: the first to fail
    is the cause, and it is not always the first to arrive."""
    end = time.monotonic() + grace_s
    while time.monotonic() < end:
        try:
            rank, ok, value = results.get(timeout=0.05)
        except queue.Empty:
            continue
        if not ok:
            failures.append((value[0], rank, f"rank {rank} raised:\n{value[1]}", value[2]))


def _check_dead(
    processes: list[mp.process.BaseProcess],
    outcomes: dict[int, Any],
    may_die: set[int],
    relay: _StderrRelay,
    exited: set[int],
) -> None:
    """Raise RankFailure for a rank that ended without a result (outcome None for one in
    `may_die`). Called after the results queue came up empty; `exited` carries the ranks that
    ended with exit code 0 from one call to the next."""
    for rank, process in enumerate(processes):
        if rank in outcomes or process.is_alive():
            continue
        process.join(timeout=0)
        if process.exitcode == 0 and rank not in exited:
            # A rank puts its outcome in the queue before it exits, but the queue was read
            # before this check: only a rank still without one after the next read (at a
            # later call) ended without one (os._exit(0) in fn), which no timeout must wait for.
            exited.add(rank)
            continue
        if process.exitcode is not None:
            if rank in may_die:
                outcomes[rank] = None
                continue
            death = _death(rank, process.exitcode)
            raise RankFailure(
                death + relay.tail(rank), f"rank {rank}: {death.removeprefix(f'rank {rank} ')}"
            )


def _is_stopped(process: mp.process.BaseProcess) -> bool:
    """Whether `process` is stopped (state T: SIGSTOP, or t: held by a debugger)."""
    try:
        with open(f"/proc/{process.pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 : stat.rfind(")") + 3] in ("T", "t")


def _death(rank: int, exitcode: int | None) -> str:
    if exitcode == 0:
        return f"rank {rank} exited with code 0 without returning (os._exit in its function?)"
    message = f"rank {rank} died with exit code {exitcode}"
    if exitcode is not None and exitcode < 0:
        with contextlib.suppress(ValueError):
            message += f" ({signal.Signals(-exitcode).name})"
    return message


STOP_GRACE_S = 5.0  # how long stopped ranks may take to exit on SIGTERM before SIGKILL


def _stop_all(processes: list[mp.process.BaseProcess]) -> None:
    """End every rank: SIGTERM, then SIGKILL for those still there after STOP_GRACE_S (in all,
    not per rank). A stopped rank (SIGSTOP, a debugger) also gets SIGCONT, without which it
    would not act on SIGTERM."""
    # Only processes that started: when starting one fails, that error must surface, not an
    # assertion from joining the ones after it.
    processes = [process for process in processes if process.pid is not None]
    for process in processes:
        if process.is_alive():
            process.terminate()
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGCONT)
    deadline = time.monotonic() + STOP_GRACE_S
    for process in processes:
        process.join(timeout=max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join(timeout=5)
