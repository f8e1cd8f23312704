"""The fenced code blocks and the inline code spans of a Markdown file, for tests that keep the
README's examples working. Fences follow CommonMark: ``` or ~~~, indented (a block under a list
item), the language the first word after the fence."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
_INLINE = re.compile(r"`([^`]+)`")
# The languages a reader runs with Python, or pastes into a shell; "" is an untagged block.
PYTHON_LANGUAGES = frozenset({"python", "py", "python3"})
SHELL_LANGUAGES = frozenset({"", "bash", "sh", "shell", "console", "zsh"})
# Between two commands on one line, in shlex's punctuation tokens.
_SEPARATORS = frozenset({"&&", "||", ";", "|", "&"})
_PROMPT = "$ "  # a "console" block's commands start with it; its other lines are output


@dataclass(frozen=True)
class CodeBlock:
    """One fenced block: its language (lower case, "" when the fence names none), its text
    without the fence's indentation, the line of its first code line in the file, and the
    heading of the section it sits in."""

    path: Path
    language: str
    source: str
    line: int
    heading: str

    @property
    def name(self) -> str:
        return f"{self.path.name}:{self.line}"

    @property
    def is_python(self) -> bool:
        return self.language in PYTHON_LANGUAGES

    @property
    def is_shell(self) -> bool:
        return self.language in SHELL_LANGUAGES

    def marker(self, prefix: str) -> str | None:
        """What follows `prefix` (e.g. "# run: ") on the block's first line, or None."""
        first = self.source.splitlines()[0] if self.source else ""
        return first[len(prefix) :].strip() if first.startswith(prefix) else None


def code_blocks(path: Path) -> list[CodeBlock]:
    """Every fenced block of `path`, in order."""
    return [block for block, _ in _blocks_and_lines(path)]


def _blocks_and_lines(path: Path) -> list[tuple[CodeBlock, range]]:
    """Every fenced block of `path`, with the file's lines it takes, fences included."""
    blocks: list[tuple[CodeBlock, range]] = []
    heading = ""
    opening: re.Match[str] | None = None  # the open block's fence, None outside a block
    body: list[str] = []
    start = 0
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fence = _FENCE.match(line)
        if opening is None:
            if fence and not (fence["fence"][0] == "`" and "`" in fence["info"]):
                opening, body, start = fence, [], number + 1
            elif line.startswith("#"):
                heading = line.lstrip("#").strip()
        elif _closes(fence, opening):
            language = opening["info"].split()[0].lower() if opening["info"].strip() else ""
            source = "\n".join(body) + "\n"
            taken = range(start - 1, number + 1)
            blocks.append((CodeBlock(path, language, source, start, heading), taken))
            opening = None
        else:
            # CommonMark: a line loses as much of its indentation as the opening fence had.
            indent = len(opening["indent"])
            body.append(line[min(indent, len(line) - len(line.lstrip(" "))) :])
    if opening is not None:
        raise ValueError(f"{path}:{start - 1}: a code block is never closed")
    return blocks


def _closes(fence: re.Match[str] | None, opening: re.Match[str]) -> bool:
    """Whether `fence` closes the block `opening` opened: the same character, at least as many,
    nothing after it."""
    return (
        fence is not None
        and fence["fence"][0] == opening["fence"][0]
        and len(fence["fence"]) >= len(opening["fence"])
        and not fence["info"].strip()
    )


def shell_commands(block: CodeBlock) -> list[tuple[int, list[str]]]:
    """The commands of a shell block, as (the file's line where each starts, its arguments):
    continuation lines joined, comments and blank lines dropped, `a && b` or `a; b` taken as
    two commands; of a "console" block only the lines after a `$ ` prompt."""
    commands = []
    lines = block.source.splitlines()
    index = 0
    while index < len(lines):
        first = index
        text = lines[index]
        while text.endswith("\\") and index + 1 < len(lines):
            index += 1
            text = text[:-1] + " " + lines[index]
        index += 1
        if block.language == "console":
            if not text.startswith(_PROMPT):
                continue
            text = text[len(_PROMPT) :]
        commands += [(block.line + first, words) for words in _split_commands(text)]
    return commands


def _split_commands(text: str) -> list[list[str]]:
    """The commands of one shell line, each as its arguments."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in _SEPARATORS:
            commands.append([])
        else:
            commands[-1].append(token)
    return [words for words in commands if words]


def inline_spans(path: Path) -> list[tuple[int, str]]:
    """The inline code spans of `path` outside its fenced blocks, as (the line where each
    starts, its text with runs of white space made one space)."""
    lines = path.read_text().splitlines()
    for _, taken in _blocks_and_lines(path):
        for number in taken:
            lines[number - 1] = ""
    text = "\n".join(lines)
    return [
        (text.count("\n", 0, match.start()) + 1, " ".join(match.group(1).split()))
        for match in _INLINE.finditer(text)
    ]
