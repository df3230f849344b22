"""The package's import graph follows the layering of DESIGN.md (docs/architecture.md): imports
point downward only, the three jobs (samplers, likelihood, training) do not import each other, and
there is no import cycle between modules."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Set

PACKAGE = Path(__file__).resolve().parents[1] / "sde_diffusion"

# lowest first; a module may import its own layer's modules or lower ones
LAYERS = [
    {"_checks", "_files", "data", "metrics", "divergence"},
    {"sdes"},
    {"oracles", "models", "losses", "flow", "config", "checkpoints"},
    {"samplers", "likelihood", "training"},
    {"experiments", "evaluation", "reports", "demo", "cli", "guidance_cli", "__main__", "__init__", "inverse", "sharded", "fid_cli", "studies", "study_cli", "cli_common"},
]
JOBS = {"samplers", "likelihood", "training"}


def _unit(module: str) -> str:
    """``samplers.api`` -> ``samplers``; ``models.wrapper`` -> ``models``; ``sdes`` -> ``sdes``.
    A package's ``__main__`` (``training.__main__``: what ``python -m sde_diffusion.training``
    runs, and nothing imports) is an entry point like ``sde_diffusion/__main__.py``: ``__main__``."""
    if module.split(".")[-1] == "__main__":
        return "__main__"
    return module.split(".")[0]


def _modules() -> Dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, known: Set[str]) -> Set[str]:
    """Package modules imported by ``name`` (relative and absolute imports, anywhere in the file)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("sde_diffusion"):
                target = node.module[len("sde_diffusion"):].lstrip(".")
            else:
                continue
            candidates = [target] + [f"{target}.{a.name}" if target else a.name for a in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name[len("sde_diffusion"):].lstrip(".") for a in node.names
                          if a.name.startswith("sde_diffusion")]
        else:
            continue
        found.update(c for c in candidates if c in known and c != name)
    return found


def _layer(unit: str) -> int:
    for level, units in enumerate(LAYERS):
        if unit in units:
            return level
    raise AssertionError(f"module {unit!r} is in no layer of tests/test_architecture.py: add it "
                         f"(and to the layering in docs/architecture.md)")


def test_imports_point_downward_and_jobs_stay_apart():
    modules = _modules()
    bad = []
    for name, path in modules.items():
        src = _unit(name)
        for target in _imports(name, path, set(modules)):
            dst = _unit(target)
            if dst == src or not target:
                continue
            if _layer(dst) > _layer(src):
                bad.append(f"{name} imports {target} (layer {_layer(dst)} above {_layer(src)})")
            elif src in JOBS and dst in JOBS:
                bad.append(f"{name} imports {target}: the jobs samplers/likelihood/training are "
                           f"independent")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycle_between_units():
    modules = _modules()
    graph: Dict[str, Set[str]] = {}
    for name, path in modules.items():
        graph.setdefault(_unit(name), set()).update(
            _unit(t) for t in _imports(name, path, set(modules)) if t and _unit(t) != _unit(name))
    graph.pop("__init__", None)
    for deps in graph.values():
        deps.discard("__init__")
    state: Dict[str, int] = {}

    def visit(node: str, stack: list) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
