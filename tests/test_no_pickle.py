"""Nothing in the package deserialises unsafely: no pickle (or its cousins), no unsafe loads.

Checkpoints and exports are safetensors + JSON; the wire format is Flower's ArrayRecord
(numpy ``allow_pickle=False``). This test reads the source, so it fails as soon as someone
adds ``import pickle``, ``torch.load`` without ``weights_only=True`` or
``np.load(..., allow_pickle=True)``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "raflora"
SOURCES = sorted(PACKAGE.rglob("*.py"))
UNSAFE_MODULES = {
    "pickle",
    "cPickle",
    "_pickle",
    "dill",
    "cloudpickle",
    "joblib",
    "shelve",
    "marshal",
}


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _dotted(func: ast.expr) -> str:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def problems(source: str) -> list[str]:
    tree = ast.parse(source)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [
                f"import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES
            ]
        elif (
            isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES
        ):
            found.append(f"from {node.module} import ...")
    for call in _calls(tree):
        name = _dotted(call.func)
        if name.endswith("torch.load"):
            safe = _keyword(call, "weights_only")
            if not (isinstance(safe, ast.Constant) and safe.value is True):
                found.append("torch.load without weights_only=True")
        if name in ("np.load", "numpy.load"):
            flag = _keyword(call, "allow_pickle")
            if isinstance(flag, ast.Constant) and flag.value is True:
                found.append("np.load(allow_pickle=True)")
        if name.endswith("pd.read_pickle") or name.endswith("pandas.read_pickle"):
            found.append("pandas.read_pickle")
    return found


def test_the_scanner_catches_unsafe_code():
    assert problems("import pickle") == ["import pickle"]
    assert problems("from joblib import load") == ["from joblib import ..."]
    assert problems("import torch\ntorch.load('x')") == ["torch.load without weights_only=True"]
    assert problems("import torch\ntorch.load('x', weights_only=True)") == []
    assert problems("import numpy as np\nnp.load('x', allow_pickle=True)") == [
        "np.load(allow_pickle=True)"
    ]
    assert problems("import pandas as pd\npd.read_pickle('x')") == ["pandas.read_pickle"]


def test_package_has_sources():
    assert len(SOURCES) > 20


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_unsafe_deserialisation(path: Path):
    assert problems(path.read_text()) == []
