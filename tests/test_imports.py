"""The package's import graph: no import loop (imports inside functions count), and the runtime reaches the
converter only through the FGS cache module."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"mmt_mlx": ROOT / "mmt_mlx", "mmt_mlx.server": ROOT / "server"}


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg, folder in PACKAGES.items():
        for f in folder.rglob("*.py"):
            parts = pkg.split(".") + list(f.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = f
    return mods


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        pkg = m if f.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for n in names:
                while n and n not in mods:
                    n = n.rsplit(".", 1)[0] if "." in n else ""
                if n and n != m and not m.startswith(n + "."):  # a module importing its own package
                    edges[m].add(n)
    return edges


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        path.append(v)
        for w in sorted(edges[v]):
            if state.get(w) == 1:
                return path[path.index(w) :] + [w]
            if w not in state and (found := visit(w)):
                return found
        state[v] = 2
        path.pop()
        return None

    for v in sorted(edges):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_no_import_loop():
    edges = import_graph()
    assert "mmt_mlx.loader" in edges and "mmt_mlx.server.app" in edges
    assert _cycle(edges) is None, " -> ".join(_cycle(edges) or [])


def test_cycle_finder_finds_a_loop():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_runtime_reaches_the_converter_only_through_the_cache():
    importers = {m for m, targets in import_graph().items() if "mmt_mlx.convert" in targets}
    # fgs_cache: the runtime's one way in; the CLI's convert and eval commands read presets and run it
    assert importers <= {"mmt_mlx.fgs_cache", "mmt_mlx.cli", "mmt_mlx.evals.cli"}, importers
    assert "mmt_mlx.fgs_cache" in importers
