"""The package's shape: data flows one way through the modules of mailproxy/ (no import cycle,
function-level imports included), and no module passes about 600 lines.  The tests' shape: no
module under tests/ imports a test module (test_*.py); what tests share lives in tests/support/
(and tests/unit/playbook.py).  The same checks from the command line:

    python3 tests/test_shape.py
"""

import ast
import pathlib
import sys

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "mailproxy"
TESTS = pathlib.Path(__file__).resolve().parent


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


def _is_test_module(dotted):
    return any(part.startswith("test_") for part in dotted.split(".") if part)


def cross_test_imports(tests=TESTS):
    """[(path, line, module)] where a module under `tests` imports a test module: `import
    tests.test_x`, `from tests.x.test_y import ...`, `from tests import test_x`, `import
    test_x` (pytest's rootdir-relative sys.path) or the relative forms (`from .test_x`,
    `from . import test_x`), function-level imports included."""
    out = []
    for path in sorted(tests.rglob("*.py")):
        rel = str(path.relative_to(tests.parent))
        for n in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(n, ast.Import):
                bad = [a.name for a in n.names if _is_test_module(a.name)]
            elif isinstance(n, ast.ImportFrom):
                base = "." * n.level + (n.module or "")
                if _is_test_module(n.module or ""):
                    bad = [base]
                elif n.level or (n.module or "").split(".")[0] == "tests":
                    # from . import test_x, from tests.integration import test_y
                    sep = "" if base.endswith(".") else "."
                    bad = [base + sep + a.name for a in n.names if a.name.startswith("test_")]
                else:
                    bad = []
            else:
                continue
            out.extend((rel, n.lineno, m) for m in bad)
    return sorted(out)


def test_no_test_module_imports_another():
    assert cross_test_imports() == []


def test_test_import_finder_finds_each_form(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "test_a.py").write_text(
        "import os\n"
        "from tests.support.tls import client_ctx\n"
        "from tests.test_b import x\n"
        "import tests.integration.test_c\n"
        "from tests.integration import test_d, conftest\n"
        "from .test_e import y\n"
        "from .. import test_f\n"
        "def f():\n"
        "    import test_g\n")
    found = cross_test_imports(tmp_path)
    assert found == [("%s/sub/test_a.py" % tmp_path.name, line, m) for line, m in [
        (3, "tests.test_b"), (4, "tests.integration.test_c"), (5, "tests.integration.test_d"),
        (6, ".test_e"), (7, "..test_f"), (9, "test_g")]]


if __name__ == "__main__":
    found = cycles(import_graph())
    for c in found:
        print("import cycle: " + " -> ".join(c))
    big = oversized()
    for path, n in big:
        print("%s: %d lines (at most %d)" % (path, n, MAX_LINES))
    crossed = cross_test_imports()
    for path, line, module in crossed:
        print("%s:%d: imports test module %s (shared test code goes in tests/support/)"
              % (path, line, module))
    sys.exit(1 if found or big or crossed else 0)
