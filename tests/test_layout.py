"""The package's layout: sub-packages in one direction, no import cycles, no private names used
across modules, modules of a readable size.

The import graph is read from the source with :mod:`ast`, so imports inside functions and under
``TYPE_CHECKING`` count as much as those at the top of a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import lightning_neuronprune

PACKAGE = Path(lightning_neuronprune.__file__).parent
NAME = "lightning_neuronprune"

#: Sub-packages in the order data flows; a module may import from its own layer and those before.
LAYERS = ("errors", "core", "structure", "cost", "search", "lightning")

#: Longest module (lines) unless it is mostly docstrings.
MAX_LINES = 450


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = [NAME, *rel.parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if MODULES[module].name != "__init__.py":
        base = base[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join([*base, *([node.module] if node.module else [])])


def _imports(module: str) -> list[tuple[str, str | None]]:
    """``(imported module, imported name or None)`` for every import in ``module``'s source."""
    tree = ast.parse(MODULES[module].read_text())
    found: list[tuple[str, str | None]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            for a in node.names:
                sub = f"{target}.{a.name}"
                found.append((sub, None) if sub in MODULES else (target, a.name))
    return [(m, n) for m, n in found if m == NAME or m.startswith(NAME + ".")]


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


GRAPH = {m: sorted({t for t, _ in _imports(m) if t in MODULES and t != m}) for m in MODULES}


def test_every_module_is_in_a_layer() -> None:
    stray = [m for m in MODULES if m != NAME and _layer(m) not in (*LAYERS, "testing")]
    assert not stray, f"modules outside the sub-packages {LAYERS}: {stray}"


@pytest.mark.parametrize("module", [m for m in MODULES if _layer(m) in LAYERS])
def test_imports_point_down_the_layers(module: str) -> None:
    rank = LAYERS.index(_layer(module))  # type: ignore[arg-type]
    upward = [
        t
        for t in GRAPH[module]
        if t != NAME and (_layer(t) == "testing" or LAYERS.index(_layer(t)) > rank)  # type: ignore[arg-type]
    ]
    assert not upward, f"{module} imports from a later layer (or testing): {upward}"
    assert NAME not in GRAPH[module], f"{module} imports the top-level package"


def test_no_import_cycles() -> None:
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in GRAPH[m]:
            if t == NAME:
                continue
            if state.get(t) == 1:
                cycles.append([*stack[stack.index(t) :], t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in MODULES:
        if m not in state:
            visit(m)
    assert not cycles, f"import cycles: {cycles}"


def test_no_private_names_across_modules() -> None:
    bad = []
    for m in MODULES:
        for target, name in _imports(m):
            private_module = any(p.startswith("_") for p in target.split(".")[1:])
            if target != m and (private_module or (name is not None and name.startswith("_"))):
                bad.append(f"{m} imports {target}{'.' + name if name else ''}")
    assert not bad, "private names used across modules:\n" + "\n".join(bad)


def _docstring_lines(tree: ast.Module) -> int:
    total = 0
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            first = body[0] if body else None
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                total += body[0].end_lineno - body[0].lineno + 1  # type: ignore[operator]
    return total


@pytest.mark.parametrize("module", list(MODULES))
def test_modules_are_short_or_mostly_docstrings(module: str) -> None:
    source = MODULES[module].read_text()
    lines = len(source.splitlines())
    if lines > MAX_LINES:
        docs = _docstring_lines(ast.parse(source))
        assert docs > lines / 2, f"{module}: {lines} lines, {docs} of them docstrings"


def test_public_api_is_sorted_and_importable() -> None:
    names = lightning_neuronprune.__all__
    assert names == sorted(names)
    missing = [n for n in names if not hasattr(lightning_neuronprune, n)]
    assert not missing, missing
