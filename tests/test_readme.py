"""The README's examples work: every Python block runs as a reader would run it, and every
command the README and docs/multinode.md show parses with the flags it uses.

A Python block runs as a script of its own, in a fresh folder: with `python example.py`, or as
its first line says, e.g. `# run: torchrun --standalone --nproc-per-node 2 example.py`; up to
three examples run at once, since most of their time is spent importing torch. A block
that needs what not every machine has says so on its first line (`# needs: cuda`); it is
compiled everywhere, run where the need is met, and listed in `NEEDS_MARKED` below, so that no
example stops running by accident.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shlex
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch.distributed.run import get_args_parser as torchrun_parser

from fastpar.__main__ import build_parser as fastpar_parser
from tests.markdown_code import CodeBlock, code_blocks, inline_commands, shell_commands
from tests.processes import descendants

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = (README, ROOT / "docs" / "multinode.md")
RUN = "# run: "
NEEDS = "# needs: "
# What a `# needs:` marker may name, and whether this machine has it.
NEEDS_MET: dict[str, Callable[[], bool]] = {"cuda": torch.cuda.is_available}
# The README's examples that not every machine can run: (their section, what they need).
NEEDS_MARKED = {("`fastpar.nn.LSTM`", "cuda")}
EXAMPLE_TIMEOUT_S = 180  # on a loaded 2-core host an example takes 6-16 s, three at once 2x
EXAMPLES_AT_ONCE = 3

PYTHON_BLOCKS = [block for block in code_blocks(README) if block.language == "python"]
RUNNABLE = [
    block
    for block in PYTHON_BLOCKS
    if (need := block.marker(NEEDS)) is None or (need in NEEDS_MET and NEEDS_MET[need]())
]


def test_every_python_example_compiles() -> None:
    for block in PYTHON_BLOCKS:
        compile(block.source, f"{block.name} ({block.heading})", "exec")


def test_examples_that_cannot_run_everywhere_are_listed() -> None:
    marked = {(b.heading, need) for b in PYTHON_BLOCKS if (need := b.marker(NEEDS)) is not None}
    assert marked == NEEDS_MARKED
    assert {need for _, need in marked} <= set(NEEDS_MET)


@pytest.fixture(scope="module")
def example_runs(request: pytest.FixtureRequest) -> Iterator[dict[str, Future[tuple[int, str]]]]:
    """The runs of the examples this session selected, started together: name -> (exit code,
    output)."""
    selected = {
        item.callspec.params["block"].name
        for item in request.session.items
        if getattr(item, "originalname", "") == "test_python_example_runs"
    }
    with tempfile.TemporaryDirectory() as folder, ThreadPoolExecutor(EXAMPLES_AT_ONCE) as pool:
        runs = {}
        for block in RUNNABLE:
            if block.name in selected:
                cwd = Path(folder) / block.name.replace(":", "-")
                cwd.mkdir()
                runs[block.name] = pool.submit(_run_example, block, cwd)
        yield runs


@pytest.mark.parametrize("block", RUNNABLE, ids=[block.name for block in RUNNABLE])
def test_python_example_runs(
    block: CodeBlock, example_runs: dict[str, Future[tuple[int, str]]]
) -> None:
    code, output = example_runs[block.name].result()
    assert code == 0, f"the example at {block.name} ({block.heading}) exited {code}:\n{output}"


def test_documented_commands_parse() -> None:
    problems = []
    for doc in DOCS:
        for block in code_blocks(doc):
            if block.language in ("", "bash", "sh"):
                for words in shell_commands(block):
                    problems += [f"{block.name}: {p}" for p in _command_problems(words)]
        starts = tuple(f"{p} {c}" for p in ("fastpar", "python -m fastpar") for c in _COMMANDS)
        for span, words in inline_commands(doc, (*starts, *_SCRIPT_STARTS)):
            problems += [f"{doc.name}, `{span}`: {p}" for p in _command_problems(words)]
    assert not problems, "\n".join(problems)


_COMMANDS = ("train", "bench", "info", "build")
_SCRIPT_STARTS = ("python bench/", "bash bench/", "bench/")


def _run_example(block: CodeBlock, cwd: Path) -> tuple[int, str]:
    script = cwd / "example.py"
    script.write_text(block.source)
    launcher = block.marker(RUN)
    command = [sys.executable, str(script)] if launcher is None else _launch(launcher, script)
    # The examples import the fastpar under test; TRITON_INTERPRET comes from conftest.py.
    path = os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))
    return _run_bounded(command, cwd=cwd, env={**os.environ, "PYTHONPATH": path})


def _launch(launcher: str, script: Path) -> list[str]:
    """The command of a `# run: torchrun ... example.py` marker, with this Python's torchrun."""
    words = shlex.split(launcher)
    assert words[0] == "torchrun" and words[-1] == "example.py", f"unknown launcher {launcher!r}"
    return [sys.executable, "-m", "torch.distributed.run", *words[1:-1], str(script)]


def _run_bounded(command: list[str], *, cwd: Path, env: dict[str, str]) -> tuple[int, str]:
    """Run `command`; after the bound, kill it and every process it started. torchrun starts
    each rank in a session of its own, out of reach of a kill of its process group, so the
    ranks are found by their parent ids before anything is killed."""
    log = cwd / "output.txt"  # a file: a pipe would stay open while an orphaned rank runs
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            code = process.wait(timeout=EXAMPLE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for pid in (*descendants(process.pid), process.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            process.wait()
            code = -1
    output = log.read_text()[-4000:]
    return code, output if code != -1 else f"still running after {EXAMPLE_TIMEOUT_S} s:\n{output}"


def _command_problems(words: list[str]) -> list[str]:
    """What is wrong with one documented command line: flags or choices its parser refuses, a
    Makefile target or a script that does not exist. Commands of other tools pass unchecked."""
    if "torchrun" in words:
        torchrun = words[words.index("torchrun") + 1 :]
        problem, args = _parse(torchrun_parser(), torchrun)
        if problem or not (args.module and args.training_script == "fastpar"):
            return [problem or "torchrun does not start `-m fastpar`"]
        words = ["fastpar", *args.training_script_args]
    if words[:3] == ["python", "-m", "fastpar"]:
        words = words[2:]
    if words[0] == "fastpar":
        return [problem] if (problem := _parse(fastpar_parser(), words[1:])[0]) else []
    if words[0] == "make":
        targets = {line.split(":")[0] for line in (ROOT / "Makefile").read_text().splitlines()}
        return [f"no Makefile target {w!r}" for w in words[1:] if "=" not in w and w not in targets]
    script = words[1] if words[0] in ("python", "bash") else words[0]
    if script.endswith((".py", ".sh")):
        return _script_problems(ROOT / script, words)
    return []


def _script_problems(script: Path, words: list[str]) -> list[str]:
    """A missing script, or flags its source does not define (a bench script's parser costs
    an import of torch to build; its source names each flag it takes)."""
    if not script.is_file():
        return [f"no file {script.relative_to(ROOT)}"]
    # gpu_check.sh hands every flag but --python to gpu_check.py.
    sources = [path.read_text() for path in (script, script.with_suffix(".py")) if path.is_file()]
    flags = {word.split("=")[0] for word in words if word.startswith("--")}
    defined = {f for f in flags if any(f'"{f}"' in text or f"{f})" in text for text in sources)}
    return [f"{script.name} defines no {flag}" for flag in sorted(flags - defined)]


def _parse(parser: argparse.ArgumentParser, args: list[str]) -> tuple[str, argparse.Namespace]:
    """(the parser's error, "" when none; the parsed arguments)."""
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            return "", parser.parse_args(args)
    except SystemExit:
        return errors.getvalue().strip().splitlines()[-1], argparse.Namespace()
