"""How `spawn_ranks` starts ranks: spawned, or forked from a preloaded server (what the tests'
`run_multiprocess` does). Either way a rank sees the launcher's environment as it is at the
call, before its function's module is imported, and no rank outlives a killed launcher."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastpar.launch import START_METHODS, spawn_ranks
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
    with pytest.raises(ValueError, match="start_method must be one of .*'fork'"):
        spawn_ranks(launch_probe.environment, 1, start_method="fork")


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


def test_the_test_helper_forks_its_ranks() -> None:
    # The server imported the helper's modules, so a rank finds them loaded before it imports
    # anything itself.
    loaded = run_multiprocess(_loaded_modules, 1, timeout=120)[0]
    assert {"torch", "fastpar.parallel", "pytest"} <= loaded


def _loaded_modules(rank: int, world_size: int) -> set[str]:
    return {name for name in ("torch", "fastpar.parallel", "pytest") if name in sys.modules}
