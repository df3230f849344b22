"""Fenced code blocks, inline code spans and shell commands of markdown files.

Standard library only: the docs test (tests/test_docs.py) and the CI scripts that run the docs'
commands (.ci/user_path.py, .ci/e2e.py, run in virtual environments without pytest) share it, so the
tests and CI read the docs the same way.

Fences follow CommonMark: ``` or ~~~, at least three, up to three spaces of indentation, closed by
the same character at least as long; an unclosed fence runs to the end. A backtick fence's info
string may not contain a backtick. Inline code spans are delimited by equal runs of backticks; a
line break inside a span counts as a space.
"""
from __future__ import annotations

import re
import shlex
from typing import List, NamedTuple, Optional, Tuple

__all__ = ["Fence", "Span", "DocCommand", "fenced_blocks", "inline_spans", "shell_commands",
           "inline_commands", "EXPECT_EXIT"]

_OPEN = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>.*)$")


class Fence(NamedTuple):
    line: int       # 1-based line number of the first code line
    info: str       # the info string after the fence, stripped ("python no-run", "bash", ...)
    code: str       # the block's text, indentation of the fence removed, ending in a newline

    @property
    def words(self) -> List[str]:
        """The info string's words; ``{python}`` and ``python,title`` count as ``python``."""
        return self.info.replace("{", " ").replace("}", " ").replace(",", " ").split()

    @property
    def lang(self) -> str:
        """The first word of the info string, lower case, without a leading dot ('' if none)."""
        return self.words[0].lstrip(".").lower() if self.words else ""


class Span(NamedTuple):
    line: int       # 1-based line where the span starts
    code: str       # the span's text, line breaks as spaces


def _fences(lines: List[str]) -> List[Tuple[int, int, Fence]]:
    """``(opening line index, closing line index, Fence)`` for each fenced block."""
    found = []
    i = 0
    while i < len(lines):
        m = _OPEN.match(lines[i])
        if not m or (m["fence"][0] == "`" and "`" in m["info"]):
            i += 1
            continue
        fence, indent = m["fence"], len(m["indent"])
        close = re.compile(rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        j = i + 1
        while j < len(lines) and not close.match(lines[j]):
            j += 1
        body = [ln[min(indent, len(ln) - len(ln.lstrip(" "))):] for ln in lines[i + 1:j]]
        found.append((i, j, Fence(i + 2, m["info"].strip(), "\n".join(body) + "\n")))
        i = j + 1
    return found


def fenced_blocks(text: str, lang: Optional[str] = None) -> List[Fence]:
    """The fenced code blocks of a markdown text, in order; only those of language ``lang`` (the
    info string's first word, e.g. ``"bash"``) when given."""
    blocks = [f for _, _, f in _fences(text.splitlines())]
    return blocks if lang is None else [b for b in blocks if b.lang == lang]


def inline_spans(text: str) -> List[Span]:
    """The inline code spans of a markdown text outside fenced blocks, in order."""
    lines = text.splitlines()
    inside = set()
    for i, j, _ in _fences(lines):
        inside.update(range(i, j + 1))
    # prose with fenced blocks blanked out (line numbers kept); a span may cross line breaks
    prose = "\n".join("" if k in inside else ln for k, ln in enumerate(lines))
    spans, pos = [], 0
    for m in re.finditer(r"`+", prose):
        if m.start() < pos:
            continue
        closing = re.compile(rf"(?<!`){m.group()}(?!`)")
        end = closing.search(prose, m.end())
        if end is None:
            pos = m.end()
            continue
        code = prose[m.end():end.start()]
        if "\n\n" in code:  # a paragraph break ends any span
            pos = m.end()
            continue
        code = code.replace("\n", " ")
        if code.startswith(" ") and code.endswith(" ") and code.strip():
            code = code[1:-1]
        spans.append(Span(prose.count("\n", 0, m.start()) + 1, code))
        pos = end.end()
    return spans


#: A documented command that fails on purpose says so in a trailing comment on its last line:
#: ``sde-diffusion sample --n 0   # exit status 2``. Its expected exit status is that number.
EXPECT_EXIT = re.compile(r"#.*\bexit status (\d+)\b")


class DocCommand(NamedTuple):
    line: int            # line in the markdown file where the command starts
    argv: List[str]      # the command's words, as the shell would split them
    text: str            # the command as written (continuations joined, comment removed)
    expect: int          # the exit status the docs promise: 0, or the EXPECT_EXIT marker's number


_RUNNABLE = re.compile(r"^(sde-diffusion|torchrun)\s|^python3?\s+-m\s+sde_diffusion")


def shell_commands(block: Fence) -> List[DocCommand]:
    """The ``sde-diffusion``, ``torchrun`` and ``python -m sde_diffusion...`` commands of a shell
    block: ``\\``-continued lines joined, comments dropped, ``&&`` chains split (the other commands
    of a chain, such as installs, are not returned)."""
    commands = []
    lines = block.code.splitlines()
    k = 0
    while k < len(lines):
        first, parts = k, []
        while True:
            ln = lines[k]
            k += 1
            if ln.rstrip().endswith("\\") and k < len(lines):
                parts.append(ln.rstrip()[:-1])
                continue
            parts.append(ln)
            break
        joined = " ".join(p.strip() for p in parts).strip()
        if not joined or joined.startswith("#"):
            continue
        lexer = shlex.shlex(joined, posix=True, punctuation_chars="&|;")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        words = list(lexer)
        marker = EXPECT_EXIT.search(joined)
        # the command text without its trailing comment: what the words came from
        text = re.split(r"\s#", joined, maxsplit=1)[0].strip()
        chain: List[List[str]] = [[]]
        for word in words:
            if word in ("&&", ";", "||", "|", "&"):
                chain.append([])
            else:
                chain[-1].append(word)
        for argv in chain:
            if argv and _RUNNABLE.match(" ".join(argv) + " "):
                commands.append(DocCommand(block.line + first, argv, shlex.join(argv) if len(chain) > 1
                                           else text, int(marker.group(1)) if marker else 0))
    return commands


def inline_commands(text: str) -> List[DocCommand]:
    """Inline code spans that are ``sde-diffusion`` commands with arguments (``sde-diffusion
    sample --checkpoint runs/moons``); a bare ``sde-diffusion train`` names a command in prose
    and is not returned."""
    found = []
    for span in inline_spans(text):
        if not span.code.startswith("sde-diffusion "):
            continue
        argv = shlex.split(span.code)
        if len(argv) > 2:
            found.append(DocCommand(span.line, argv, span.code, 0))
    return found
