"""The native build: concurrent first use from several processes, and clear toolchain errors."""

from __future__ import annotations

import os
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
    (plan.directory / f"{plan.name}.so").write_text("not a library\n")
    (plan.directory / "complete").write_text(f"{plan.name}.so")
    usable, reason = _native.is_available()
    assert not usable
    assert reason.startswith("the cached native extension does not load (")
    assert reason.endswith(f"delete {plan.directory} and run `python -m fastpar build`")
    assert main(["build"]) == 1
    assert capsys.readouterr().err == f"fastpar build: {reason}\n"


def test_build_names_the_library_it_loaded(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fastpar.__main__ import main

    monkeypatch.setattr(_native, "_loaded", None)  # as in a new process
    assert main(["build"]) == 0
    library = _native.build()  # cached: the session built it
    assert capsys.readouterr().out == f"native extension: {library}\n"
