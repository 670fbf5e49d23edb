"""Nothing in src/ outside the method units and their registry decides by a method's name.

A method declares its behaviour in its `Method` (src/raflora/math/methods/); code elsewhere asks
the registry (`get_method(name).allocation`, `.ranks_may_shrink`, ...) instead of comparing
names. The check reads the code's syntax tree, so docstrings, comments, help texts, defaults
and log names may mention methods freely; what it flags is a registered name (or a container
of them) used as a string in a comparison, in the condition of an if / elif / while /
conditional expression / assert / comprehension filter, as a match-case value, as the key of
a dict literal indexed on the spot, or as the argument of ``<...method...>.startswith(...)``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from raflora.math import available_methods

SRC = Path(__file__).resolve().parents[1] / "src" / "raflora"
UNITS = SRC / "math" / "methods"  # the methods themselves and the registry
STRING_TESTS = ("startswith", "endswith", "removeprefix", "removesuffix")


def _strings(node: ast.AST) -> list[ast.Constant]:
    return [n for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def _decisions(tree: ast.AST) -> list[tuple[ast.AST, bool]]:
    """The parts of the tree in which a string decides something, each with whether ANY string
    there is a method-name test (the argument of ``<...method...>.endswith(...)``)."""
    out: list[tuple[ast.AST, bool]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            out.append((node, False))
        elif isinstance(node, (ast.If, ast.IfExp, ast.While, ast.Assert)):
            out.append((node.test, False))
        elif isinstance(node, ast.comprehension):
            out.extend((test, False) for test in node.ifs)
        elif isinstance(node, ast.match_case):
            out.append((node.pattern, False))
        elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Dict):
            out.extend((key, False) for key in node.value.keys if key is not None)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in STRING_TESTS
            and "method" in ast.unparse(node.func.value).lower()
        ):
            out.extend((arg, True) for arg in node.args)
    return out


def name_decisions(source: str, names: set[str]) -> list[tuple[int, str]]:
    """(line, string) of every registered name in a decision (see the module docstring), and
    of any string tested against a method name."""
    hits = set()
    for part, any_string in _decisions(ast.parse(source)):
        for const in _strings(part):
            if any_string or const.value in names:
                hits.add((const.lineno, const.value))
    return sorted(hits)


NAMES = {"raflora", "hetlora", "flexlora", "zeropad_svd"}
CAUGHT = [
    'if method == "raflora": pass',
    'if cfg.federation.method != "hetlora": pass',
    'ok = method in ("flexlora", "raflora")',
    'ok = method not in {"zeropad_svd"}',
    'x = 1 if name == "hetlora" else 2',
    'while "raflora" in methods: pass',
    'assert spec.name == "flexlora"',
    'xs = [m for m in ms if m.name != "raflora"]',
    'match method:\n    case "hetlora":\n        pass',
    'f = {"raflora": a, "flexlora": b}[method]',
    'if method.endswith("_svd"): pass',
    'if config.federation.method.startswith("het"): pass',
]
ALLOWED = [
    '"""The raflora method: see hetlora and flexlora."""',
    '# if method == "hetlora": a comment',
    'method: str = "raflora"',
    'log = logging.getLogger("raflora")',
    'option = typer.Option(help="default (raflora only) | on | off")',
    'handler.addFilter(lambda r: r.name.startswith("raflora"))',
    'variants = {"flexlora": Variant(method="flexlora")}',
    "if method == other: pass",
    'if name.startswith("raflora."): pass',
]


@pytest.mark.parametrize("source", CAUGHT)
def test_the_check_catches_name_decisions(source: str) -> None:
    assert name_decisions(source, NAMES), source


@pytest.mark.parametrize("source", ALLOWED)
def test_the_check_allows_mentions(source: str) -> None:
    assert name_decisions(source, NAMES) == [], source


def test_no_method_name_decides_anything_outside_the_method_units() -> None:
    names = set(available_methods())
    assert {"raflora", "hetlora", "flora"} <= names
    files = [p for p in sorted(SRC.rglob("*.py")) if UNITS not in p.parents]
    assert len(files) > 20 and SRC / "federation" / "strategy.py" in files
    found = [
        f"{path.relative_to(SRC.parent)}:{line}: {value!r}"
        for path in files
        for line, value in name_decisions(path.read_text(), names)
    ]
    assert found == [], "method names compared outside src/raflora/math/methods/:\n" + "\n".join(
        found
    )
