"""The commands the docs show, as CI reads them (.ci/user_path.py, .ci/e2e.py): how they are
extracted from markdown, and that every one of README.md and docs/cli.md is a command line the
``sde-diffusion`` parser accepts (a fast check; CI's end-to-end step runs them all)."""
import sys
from pathlib import Path

import pytest

from markdown_blocks import EXPECT_EXIT, Fence, fenced_blocks, inline_commands, shell_commands

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / ".ci"))

import e2e  # noqa: E402  (.ci/e2e.py)
import user_path  # noqa: E402  (.ci/user_path.py)

from sde_diffusion.cli import UserError, build_parser  # noqa: E402


def test_shell_commands_join_continuations_drop_comments_and_split_chains():
    block = Fence(10, "bash", "\n".join([
        "# a comment line",
        "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && sde-diffusion demo",
        "sde-diffusion compare --oracle gmm2d --solvers ancestral,ddim:eta=0 \\",
        "    --nfe 10,20 --out study/   # a comment",
        "torchrun --nproc_per_node 2 -m sde_diffusion.training --config c.py --workdir w",
        "python -m sde_diffusion sample --oracle ring8",
        "echo not ours",
        "sde-diffusion sample --oracle ring8 --n 0   # exit status 2: --n must be >= 1",
    ]) + "\n")
    found = shell_commands(block)
    assert [c.line for c in found] == [11, 12, 14, 15, 17]
    assert found[0].argv == ["sde-diffusion", "demo"]
    assert found[1].argv == ["sde-diffusion", "compare", "--oracle", "gmm2d", "--solvers",
                             "ancestral,ddim:eta=0", "--nfe", "10,20", "--out", "study/"]
    assert found[1].text == "sde-diffusion compare --oracle gmm2d --solvers ancestral,ddim:eta=0 " \
                            "--nfe 10,20 --out study/"
    assert found[2].argv[:4] == ["torchrun", "--nproc_per_node", "2", "-m"]
    assert found[3].argv[:3] == ["python", "-m", "sde_diffusion"]
    assert [c.expect for c in found] == [0, 0, 0, 0, 2]
    assert EXPECT_EXIT.search("x  # exits with exit status 3").group(1) == "3"


def test_inline_commands_span_line_breaks_and_skip_bare_names():
    text = ("Train: `sde-diffusion train --config c.py\n--workdir runs/m`, then `sde-diffusion\n"
            "sample --checkpoint runs/m`.\n\nThe command `sde-diffusion train` resumes; errors "
            "read `sde-diffusion: error: ...`.\n\n```bash\nsde-diffusion demo\n```\n"
            "``code with ` inside``\n")
    found = inline_commands(text)
    assert [c.argv for c in found] == [
        ["sde-diffusion", "train", "--config", "c.py", "--workdir", "runs/m"],
        ["sde-diffusion", "sample", "--checkpoint", "runs/m"]]
    assert [c.line for c in found] == [1, 2]


def test_e2e_reads_torchrun_and_python_m_as_the_train_command():
    assert e2e.cli_args(["torchrun", "--nproc_per_node", "2", "-m", "sde_diffusion.training",
                         "--config", "c.py"]) == ["train", "--config", "c.py"]
    assert e2e.cli_args(["python", "-m", "sde_diffusion", "demo"]) == ["demo"]
    assert e2e.cli_args(["sde-diffusion", "sample", "--n", "5"]) == ["sample", "--n", "5"]
    argv, changed = e2e.as_run("README.md", ["sde-diffusion", "sample", "--oracle", "ring8"])
    assert argv == ["sde-diffusion", "sample", "--oracle", "ring8", *e2e.SHRINK["sample"]]
    assert changed == ["+ " + " ".join(e2e.SHRINK["sample"])]


def _unused_words(rest):
    """What ``train`` would reject among the words argparse left over: anything but config
    overrides ``--config.KEY=VALUE`` or ``--config.KEY VALUE``."""
    bad, k = [], 0
    while k < len(rest):
        word = rest[k]
        if word.startswith("--config."):
            k += 1 if "=" in word else 2
        else:
            bad.append(word)
            k += 1
    return bad


@pytest.mark.parametrize("page", e2e.DOCS)
def test_every_documented_command_parses(page):
    """As written and as CI runs it (size flags appended); a command marked to fail is exempt."""
    commands = e2e.page_commands(page)
    assert commands, f"{page} shows no sde-diffusion command"
    parser = build_parser()
    for cmd in commands:
        assert e2e.cli_args(cmd.argv) is not None, f"{page}:{cmd.line}: {cmd.text}"
        if cmd.expect != 0:
            continue
        for argv in (cmd.argv, e2e.as_run(page, cmd.argv)[0]):
            try:
                ns, rest = parser.parse_known_args(e2e.cli_args(argv))
            except UserError as err:
                pytest.fail(f"{page}:{cmd.line}: {' '.join(argv)}\n  does not parse: {err}")
            unused = _unused_words(rest) if ns.command == "train" else rest
            assert not unused, f"{page}:{cmd.line}: {' '.join(argv)}: unrecognized {unused}"


def test_the_readme_has_the_two_commands_ci_runs():
    demo, tests = user_path.readme_block("demo"), user_path.readme_block("tests")
    assert demo != tests
    for block in (demo, tests):
        assert "pip install torch==2.13.0" in block.code       # the CPU build, before the package
        assert "python3 -m venv" in block.code
    assert [c.argv[:2] for c in shell_commands(demo)] == [["sde-diffusion", "demo"]]
    assert "pytest" in tests.code


def test_the_readme_blocks_ci_runs_are_plain_bash():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    langs = [b.lang for b in fenced_blocks(readme) if "pip install" in b.code]
    assert langs and set(langs) == {"bash"}
