"""How `spawn_ranks` starts ranks: spawned, or forked from a preloaded server (what the tests'
`run_multiprocess` does). Either way a rank sees the launcher's environment as it is at the
call, before its function's module is imported, and no rank outlives a killed launcher.
`fastpar train`'s launcher starts its ranks before it imports torch (seconds it spends while
they start)."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastpar._machine import usable_cores
from fastpar.launch import START_METHODS, RankFailure, spawn_ranks
from fastpar.testing.distributed import run_multiprocess

from . import launch_probe

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("start_method", START_METHODS)
def test_ranks_see_the_environment_of_the_call(
    start_method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A first call starts the fork server with the variable to remove still set.
    monkeypatch.setenv("FASTPAR_LAUNCH_REMOVED", "stale")
    spawn_ranks(launch_probe.environment, 1, start_method=start_method, timeout=120)
    value = f"set after the first call, at {time.time_ns()}"
    monkeypatch.setenv("FASTPAR_LAUNCH_PROBE", value)
    monkeypatch.delenv("FASTPAR_LAUNCH_REMOVED")
    results = spawn_ranks(launch_probe.environment, 2, start_method=start_method, timeout=120)
    assert results == [(value, value, None, "0"), (value, value, None, "1")]
    extra = spawn_ranks(launch_probe.environment, 1, start_method=start_method, timeout=120,
                        env={"FASTPAR_LAUNCH_PROBE": "from env"})  # fmt: skip
    assert extra == [("from env", "from env", None, "0")]


def test_a_bad_start_method_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"start_method must be one of .*'fork'"):
        spawn_ranks(launch_probe.environment, 1, start_method="fork")


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"timeout": 0}, ValueError, r"timeout must be a finite number > 0, got 0"),
        ({"timeout": -5.0}, ValueError, r"timeout must be a finite number > 0, got -5.0"),
        ({"group_timeout": math.inf}, ValueError, r"group_timeout must be a finite number > 0"),
        ({"env": {"OMP_NUM_THREADS": 1}}, TypeError, r"env must map str to str, got 'OMP_NUM"),
    ],
)
def test_bad_arguments_are_refused_by_name(
    options: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        spawn_ranks(launch_probe.environment, 1, **options)  # type: ignore[arg-type]


def _pids(pid_file: Path, count: int, deadline: float) -> list[int]:
    while time.monotonic() < deadline:
        files = [Path(f"{pid_file}.{rank}") for rank in range(count)]
        if all(f.exists() and f.read_text() for f in files):
            return [int(f.read_text()) for f in files]
        time.sleep(0.1)
    pytest.fail("the ranks did not start")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_no_forked_rank_outlives_a_killed_launcher(tmp_path: Path) -> None:
    pid_file = tmp_path / "rank"
    launcher = (
        "import sys\n"
        "from fastpar.testing.distributed import run_multiprocess\n"
        "from tests import launch_probe\n"
        "run_multiprocess(launch_probe.sleep_then_report, 2, args=(sys.argv[1],), timeout=600)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", launcher, str(pid_file)], cwd=REPO)
    ranks: list[int] = []
    try:
        ranks = _pids(pid_file, 2, time.monotonic() + 120)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        deadline = time.monotonic() + 30
        while any(_alive(pid) for pid in ranks) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in ranks), "a rank outlived its launcher"
    finally:
        if process.poll() is None:
            process.kill()
        for pid in filter(_alive, ranks):  # a failed check leaves no sleeper behind
            os.kill(pid, signal.SIGKILL)


def _sigint_as_in_a_terminal() -> None:
    # A background job inherits SIGINT ignored, a caller may have it blocked.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


# Run as a launcher (argument: the start method), it starts one rank, forked from a new server
# whose preload is this very file, or spawned (which imports it too); the server or the rank,
# importing it, writes down how SIGINT would reach it at that moment: its handler, and whether
# it is blocked.
_SIGINT_PROBE = """
import operator, os, signal, sys
def _sigint_reach():
    blocked = signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, ())
    return f"{signal.getsignal(signal.SIGINT)!r} {'blocked' if blocked else 'open'}"
if __name__ != "__main__":
    with open(os.environ["FASTPAR_SIGINT_RECORD"], "w") as f:
        f.write(_sigint_reach())
else:
    from fastpar.launch import spawn_ranks
    spawn_ranks(operator.add, 1, start_method=sys.argv[1], preload=["__main__"], timeout=120)
    print(_sigint_reach())
"""


@pytest.mark.parametrize("start_method", START_METHODS)
def test_children_hold_ctrl_c_from_their_start(tmp_path: Path, start_method: str) -> None:
    """CPython's fork server ignores SIGINT only after its preload (seconds with torch), a rank
    only once it runs: a Ctrl-C meanwhile printed a KeyboardInterrupt traceback. They start
    with SIGINT blocked, so one waits until they ignore it, and the launcher still takes
    Ctrl-C itself, as before."""
    script, record = tmp_path / "launcher.py", tmp_path / "sigint"
    script.write_text(_SIGINT_PROBE)
    launched = subprocess.run([sys.executable, str(script), start_method], cwd=REPO,
                              capture_output=True, text=True, timeout=180, check=False,
                              env={**os.environ, "FASTPAR_SIGINT_RECORD": str(record)},
                              preexec_fn=_sigint_as_in_a_terminal)  # fmt: skip
    assert launched.returncode == 0, launched.stderr
    assert record.read_text().endswith(" blocked")
    assert launched.stdout.strip() == f"{signal.default_int_handler!r} open"


# Run as a launcher (argument: the start method), it sends Ctrl-C to its process group (itself
# and what it started, as a terminal does) the instant it started its first child, the fork
# server or a spawned rank, printing the child's pid first (not on starting multiprocessing's
# resource tracker, which blocks SIGINT itself). Then it exits as `fastpar train` does on Ctrl-C.
_CTRL_C_PROBE = """
import os, signal, sys
from multiprocessing import util
from fastpar.launch import spawn_ranks
from tests import launch_probe

start_child = util.spawnv_passfds

def start_child_then_ctrl_c(path, args, passfds):
    pid = start_child(path, args, passfds)
    command = " ".join(map(os.fsdecode, args))
    if "forkserver import main" in command or "spawn_main" in command:
        util.spawnv_passfds = start_child
        print(pid, flush=True)
        os.killpg(0, signal.SIGINT)
    return pid

if __name__ == "__main__":  # not in a rank, which imports this file too
    util.spawnv_passfds = start_child_then_ctrl_c
    try:
        spawn_ranks(launch_probe.environment, 2, start_method=sys.argv[1], preload=(),
                    timeout=120)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        sys.exit(130)
"""


@pytest.mark.parametrize("start_method", START_METHODS)
def test_ctrl_c_while_a_child_starts_is_not_lost(tmp_path: Path, start_method: str) -> None:
    """The launcher ignored SIGINT while it started a child, so a Ctrl-C then was dropped and
    the run went on. It now waits for that instant to end, and stops everything."""
    script = tmp_path / "launcher.py"
    script.write_text(_CTRL_C_PROBE)
    launched = subprocess.run([sys.executable, str(script), start_method], cwd=REPO,
                              capture_output=True, text=True, timeout=180, check=False,
                              env={**os.environ, "PYTHONPATH": str(REPO)},
                              start_new_session=True,  # the Ctrl-C reaches this group alone
                              preexec_fn=_sigint_as_in_a_terminal)  # fmt: skip
    lines = launched.stdout.split()
    assert (launched.returncode, lines[-1:]) == (130, ["interrupted"]), launched.stderr
    assert "Traceback" not in launched.stderr  # no child printed a KeyboardInterrupt
    children = [int(pid) for pid in lines[:-1]]
    assert len(children) == 1  # the Ctrl-C came as the first child started, and stopped the rest
    deadline = time.monotonic() + 30
    while _alive(children[0]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(children[0]), "a child outlived its interrupted launcher"


# Run as a launcher (argument: the start method), it sends itself Ctrl-C wherever it is imported
# during a start: in a rank as multiprocessing starts it (which imports the main module again
# where CPython gh-126631 is not fixed, as in 3.11), or in the fork server as it preloads it;
# and again in a rank at the last moment before its function runs (multiprocessing's after-fork
# hooks, which end a forked child's block).
_CTRL_C_IN_A_START = """
import operator, os, signal, sys
from multiprocessing import util
class Hook:  # multiprocessing holds it weakly: the module's globals keep it
    def __call__(self, _):
        os.kill(os.getpid(), signal.SIGINT)
if __name__ != "__main__":
    os.kill(os.getpid(), signal.SIGINT)
    hook = Hook()
    util.register_after_fork(hook, hook)
else:
    from fastpar.launch import spawn_ranks
    print(spawn_ranks(operator.add, 2, start_method=sys.argv[1], preload=["__main__"],
                      timeout=120))
"""


@pytest.mark.parametrize("start_method", START_METHODS)
def test_a_ctrl_c_in_a_ranks_start_is_dropped(tmp_path: Path, start_method: str) -> None:
    """A rank holds Ctrl-C off until it ignores it: a forked rank too, whose block the fork
    server no longer keeps for every child."""
    script = tmp_path / "launcher.py"
    script.write_text(_CTRL_C_IN_A_START)
    run = subprocess.run([sys.executable, str(script), start_method], cwd=REPO,
                         capture_output=True, text=True, timeout=180, check=False,
                         preexec_fn=_sigint_as_in_a_terminal)  # fmt: skip
    assert (run.returncode, run.stdout) == (0, "[2, 3]\n"), run.stderr
    assert "Traceback" not in run.stderr


# Run as a caller of multiprocessing (argument: "launched" after a fastpar launch through the
# fork server, "fresh" without), it starts a forkserver Process of its own, which reports how
# SIGINT reaches it: blocked or open, its handler, and what a Ctrl-C does there; then whether
# the fork server itself has SIGINT blocked and ignored.
_LATER_CHILD_PROBE = """
import multiprocessing, operator, signal, sys

def report(queue):
    blocked = signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, ())
    handler = repr(signal.getsignal(signal.SIGINT))
    try:
        signal.raise_signal(signal.SIGINT)
        outcome = "went on"
    except KeyboardInterrupt:
        outcome = "interrupted"
    queue.put(("blocked" if blocked else "open", handler, outcome))

def server_sigint(pid):
    bit = 1 << (signal.SIGINT - 1)
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {name: bool(int(fields[name], 16) & bit) for name in ("SigBlk", "SigIgn")}

if __name__ == "__main__":
    if sys.argv[1] == "launched":
        from fastpar.launch import spawn_ranks
        spawn_ranks(operator.add, 1, start_method="forkserver", preload=["__main__"], timeout=120)
    context = multiprocessing.get_context("forkserver")
    queue = context.Queue()
    child = context.Process(target=report, args=(queue,))
    child.start()
    print(queue.get(timeout=120))
    child.join(timeout=120)
    from multiprocessing import forkserver
    print(server_sigint(forkserver._forkserver._forkserver_pid))
"""


def test_a_launch_leaves_no_sigint_block_in_the_fork_server(tmp_path: Path) -> None:
    """The server kept the block it started with for its lifetime, and so did every process it
    forked later: a caller's own forkserver Process (a Pool's, a DataLoader's workers) after a
    launch never got Ctrl-C. They now take SIGINT as in a process that never launched."""
    script = tmp_path / "caller.py"
    script.write_text(_LATER_CHILD_PROBE)
    reports = {}
    for case in ("fresh", "launched"):
        run = subprocess.run([sys.executable, str(script), case], cwd=REPO,
                             capture_output=True, text=True, timeout=240, check=False,
                             preexec_fn=_sigint_as_in_a_terminal)  # fmt: skip
        assert run.returncode == 0, run.stderr
        reports[case] = run.stdout.splitlines()
    assert reports["launched"] == reports["fresh"]
    assert reports["fresh"][0] == repr(("open", repr(signal.default_int_handler), "interrupted"))


# Run as a launcher that has another thread (torch's, a caller's), it takes a Ctrl-C while it
# holds SIGINT off for a start, and says whether the start was cut short.
_HELD_WITH_A_THREAD = """
import os, signal, threading
from fastpar.launch import _sigint_held
threading.Thread(target=threading.Event().wait, daemon=True).start()
try:
    with _sigint_held():
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(10**6):  # the rest of a start, during which the other thread takes it
            pass
        print("start finished")
except KeyboardInterrupt:
    print("interrupted")
"""


def test_a_ctrl_c_that_another_thread_takes_waits_for_the_start() -> None:
    """A block holds only the starting thread's share of SIGINT: the other thread took it, and
    Python raised KeyboardInterrupt in the main thread in the middle of the start."""
    # SIGINT at its default, as in a terminal: a shell's background job (CI) starts ignoring it.
    run = subprocess.run([sys.executable, "-c", _HELD_WITH_A_THREAD], cwd=REPO,
                         capture_output=True, text=True, timeout=60,
                         preexec_fn=_sigint_as_in_a_terminal)  # fmt: skip
    assert run.stdout.split() == ["start", "finished", "interrupted"], run.stderr


# Run as a launcher whose resource tracker is not running yet, it starts the fork server
# while holding SIGINT off, and prints whether SIGINT is still blocked afterwards.
_HELD_WITHOUT_A_TRACKER = """
import signal
from multiprocessing import forkserver
from fastpar.launch import _sigint_held
with _sigint_held():
    forkserver.ensure_running()
    print(signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []))
"""


def test_starting_the_resource_tracker_does_not_end_the_hold() -> None:
    """CPython's resource tracker, started by the fork server's start, unblocks SIGINT in the
    thread that starts it: it must run before the hold, not inside it."""
    run = subprocess.run([sys.executable, "-c", _HELD_WITHOUT_A_TRACKER], cwd=REPO,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.stdout.split() == ["True"], run.stderr


def test_the_test_helper_forks_its_ranks() -> None:
    # The server imported the helper's modules, so a rank finds them loaded before it imports
    # anything itself.
    loaded = run_multiprocess(_loaded_modules, 1, timeout=120)[0]
    assert {"torch", "fastpar.parallel", "pytest"} <= loaded


def _loaded_modules(rank: int, world_size: int) -> set[str]:
    return {name for name in ("torch", "fastpar.parallel", "pytest") if name in sys.modules}


def test_a_forked_rank_runs_parallel_cpu_ops() -> None:
    # The server's import of torch started OpenMP's thread pool; the fork must not leave the
    # rank a pool that hangs or computes wrongly.
    data = torch.randn(4_000_000, dtype=torch.float64)
    threads, total, product = run_multiprocess(_parallel_ops, 1, args=(data,), timeout=120)[0]
    assert threads == usable_cores()  # one rank: every core it may use
    torch.testing.assert_close(total, data.sum(), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(
        product, data[:1_000_000].view(1000, 1000) @ data[-1000:], rtol=1e-12, atol=1e-9
    )


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two usable cores")
def test_ranks_size_their_threads_by_the_cores_they_may_use() -> None:
    # taskset, a cpuset or Slurm leave a job fewer cores than the machine has; one thread per
    # machine core would oversubscribe them. A spawned rank inherits the launcher's affinity.
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(allowed)})
    try:
        threads = spawn_ranks(launch_probe.intra_op_threads, 1, timeout=120)
    finally:
        os.sched_setaffinity(0, allowed)
    assert threads == [1]


def _parallel_ops(
    rank: int, world_size: int, data: torch.Tensor
) -> tuple[int, torch.Tensor, torch.Tensor]:
    return torch.get_num_threads(), data.sum(), data[:1_000_000].view(1000, 1000) @ data[-1000:]


@pytest.mark.parametrize("start_method", START_METHODS)
def test_ranks_return_tensors(start_method: str) -> None:
    # A rank's result leaves by value: the rank may be gone before the launcher reads it.
    seed = int(torch.randint(0, 2**31, ()))
    results = spawn_ranks(_random_tensor, 2, args=(seed,), start_method=start_method, timeout=120)
    for rank, result in enumerate(results):
        expected = torch.randn(1000, generator=torch.Generator().manual_seed(seed + rank))
        assert torch.equal(result, expected)


def _random_tensor(rank: int, world_size: int, seed: int) -> torch.Tensor:
    return torch.randn(1000, generator=torch.Generator().manual_seed(seed + rank))


def test_a_result_that_does_not_pickle_fails_its_rank() -> None:
    with pytest.raises(RankFailure, match=r"(?s)rank 0 raised:.*pickle local object '_unpicklable"):
        run_multiprocess(_unpicklable, 1, timeout=600)


def _unpicklable(rank: int, world_size: int) -> object:
    return lambda: rank


def test_a_rank_that_exits_without_returning_fails_at_once() -> None:
    # Exit code 0 is no death, but no result comes: this must not wait for the timeout.
    start = time.monotonic()
    with pytest.raises(RankFailure, match=r"rank 1 exited with code 0 without returning"):
        run_multiprocess(_exit_on_rank_one, 2, timeout=60)
    assert run_multiprocess(_exit_on_rank_one, 2, timeout=60, may_die=(1,)) == [0, None]
    assert time.monotonic() - start < 30


def _exit_on_rank_one(rank: int, world_size: int) -> int:
    if rank == 1:
        os._exit(0)
    return rank


# `fastpar train` with spawn_ranks replaced by a stand-in that starts no rank and reports what
# the launcher had imported at the moment its ranks would have started (torch costs it seconds
# there, numpy comes with matplotlib), and then what it had imported when the command ended.
_LAUNCHER = """
import sys
import fastpar.launch

HEAVY = ("torch", "numpy")

def spawn_ranks(fn, world_size, **options):
    print("at spawn:", [name for name in HEAVY if name in sys.modules])
    return [None] * world_size

fastpar.launch.spawn_ranks = spawn_ranks
from fastpar.__main__ import main

code = main(["train", *sys.argv[1:]])
print("at exit:", code, [name for name in HEAVY if name in sys.modules])
"""


def _launch_without_ranks(*args: str) -> list[str]:
    result = subprocess.run([sys.executable, "-c", _LAUNCHER, *args], capture_output=True,
                            text=True, cwd=REPO, timeout=120, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


@pytest.mark.parametrize(
    "options",
    [
        ["--parallel", "dp"],
        ["--parallel", "pp", "--schedule", "interleaved-1f1b"],  # the stages a schedule cuts
        ["--parallel", "dp+pp", "--nproc", "4", "--schedule", "zbv"],
        ["--metrics", "{metrics}"],  # TensorBoard and matplotlib are found, not imported
    ],
    ids=["dp", "pp", "dp+pp", "metrics"],
)
def test_fastpar_train_starts_its_ranks_before_importing_torch(
    options: list[str], tmp_path: Path
) -> None:
    options = [option.format(metrics=tmp_path / "metrics") for option in options]
    lines = _launch_without_ranks("--steps", "2", "--checkpoint-dir", str(tmp_path / "run"),
                                  *options)  # fmt: skip
    assert lines == ["at spawn: []", "at exit: 0 []"]


def test_a_resumed_run_with_metrics_starts_its_ranks_before_importing_torch(
    tmp_path: Path,
) -> None:
    # The launcher picks the checkpoint and checks the metrics files' columns before starting.
    from fastpar.training import checkpoint
    from fastpar.training.metrics_files import STEP_COLUMNS

    (tmp_path / "run").mkdir()
    checkpoint.save(tmp_path / "run", 2, {"model.x": torch.ones(3)}, {"run": "earlier"})
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "steps.csv").write_text(",".join(STEP_COLUMNS) + "\r\n")
    lines = _launch_without_ranks("--steps", "4", "--checkpoint-dir", str(tmp_path / "run"),
                                  "--metrics", str(tmp_path / "metrics"), "--resume",
                                  "--parallel", "pp")  # fmt: skip
    assert lines == ["at spawn: []", "at exit: 0 []"]


def test_a_launcher_with_torch_imports_nothing_in_a_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    # The import thread only overlaps a launcher's import of torch with the ranks' start.
    import threading

    from fastpar import launch

    names: list[str] = []

    class Recorded(threading.Thread):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            names.append(self.name)

    monkeypatch.setattr(launch.threading, "Thread", Recorded)
    assert spawn_ranks(launch_probe.intra_op_threads, 1, timeout=120) == [usable_cores()]
    assert "fastpar-import-torch" not in names
