"""Test-wide setup: the Triton interpreter on machines without a GPU, the gpu/slow markers, and a
folder no file can be created in.

TRITON_INTERPRET must be set before triton is first imported, which is why it happens here, at
conftest import time, before any test module (and so fastpar.ops) is collected.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# A fresh Inductor cache per run: a graph cached on disk by an earlier version of a custom op
# must not be replayed against the current one. Removed when the run ends (pytest_unconfigure).
_RUN_INDUCTOR_CACHE: str | None = None
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _RUN_INDUCTOR_CACHE = tempfile.mkdtemp(prefix="fastpar-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _RUN_INDUCTOR_CACHE


def pytest_sessionstart(session: pytest.Session) -> None:
    # Build the native extension once, before any test spawns ranks: a first build inside a
    # multi-process test would count against that test's time bound. A build error is left
    # for the tests that use the extension to report.
    from fastpar import _native

    with contextlib.suppress(_native.NativeBuildError):
        _native.build()


def pytest_unconfigure(config: pytest.Config) -> None:
    if _RUN_INDUCTOR_CACHE is not None:
        shutil.rmtree(_RUN_INDUCTOR_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none is visible to torch")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def read_only_folder(tmp_path: Path) -> Iterator[Path]:
    """A folder this user cannot create files in (for root, which ignores modes: immutable)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() == 0:
        if (
            shutil.which("chattr") is None
            or subprocess.run(
                ["chattr", "+i", str(folder)], capture_output=True, check=False
            ).returncode
        ):
            pytest.skip("running as root without chattr +i: no folder is read-only for root")
        yield folder
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    else:
        folder.chmod(0o500)
        yield folder
        folder.chmod(0o700)
