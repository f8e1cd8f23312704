"""pytest-benchmark suites of bench/ (`bench/test_bench_*.py`): kernel micro-benchmarks, each
fastpar case next to its baseline in one group.

    python -m pytest bench --benchmark-json results/bench.json         # record
    python -m pytest bench --benchmark-compare=results/bench.json      # compare against it
    python -m pytest bench --benchmark-disable                         # run once each (CI)

Shapes come from bench/shapes.py: the "gpu" scale on a machine with CUDA, "tiny" elsewhere (the
kernels then run in Triton's interpreter); `--bench-scale` chooses.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Before anything imports triton: the kernels run in its CPU interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--bench-scale",
        choices=("gpu", "cpu", "tiny"),
        default="gpu" if HAS_CUDA else "tiny",
        help="shapes of bench/shapes.py (default: gpu with CUDA, tiny without)",
    )


def bench_scale(config: pytest.Config) -> str:
    return config.getoption("--bench-scale")


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if HAS_CUDA else "cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
