"""The public interface of mailproxy/ is annotated, and the annotations evaluate.

Public: a function or method whose name does not start with `_` (plus `__init__`'s
parameters), defined in a module of mailproxy/ (config/ included), at module level or in a
public class.  Each needs a return annotation (not `__init__`) and one on every parameter
but self/cls.  The annotations must also evaluate with `typing.get_type_hints` in the module's
namespace plus its `if TYPE_CHECKING:` imports (on the Python running the test: no `X | Y` or
`list[int]` before 3.10/3.9 in a string that would be evaluated).
"""

from __future__ import annotations

import ast
import importlib
import pathlib
import typing

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "mailproxy"

# qualified names ("module:Class.method") left unannotated on purpose, each with its reason
EXEMPT: typing.Dict[str, str] = {}


def _modules():
    """(module name, path) of every module of the package."""
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def _public_functions(tree):
    """(qualified name, FunctionDef, is a method) of the public functions of a module's AST."""
    found = []

    def walk(nodes, prefix, in_class):
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if not node.name.startswith("_") or node.name == "__init__":
                    found.append((prefix + node.name, node, in_class))
            elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                walk(node.body, prefix + node.name + ".", True)
            elif isinstance(node, ast.If):          # if TYPE_CHECKING / platform branches
                walk(node.body, prefix, in_class)
                walk(node.orelse, prefix, in_class)
            elif isinstance(node, ast.Try):
                walk(node.body, prefix, in_class)
                for handler in node.handlers:
                    walk(handler.body, prefix, in_class)
                walk(node.orelse, prefix, in_class)
    walk(tree.body, "", False)
    return found


def _decorators(node):
    return {d.id for d in node.decorator_list if isinstance(d, ast.Name)}


def missing_annotations(source, module="m"):
    """["module:qualname: what is missing"] for the public functions in `source`."""
    out = []
    for qual, node, is_method in _public_functions(ast.parse(source)):
        a = node.args
        params = a.posonlyargs + a.args + a.kwonlyargs
        if is_method and params and "staticmethod" not in _decorators(node):
            params = params[1:]                     # self / cls
        lacking = [p.arg for p in params if p.annotation is None]
        lacking += [star + v.arg for star, v in (("*", a.vararg), ("**", a.kwarg))
                    if v is not None and v.annotation is None]
        if node.returns is None and node.name != "__init__":
            lacking.append("return")
        name = "%s:%s" % (module, qual)
        if lacking and name not in EXEMPT:
            out.append("%s: %s" % (name, ", ".join(lacking)))
    return out


def _type_checking_namespace(module, tree, path):
    """The module's globals plus what its `if TYPE_CHECKING:` blocks import."""
    ns = dict(vars(module))
    for node in tree.body:
        if (isinstance(node, ast.If) and isinstance(node.test, ast.Name)
                and node.test.id == "TYPE_CHECKING"):
            block = ast.Module(body=node.body, type_ignores=[])
            exec(compile(block, str(path), "exec"), ns)
    return ns


def _resolve(module, qual):
    """The function object behind a qualified name (a property's getter, a staticmethod's
    function)."""
    obj = module
    for part in qual.split("."):
        obj = vars(obj).get(part) if isinstance(obj, type) else getattr(obj, part)
    if isinstance(obj, property):
        obj = obj.fget
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    return obj


def test_public_interface_is_annotated():
    missing = []
    for name, path in _modules():
        missing += missing_annotations(path.read_text(), name)
    assert not missing, "not annotated:\n" + "\n".join(missing)


@pytest.mark.parametrize("name,path", list(_modules()), ids=[n for n, _ in _modules()])
def test_annotations_evaluate(name, path):
    tree = ast.parse(path.read_text())
    module = importlib.import_module(name)
    ns = _type_checking_namespace(module, tree, path)
    failed = []
    for qual, node, _ in _public_functions(tree):
        func = _resolve(module, qual)
        if not callable(func) or getattr(func, "__module__", name) != name:
            continue                    # replaced at run time (e.g. by a decorator)
        try:
            typing.get_type_hints(func, globalns=ns)
        except Exception as e:
            failed.append("%s:%s: %s: %s" % (name, qual, type(e).__name__, e))
    assert not failed, "\n".join(failed)


def test_checker_finds_what_is_missing():
    source = '''
def f(a, b: int, *args, **kw): pass
def g() -> None: pass
def _private(x): pass
class C:
    def __init__(self, x): pass
    def m(self, y: int): pass
    @staticmethod
    def s(z) -> int: pass
    def ok(self) -> None: pass
class _Hidden:
    def m(self, y): pass
'''
    assert missing_annotations(source) == [
        "m:f: a, *args, **kw, return",
        "m:C.__init__: x",
        "m:C.m: return",
        "m:C.s: z",
    ]
