"""The shape rules of docs/ARCHITECTURE.md, checked on the source: short functions, imports at the top of the module
unless a heavy package must stay out of a command's start-up (said on the line), no benchmark code in the package."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "chatrlhf"
MAX_LINES = 80
LONG_TAG = "# long:"  # first body line of a function that needs more than MAX_LINES, with the reason
LAZY_TAG = "# lazy:"  # on a function-level import: the heavy import it keeps out of start-up


def _sources():
    return sorted(p for p in SRC.rglob("*.py"))


def _all(check) -> list[str]:
    return [x for p in _sources() for x in check(p.read_text(), str(p.relative_to(SRC.parent)))]


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def _long_reason(node: ast.AST, lines: list[str]) -> bool:
    body = node.body[1:] if (node.body and isinstance(node.body[0], ast.Expr)
                             and isinstance(getattr(node.body[0], "value", None), ast.Constant)) else node.body
    start = (node.body[0].end_lineno if body is not node.body else node.lineno)  # after the docstring (or the def)
    first = body[0].lineno if body else node.end_lineno
    return any(LONG_TAG in ln for ln in lines[start:first])


def long_functions(text: str, name: str) -> list[str]:
    lines = text.splitlines()
    out = []
    for fn in _functions(ast.parse(text)):
        n = fn.end_lineno - fn.lineno + 1
        if n > MAX_LINES and not _long_reason(fn, lines):
            out.append(f"{name}:{fn.lineno} {fn.name}() is {n} lines")
    return out


def untagged_lazy_imports(text: str, name: str) -> list[str]:
    lines = text.splitlines()
    out = []
    for fn in _functions(ast.parse(text)):
        for node in ast.walk(fn):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and LAZY_TAG not in lines[node.lineno - 1]:
                out.append(f"{name}:{node.lineno} {lines[node.lineno - 1].strip()}")
    return out


def test_no_function_over_80_lines_without_a_reason():
    bad = _all(long_functions)
    assert not bad, f"functions over {MAX_LINES} lines without a '{LONG_TAG} why' line:\n" + "\n".join(bad)


def test_function_level_imports_say_why():
    bad = _all(untagged_lazy_imports)
    assert not bad, (f"imports inside functions without '{LAZY_TAG} why' (move them to the top of the module):\n"
                     + "\n".join(bad))


@pytest.mark.parametrize("check,src,expect", [
    (long_functions, "def f():\n" + "    x = 1\n" * 85, 1),
    (long_functions, "def f():\n    '''doc'''\n    # long: one screen of phases\n" + "    x = 1\n" * 85, 0),
    (long_functions, "def f():\n" + "    x = 1\n" * 20, 0),
    (untagged_lazy_imports, "import os\ndef f():\n    import torch\n", 1),
    (untagged_lazy_imports, "def f():\n    import torch  # lazy: keeps torch out of --help\n", 0),
])
def test_the_checks_catch_what_they_claim(check, src, expect):
    assert len(check(src, "probe.py")) == expect


def test_the_package_holds_no_benchmark_code():
    names = {p.stem for p in _sources()}
    assert not names & {"bench", "bench_trl", "harness"}, names
