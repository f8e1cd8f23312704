"""The native build: concurrent first use from several processes, and clear toolchain errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastpar import _native
from fastpar.testing.distributed import run_multiprocess


def _build_and_reduce(rank: int, world_size: int) -> str:
    import torch

    from fastpar.comm.reduce import reduce_buffers

    library = _native.build()
    a, b = torch.randn(100), torch.randn(100)
    assert torch.equal(reduce_buffers([a, b]), a + b)
    return str(library)


@pytest.mark.slow
def test_ranks_building_at_once_share_one_build(tmp_path: Path) -> None:
    env = {"FASTPAR_CACHE_DIR": str(tmp_path)}
    libraries = run_multiprocess(_build_and_reduce, 3, timeout=600, env=env)
    assert len(set(libraries)) == 1
    builds = [p for p in tmp_path.iterdir() if p.is_dir()]
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
    env = {**os.environ, "FASTPAR_CACHE_DIR": str(tmp_path)}
    plan_code = "from fastpar import _native; print(_native.plan_build().directory)"
    directory = Path(
        subprocess.run([sys.executable, "-c", plan_code], capture_output=True, text=True,
                       env=env, check=True).stdout.strip()
    )  # fmt: skip
    directory.mkdir(parents=True)
    (directory / "lock").write_text("")  # what torch leaves when a build is killed
    build = "from fastpar import _native; print(_native.build())"
    result = subprocess.run([sys.executable, "-c", build], capture_output=True, text=True,
                            env=env, timeout=600, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert Path(result.stdout.strip()).exists()
