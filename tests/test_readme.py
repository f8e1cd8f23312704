"""The README's examples work: every Python block runs as a reader would run it, and every
command the README and docs/multinode.md show parses with the flags it uses, in whatever form a
reader would copy it (see `_command_problems`): a shell block's line, a console block's `$ `
line, or an inline span.

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
import itertools
import os
import re
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
from tests.markdown_code import CodeBlock, code_blocks, inline_spans, shell_commands
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

PYTHON_BLOCKS = [block for block in code_blocks(README) if block.is_python]
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
    problems = [problem for doc in DOCS for problem in doc_problems(doc)]
    assert not problems, "\n".join(problems)


def doc_problems(doc: Path) -> list[str]:
    """What is wrong with the commands of `doc`, each problem after the line of its command:
    those of its shell blocks, and its inline spans that are whole commands of fastpar or of
    a script in bench/."""
    problems = []
    for block in code_blocks(doc):
        if block.is_shell:
            for line, words in shell_commands(block):
                problems += [f"{doc.name}:{line}: {p}" for p in _command_problems(words)]
    for line, span in inline_spans(doc):
        if (words := _inline_command(span)) is not None:
            problems += [f"{doc.name}:{line}: `{span}`: {p}" for p in _command_problems(words)]
    return problems


_COMMANDS = ("train", "bench", "info", "build")
_SCRIPT_STARTS = ("bench/",)
_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")  # FASTPAR_X=1 before a command
_PYTHON = re.compile(r"(.*/)?python(3(\.\d+)?)?")
_TORCHRUN_MODULE = ["-m", "torch.distributed.run"]
_PYTHON_MODULES = (_TORCHRUN_MODULE, ["-m", "fastpar"])


def _inline_command(span: str) -> list[str] | None:
    """The arguments of an inline span that is a whole command (no "..." standing for the
    rest) of fastpar, or of a script in bench/, optional ones ("[--a b]") taken as given; None
    for any other span."""
    if "..." in span:
        return None
    try:
        words = shlex.split(span.replace("[", "").replace("]", ""))
    except ValueError:  # not shell words: an unpaired quote
        return None
    command = list(itertools.dropwhile(_ASSIGNMENT.match, words))
    if not command:
        return None
    if _launch_start(command) == 0 and "fastpar" in command:
        return words
    script = command[1] if len(command) > 1 and _is_python_or_bash(command[0]) else command[0]
    return words if script.startswith(_SCRIPT_STARTS) else None


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
    Makefile target or a script that does not exist. A command runs fastpar as a user types it:
    after environment assignments (`FASTPAR_X=1 fastpar ...`), or a wrapper (`srun`, `nsys
    profile ...`), as `fastpar`, `python -m fastpar`, or under torchrun (`torchrun ... -m
    fastpar ...`, `python -m torch.distributed.run ... -m fastpar ...`). Commands of other
    tools pass unchecked."""
    words = list(itertools.dropwhile(_ASSIGNMENT.match, words))
    if not words:
        return []
    start = _launch_start(words)
    if start is not None:
        return _launch_problems(words[start:])
    if words[0] == "make":
        targets = {line.split(":")[0] for line in (ROOT / "Makefile").read_text().splitlines()}
        return [f"no Makefile target {w!r}" for w in words[1:] if "=" not in w and w not in targets]
    script = words[1] if len(words) > 1 and _is_python_or_bash(words[0]) else words[0]
    if script.endswith((".py", ".sh")):
        return _script_problems(ROOT / script, words)
    return []


def _launch_start(words: list[str]) -> int | None:
    """Where in `words` fastpar or torchrun starts (the words before it: a wrapper), or None."""
    for index, word in enumerate(words):
        after = words[index + 1 : index + 3]
        if word == "torchrun" or (_PYTHON.fullmatch(word) and after in _PYTHON_MODULES):
            return index
        # `pip install fastpar` names the package: fastpar starts with a command or a flag.
        if word == "fastpar" and after and (after[0] in _COMMANDS or after[0].startswith("-")):
            return index
    return None


def _launch_problems(words: list[str]) -> list[str]:
    """What fastpar's parser (or first torchrun's, then fastpar's) refuses in `words`, which
    start with torchrun, python -m or fastpar."""
    if words[0] == "torchrun" or words[1:3] == _TORCHRUN_MODULE:
        problem, args = _parse(torchrun_parser(), words[1 if words[0] == "torchrun" else 3 :])
        if problem or args is None:  # None: --help
            return [problem] if problem else []
        if not (args.module and args.training_script == "fastpar"):
            return ["torchrun does not start `-m fastpar`"]
        words = ["fastpar", *args.training_script_args]
    arguments = words[1:] if words[0] == "fastpar" else words[3:]
    return [problem] if (problem := _parse(fastpar_parser(), arguments)[0]) else []


def _is_python_or_bash(word: str) -> bool:
    return word == "bash" or _PYTHON.fullmatch(word) is not None


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


def _parse(
    parser: argparse.ArgumentParser, args: list[str]
) -> tuple[str, argparse.Namespace | None]:
    """(the parser's error, "" when none; the parsed arguments, None after an error or a
    `--help`, which exits with code 0)."""
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
            return "", parser.parse_args(args)
    except SystemExit as exit:
        if exit.code in (0, None):
            return "", None
        return errors.getvalue().strip().splitlines()[-1], None


def _bash(commands: str) -> str:
    return f"```bash\n{commands}\n```\n"


# Each way a document may show a command that hands fastpar a bad flag: (its Markdown, the line
# of the command). The check must report each one as it reports a plain `fastpar train`.
BAD_FLAG_DOCS = {
    "plain": ("```bash\nfastpar train --bogus\n```\n", 2),
    "untagged": ("```\nfastpar train --bogus\n```\n", 2),
    "sh": ("```sh\nfastpar train --bogus\n```\n", 2),
    "shell": ("```shell\nfastpar train --bogus\n```\n", 2),
    "console": ("```console\n$ fastpar train --bogus\nstep 1 ...\n```\n", 2),
    "tilde fence": ("~~~bash\nfastpar train --bogus\n~~~\n", 2),
    "under a list item": ("1. Train:\n\n   ```bash\n   fastpar train --bogus\n   ```\n", 4),
    "environment": (_bash("FASTPAR_TEST_SLOW=1:100:200:5 fastpar train --bogus"), 2),
    "python -m": (_bash("python -m fastpar train --bogus"), 2),
    "python3 -m": (_bash("python3 -m fastpar train --bogus"), 2),
    "torchrun": (_bash("torchrun --nproc-per-node 2 -m fastpar train --bogus"), 2),
    "torch.distributed.run": (
        _bash("python -m torch.distributed.run --nproc-per-node 2 -m fastpar train --bogus"),
        2,
    ),
    "continued": (
        _bash("# two lines\ntorchrun --nproc-per-node 2 \\\n  -m fastpar train --bogus"),
        3,
    ),
    "wrapper": (_bash("srun --ntasks 2 fastpar train --bogus"), 2),
    "after &&": (_bash("cd run && fastpar train --bogus"), 2),
    "inline": ("Run\n`FASTPAR_X=1 fastpar train --bogus`.\n", 2),
    "inline torchrun": ("Or `torchrun --nproc-per-node 2 -m fastpar train --bogus`.\n", 1),
}


@pytest.mark.parametrize("markdown, line", BAD_FLAG_DOCS.values(), ids=list(BAD_FLAG_DOCS))
def test_a_bad_flag_is_reported_in_every_form_of_command(
    tmp_path: Path, markdown: str, line: int
) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(markdown)
    problems = doc_problems(doc)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"doc.md:{line}: ")
    assert problems[0].endswith("fastpar: error: unrecognized arguments: --bogus")


@pytest.mark.parametrize("markdown, line", BAD_FLAG_DOCS.values(), ids=list(BAD_FLAG_DOCS))
def test_the_same_commands_with_good_flags_pass(tmp_path: Path, markdown: str, line: int) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(markdown.replace("--bogus", "--steps 3"))
    assert doc_problems(doc) == []


@pytest.mark.parametrize(
    "command",
    [
        "fastpar train --help",
        "python -m fastpar --help",
        "torchrun --help",
        "torchrun --nproc-per-node 2 -m fastpar train -h",
        "pip install fastpar",
    ],
)
def test_help_and_other_tools_pass(command: str) -> None:
    assert _command_problems(shlex.split(command)) == []


def test_console_output_lines_are_not_commands(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text("```console\n$ fastpar info\nfastpar train --bogus\n```\n")
    assert doc_problems(doc) == []


def test_python_blocks_are_found_by_any_python_tag_and_indented(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(
        "# Steps\n- first:\n  ```python\n  x = 1\n    y = 2\n  ```\n"
        "```py\nprint(1)\n```\n````python3 title\n```\n````\n"
    )
    found = [(b.language, b.is_python, b.source, b.line, b.heading) for b in code_blocks(doc)]
    assert found == [
        ("python", True, "x = 1\n  y = 2\n", 4, "Steps"),
        ("py", True, "print(1)\n", 8, "Steps"),
        ("python3", True, "```\n", 11, "Steps"),
    ]
