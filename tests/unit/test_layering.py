"""The package's layer rule (docs/architecture.md, "The layer rule"), checked on the
source: every module's imports are parsed, and the test fails on an import of a higher
layer, on an import cycle, on an import inside a function (optional dependencies
excepted) and on aiohttp outside ``web/``."""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "proxy"

# Lowest first. A module may import its own layer (without a cycle) and those below.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("proxy.errors", "proxy.defaults", "proxy.bootstrap"),
    ("proxy.core",),
    ("proxy.providers", "proxy.pricing", "proxy.catalog", "proxy.budgets", "proxy.keys"),
    ("proxy.config", "proxy.config_checks", "proxy.outputs", "proxy.engine", "proxy.manual"),
    ("proxy.storage",),
    ("proxy.reports",),
    ("proxy.web", "proxy.cli"),
    ("proxy.__main__",),
)
# Imported inside a function on purpose: not installed everywhere (uvloop, bpe-openai),
# heavy and needed only when the catalog is on (genai-prices), POSIX-only (fcntl).
OPTIONAL = {"uvloop", "bpe_openai", "genai_prices", "fcntl"}
# Third-party packages only the aiohttp shell may import.
WEB_ONLY = {"aiohttp", "multidict", "yarl"}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # a proxy module, or a top-level distribution name
    line: int
    in_function: bool


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str) -> str | None:
    """The proxy module that ``name`` (a module, or a name in one) is."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str) -> list[Import]:
    return imports_in(module, MODULES[module].read_text(encoding="utf-8"))


def imports_in(module: str, source: str) -> list[Import]:
    tree = ast.parse(source)
    in_function: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            in_function |= {id(n) for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: the package uses absolute imports only
                found.append(Import(module, "." * node.level + (node.module or ""), node.lineno, id(node) in in_function))
                continue
            base = node.module or ""
            # `from proxy.x import y` may name a module y or a name in x.
            names = [f"{base}.{a.name}" for a in node.names] if base.startswith("proxy") else [base]
        else:
            continue
        for name in names:
            target = _resolve(name) if name.split(".")[0] == "proxy" else name.split(".")[0]
            if target is None or target == module or module.startswith(target + "."):
                continue  # the package itself, or an ancestor package (imported anyway)
            found.append(Import(module, target, node.lineno, id(node) in in_function))
    return found


ALL_IMPORTS = [imp for m in MODULES for imp in imports_of(m)]


def layer(module: str) -> int:
    best = None
    for i, names in enumerate(LAYERS):
        for name in names:
            if module == name or module.startswith(name + "."):
                best = i
    if best is None:
        raise AssertionError(f"{module} belongs to no layer: add it to LAYERS and docs/architecture.md")
    return best


def test_every_module_has_a_layer() -> None:
    for m in MODULES:
        if m != "proxy":
            layer(m)


def test_no_upward_import() -> None:
    bad = [
        f"{i.module}:{i.line} imports {i.target} (layer {layer(i.target)} is above {layer(i.module)})"
        for i in ALL_IMPORTS
        if i.target.startswith("proxy") and i.module != "proxy" and layer(i.target) > layer(i.module)
    ]
    assert not bad, "\n".join(bad)


def test_web_and_cli_are_separate_shells() -> None:
    # The CLI may start the server (serve); the server never reaches into the CLI.
    bad = [
        f"{i.module}:{i.line} imports {i.target}"
        for i in ALL_IMPORTS
        if i.module.startswith("proxy.web") and i.target.startswith("proxy.cli")
    ]
    assert not bad, "\n".join(bad)


def test_no_import_cycle() -> None:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for i in ALL_IMPORTS:
        if i.target in MODULES:
            graph[i.module].add(i.target)
    # Depth-first search; a grey node met again closes a cycle.
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))
    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_no_import_inside_a_function() -> None:
    bad = [f"{i.module}:{i.line} imports {i.target} inside a function" for i in ALL_IMPORTS if i.in_function and i.target not in OPTIONAL]
    assert not bad, "\n".join(bad)


def test_absolute_imports_only() -> None:
    bad = [f"{i.module}:{i.line} imports {i.target}" for i in ALL_IMPORTS if i.target.startswith(".")]
    assert not bad, "\n".join(bad)


def test_only_web_imports_aiohttp() -> None:
    bad = [f"{i.module}:{i.line} imports {i.target}" for i in ALL_IMPORTS if i.target in WEB_ONLY and not i.module.startswith("proxy.web")]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
    "source,problem",
    [
        ("from proxy.web.app import create_app\n", "upward"),
        ("def f():\n    import json\n", "in function"),
        ("from . import money\n", "relative"),
        ("import aiohttp\n", "aiohttp"),
    ],
)
def test_the_checks_catch_what_they_are_for(source: str, problem: str) -> None:
    # The checks above read the real tree; a planted module's source shows each one fires.
    found = imports_in("proxy.core.probe", source)
    assert found, source
    imp = found[0]
    if problem == "upward":
        assert layer(imp.target) > layer(imp.module)
    elif problem == "in function":
        assert imp.in_function and imp.target not in OPTIONAL
    elif problem == "relative":
        assert imp.target.startswith(".")
    else:
        assert imp.target in WEB_ONLY


def test_no_private_name_crosses_a_module_line() -> None:
    """``from proxy.x import _name`` anywhere in the package or its tests: a private name
    used outside its module is a public one in disguise (give it a public name)."""
    roots = [PACKAGE, PACKAGE.parent / "tests", PACKAGE.parent / "bench", PACKAGE.parent / "scripts"]
    bad = []
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("proxy"):
                    bad += [f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {a.name}" for a in node.names if a.name.startswith("_")]
    assert not bad, "\n".join(bad)
