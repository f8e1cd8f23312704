"""`fastpar train --timeout` bounds a run whose rank stops answering: with one data-parallel
rank stopped (SIGSTOP), the run ends within three times the timeout, non-zero, with a line
naming the rank it waited for and the timeout, and the launcher leaves no rank behind (the
stopped one included, which acts on SIGTERM only once continued)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastpar.training.checkpoint import find_intact
from tests.processes import children, session_processes

from .util import REPO, SMALL

# Waited out once per test (the run ends between one and three of them after the stop).
TIMEOUT_S = 5


def _ranks(launcher: int) -> list[int]:
    """The launcher's rank processes, in start order: the children of its fork server (which
    the ranks are forked from)."""
    servers = [pid for pid, args in children(launcher) if "forkserver" in args]
    return sorted(pid for server in servers for pid, _ in children(server))


@pytest.mark.slow
@pytest.mark.parametrize("comm", ["ring", "torch"])
def test_a_stopped_rank_ends_the_run_within_three_timeouts(tmp_path: Path, comm: str) -> None:
    arguments = [a for a in SMALL]
    arguments[arguments.index("--timeout") + 1] = str(TIMEOUT_S)
    command = [sys.executable, "-m", "fastpar", "train", *arguments, "--checkpoint-dir",
               str(tmp_path), "--nproc", "2", "--steps", "100000", "--checkpoint-every", "2",
               "--comm", comm]  # fmt: skip
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)  # fmt: skip
    stopped = None
    try:
        deadline = time.monotonic() + 120
        while find_intact(tmp_path)[0] is None:  # the ranks are training
            assert process.poll() is None and time.monotonic() < deadline, process.stderr
            time.sleep(0.2)
        ranks = _ranks(process.pid)
        assert len(ranks) == 2, ranks
        stopped = ranks[-1]
        os.kill(stopped, signal.SIGSTOP)
        start = time.monotonic()
        try:
            _, stderr = process.communicate(timeout=3 * TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {3 * TIMEOUT_S} s after a rank was stopped")
        ended_after = time.monotonic() - start
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 1, stderr
    assert ended_after < 3 * TIMEOUT_S
    assert "Traceback" not in stderr
    # One line per failure: the stopped rank named, and the peer's timeout.
    failures = [line for line in stderr.splitlines() if line.startswith("rank ")]
    named = [line for line in failures if re.fullmatch(r"rank [01]: is stopped .*", line)]
    assert len(named) == 1, stderr
    assert any(f"{TIMEOUT_S} s" in line or f"{TIMEOUT_S}000ms" in line for line in failures), stderr
    # No rank outlives the launcher, the stopped one included (multiprocessing's own helper
    # may take a moment to notice).
    deadline = time.monotonic() + 10
    while (left := session_processes(process.pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, left
    assert stopped is not None
    with pytest.raises(ProcessLookupError):
        os.kill(stopped, 0)
