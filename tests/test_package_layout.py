"""The plugin package's shape: imports flow one way, and the public API is where users look for it.

The import graph is read from the source (every `import` statement, function-level
ones included, since a function-level import is how a circle hides), not from
what Python happens to load.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import fireredasr_vllm

PACKAGE = "fireredasr_vllm"
ROOT = Path(fireredasr_vllm.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join((PACKAGE, *parts))


def package_imports(path: Path, modules: set[str]) -> set[str]:
    """The package's modules `path` imports anywhere in its body (function-level imports included)."""
    name = module_name(path)
    # The package a relative import starts from: the module's own for __init__.py, else its parent's.
    here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = here[: len(here) - node.level + 1] if node.level else []
            origin = ".".join([*base, *(node.module.split(".") if node.module else [])])
            # `from .x import y` imports x, and y too when y is a module.
            targets = [origin, *(f"{origin}.{alias.name}" for alias in node.names)]
        else:
            continue
        for target in targets:
            # The deepest module of the package the name is in (a.b.c -> a.b when c is a class).
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name and target != PACKAGE:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = sorted(ROOT.rglob("*.py"))
    modules = {module_name(path) for path in paths}
    return {module_name(path): package_imports(path, modules) for path in paths}


def circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_walker_sees_function_level_imports_and_finds_a_circle(tmp_path, monkeypatch):
    # A synthetic package: a imports b at module level, b imports a inside a function.
    package = tmp_path / PACKAGE
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .b import thing\n")
    (package / "b.py").write_text("def thing():\n    from . import a\n    return a\n")
    (package / "c.py").write_text("from fireredasr_vllm.a import thing\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", package)
    graph = import_graph()
    assert graph[f"{PACKAGE}.a"] == {f"{PACKAGE}.b"}
    assert graph[f"{PACKAGE}.b"] == {f"{PACKAGE}.a"}
    assert graph[f"{PACKAGE}.c"] == {f"{PACKAGE}.a"}
    assert circles(graph) == [{f"{PACKAGE}.a", f"{PACKAGE}.b"}]


def test_the_plugin_package_has_no_import_circle():
    graph = import_graph()
    # The walker reads the real package: the decoders sit above the engine primitives.
    assert f"{PACKAGE}.engine" in graph[f"{PACKAGE}.beam_search"]
    assert f"{PACKAGE}.beam_search" in graph[f"{PACKAGE}.offline"]
    # The command imports its Ray runner (inside a function), which imports nothing of the command's.
    assert f"{PACKAGE}.ray_transcription" in graph[f"{PACKAGE}.transcribe"]
    assert f"{PACKAGE}.transcribe" not in graph[f"{PACKAGE}.ray_transcription"]
    found = circles(graph)
    assert not found, f"import circles: {[sorted(c) for c in found]}"


@pytest.mark.slow
def test_the_api_is_exported_and_importing_the_package_loads_neither_it_nor_vllm():
    # vLLM imports the package in each of its processes to call `register`: that must stay light.
    code = (
        "import sys, fireredasr_vllm\n"
        "assert 'vllm' not in sys.modules and 'fireredasr_vllm.api' not in sys.modules, sorted(sys.modules)\n"
        "from fireredasr_vllm import FireRedAsr, TimedText, Decoding, SegmenterSettings, AudioError\n"
        "import fireredasr_vllm.api as api\n"
        "assert FireRedAsr is api.FireRedAsr\n"
        "assert all(getattr(fireredasr_vllm, name) is not None for name in fireredasr_vllm.__all__)\n"
        "assert 'vllm' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
