"""What the checkpoint and metrics folders share."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def probe_writable(directory: Path) -> None:
    """Create and remove a file in `directory`; raises the OSError that stops a real write
    (os.access ignores read-only mounts and ACL subtleties)."""
    descriptor, probe = tempfile.mkstemp(dir=directory, prefix=".write-test.")
    os.close(descriptor)
    os.unlink(probe)
