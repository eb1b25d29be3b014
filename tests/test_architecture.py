"""The import rules of docs/architecture.md, checked on the source: imports point down,
the engines know no privacy mechanism, the round loop knows no stage but the strategy."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for path in (SRC / "fedloom").rglob("*.py"):
        name = ".".join(path.with_suffix("").relative_to(SRC).parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imports(path: Path, modules: dict[str, Path], *, top_level_only: bool) -> set[str]:
    """fedloom modules ``path`` imports (``from pkg import sub`` counts as ``pkg.sub``)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    deps: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fedloom"):
            subs = [f"{node.module}.{a.name}" for a in node.names]
            known = [s for s in subs if s in modules]
            deps.update(known)
            if len(known) < len(subs):
                deps.add(node.module)
        elif isinstance(node, ast.Import):
            deps.update(a.name for a in node.names if a.name.startswith("fedloom"))
    return deps


def test_no_import_cycles_among_modules() -> None:
    modules = _modules()
    graph = {
        m: _imports(p, modules, top_level_only=True) & set(modules) for m, p in modules.items()
    }
    # Depth-first search for a back edge, reporting the cycle it closes.
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph[m] - {m}):
            if state.get(d) == 1:
                return [*path[path.index(d) :], d]
            if d not in state and (cycle := visit(d)):
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            assert visit(m) is None, f"import cycle: {' -> '.join(path)}"


def test_engines_and_round_loop_import_no_privacy_module() -> None:
    modules = _modules()
    guarded = [
        m
        for m in modules
        if m.startswith("fedloom.engine") or m in ("fedloom.server.loop", "fedloom.server.strategy")
    ]
    offenders = {
        m: sorted(d for d in _imports(modules[m], modules, top_level_only=False) if "privacy" in d)
        for m in guarded
    }
    assert {m: d for m, d in offenders.items() if d} == {}


def test_lower_layers_import_neither_engine_nor_cli() -> None:
    modules = _modules()
    lower = [
        m
        for m in modules
        if m.split(".")[:2] not in (["fedloom", "engine"], ["fedloom", "cli"], ["fedloom", "api"])
        and m not in ("fedloom", "fedloom.attacks.leakage")
    ]
    offenders = {
        m: sorted(
            d
            for d in _imports(modules[m], modules, top_level_only=False)
            if d.split(".")[:2] in (["fedloom", "engine"], ["fedloom", "cli"])
        )
        for m in lower
    }
    assert {m: d for m, d in offenders.items() if d} == {}
