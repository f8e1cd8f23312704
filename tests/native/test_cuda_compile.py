"""Every CUDA source in csrc/ compiles for sm_90 (H100) with nvcc, and every C++ source with
CUDA-only parts (the torch glue of the CUDA code, the bindings) with the host C++ compiler as in
a CUDA build, where nvcc exists.

CI machines have nvcc but no GPU, and a CPU build compiles none of it: this catches compile
errors of the CUDA code before a GPU ever sees it. The torch headers of the installed torch are
used, with the flags torch's extension build gives each compiler, as in the real build. The .cu
files include no torch headers (nvcc's front end took most of a minute per file on them): that
is checked here too.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

from fastpar._native import _CUDA_FLAGS, _CXX_FLAGS, nvcc_include_dirs, source_dir

NVCC = shutil.which("nvcc")
# CUDA's own headers, which the real build gives the C++ compiles of the glue too.
CUDA_INCLUDE_DIRS = nvcc_include_dirs(NVCC) if NVCC is not None else []
CUDA_SOURCES = sorted(source_dir().glob("*.cu"))
_CUDA_ONLY_GUARD = "#ifdef FASTPAR_WITH_CUDA"


def _cuda_only(source: Path) -> bool:
    """Whether a C++ source is all inside `#ifdef FASTPAR_WITH_CUDA` (its first directive): it
    compiles to nothing in a CPU build."""
    lines = source.read_text().splitlines()
    directives = (line.strip() for line in lines if line.lstrip().startswith("#"))
    return next(directives, "") == _CUDA_ONLY_GUARD


# The torch glue of the CUDA code, compiled by the host compiler in a CUDA build only.
CUDA_GLUE_SOURCES = sorted(p for p in source_dir().glob("*.cpp") if _cuda_only(p))
# Every C++ source with a part that only a CUDA build compiles (the glue, and the bindings of
# the CUDA code in bindings.cpp), compiled here as in a CUDA build.
CUDA_HOST_SOURCES = sorted(
    p for p in source_dir().glob("*.cpp") if _CUDA_ONLY_GUARD in p.read_text().splitlines()
)

# What torch's extension build (torch.utils.cpp_extension) gives every compile besides the
# caller's flags: the module's name (bindings.cpp's PYBIND11_MODULE needs it) and the macro of
# an extension's torch headers.
_TORCH_EXTENSION_DEFINES = (
    "-DTORCH_EXTENSION_NAME=fastpar_compile_check",
    "-DTORCH_API_INCLUDE_EXTENSION_H",
)
# What it gives nvcc: its own defines and options, taken from torch (the half and bfloat16
# operators off, --expt-relaxed-constexpr), and position-independent host code, which it passes
# as `--compiler-options '-fPIC'` in the ninja file it writes (a shell line: unquoted here).
TORCH_NVCC_FLAGS = (*COMMON_NVCC_FLAGS, "--compiler-options", "-fPIC")


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
    assert CUDA_GLUE_SOURCES, f"no .cpp files of CUDA glue ({_CUDA_ONLY_GUARD}) in {source_dir()}"
    assert source_dir() / "bindings.cpp" in CUDA_HOST_SOURCES, "bindings.cpp binds no CUDA code"


_LOCAL_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)
_TORCH_INCLUDE = re.compile(r"^\s*#\s*include\s+<(torch|ATen|c10|pybind11)/", re.MULTILINE)


@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_cuda_source_includes_no_torch_headers(source: Path) -> None:
    """nvcc spends most of a minute on torch's headers: the .cu files and the csrc/ headers
    they include reach none (the torch glue is in .cpp files)."""
    seen: set[Path] = set()
    pending = [source]
    while pending:
        path = pending.pop()
        if path in seen:
            continue
        seen.add(path)
        text = path.read_text()
        found = _TORCH_INCLUDE.search(text)
        assert found is None, f"{source.name} includes torch's headers through {path.name}"
        for name in _LOCAL_INCLUDE.findall(text):
            if (source_dir() / name).is_file():
                pending.append(source_dir() / name)


@dataclass
class _Compile:
    process: subprocess.Popen[bytes]
    stderr: Path


def _start(command: list[str], stderr: Path) -> _Compile:
    with open(stderr, "wb") as log:  # a file: a full pipe would stall a compile
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)
    return _Compile(process, stderr)


@pytest.fixture(scope="module")
def compiles(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[Path, _Compile]]:
    """Every source's compile (nvcc for the .cu files, the host compiler for the C++ sources
    with CUDA-only parts; to objects that nothing links), all started at once: one compile
    keeps one core busy for up to a minute, so side by side they take about the time of the
    longest instead of the sum."""
    root = tmp_path_factory.mktemp("nvcc")
    includes = _include_flags(root / "shim")
    started = {}
    if NVCC is not None and CUDA_INCLUDE_DIRS:
        for source in CUDA_HOST_SOURCES:
            command = [
                os.environ.get("CXX", "c++"),
                "-c",
                str(source),
                "-o",
                str(root / (source.stem + ".o")),
                *_CXX_FLAGS,  # the flags of the real build
                "-fPIC",
                *_TORCH_EXTENSION_DEFINES,
                "-DFASTPAR_WITH_CUDA",
                "-D_GLIBCXX_USE_CXX11_ABI=1",
                *(flag for path in CUDA_INCLUDE_DIRS for flag in ("-I", path)),
                *includes,
            ]
            started[source] = _start(command, root / (source.stem + ".stderr"))
    for source in CUDA_SOURCES:
        command = [
            str(NVCC),
            "-c",
            str(source),
            "-o",
            str(root / (source.stem + ".o")),
            *_TORCH_EXTENSION_DEFINES,
            *TORCH_NVCC_FLAGS,
            *_CUDA_FLAGS,  # the flags of the real build
            "-gencode=arch=compute_90,code=sm_90",
            "-DFASTPAR_WITH_CUDA",
            "-D_GLIBCXX_USE_CXX11_ABI=1",
            "-Xptxas=-warn-spills",
            *includes,
        ]
        started[source] = _start(command, root / (source.stem + ".stderr"))
    yield started
    for compile_ in started.values():  # a test that failed early leaves none running
        if compile_.process.poll() is None:
            compile_.process.kill()
            compile_.process.wait()


def _succeeded(compile_: _Compile, compiler: str, source: Path) -> str:
    """The compile's stderr, once it has ended without an error."""
    returncode = compile_.process.wait(timeout=600)
    stderr = compile_.stderr.read_text(errors="replace")
    assert returncode == 0, f"{compiler} failed for {source.name}:\n{stderr[-4000:]}"
    return stderr


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_compiles_for_sm90(source: Path, compiles: dict[Path, _Compile]) -> None:
    stderr = _succeeded(compiles[source], "nvcc", source)
    assert "spill" not in stderr.lower(), stderr


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
@pytest.mark.skipif(not CUDA_INCLUDE_DIRS, reason="nvcc's dry run named no include folder")
@pytest.mark.parametrize("source", CUDA_HOST_SOURCES, ids=lambda p: p.name)
def test_cuda_parts_of_cpp_sources_compile(source: Path, compiles: dict[Path, _Compile]) -> None:
    _succeeded(compiles[source], "the C++ compiler", source)
