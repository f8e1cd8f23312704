"""What the ranks write to stderr: relayed to the launcher's stderr, and for a rank that dies
without a Python error (an abort in native code, a signal), its last lines quoted in the
RankFailure, with faulthandler's Python stack of the moment it died."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import pytest

from fastpar.launch import START_METHODS, STDERR_TAIL_LINES, RankFailure, spawn_ranks


def _say_then_abort(rank: int, world_size: int) -> None:
    print("an early line", file=sys.stderr, flush=True)
    for i in range(STDERR_TAIL_LINES):
        os.write(2, f"native line {i}\n".encode())  # below Python, as C++ code writes
    os.write(2, b"terminate called after a planted failure")  # no newline, as abort() leaves
    os.abort()


@pytest.mark.parametrize("start_method", START_METHODS)
def test_a_rank_that_aborts_is_quoted_from_its_stderr(start_method: str) -> None:
    with pytest.raises(RankFailure) as failure:
        spawn_ranks(_say_then_abort, 1, timeout=120, start_method=start_method)
    message = str(failure.value)
    assert message.startswith("rank 0 died with exit code -6 (SIGABRT)"), message
    assert "the last lines rank 0 wrote to stderr:" in message
    assert "terminate called after a planted failure" in message
    assert "Fatal Python error: Aborted" in message  # faulthandler
    assert "_say_then_abort" in message  # the Python frame it died in
    # The last lines only, and the summary stays one line per rank.
    assert "an early line" not in message
    assert not re.search(r"^    native line 0$", message, re.MULTILINE)
    assert failure.value.summary == "rank 0: died with exit code -6 (SIGABRT)"


def _say(rank: int, world_size: int) -> int:
    print(f"rank {rank} says hello", file=sys.stderr, flush=True)
    os.write(2, f"rank {rank} ends without a newline".encode())
    return rank


def test_what_ranks_write_to_stderr_reaches_the_launcher(capsys: pytest.CaptureFixture) -> None:
    assert spawn_ranks(_say, 2, timeout=120) == [0, 1]
    err = capsys.readouterr().err
    for rank in range(2):
        assert f"rank {rank} says hello\n" in err
        assert f"rank {rank} ends without a newline" in err


def test_a_killed_launchers_stderr_folder_is_removed_by_the_next_launch() -> None:
    """A launcher killed with SIGKILL cannot remove its ranks' stderr folder; the next launch
    removes every folder whose launcher is gone, and leaves a live launcher's alone."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    orphan = tempfile.mkdtemp(prefix=f"fastpar-ranks-{gone.stdout.strip()}-")
    live = tempfile.mkdtemp(prefix=f"fastpar-ranks-{os.getppid()}-")
    try:
        assert spawn_ranks(_say, 1, timeout=120) == [0]
        assert not os.path.exists(orphan)
        assert os.path.isdir(live)
    finally:
        for path in (orphan, live):
            if os.path.isdir(path):
                os.rmdir(path)
