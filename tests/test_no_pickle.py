"""Nothing in the package deserialises unsafely: no pickle (or its cousins), no unsafe loads.

Checkpoints and exports are safetensors + JSON; the wire format is Flower's ArrayRecord
(numpy ``allow_pickle=False``). Two checks:

- a static scan of the source (package, benchmarks) that fails as soon as someone imports
  ``pickle`` (directly, via ``importlib``/``__import__``, or an alias), calls ``torch.load``
  without ``weights_only=True``, ``np.load`` with ``allow_pickle`` anything but False, or
  writes/reads weights in pickle form through transformers/PEFT;
- a runtime check: a whole federated run (data, models, messages, checkpoints, export, resume,
  reloading the adapter with PEFT) under an audit hook that records every class a pickle
  unpickler looks up. Importing pickle is not the risk (torch imports it); unpickling is.
"""

from __future__ import annotations

import ast
import contextlib
import pickle
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "raflora"
SOURCES = sorted(PACKAGE.rglob("*.py")) + sorted((ROOT / "benchmarks").rglob("*.py"))
UNSAFE_MODULES = {
    "pickle",
    "cPickle",
    "_pickle",
    "dill",
    "cloudpickle",
    "joblib",
    "shelve",
    "marshal",
    "copyreg",
}
UNSAFE_CALLS = {  # fully qualified name → why
    "pandas.read_pickle": "pandas.read_pickle",
    "torch.jit.load": "torch.jit.load (TorchScript archives carry code)",
    "yaml.unsafe_load": "yaml.unsafe_load",
    "yaml.full_load": "yaml.full_load",
    "numpy.lib.format.read_array": "numpy read_array",
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


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name → what it was imported as: ``np`` → ``numpy``, ``load`` → ``torch.load``."""
    names = {"np": "numpy", "pd": "pandas"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                names[alias.asname or alias.name.split(".")[0]] = (
                    alias.name if alias.asname else alias.name.split(".")[0]
                )
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _qualified(call: ast.Call, aliases: dict[str, str]) -> str:
    name = _dotted(call.func)
    head, _, rest = name.partition(".")
    full = aliases.get(head, head)
    return f"{full}.{rest}" if rest else full


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_constant(node: ast.expr | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def problems(source: str) -> list[str]:
    tree = ast.parse(source)
    aliases = _aliases(tree)
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
        name = _qualified(call, aliases)
        if name in ("importlib.import_module", "__import__") and call.args:
            target = call.args[0]
            if isinstance(target, ast.Constant) and str(target.value).split(".")[0] in (
                UNSAFE_MODULES
            ):
                found.append(f"{name}({target.value!r})")
        if name in ("torch.load", "torch.serialization.load") and not _is_constant(
            _keyword(call, "weights_only"), True
        ):
            found.append("torch.load without weights_only=True")
        if name == "numpy.load":
            flag = _keyword(call, "allow_pickle")
            if flag is not None and not _is_constant(flag, False):
                found.append("np.load(allow_pickle=...) other than False")
        if name == "yaml.load":
            loader = _dotted(_keyword(call, "Loader") or ast.Constant(None))
            if not loader.endswith(("SafeLoader", "CSafeLoader")):
                found.append("yaml.load without SafeLoader")
        if name in UNSAFE_CALLS:
            found.append(UNSAFE_CALLS[name])
        attribute = name.rsplit(".", 1)[-1]
        if attribute == "from_pretrained" and _is_constant(
            _keyword(call, "use_safetensors"), False
        ):
            found.append("from_pretrained(use_safetensors=False)")
        if attribute == "save_pretrained" and _is_constant(
            _keyword(call, "safe_serialization"), False
        ):
            found.append("save_pretrained(safe_serialization=False)")
    return found


@pytest.mark.parametrize(
    ("source", "found"),
    [
        ("import pickle", ["import pickle"]),
        ("import pickle as p", ["import pickle"]),
        ("from joblib import load", ["from joblib import ..."]),
        ("import copyreg", ["import copyreg"]),
        ("import importlib\nimportlib.import_module('pickle')",
         ["importlib.import_module('pickle')"]),
        ("from importlib import import_module\nimport_module('dill')",
         ["importlib.import_module('dill')"]),
        ("__import__('marshal')", ["__import__('marshal')"]),
        ("import torch\ntorch.load('x')", ["torch.load without weights_only=True"]),
        ("import torch as T\nT.load('x')", ["torch.load without weights_only=True"]),
        ("from torch import load\nload('x')", ["torch.load without weights_only=True"]),
        ("import torch\ntorch.load('x', weights_only=False)",
         ["torch.load without weights_only=True"]),
        ("import torch\ntorch.load('x', weights_only=True)", []),
        ("import torch\ntorch.jit.load('m.pt')",
         ["torch.jit.load (TorchScript archives carry code)"]),
        ("import numpy as np\nnp.load('x', allow_pickle=True)",
         ["np.load(allow_pickle=...) other than False"]),
        ("from numpy import load\nload('x', allow_pickle=flag)",
         ["np.load(allow_pickle=...) other than False"]),
        ("import numpy as np\nnp.load('x')", []),
        ("import numpy as np\nnp.load('x', allow_pickle=False)", []),
        ("import pandas as pd\npd.read_pickle('x')", ["pandas.read_pickle"]),
        ("from pandas import read_pickle\nread_pickle('x')", ["pandas.read_pickle"]),
        ("import yaml\nyaml.load(s)", ["yaml.load without SafeLoader"]),
        ("import yaml\nyaml.load(s, Loader=yaml.SafeLoader)", []),
        ("m = M.from_pretrained(p, use_safetensors=False)",
         ["from_pretrained(use_safetensors=False)"]),
        ("model.save_pretrained(p, safe_serialization=False)",
         ["save_pretrained(safe_serialization=False)"]),
        ("model.save_pretrained(p)", []),
    ],
)  # fmt: skip
def test_the_scanner_catches_unsafe_code(source: str, found: list[str]) -> None:
    assert problems(source) == found


def test_package_has_sources():
    assert len(SOURCES) > 20
    assert any(path.parent.name == "benchmarks" for path in SOURCES)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_unsafe_deserialisation(path: Path):
    assert problems(path.read_text()) == []


# --------------------------------------------------------------------------- runtime

UNPICKLED: list[tuple[str, str]] | None = None  # recording while a list


def _audit(event: str, args: tuple) -> None:
    if UNPICKLED is not None and event == "pickle.find_class":
        UNPICKLED.append((str(args[0]), str(args[1])))


sys.addaudithook(_audit)  # cannot be removed; records only inside `unpickling()`


@contextlib.contextmanager
def unpickling() -> Iterator[list[tuple[str, str]]]:
    """Collect the (module, name) of every class a pickle unpickler looks up in the block."""
    global UNPICKLED
    UNPICKLED = []
    try:
        yield UNPICKLED
    finally:
        UNPICKLED = None


def test_the_audit_hook_sees_unpickling() -> None:
    with unpickling() as found:
        pickle.loads(pickle.dumps(Path("x")))
    assert ("pathlib", "PosixPath") in found


@pytest.mark.usefixtures("single_torch_thread")
def test_a_whole_run_export_and_resume_unpickle_nothing(tiny_bert_dir: Path, tmp_path: Path):
    from peft import PeftModel

    from helpers.runs import run_in_process, tiny_config
    from raflora.federation.checkpoint import latest_checkpoint, load_checkpoint
    from raflora.federation.export import export_run
    from raflora.training import load_base_model

    config = tiny_config(tiny_bert_dir, "federation.rounds=1", "train.local_steps=1")
    with unpickling() as found:
        run_in_process(config, tmp_path / "run", finish=False)  # data, models, messages
        load_checkpoint(latest_checkpoint(tmp_path / "run"))  # what --resume reads
        path, _ = export_run(tmp_path / "run", tmp_path / "adapter")
        base, _ = load_base_model(str(tiny_bert_dir), "classification", 2, seed=0)
        PeftModel.from_pretrained(base, path)
    assert found == []
