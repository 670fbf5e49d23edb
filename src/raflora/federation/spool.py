"""A round's replies spooled to disk as they are accepted, read back one module at a time.

With ``federation.spool_dir`` set, the strategy writes each validated reply to
``<spool>/round_XXX_*/client_<pid>.safetensors`` the moment it accepts it (keys
``lora/<module>/{B,A}`` as received, ``dense/<name>``; partition id, rank, num-examples and
metrics (JSON) in the file's metadata) and keeps only a header (the reply without its
factors). The round step (`raflora.math.round.aggregate_streamed`) then reads one module of
every client at a time (``safe_open`` loads one tensor at a time), so the server holds one
module's factors instead of the whole round's. The round's folder is deleted after the round,
whatever happened. safetensors + JSON only.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from raflora.math.round import ClientUpdate, Factors

FIELD = "federation.spool_dir"


class SpoolError(ValueError):
    """The spool directory cannot be used (names the config field and the fix)."""


def spool_root(setting: str) -> Path | None:
    """The folder a ``federation.spool_dir`` value names: None for "" (replies stay in
    memory), the system's temporary folder for "auto", else the path (created if missing;
    it must be a writable directory)."""
    if setting == "":
        return None
    auto = Path(tempfile.gettempdir()) / "raflora-spool"
    root = auto if setting == "auto" else Path(os.path.expanduser(setting))
    try:
        root.mkdir(parents=True, exist_ok=True)
    except (OSError, ValueError) as error:
        reason = getattr(error, "strerror", None) or error
        raise SpoolError(
            f"{FIELD} = {setting!r} cannot be created ({reason}); "
            'give a writable directory, "auto" (the temporary folder) or "" (in memory)'
        ) from error
    if not root.is_dir() or not os.access(root, os.W_OK | os.X_OK):
        raise SpoolError(
            f"{FIELD} = {setting!r} is not a writable directory; "
            'give a writable directory, "auto" (the temporary folder) or "" (in memory)'
        )
    return root


class ReplySpool:
    """One round's accepted replies on disk; also the round step's module source
    (`raflora.math.round.ModuleSource`): ``updates``, ``modules``, ``load(name)``."""

    def __init__(self, root: Path, server_round: int) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix=f"round_{server_round:03d}_", dir=root))
        self._headers: dict[int, ClientUpdate] = {}
        self._modules: list[str] | None = None

    @classmethod
    def reopen(cls, folder: Path) -> ReplySpool:
        """The spool already written in ``folder`` (headers read back from each file's
        metadata; its arrays stay on disk). ``close()`` deletes the folder."""
        spool = cls.__new__(cls)
        spool.folder, spool._headers, spool._modules = Path(folder), {}, None
        for path in sorted(Path(folder).glob("client_*.safetensors")):
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
                names = {key[5:].rsplit("/", 1)[0] for key in f.keys() if key[:5] == "lora/"}  # noqa: SIM118
                dense = {
                    key.split("/", 1)[1]: f.get_tensor(key)
                    for key in f.keys()  # noqa: SIM118 (a safe_open handle, not a dict)
                    if key.startswith("dense/")
                }
            header = ClientUpdate(
                partition_id=int(meta["partition_id"]),
                rank=int(meta["rank"]),
                num_examples=int(meta["num_examples"]),
                factors={},
                dense=dense,
                metrics=json.loads(meta.get("metrics", "{}")),
            )
            spool._headers[header.partition_id] = header
            spool._modules = sorted(names)
        return spool

    def _path(self, partition_id: int) -> Path:
        return self.folder / f"client_{partition_id}.safetensors"

    def add(self, update: ClientUpdate) -> ClientUpdate:
        """Write ``update``'s factors to disk; returns its header (the update without them)."""
        if update.partition_id in self._headers:
            raise ValueError(f"partition {update.partition_id} is already spooled this round")
        modules = sorted(update.factors)
        if self._modules is not None and modules != self._modules:
            raise ValueError(
                f"partition {update.partition_id} has modules that differ from the round's"
            )
        tensors = {f"dense/{name}": np.ascontiguousarray(x) for name, x in update.dense.items()}
        for name, (B, A) in update.factors.items():
            tensors[f"lora/{name}/B"] = np.ascontiguousarray(B)
            tensors[f"lora/{name}/A"] = np.ascontiguousarray(A)
        metadata = {
            "partition_id": str(update.partition_id),
            "rank": str(update.rank),
            "num_examples": str(update.num_examples),
            "metrics": json.dumps(update.metrics),
        }
        save_file(tensors, str(self._path(update.partition_id)), metadata=metadata)
        self._modules = modules
        header = replace(update, factors={})
        self._headers[update.partition_id] = header
        return header

    @property
    def updates(self) -> list[ClientUpdate]:
        """The spooled replies' headers, by partition id."""
        return [self._headers[pid] for pid in sorted(self._headers)]

    @property
    def modules(self) -> list[str]:
        return list(self._modules or [])

    def load(self, name: str) -> list[Factors]:
        """Every spooled client's ``(B_k, A_k)`` of module ``name``, by partition id (each
        file opened, two tensors read, closed: nothing else of the round is mapped)."""
        out = []
        for pid in sorted(self._headers):
            with safe_open(str(self._path(pid)), framework="numpy") as f:
                out.append((f.get_tensor(f"lora/{name}/B"), f.get_tensor(f"lora/{name}/A")))
        return out

    def close(self) -> None:
        """Delete the round's folder (idempotent)."""
        shutil.rmtree(self.folder, ignore_errors=True)
        self._headers.clear()

    def __enter__(self) -> ReplySpool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
