"""Package structure: every module imports, the intra-package import graph has no cycle, and `import ssdd_runtime`
stays light (no optional heavy dependency)."""
from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# setup.py's package_dir: source folder -> installed package name
SOURCES = {"ssdd_runtime": "ssdd_runtime", "kernels": "ssdd_runtime.kernels", "export": "ssdd_runtime.export",
           "benchmarks": "ssdd_runtime.benchmarks"}
# modules that need an optional dependency -> that dependency's top-level module
OPTIONAL = {"ssdd_runtime.integrations.diffusers": "diffusers"}
HEAVY = ["diffusers", "onnx", "onnxruntime", "ray", "tensorrt", "openvino"]


def _installed_modules() -> list[str]:
    """Every module of the installed package. The mapped sub-packages are walked from their own __path__: an
    editable install finds them through its import hook, not inside ssdd_runtime.__path__."""
    names = set(SOURCES.values())
    for pkg in SOURCES.values():
        path = importlib.import_module(pkg).__path__
        names.update(m.name for m in pkgutil.walk_packages(path, prefix=pkg + "."))
    return sorted(names)


def _import_all(names: list[str]) -> dict[str, str]:
    """Import each module in one fresh interpreter; name -> error ('' when it imported)."""
    code = ("import importlib, json, sys, traceback\nout = {}\nfor name in json.loads(sys.argv[1]):\n"
            "    try:\n        importlib.import_module(name)\n        out[name] = ''\n"
            "    except Exception as e:\n        out[name] = f'{type(e).__name__}: {e}'\nprint(json.dumps(out))")
    res = subprocess.run([sys.executable, "-c", code, json.dumps(names)], capture_output=True, text=True,
                         check=True)
    return json.loads(res.stdout.splitlines()[-1])


def _available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def test_every_module_imports():
    names = _installed_modules()
    assert "ssdd_runtime.cli" in names and "ssdd_runtime.kernels.attention" in names, names
    errors = {name: err for name, err in _import_all(names).items() if err}
    missing = {name: OPTIONAL[name] for name in errors if name in OPTIONAL and not _available(OPTIONAL[name])}
    assert set(errors) == set(missing), {n: e for n, e in errors.items() if n not in missing}
    if missing:
        pytest.skip(f"optional dependency missing for {missing}")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = [SOURCES[rel.parts[0]], *rel.parts[1:]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (at any depth of the file: lazy imports count too)."""
    files = [f for src in SOURCES for f in (ROOT / src).rglob("*.py")]
    modules = {_module_name(f): f for f in files}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = ".".join(pkg[:len(pkg) - node.level + 1] + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                # the longest package module the import names (`from ssdd_runtime.io import x` -> ssdd_runtime.io)
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    deps.add(t)
        graph[name] = deps
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_import_graph_has_no_cycle():
    graph = _import_graph()
    assert "ssdd_runtime.export.onnx" in graph and "ssdd_runtime.cli" in graph
    # a package importing its own submodules (ssdd_runtime -> ssdd_runtime.api) is not a cycle; a submodule
    # importing its parent package's __init__ is the package's business, so parents are left out
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
    library = [m for m in graph if m != "ssdd_runtime.cli" and m != "ssdd_runtime.__main__"]
    assert not [m for m in library if "ssdd_runtime.cli" in graph[m]], "library modules must not import the CLI"


def test_find_cycle_reports_the_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_import_ssdd_runtime_stays_light():
    code = f"import sys, ssdd_runtime; print([m for m in {HEAVY!r} if m in sys.modules])"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]", res.stdout


def test_missing_diffusers_gives_the_install_hint():
    code = ("import sys; sys.modules['diffusers'] = None\n"  # None in sys.modules: `import diffusers` fails
            "import ssdd_runtime.integrations as integ\n"
            "try:\n    integ.SSDDVAE\nexcept ImportError as e:\n    print(e)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'ssdd-runtime[diffusers]'" in res.stdout, res.stdout
