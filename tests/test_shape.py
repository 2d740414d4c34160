"""The package's shape: data flows one way through the modules of mailproxy/ (no import cycle,
function-level imports included).  The same check from the command line:

    python3 tests/test_shape.py
"""

import ast
import pathlib
import sys

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "mailproxy"


def import_graph(package=PACKAGE):
    """{module: {modules of the package it imports anywhere in its code}}."""
    mods = {p.stem: p for p in package.glob("*.py")}
    graph = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps.update([node.module.split(".")[0]] if node.module
                            else [a.name for a in node.names])
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mailproxy."):
                deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps.update(a.name.split(".")[1] for a in node.names
                            if a.name.startswith("mailproxy."))
        graph[name] = (deps & set(mods)) - {name}
    return graph


def cycles(graph):
    """Every import cycle, each as a list of modules from its smallest name round to it."""
    found = set()

    def walk(start, node, path):
        for nxt in graph[node]:
            if nxt == start:
                found.add(tuple(path + [start]))
            elif nxt > start and nxt not in path:
                walk(start, nxt, path + [nxt])
    for name in sorted(graph):
        walk(name, name, [name])
    return sorted(found)


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [("a", "b", "c", "a")]


if __name__ == "__main__":
    found = cycles(import_graph())
    for c in found:
        print(" -> ".join(c))
    sys.exit(1 if found else 0)
