#!/usr/bin/env python3
"""Which lines of the I/O-free protocol modules the unit layer never runs (a script, not a test
module; standard library only, as `coverage` is not a dependency).

    python3 tests/unit/coverage_check.py

Runs `tests/unit` in this process under a line tracer (sys.settrace, and threading.settrace
for threads), then lists every executable line of MODULES that never ran, and under it each
bytes literal holding b"\\r\\n" on such a line (a reply string the unit layer does not cover).
Executable lines are those of the compiled module's line tables (`dis.findlinestarts` over every
nested code object), minus `if TYPE_CHECKING:` blocks and lines (or whole statements) marked
`# pragma: no cover`.  Exit status: pytest's when the tests fail, 1 when a line was missed,
0 otherwise.
"""

from __future__ import annotations

import ast
import dis
import os
import sys
import threading
from types import CodeType
from typing import Dict, Iterator, List, Set, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODULES = ("conversation.py", "pop3.py", "imap.py", "imap_parse.py", "smtp.py", "sasl.py",
           "protocols.py", "sieve.py")
PRAGMA = "pragma: no cover"


def code_objects(code: CodeType) -> Iterator[CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, CodeType):
            yield from code_objects(const)


def executable_lines(path: str, source: str) -> Set[int]:
    """Every line some instruction of the module starts (its functions, classes, lambdas and
    comprehensions included)."""
    lines: Set[int] = set()
    for code in code_objects(compile(source, path, "exec")):
        lines.update(line for _, line in dis.findlinestarts(code) if line)
    return lines


def is_type_checking(test: ast.expr) -> bool:
    return ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def excluded_lines(tree: ast.Module, text_lines: List[str]) -> Set[int]:
    """Lines of `if TYPE_CHECKING:` blocks, and of every statement or `except` clause whose
    first line (or a decorator's) carries the pragma; a marked line that starts none alone."""
    marked = {i for i, text in enumerate(text_lines, 1) if PRAGMA in text}
    out = set(marked)
    for node in ast.walk(tree):
        if not isinstance(node, (ast.stmt, ast.excepthandler)):
            continue
        end = getattr(node, "end_lineno", None) or node.lineno
        starts = {node.lineno} | {d.lineno for d in getattr(node, "decorator_list", [])}
        if starts & marked:
            out.update(range(min(starts), end + 1))
        if isinstance(node, ast.If) and is_type_checking(node.test):
            out.update(range(node.lineno, end + 1))
    return out


def crlf_literals(tree: ast.Module) -> List[Tuple[int, int, bytes]]:
    """(line of the literal, first line of its statement, value) of each bytes literal
    holding CRLF."""
    found = []

    def visit(node: ast.AST, stmt_line: int) -> None:
        if isinstance(node, ast.stmt):
            stmt_line = node.lineno
        if (isinstance(node, ast.Constant) and isinstance(node.value, bytes)
                and b"\r\n" in node.value):
            found.append((node.lineno, stmt_line, node.value))
        for child in ast.iter_child_nodes(node):
            visit(child, stmt_line)

    visit(tree, 1)
    return found


class Tracer:
    """Records (file, line) for the files asked for only; every other frame goes untraced."""

    def __init__(self, files: Set[str]):
        self.files = files
        self.hits: Dict[str, Set[int]] = {f: set() for f in files}

    def global_trace(self, frame, event, arg):
        hits = self.hits.get(frame.f_code.co_filename)
        if hits is None:
            return None
        hits.add(frame.f_lineno)

        def local_trace(frame, event, arg):
            if event == "line":
                hits.add(frame.f_lineno)
            return local_trace
        return local_trace

    def run(self, func, *args):
        threading.settrace(self.global_trace)
        sys.settrace(self.global_trace)
        try:
            return func(*args)
        finally:
            sys.settrace(None)
            threading.settrace(None)     # type: ignore[arg-type]


def main() -> int:
    os.chdir(ROOT)
    sys.path.insert(0, ROOT)
    import pytest

    paths = {name: os.path.join(ROOT, "mailproxy", name) for name in MODULES}
    tracer = Tracer(set(paths.values()))
    status = tracer.run(pytest.main, ["-q", "-p", "no:cacheprovider", "tests/unit"])
    if status != 0:
        print("coverage_check: the unit tests failed (pytest exit status %s)" % int(status))
        return int(status) or 1

    missed_total = 0
    for name, path in paths.items():
        with open(path, encoding="utf-8") as f:
            source = f.read()
        text_lines = source.splitlines()
        tree = ast.parse(source, path)
        lines = executable_lines(path, source) - excluded_lines(tree, text_lines)
        missed = lines - tracer.hits[path]
        if not missed:
            continue
        missed_total += len(missed)
        rel = os.path.relpath(path, ROOT)
        print("\n%s: %d of %d lines never ran in tests/unit" % (rel, len(missed), len(lines)))
        for line in sorted(missed):
            print("  %s:%d: %s" % (rel, line, text_lines[line - 1].strip()))
        for line, stmt_line, value in crlf_literals(tree):
            where = line if line in lines else stmt_line
            if where in missed:
                print("  reply string not covered, %s:%d: %r" % (rel, line, value))
    if missed_total:
        print("\ncoverage_check: %d lines of the protocol modules never ran in tests/unit"
              % missed_total)
        return 1
    print("coverage_check: every line of %s ran in tests/unit" % ", ".join(MODULES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
