"""Run the documentation's examples: every ```python block of docs/*.md and README.md.

Each block runs by itself, as a reader who copies only that block would run it: in a fresh
namespace and a fresh empty working directory, with a non-interactive matplotlib backend; one test
per block. A block that truly continues the one before it says so in its info string
(```python continues): it runs after that block (and whatever that one continues) in the same
namespace and folder, all in one test. Keep that rare. A fence whose info string contains
``no-run`` (```python no-run) is shown to readers but not run.

Blocks are found by ``markdown_blocks`` (CommonMark fences), which the CI scripts that run the
docs' shell commands (.ci/user_path.py, .ci/e2e.py) share.
"""
from __future__ import annotations

import os
import traceback
from pathlib import Path
from typing import List, NamedTuple

import pytest

from markdown_blocks import fenced_blocks

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]

_PYTHON = {"python", "py", "python3"}


class Block(NamedTuple):
    index: int      # 1-based position among the file's python blocks (skipped ones included)
    line: int       # line number of the first code line
    code: str
    run: bool
    continues: bool = False   # runs after the previous python block, in its namespace and folder


def python_blocks(text: str) -> List[Block]:
    """The fenced python blocks of a markdown text (see ``markdown_blocks.fenced_blocks``)."""
    found = [f for f in fenced_blocks(text) if f.lang in _PYTHON]
    return [Block(k, f.line, f.code, "no-run" not in f.info, "continues" in f.words[1:])
            for k, f in enumerate(found, start=1)]


def chains(blocks: List[Block], where: str = "") -> List[List[Block]]:
    """The runnable blocks grouped into what runs together: a block alone, or a block followed by
    the blocks that declare ``continues``. A ``continues`` block with no runnable python block
    right before it is an error (there is nothing to continue)."""
    groups: List[List[Block]] = []
    previous = None
    for block in blocks:
        if block.run and block.continues:
            if previous is None or not previous.run:
                raise ValueError(f"{where}python block #{block.index} (line {block.line}) says "
                                 f"'continues' but no runnable python block comes right before it")
            groups[-1].append(block)
        elif block.run:
            groups.append([block])
        previous = block
    return groups


def run_chain(path: Path, chain: List[Block], workdir: Path) -> None:
    """Execute ``chain`` in one fresh namespace with ``workdir`` as the working directory;
    ``pytest.fail`` names the file, the block and its markdown line when one raises."""
    rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    namespace = {"__name__": f"__doc_{path.stem}__"}
    workdir.mkdir(parents=True, exist_ok=True)
    before = os.getcwd()
    os.chdir(workdir)
    try:
        for block in chain:
            # blank lines up to the block's position make tracebacks point at the markdown line
            code = compile("\n" * (block.line - 1) + block.code, str(rel), "exec")
            failure = None
            try:
                exec(code, namespace)
            except Exception:  # noqa: BLE001 - reported with the file, block and traceback
                failure = traceback.format_exc()
            if failure is not None:
                alone = "" if block is chain[0] else f" (it continues block #{chain[0].index})"
                pytest.fail(f"{rel}: python block #{block.index} (starting at line {block.line}) "
                            f"failed{alone}\n{failure}\n---- block #{block.index} ----\n"
                            f"{block.code}", pytrace=False)
    finally:
        os.chdir(before)


def run_markdown(path: Path, workdir: Path) -> int:
    """Run every runnable python block of ``path``, each chain in a fresh namespace and its own
    subfolder of ``workdir``; returns how many blocks ran."""
    groups = chains(python_blocks(path.read_text(encoding="utf-8")), f"{path.name}: ")
    for k, chain in enumerate(groups):
        run_chain(path, chain, workdir / f"chain{k}")
    return sum(len(c) for c in groups)


def _doc_chains():
    params = []
    for path in DOC_FILES:
        rel = path.relative_to(ROOT).as_posix()
        for chain in chains(python_blocks(path.read_text(encoding="utf-8")), f"{rel}: "):
            ident = f"{rel}#" + "+".join(str(b.index) for b in chain)
            params.append(pytest.param(path, chain, id=ident))
    return params


@pytest.mark.parametrize("path, chain", _doc_chains())
def test_doc_example_runs_alone(path, chain, tmp_path, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    run_chain(path, chain, tmp_path)


def test_docs_exist_and_have_examples():
    assert (ROOT / "docs" / "sdes.md") in DOC_FILES
    assert any(b.run for b in python_blocks((ROOT / "docs" / "sdes.md").read_text(encoding="utf-8")))
    assert any(b.run for b in python_blocks((ROOT / "README.md").read_text(encoding="utf-8")))


def test_continuing_blocks_are_rare():
    """Each example should stand alone; a file where most blocks continue another is a tutorial
    that a reader cannot dip into."""
    for path in DOC_FILES:
        blocks = [b for b in python_blocks(path.read_text(encoding="utf-8")) if b.run]
        assert sum(b.continues for b in blocks) <= max(1, len(blocks) // 3), path.name


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
        "```python continues",
        "f = d",
        "```",
        "``` python",
        "e = 5",
    ])
    blocks = python_blocks(text)
    assert [b.index for b in blocks] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [b.run for b in blocks] == [True, False, True, True, True, True, True, True]
    assert [b.continues for b in blocks] == [False] * 6 + [True, False]
    assert blocks[0] == Block(1, 3, "a = 1\n", True)
    assert blocks[3].code == "s = '''\n```\n'''\n"
    assert blocks[4].code == "c = 3\n"
    assert blocks[5].code == "d = 4\n" and blocks[7].code == "e = 5\n"
    assert [[b.index for b in c] for c in chains(blocks)] == [[1], [3], [4], [5], [6, 7], [8]]


def test_a_failing_block_names_the_file_and_block(tmp_path):
    doc = tmp_path / "broken.md"
    doc.write_text("```python\nx = 1\n```\n\ntext\n\n```python continues\ny = x / 0\n```\n",
                   encoding="utf-8")
    with pytest.raises(pytest.fail.Exception) as info:
        run_markdown(doc, tmp_path / "run")
    message = str(info.value)
    assert "broken.md: python block #2 (starting at line 8) failed" in message
    assert "(it continues block #1)" in message
    assert "ZeroDivisionError" in message and 'line 8' in message and "y = x / 0" in message


def test_each_block_runs_alone_in_a_fresh_namespace_and_folder(tmp_path):
    """Without ``continues``, a block does not see the names or the files of the block before."""
    doc = tmp_path / "alone.md"
    doc.write_text("```python\nx = 1\nopen('made_here.txt', 'w').close()\n```\n\n"
                   "```python\nimport os\nassert not os.path.exists('made_here.txt')\n```\n\n"
                   "```python\nprint(x)\n```\n", encoding="utf-8")
    with pytest.raises(pytest.fail.Exception) as info:
        run_markdown(doc, tmp_path / "run")
    message = str(info.value)
    assert "alone.md: python block #3 (starting at line 12) failed" in message
    assert "NameError" in message and "'x'" in message
    doc.write_text("```python\nx = 1\nopen('made_here.txt', 'w').close()\n```\n\n"
                   "```python continues\nimport os\nassert os.path.exists('made_here.txt')\n"
                   "assert x == 1\n```\n", encoding="utf-8")
    assert run_markdown(doc, tmp_path / "run2") == 2


def test_continues_needs_a_runnable_block_before_it():
    for text in ("```python continues\nx = 1\n```\n",
                 "```python no-run\nx = 1\n```\n```python continues\ny = 2\n```\n"):
        with pytest.raises(ValueError, match="'continues' but no runnable python block"):
            chains(python_blocks(text), "t.md: ")
