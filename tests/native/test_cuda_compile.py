"""Every CUDA source in csrc/ compiles for sm_90 (H100) with nvcc, where nvcc exists.

CI machines have nvcc but no GPU: this catches CUDA compile errors before a GPU ever sees the
code. The torch headers of the installed torch are used, as in the real build.
"""

from __future__ import annotations

import shutil
import subprocess
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fastpar._native import _CUDA_FLAGS, source_dir

NVCC = shutil.which("nvcc")
CUDA_SOURCES = sorted(source_dir().glob("*.cu"))


# A CPU-only torch wheel ships the c10/cuda headers but not this one, which CMake generates in
# CUDA builds; this is its content there.
_CUDA_CMAKE_MACROS = "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n"


def _include_flags(shim_dir: Path) -> list[str]:
    from torch.utils.cpp_extension import include_paths

    macros = shim_dir / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    macros.parent.mkdir(parents=True, exist_ok=True)
    macros.write_text(_CUDA_CMAKE_MACROS)
    paths = [*include_paths(), str(shim_dir), sysconfig.get_paths()["include"], str(source_dir())]
    return [flag for path in paths for flag in ("-I", path)]


def test_there_are_cuda_sources() -> None:
    assert CUDA_SOURCES, f"no .cu files in {source_dir()}"


@dataclass
class _Compile:
    process: subprocess.Popen[bytes]
    stderr: Path


@pytest.fixture(scope="module")
def compiles(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[Path, _Compile]]:
    """Every source's nvcc, all started at once: one compile keeps one core busy for most of a
    minute, so side by side they take about the time of the longest instead of the sum."""
    root = tmp_path_factory.mktemp("nvcc")
    includes = _include_flags(root / "shim")
    started = {}
    for source in CUDA_SOURCES:
        command = [
            str(NVCC),
            "-c",
            str(source),
            "-o",
            str(root / (source.stem + ".o")),
            *_CUDA_FLAGS,  # the flags of the real build
            "-gencode=arch=compute_90,code=sm_90",
            "-DFASTPAR_WITH_CUDA",
            "-D_GLIBCXX_USE_CXX11_ABI=1",
            "--expt-relaxed-constexpr",
            "-Xptxas=-warn-spills",
            *includes,
        ]
        stderr = root / (source.stem + ".stderr")
        with open(stderr, "wb") as log:  # a file: a full pipe would stall a compile
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)
        started[source] = _Compile(process, stderr)
    yield started
    for compile_ in started.values():  # a test that failed early leaves none running
        if compile_.process.poll() is None:
            compile_.process.kill()
            compile_.process.wait()


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_compiles_for_sm90(source: Path, compiles: dict[Path, _Compile]) -> None:
    compile_ = compiles[source]
    returncode = compile_.process.wait(timeout=600)
    stderr = compile_.stderr.read_text(errors="replace")
    assert returncode == 0, f"nvcc failed for {source.name}:\n{stderr[-4000:]}"
    assert "spill" not in stderr.lower(), stderr
