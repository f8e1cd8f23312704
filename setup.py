"""Ships csrc/ inside the wheel as fastpar/_csrc so a non-editable install can build the
native extension on first use (the extension is compiled lazily, not at install time)."""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithSources(build_py):
    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "fastpar" / "_csrc"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(ROOT / "csrc", target)


setup(cmdclass={"build_py": BuildPyWithSources})
