"""What fastpar asks of the machine it runs on, in one place for every layer: whether a folder
takes new files, a file's digest, and how many cores this process may use."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


def probe_writable(directory: Path) -> None:
    """Create and remove a file in `directory`; raises the OSError that stops a real write.

    os.access asks for the real user id, not the effective one, and misses what only a real
    write meets (a security module's path rules, a full inode table).
    """
    descriptor, probe = tempfile.mkstemp(dir=directory, prefix=".write-test.")
    os.close(descriptor)
    os.unlink(probe)


def file_sha256(path: Path) -> str:
    """The SHA-256 of the file at `path`, as hex, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def output_folder_problem(directory: Path, option: str, purpose: str) -> str | None:
    """Create `directory` (and its parents) for a run's output and check that it takes files;
    what stops it, naming the command-line `option` and the folder's `purpose`, or None.
    Checked before any rank starts: the ranks write into it only later."""
    if directory.exists() and not directory.is_dir():
        return f"{option} {directory} is not a folder"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe_writable(directory)
    except OSError as error:
        return (
            f"cannot write into {purpose} folder {directory} ({error.strerror}); fix its "
            f"permissions or choose another {option} folder"
        )
    return None


def usable_cores() -> int:
    """The cores this process may run on: taskset, a cgroup cpuset or a Slurm allocation leave
    it fewer than the machine has, and torch sizes its thread pool by these."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def describe_cores() -> str:
    """The machine's cores, and those this process may use where fewer: "8 cores, 2 usable by
    this process"."""
    usable = usable_cores()
    cores = os.cpu_count() or usable  # None where the platform cannot tell
    if usable == cores:
        return f"{cores} cores"
    return f"{cores} cores, {usable} usable by this process"
