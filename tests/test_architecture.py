"""docs/ARCHITECTURE.md stays true: every module it names exists, every module is named,
each imports only what the map allows, no private name crosses a module, no import cycle."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pipeline"
ROW = re.compile(r"^\| `(pipeline/[^`]+\.py)` \|(.*)\|(.*)\|\s*$")


def _map():
    rows = {}
    for line in (ROOT / "docs" / "ARCHITECTURE.md").read_text().splitlines():
        m = ROW.match(line)
        if m:
            allowed = {a.strip() for a in m.group(3).split(",") if a.strip()}
            rows[m.group(1)] = allowed
    return rows


def _name(path):
    """``pipeline/store/results.py`` -> ``store.results``; a package's ``__init__`` -> the package."""
    parts = list(Path(path).relative_to("pipeline").with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules():
    return {str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py")}


def _imports(path):
    """(pipeline module imported, names taken) for each relative import of a file."""
    tree = ast.parse((ROOT / path).read_text())
    here = _name(path).split(".") if _name(path) else []
    package = here if path.endswith("__init__.py") else here[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)]
            target = ".".join(base + (node.module.split(".") if node.module else []))
            for alias in node.names:
                sub = f"{target}.{alias.name}" if target else alias.name
                # `from . import store` / `from .kernels import topk`: the submodule itself.
                is_module = (PACKAGE / sub.replace(".", "/")).with_suffix(".py").exists() or \
                    (PACKAGE / sub.replace(".", "/") / "__init__.py").exists()
                out.append((sub if is_module else target, alias.name))
    return out


def test_every_module_is_on_the_map_and_every_mapped_module_exists():
    mapped, real = set(_map()), _modules()
    assert len(mapped) > 20, "the module table of docs/ARCHITECTURE.md was not found"
    assert not mapped - real, f"named in docs/ARCHITECTURE.md but missing: {sorted(mapped - real)}"
    assert not real - mapped, f"modules missing from docs/ARCHITECTURE.md: {sorted(real - mapped)}"


@pytest.mark.parametrize("path", sorted(_map()))
def test_module_imports_only_what_the_map_allows(path):
    allowed = _map()[path]
    me = _name(path)
    for target, _ in _imports(path):
        if not target or target == me or target.startswith(me + ".") and path.endswith("__init__.py"):
            continue
        ok = any(target == a or target.startswith(a + ".") for a in allowed)
        assert ok, f"{path} imports {target!r}; docs/ARCHITECTURE.md allows only {sorted(allowed)}"


@pytest.mark.parametrize("path", sorted(_modules()))
def test_no_private_name_crosses_a_module(path):
    for target, name in _imports(path):
        assert not name.startswith("_"), f"{path} imports the private name {name!r} from {target}"


def test_no_import_cycle():
    graph = {}
    for path in _modules():
        me = _name(path)
        graph[me] = {t for t, _ in _imports(path) if t != me and not (path.endswith("__init__.py")
                                                                     and t.startswith(me + "."))}
    state = {}

    def visit(node, trail):
        if state.get(node) == "done":
            return
        assert state.get(node) != "open", f"import cycle: {' -> '.join(trail + [node])}"
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, trail + [node])
        state[node] = "done"

    for node in sorted(graph):
        visit(node, [])
