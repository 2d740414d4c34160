"""The package's shape: data flows one way through the modules of mailproxy/ (no import cycle,
function-level imports included), and no module passes about 600 lines.  The same checks from
the command line:

    python3 tests/test_shape.py
"""

import ast
import pathlib
import sys

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "mailproxy"


def import_graph(package=PACKAGE):
    """{module: {modules of the package it imports anywhere in its code}}; a subpackage
    (config/) is one node, its modules' imports of each other left out."""
    files = {}
    for path in package.rglob("*.py"):
        rel = path.relative_to(package).with_suffix("").parts
        files[path] = rel[0]                # node: the top module, or the subpackage
    nodes = set(files.values())
    graph = {n: set() for n in nodes}
    for path, node in files.items():
        inside = path.parent != package     # a module of a subpackage
        for n in ast.walk(ast.parse(path.read_text(), str(path))):
            deps = []
            if isinstance(n, ast.ImportFrom) and n.level:
                up = n.level - (1 if inside else 0)    # levels above mailproxy/ itself
                if up == 0 and inside:
                    continue                            # from .x inside the subpackage
                if up != 1 and not (up == 0 and not inside):
                    continue
                deps = [n.module.split(".")[0]] if n.module else [a.name for a in n.names]
            elif isinstance(n, ast.ImportFrom) and (n.module or "").startswith("mailproxy."):
                deps = [n.module.split(".")[1]]
            elif isinstance(n, ast.Import):
                deps = [a.name.split(".")[1] for a in n.names if a.name.startswith("mailproxy.")]
            graph[node].update(d for d in deps if d in nodes and d != node)
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


MAX_LINES = 600


def oversized(package=PACKAGE, limit=MAX_LINES):
    """[(path, lines)] of the package's modules longer than `limit` lines."""
    out = []
    for path in sorted(package.rglob("*.py")):
        n = len(path.read_text().splitlines())
        if n > limit:
            out.append((str(path.relative_to(package.parent)), n))
    return out


def test_no_module_past_600_lines():
    assert oversized() == []


def test_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [("a", "b", "c", "a")]


if __name__ == "__main__":
    found = cycles(import_graph())
    for c in found:
        print("import cycle: " + " -> ".join(c))
    big = oversized()
    for path, n in big:
        print("%s: %d lines (at most %d)" % (path, n, MAX_LINES))
    sys.exit(1 if found or big else 0)
