"""The fenced code blocks and the inline commands of a Markdown file, for tests that keep the
README's examples working."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

_FENCE = re.compile(r"^```(\w*)\s*$")
_INLINE = re.compile(r"`([^`]+)`")
_FENCED = re.compile(r"^```.*?^```\s*$", re.MULTILINE | re.DOTALL)


@dataclass(frozen=True)
class CodeBlock:
    """One fenced block: its language ("" when the fence names none), its text, the line of
    its first code line in the file, and the heading of the section it sits in."""

    path: Path
    language: str
    source: str
    line: int
    heading: str

    @property
    def name(self) -> str:
        return f"{self.path.name}:{self.line}"

    def marker(self, prefix: str) -> str | None:
        """What follows `prefix` (e.g. "# run: ") on the block's first line, or None."""
        first = self.source.splitlines()[0] if self.source else ""
        return first[len(prefix) :].strip() if first.startswith(prefix) else None


def code_blocks(path: Path) -> list[CodeBlock]:
    """Every fenced block of `path`, in order."""
    blocks: list[CodeBlock] = []
    heading = ""
    language: str | None = None  # inside a block when not None
    body: list[str] = []
    start = 0
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fence = _FENCE.match(line)
        if language is None:
            if fence:
                language, body, start = fence.group(1), [], number + 1
            elif line.startswith("#"):
                heading = line.lstrip("#").strip()
        elif line.startswith("```"):
            blocks.append(CodeBlock(path, language, "\n".join(body) + "\n", start, heading))
            language = None
        else:
            body.append(line)
    if language is not None:
        raise ValueError(f"{path}:{start - 1}: a code block is never closed")
    return blocks


def shell_commands(block: CodeBlock) -> list[list[str]]:
    """The commands of a shell block, as argument lists (continuation lines joined, comments
    and blank lines dropped)."""
    joined = block.source.replace("\\\n", " ")
    return [words for line in joined.splitlines() if (words := shlex.split(line, comments=True))]


def inline_commands(path: Path, starts: tuple[str, ...]) -> list[tuple[str, list[str]]]:
    """The inline code spans of `path` that start with one of `starts` and are whole commands
    (no "..." standing for the rest), as (the span, its arguments, optional ones ("[--a b]")
    taken as given)."""
    text = _FENCED.sub("", path.read_text())
    found = []
    for span in (" ".join(span.split()) for span in _INLINE.findall(text)):
        if span.startswith(starts) and "..." not in span:
            found.append((span, shlex.split(span.replace("[", "").replace("]", ""))))
    return found
