"""Rules on the shape of the library's code that review keeps missing: short functions, jobs
passed as dataclasses rather than long positional lists, and only ddpmseg's own exceptions
raised (each inherits the built-in it resembles, so callers can still catch ValueError)."""

from __future__ import annotations

import ast
import builtins
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ddpmseg"
MAX_LINES = 60          # a function's body, its docstring left out
MAX_POSITIONAL = 8      # more settings than this: keyword-only, or a dataclass
# Protocol exceptions (a store indexed past its end raises IndexError, as a list does) and
# AssertionError for a bug no input reaches.
ALLOWED_BUILTINS = {"NotImplementedError", "AttributeError", "StopIteration", "IndexError",
                    "AssertionError"}


def functions():
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path.relative_to(PACKAGE.parent), node


def body_lines(fn: ast.FunctionDef) -> int:
    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:] or body
    return body[-1].end_lineno - body[0].lineno + 1


def test_functions_are_short():
    long = [f"{path}:{fn.lineno} {fn.name} ({body_lines(fn)} lines)"
            for path, fn in functions() if body_lines(fn) > MAX_LINES]
    assert long == []


def test_no_long_positional_parameter_lists():
    # click commands take one parameter per option: their lists are the options'.
    long = [f"{path}:{fn.lineno} {fn.name}" for path, fn in functions()
            if len(fn.args.posonlyargs) + len(fn.args.args) > MAX_POSITIONAL
            and "cli" not in path.parts]
    assert long == []


def test_only_our_exceptions_are_raised():
    errors = {name for name in dir(builtins) if name.endswith(("Error", "Exception"))}
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and \
                    isinstance(node.exc.func, ast.Name) and node.exc.func.id in errors and \
                    node.exc.func.id not in ALLOWED_BUILTINS:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} "
                             f"{node.exc.func.id}")
    assert wrong == []
