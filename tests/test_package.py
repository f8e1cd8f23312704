"""Packaging and import hygiene: fastpar imports without triton or CUDA, the CLI works, and a
wheel carries the C++ sources so a non-editable install can build the extension."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Makes `import triton` fail as it does where triton is not installed.
_BLOCK_TRITON = """
import importlib.abc, importlib.machinery, sys
class _NoTriton(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name == "triton" or name.startswith("triton."):
            return importlib.machinery.ModuleSpec(name, self)
        return None
    def create_module(self, spec):
        raise ModuleNotFoundError(f"No module named {spec.name!r}", name=spec.name)
    def exec_module(self, module):
        raise AssertionError("unreachable")
sys.meta_path.insert(0, _NoTriton())
"""


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=False
    )


def _subpackages() -> list[str]:
    package = REPO / "fastpar"
    names = ["fastpar"]
    for init in sorted(package.glob("*/__init__.py")):
        names.append(f"fastpar.{init.parent.name}")
    return names


def test_import_needs_no_triton() -> None:
    imports = "; ".join(f"import {name}" for name in _subpackages())
    lazy = "import fastpar; fastpar.nn.LSTM; fastpar.parallel.DataParallel; fastpar.data"
    code = f"{_BLOCK_TRITON}{lazy}\n{imports}\nassert 'triton' not in sys.modules"
    result = _python(code)
    assert result.returncode == 0, result.stderr


def test_info_reports_a_missing_triton() -> None:
    code = _BLOCK_TRITON + "from fastpar.__main__ import main; main(['info'])"
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert "triton: not importable (No module named 'triton')" in result.stdout
    assert "triton (interpreter)       no (needs triton" in result.stdout
    assert "native extension: builds and loads" in result.stdout


def test_ctrl_c_before_a_command_takes_it_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C while `fastpar train` still imports torch printed a KeyboardInterrupt traceback."""
    from fastpar import __main__

    def interrupted(args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(__main__, "_info", interrupted)
    try:
        code = __main__.main(["info"])
    except KeyboardInterrupt:  # would end the whole pytest session
        pytest.fail("KeyboardInterrupt escaped fastpar's main")
    assert code == 130
    assert capsys.readouterr().err == "\nfastpar info: interrupted\n"


def test_cli_rejects_an_unknown_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fastpar", "frobnicate"], capture_output=True, text=True,
        cwd=REPO, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "invalid choice: 'frobnicate'" in result.stderr


def test_wheel_ships_the_native_sources(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(REPO)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("fastpar-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for source in sorted((REPO / "csrc").iterdir()):
        assert f"fastpar/_csrc/{source.name}" in names
    assert "fastpar/_native.py" in names


def test_info_counts_the_cores_this_process_may_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under taskset or a cgroup cpuset, `fastpar info` reported the machine's cores only."""
    from fastpar import info

    monkeypatch.setattr(info.os, "cpu_count", lambda: 8)
    monkeypatch.setattr(info.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert info._devices()[0].endswith(", 8 cores, 2 usable by this process")
    monkeypatch.setattr(info.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert info._devices()[0].endswith(", 8 cores")
