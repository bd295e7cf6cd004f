"""The package's layout (ARCHITECTURE.md): its import graph is layered and its rooms are
stacked pipeline < survey < sim < cli, with modules and functions short enough to read."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import kspec_fluxcal

ROOT = Path(kspec_fluxcal.__file__).parent
PACKAGE = "kspec_fluxcal"

#: Rooms from the bottom up: a module may import its own room and the rooms below it.
ROOMS = ("pipeline", "survey", "sim", "cli")
MAX_MODULE_LINES = 700
MAX_FUNCTION_LINES = 80


def _module_name(path):
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))
           if "data" not in p.relative_to(ROOT).parts[:-1]}  # data/: table-making scripts


def _room(module):
    rest = module.split(".")[1:]
    if not rest:
        return "pipeline"  # the package root only maps public names to modules
    if rest[0] in ("cli", "__main__"):
        return "cli"
    return rest[0] if rest[0] in ("survey", "sim") else "pipeline"


def _imports(module):
    """Package modules that ``module`` imports, at any level of its code (function-level
    imports included: they are dependencies too, only paid later)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [target, *(f"{target}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        found.update(c for c in candidates if c in MODULES and c not in (module, PACKAGE))
    return found


GRAPH = {module: _imports(module) for module in MODULES}


def _cycle(graph):
    """One import cycle as a list of modules, or None."""
    state, stack = {}, []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for dep in sorted(graph[module]):
            if state.get(dep) == "open":
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        state[module] = "done"
        stack.pop()
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module)):
            return found
    return None


def test_graph_check_sees_imports_and_cycles():
    """The checks below rest on these two functions: they find a function-level relative
    import, and a cycle."""
    assert f"{PACKAGE}.survey.job" in GRAPH[f"{PACKAGE}.survey"]  # from .job import ...
    assert f"{PACKAGE}.qc" in GRAPH[f"{PACKAGE}.pipeline"]  # imported inside a function
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    """A reader following any function down its imports never climbs back to a module
    already left: the import graph has a topological order."""
    assert _cycle(GRAPH) is None


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_a_room_above_its_own(module):
    level = ROOMS.index(_room(module))
    above = sorted(dep for dep in GRAPH[module] if ROOMS.index(_room(dep)) > level)
    assert not above, f"{module} ({_room(module)}) imports {above}"


def _function_lines(node):
    """Lines of a function without its docstring."""
    lines = node.end_lineno - node.lineno + 1
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
            and isinstance(first.value.value, str):
        lines -= first.end_lineno - first.lineno + 1
    return lines


def test_modules_and_functions_are_short():
    long_modules = {m: n for m, p in MODULES.items()
                    if (n := p.read_text().count("\n")) > MAX_MODULE_LINES}
    long_functions = {
        f"{m}.{node.name}": _function_lines(node)
        for m, p in MODULES.items() for node in ast.walk(ast.parse(p.read_text()))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and _function_lines(node) > MAX_FUNCTION_LINES}
    assert not long_modules and not long_functions, (long_modules, long_functions)
