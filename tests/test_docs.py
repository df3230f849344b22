"""Run the documentation's examples: every ```python block of docs/*.md and README.md.

One test per file; its blocks run in order in one namespace (so a later block may use what an earlier
one defined), in a temporary working directory, with a non-interactive matplotlib backend. A fence
whose info string contains ``no-run`` (e.g. ```python no-run) is shown to readers but not run.
"""
from __future__ import annotations

import re
import traceback
from pathlib import Path
from typing import List, NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]

_OPEN = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
_PYTHON = {"python", "py", "python3"}


class Block(NamedTuple):
    index: int      # 1-based position among the file's python blocks (skipped ones included)
    line: int       # line number of the first code line
    code: str
    run: bool


def python_blocks(text: str) -> List[Block]:
    """The fenced python blocks of a markdown text (CommonMark fences: ``` or ~~~, at least three,
    closed by the same character at least as long; an unclosed fence runs to the end)."""
    lines = text.splitlines()
    blocks: List[Block] = []
    i = 0
    while i < len(lines):
        m = _OPEN.match(lines[i])
        if not m or (m["fence"][0] == "`" and "`" in m["info"]):
            i += 1
            continue
        fence, info, indent = m["fence"], m["info"].strip(), len(m["indent"])
        close = re.compile(rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        j = i + 1
        while j < len(lines) and not close.match(lines[j]):
            j += 1
        words = info.replace("{", " ").replace("}", " ").replace(",", " ").split()
        if words and words[0].lstrip(".").lower() in _PYTHON:
            body = [ln[min(indent, len(ln) - len(ln.lstrip(" "))):] for ln in lines[i + 1:j]]
            blocks.append(Block(len(blocks) + 1, i + 2, "\n".join(body) + "\n", "no-run" not in info))
        i = j + 1
    return blocks


def run_markdown(path: Path) -> int:
    """Execute the runnable python blocks of ``path`` in one namespace; return how many ran."""
    rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    namespace = {"__name__": f"__doc_{path.stem}__"}
    ran = 0
    for block in python_blocks(path.read_text(encoding="utf-8")):
        if not block.run:
            continue
        # blank lines up to the block's position make tracebacks point at the markdown line
        code = compile("\n" * (block.line - 1) + block.code, str(rel), "exec")
        failure = None
        try:
            exec(code, namespace)
        except Exception:  # noqa: BLE001 - reported with the file, block and traceback
            failure = traceback.format_exc()
        if failure is not None:
            pytest.fail(f"{rel}: python block #{block.index} (starting at line {block.line}) failed\n"
                        f"{failure}\n---- block #{block.index} ----\n{block.code}", pytrace=False)
        ran += 1
    return ran


@pytest.mark.parametrize("path", DOC_FILES, ids=[str(p.relative_to(ROOT)) for p in DOC_FILES])
def test_markdown_examples_run(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    run_markdown(path)


def test_docs_exist_and_have_examples():
    assert (ROOT / "docs" / "sdes.md") in DOC_FILES
    assert any(b.run for b in python_blocks((ROOT / "docs" / "sdes.md").read_text(encoding="utf-8")))
    assert any(b.run for b in python_blocks((ROOT / "README.md").read_text(encoding="utf-8")))


def test_block_extraction():
    text = "\n".join([
        "# Title",
        "```python",
        "a = 1",
        "```",
        "```bash",
        "echo not python",
        "```",
        "```python no-run",
        "raise SystemExit  # shown, not run",
        "```",
        "~~~py",
        "b = a + 1",
        "~~~",
        "````python title=\"nested\"",
        "s = '''",
        "```",
        "'''",
        "````",
        "  ```python",
        "  c = 3",
        "  ```",
        "```{python}",
        "d = 4",
        "```",
        "``` python",
        "e = 5",
    ])
    blocks = python_blocks(text)
    assert [b.index for b in blocks] == [1, 2, 3, 4, 5, 6, 7]
    assert [b.run for b in blocks] == [True, False, True, True, True, True, True]
    assert blocks[0] == Block(1, 3, "a = 1\n", True)
    assert blocks[3].code == "s = '''\n```\n'''\n"
    assert blocks[4].code == "c = 3\n"
    assert blocks[5].code == "d = 4\n" and blocks[6].code == "e = 5\n"


def test_a_failing_block_names_the_file_and_block(tmp_path):
    doc = tmp_path / "broken.md"
    doc.write_text("```python\nx = 1\n```\n\ntext\n\n```python\ny = x / 0\n```\n", encoding="utf-8")
    with pytest.raises(pytest.fail.Exception) as info:
        run_markdown(doc)
    message = str(info.value)
    assert "broken.md: python block #2 (starting at line 8) failed" in message
    assert "ZeroDivisionError" in message and 'line 8' in message and "y = x / 0" in message
