"""bench/common.py: what the benchmark tables and plots say about the machine they ran on."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import common as bench_common


def test_the_cpu_label_counts_the_cores_this_process_may_use(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under taskset or a cgroup cpuset the tables named the machine's cores only, as if the
    benchmark had run on all of them."""
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert bench_common.device_name("cpu").endswith(", 8 cores, 2 usable by this process")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert bench_common.device_name("cpu").endswith(", 8 cores")
