"""The code's layout holds: short modules, no import cycle, a torch-free API layer, clean benchmarks."""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.conftest import ROOT

PACKAGES = ("service", "pruning")
MAX_LINES = 400


def _modules() -> dict[str, object]:
    out = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            rel = f.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            out[".".join(parts)] = f
    return out


def _top_level_imports(path, name: str, known: set[str]) -> set[str]:
    """Modules of ours this one imports when it is imported (not inside functions or TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()

    def visit(nodes):
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for h in getattr(node, "handlers", []):
                    visit(h.body)
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in known:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    found.add(t)

    visit(tree.body)
    return found


def test_no_module_over_the_limit():
    long = {n: len(f.read_text().splitlines()) for n, f in _modules().items()}
    assert {n: k for n, k in long.items() if k > MAX_LINES} == {}


def test_no_import_cycle():
    mods = _modules()
    graph = {n: _top_level_imports(f, n, set(mods)) for n, f in mods.items()}
    state: dict[str, int] = {}
    cycles = []

    def walk(n, path):
        state[n] = 1
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                cycles.append(path[path.index(m):] + [m])
            elif m not in state:
                walk(m, path + [m])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            walk(n, [n])
    assert cycles == []


def test_api_layer_imports_no_torch():
    code = "import sys, service.protocol, service.api.npcs; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


def test_benchmarks_import_the_library_not_tests():
    offenders = []
    for f in sorted((ROOT / "benchmarks").rglob("*.py")):
        text = f.read_text()
        tree = ast.parse(text)
        for node in ast.walk(tree):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(m == "tests" or m.startswith(("tests.", "conftest")) for m in mods):
                offenders.append(f"{f.relative_to(ROOT)}: imports tests")
        if "sys.path" in text:
            offenders.append(f"{f.relative_to(ROOT)}: edits sys.path")
    assert offenders == []
