"""The codebase's own rules, checked on its source: no module imports another's private names, the
engine's modules import each other without cycles, and the argument checks live in one place."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "gpt2kernels", "benchmarks")


def _modules():
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            yield name, path, ast.parse(path.read_text(encoding="utf-8"))


def _imported(name: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module an ``from X import ...`` names, from module ``name`` at ``path``."""
    if not node.level:
        return node.module or ""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    base = package[:len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def test_no_module_imports_another_modules_private_names():
    """Private modules (``gpt2kernels._extension``) are for their own package."""
    found = []
    modules = {name for name, _, _ in _modules()}
    for name, path, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                source = _imported(name, path, node)
                if source.split(".")[0] in PACKAGES:
                    own_module = {a.name for a in node.names if f"{source}.{a.name}" in modules
                                  and source.split(".")[0] == name.split(".")[0]}
                    found += [f"{path.relative_to(ROOT)}:{node.lineno} {a.name} from {source}"
                              for a in node.names if a.name.startswith("_") and a.name not in own_module]
    assert found == []


def _engine_import_graph() -> dict[str, set[str]]:
    """Module -> the engine modules it imports anywhere in it (function-level imports too), the
    package ``engine`` itself left out (it imports everything, for its public names)."""
    graph = {}
    names = {name for name, _, _ in _modules() if name.startswith("engine")}
    for name, path, tree in _modules():
        if not name.startswith("engine") or name == "engine":
            continue
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                source = _imported(name, path, node)
                for alias in node.names:  # ``from . import x`` imports module engine.x
                    edges.add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in names else source)
            elif isinstance(node, ast.Import):
                edges.update(a.name for a in node.names)
        graph[name] = {e for e in edges if e in names and e != "engine" and e != name}
    return graph


def test_the_engines_modules_import_each_other_without_cycles():
    graph = _engine_import_graph()
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_argument_checks_are_written_once():
    """The bool-is-not-an-int guard and the vocabulary check live in engine/checks.py."""
    offenders = []
    for path in sorted((ROOT / "engine").rglob("*.py")):
        if path.name == "checks.py":
            continue
        text = path.read_text(encoding="utf-8")
        for needle in (", bool)", "outside the model's vocabulary"):
            offenders += [f"{path.relative_to(ROOT)}: {needle}" for line in text.splitlines()
                          if needle in line and "isinstance" in line or needle in line and "vocabulary" in needle]
    assert offenders == []
