"""What fastpar asks of the machine it runs on, in one place for every layer: whether a folder
takes new files, and how many cores this process may use."""

from __future__ import annotations

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
