"""No import cycle inside the package: every import of a fused_pairloss module by another (at module
level or inside a function) is an edge, and the graph of those edges has no cycle. Cycles are what
made memory.py / parallel.py and ops/engines.py / ops/triton_engines.py import each other lazily."""
import ast
import os

import fused_pairloss

PACKAGE = "fused_pairloss"
ROOT = os.path.dirname(fused_pairloss.__file__)


def _modules():
    out = {}
    for folder, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].replace(os.sep, ".")
                name = PACKAGE if rel == "__init__" else PACKAGE + "." + rel.removesuffix(".__init__")
                out[name] = os.path.join(folder, f)
    return out


def _imports(name, path, modules):
    """The package modules `name` imports (`from . import x` of a submodule x counts as x)."""
    is_package = path.endswith("__init__.py")
    base = name.split(".") if is_package else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
            found.update(subs if subs else [target])
    return {m for m in found if m in modules and m != name}


def _cycle(graph):
    """A cycle of the graph as a list of modules, or None."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_cycle_in_the_package():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    # importing a subpackage runs its parent's __init__: only edges between modules count
    assert "fused_pairloss.ops.engines" in graph["fused_pairloss.ops.stats"]
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
