"""The native build: concurrent first use from several processes, clear toolchain errors, and
a cached library that no longer matches its build rebuilt rather than loaded."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fastpar import _native
from fastpar.testing.distributed import run_multiprocess

# What these tests prove is build()'s locking, which does not depend on what it compiles: they
# build a one-function pybind11 module (seconds) rather than csrc/ (about a minute per build),
# which `python -m fastpar build` and every native test build anyway.
_PROBE_SOURCE = """
#include <pybind11/pybind11.h>
int add(int a, int b) { return a + b; }
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("add", &add); }
"""


def _probe_plan(root: Path) -> _native.BuildPlan:
    name = "fastpar_build_probe"
    source = root / "src" / "probe.cpp"
    return _native.BuildPlan(
        name=name, directory=root / "cache" / name, sources=(source,), with_cuda=False
    )


def _write_probe(root: Path) -> _native.BuildPlan:
    """The probe's source, written once before any rank starts (a rank rewriting it could
    truncate it under another's compiler)."""
    plan = _probe_plan(root)
    plan.sources[0].parent.mkdir(parents=True)
    plan.sources[0].write_text(_PROBE_SOURCE)
    return plan


def _build_and_call(rank: int, world_size: int, root: str) -> str:
    plan = _probe_plan(Path(root))
    library = _native.build(plan=plan)
    # The rank that compiled has the module loaded; the ranks that waited load the same library.
    module = sys.modules.get(plan.name) or _native._import_library(plan.name, library)
    assert module.add(2, 3) == 5
    return str(library)


def test_ranks_building_at_once_share_one_build(tmp_path: Path) -> None:
    _write_probe(tmp_path)
    libraries = run_multiprocess(_build_and_call, 3, args=(str(tmp_path),), timeout=120)
    assert len(set(libraries)) == 1
    builds = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert len(builds) == 1 and (builds[0] / "complete").exists()


def test_missing_compiler_names_what_to_install(tmp_path: Path) -> None:
    code = (
        "from fastpar import _native\n"
        "try:\n    _native.load()\n"
        "except _native.NativeBuildError as e:\n    print(e)\n"
        "else:\n    raise SystemExit('expected NativeBuildError')\n"
    )
    env = {**os.environ, "FASTPAR_CACHE_DIR": str(tmp_path), "CXX": "no-such-compiler-xyz"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "'no-such-compiler-xyz' was not found: install g++" in result.stdout


def test_a_stale_lock_from_a_killed_build_does_not_block(tmp_path: Path) -> None:
    plan = _write_probe(tmp_path)
    plan.directory.mkdir(parents=True)
    (plan.directory / "lock").write_text("")  # what torch leaves when a build is killed
    # A build that waited on the stale lock would run past the timeout and fail.
    [library] = run_multiprocess(_build_and_call, 1, args=(str(tmp_path),), timeout=120)
    assert Path(library).exists()


def test_an_empty_cache_dir_variable_means_the_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`FASTPAR_CACHE_DIR= fastpar build` compiled into the current folder."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("FASTPAR_CACHE_DIR", "")
    assert _native.cache_root() == tmp_path / ".cache" / "fastpar"


def test_a_tilde_in_the_cache_dir_variable_is_the_home_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`FASTPAR_CACHE_DIR="~/x"` (quoted, so no shell expanded it) built into a folder named `~`."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("FASTPAR_CACHE_DIR", "~/x")
    assert _native.cache_root() == tmp_path / "x"


def test_an_unusable_cache_folder_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A cache folder that cannot be created (here a file is in the way; a read-only folder
    alike) ended `fastpar build` with an OSError traceback."""
    from fastpar.__main__ import main

    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    monkeypatch.setenv("FASTPAR_CACHE_DIR", str(not_a_folder))
    monkeypatch.setattr(_native, "_loaded", None)  # as in a new process
    assert main(["build"]) == 1
    error = capsys.readouterr().err
    assert error.startswith(
        f"fastpar build: fastpar's native extension cannot be built in {not_a_folder} "
        "(Not a directory): set FASTPAR_CACHE_DIR to a writable folder"
    )
    assert error.count("\n") == 1


def test_a_compiler_error_is_its_log_not_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A source that did not compile ended `fastpar build` in a 40-line traceback above the
    compiler's log; `load()` (and so `fastpar info`) named the failure, the command did not."""
    from fastpar.__main__ import main

    def compiler_fails(*args: object) -> None:  # what torch's load() raises when ninja fails
        raise RuntimeError("Error building extension 'x': x.cpp:1:18: error: 'y' was not declared")

    monkeypatch.setenv("FASTPAR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_native, "_loaded", None)  # as in a new process
    monkeypatch.setattr(_native, "_load_extension", compiler_fails)
    assert main(["build"]) == 1
    assert capsys.readouterr().err == (
        "fastpar build: building fastpar's native extension failed: "
        "Error building extension 'x': x.cpp:1:18: error: 'y' was not declared\n"
    )


def test_a_cached_library_that_does_not_load_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A cached library that did not load (corrupted, or a cache shared with a system with other
    libraries) ended `fastpar info` in an ImportError traceback, and `fastpar build` said it
    was fine."""
    from fastpar.__main__ import main

    monkeypatch.setenv("FASTPAR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_native, "_loaded", None)
    plan = _native.plan_build()
    # An earlier test of this process may have loaded the good library under the same name.
    monkeypatch.delitem(sys.modules, plan.name, raising=False)
    plan.directory.mkdir(parents=True)
    library = plan.directory / f"{plan.name}.so"
    library.write_text("not a library\n")
    _native._write_marker(plan, library)  # intact as built, and still no library here
    usable, reason = _native.is_available()
    assert not usable
    assert reason.startswith("the cached native extension does not load (")
    assert reason.endswith(f"delete {plan.directory} and run `python -m fastpar build`")
    assert main(["build"]) == 1
    assert capsys.readouterr().err == f"fastpar build: {reason}\n"


# load() with the probe's plan in place of csrc/'s, in a process of its own: loading a truncated
# library is a bus error, which would kill pytest.
_LOAD_PROBE = """
import sys
from pathlib import Path
from fastpar import _native
plan = _native.BuildPlan(name="fastpar_build_probe", directory=Path(sys.argv[1]),
                         sources=(Path(sys.argv[2]),), with_cuda=False)
_native.plan_build = lambda: plan
print(_native.load().add(2, 3))
"""


def _load_probe(plan: _native.BuildPlan) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", _LOAD_PROBE, str(plan.directory), str(plan.sources[0])]
    env = {**os.environ, "FASTPAR_CACHE_DIR": str(plan.directory.parent)}  # nothing shared
    return subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=300, check=False
    )


def test_a_truncated_cached_library_is_rebuilt_not_loaded(tmp_path: Path) -> None:
    """A cached library cut short after its build (a full disk, a copy cut short), its marker in
    place, was dlopened: a bus error no Python code can catch."""
    plan = _write_probe(tmp_path)
    first = _load_probe(plan)
    assert first.returncode == 0 and first.stdout == "5\n", first.stderr
    marker = json.loads((plan.directory / "complete.json").read_text())
    library = plan.directory / marker["library"]
    assert marker["size"] == library.stat().st_size > 0
    os.truncate(library, library.stat().st_size // 3)
    second = _load_probe(plan)
    assert second.returncode == 0 and second.stdout == "5\n", second.stderr
    assert "rebuilding fastpar's native extension: " in second.stderr
    assert f"{library} has {marker['size'] // 3} bytes, its build wrote" in second.stderr
    rebuilt, why = _native._built_library(plan)
    assert rebuilt == library and why == ""
    assert (
        library.stat().st_size == json.loads((plan.directory / "complete.json").read_text())["size"]
    )


def _vouched_library(tmp_path: Path) -> tuple[_native.BuildPlan, Path]:
    """A plan whose folder holds a stand-in library (random bytes) and the marker for it."""
    plan = _probe_plan(tmp_path)
    plan.directory.mkdir(parents=True)
    library = plan.directory / f"{plan.name}.so"
    library.write_bytes(os.urandom(4096))
    _native._write_marker(plan, library)
    assert _native._built_library(plan) == (library, "")
    return plan, library


def test_an_altered_cached_library_of_its_size_is_not_vouched_for(tmp_path: Path) -> None:
    plan, library = _vouched_library(tmp_path)
    data = bytearray(library.read_bytes())
    data[len(data) // 2] ^= 0x01
    library.write_bytes(bytes(data))
    assert _native._built_library(plan) == (
        None,
        f"{library}'s SHA-256 is not its build's (altered)",
    )
    library.unlink()
    assert _native._built_library(plan) == (None, f"{library} is missing")


@pytest.mark.parametrize(
    "record",
    [
        '{"library": "fastpar_build_probe.so", "size": 4096}',
        '{"library": "../elsewhere.so", "size": 4096, "sha256": "00"}',
        '{"library": "fastpar_build_probe.so", "size": true, "sha256": "00"}',
        '{"library": "fastpar_build_probe.so", "si',
        "[]",
    ],
)
def test_a_damaged_build_record_is_not_trusted(tmp_path: Path, record: str) -> None:
    plan, _ = _vouched_library(tmp_path)
    (plan.directory / "complete.json").write_text(record)
    library, why = _native._built_library(plan)
    assert library is None
    assert why == (
        f"its build record {plan.directory / 'complete.json'} holds no name, size and SHA-256 "
        "of the library (damaged)"
    )


def test_an_older_fastpars_build_is_not_trusted_and_still_marked_for_it(tmp_path: Path) -> None:
    """An older fastpar wrote the library's name alone in `complete` (all it reads, so new
    builds still write it: an older fastpar sharing the cache would otherwise rebuild)."""
    plan, library = _vouched_library(tmp_path)
    assert (plan.directory / "complete").read_text() == library.name
    (plan.directory / "complete.json").unlink()
    assert _native._built_library(plan) == (
        None,
        f"{plan.directory} was built by an older fastpar, which recorded no size and SHA-256 "
        "of the library to check it against",
    )


def test_a_build_finds_no_marker_as_nothing_built(tmp_path: Path) -> None:
    assert _native._built_library(_probe_plan(tmp_path)) == (None, "")


def test_build_names_the_library_it_loaded(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fastpar.__main__ import main

    monkeypatch.setattr(_native, "_loaded", None)  # as in a new process
    assert main(["build"]) == 0
    library = _native.build()  # cached: the session built it
    assert capsys.readouterr().out == f"native extension: {library}\n"


_CUDA_PROBE_SOURCES = {
    "probe.cpp": """
#include <pybind11/pybind11.h>
int device_count();
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("device_count", &device_count); }
""",
    "probe_cuda.cu": """
#include <cuda_runtime.h>
int device_count() { int n = 0; return cudaGetDeviceCount(&n) == cudaSuccess ? n : -1; }
""",
}
_BUILD_CUDA_PROBE = """
import sys
from pathlib import Path
from fastpar import _native
root = Path(sys.argv[1])
plan = _native.BuildPlan(name="fastpar_cuda_probe", directory=root / "cache" / "fastpar_cuda_probe",
    sources=(root / "src" / "probe.cpp", root / "src" / "probe_cuda.cu"), with_cuda=True)
_native.build(plan=plan)
print(sys.modules[plan.name].device_count())
"""


@pytest.mark.skipif(
    shutil.which("nvcc") is None or not _native.cuda_build_possible()[0],
    reason="needs a CUDA build of torch and nvcc on PATH",
)
def test_a_cuda_build_links_with_nvcc_found_on_path(tmp_path: Path) -> None:
    """torch guesses CUDA_HOME from the nvcc on PATH and links -lcudart from CUDA_HOME/lib;
    where that nvcc is a wrapper script outside the toolkit (/usr/local/bin/nvcc), the link
    found no libcudart until the build searched the folders nvcc itself links from."""
    (tmp_path / "src").mkdir()
    for name, text in _CUDA_PROBE_SOURCES.items():
        (tmp_path / "src" / name).write_text(text)
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH")}
    result = subprocess.run(
        [sys.executable, "-c", _BUILD_CUDA_PROBE, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.split()[-1]) >= -1  # the library loaded and cudart answered
