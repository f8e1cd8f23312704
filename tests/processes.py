"""The processes a test started, as `ps` lists them: for tests that check a job leaves none
behind, or that signal some of them."""

from __future__ import annotations

import subprocess


def _ps(*selection: str, columns: str = "pid=,args=") -> list[str]:
    found = subprocess.run(["ps", "-ww", "-o", columns, *selection], capture_output=True,
                           text=True, check=False)  # fmt: skip
    return found.stdout.strip().splitlines()


def children(parent: int) -> list[tuple[int, str]]:
    """(pid, "pid args") of each process `parent` started."""
    return [(int(line.split()[0]), line) for line in _ps("--ppid", str(parent))]


def descendants(pid: int) -> list[int]:
    """The processes `pid` started, and theirs."""
    found = [child for child, _ in children(pid)]
    return found + [grandchild for child in found for grandchild in descendants(child)]


def session_processes(session: int) -> list[str]:
    """ "pid stat args" of each process left in `session`."""
    return _ps("-s", str(session), columns="pid=,stat=,args=")
