"""The watchdog thread the CUDA ring uses to notice a dead peer while its kernel spins
(`csrc/process.h`): it names the first watched process found gone (a killed child, still a
zombie until reaped) and never a live one. Runs on CPU, with real processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from fastpar import _native


def _wait_for_culprit(watchdog: object, bound_s: float) -> int:
    """The watchdog's culprit once it has one; fails after `bound_s` (a bound, not a measure)."""
    deadline = time.monotonic() + bound_s
    while watchdog.culprit == -1:
        assert time.monotonic() < deadline, "the watchdog did not notice the killed process"
        time.sleep(0.01)
    return watchdog.culprit


def test_names_the_killed_process_not_the_live_ones() -> None:
    native = _native.load()
    children = [subprocess.Popen([sys.executable, "-c", "input()"], stdin=subprocess.PIPE)
                for _ in range(2)]  # fmt: skip
    try:
        pids = [0, os.getpid(), children[0].pid, children[1].pid]
        watchdog = native.PeerWatchdog(pids=pids, period_s=0.01)
        assert watchdog.culprit == -1  # every watched process lives
        children[1].kill()  # not reaped: a zombie counts as gone
        assert _wait_for_culprit(watchdog, 30) == 3
        children[0].kill()
        children[0].wait()
        assert watchdog.culprit == 3  # the first one found, kept
    finally:
        for child in children:
            child.kill()
            child.wait()


@pytest.mark.parametrize("period_s", [0.0, -1.0, float("nan")])
def test_rejects_a_period_that_is_not_positive(period_s: float) -> None:
    with pytest.raises(ValueError, match="period_s must be positive"):
        _native.load().PeerWatchdog(pids=[os.getpid()], period_s=period_s)
