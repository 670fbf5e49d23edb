"""A Flower deployment on 127.0.0.1: one SuperLink, N SuperNodes, `flwr` CLI calls.

Every process starts in its own session (process group) so that teardown reaches the
superexec / flwr-serverapp / flwr-clientapp processes they spawn; teardown sends SIGTERM to
each group, waits, then SIGKILLs whatever is left. Environment as in /work/notes/flower142.md §4.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

VENV_BIN = Path(sys.executable).parent
CONNECTION = "raflora-loopback"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Loopback:
    """Start with `start_superlink` / `start_supernode`, always `stop()` (e.g. in a fixture)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.home = root / "flwr_home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.procs: list[subprocess.Popen] = []
        self.env = dict(os.environ)
        self.env.update(
            PATH=f"{VENV_BIN}:{self.env.get('PATH', '')}",  # they spawn flower-superexec by name
            FLWR_HOME=str(self.home),
            FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
            FLWR_DISABLE_UPDATE_CHECK="1",
            FLWR_TELEMETRY_ENABLED="0",
        )
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )

    def _start(self, name: str, *args: str) -> subprocess.Popen:
        log = (self.root / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            [str(VENV_BIN / args[0]), *args[1:]],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def start_superlink(self, timeout: float = 60.0) -> None:
        self._start(
            "superlink",
            "flower-superlink",
            "--insecure",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--disable-runtime-dependency-installation",
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1).is_success:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"superlink on port {self.port} not healthy after {timeout}s")

    def start_supernode(self, node_config: str) -> None:
        index = len(self.procs) - 1  # the superlink is procs[0]
        self._start(
            f"supernode{index}",
            "flower-supernode",
            "--insecure",
            "--superlink",
            f"127.0.0.1:{self.port}",
            "--host",
            "127.0.0.1",
            "--port",
            str(free_port()),
            "--node-config",
            node_config,
        )

    def flwr(self, *args: str, timeout: float = 300.0) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(VENV_BIN / "flwr"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.root,
        )

    def runs(self) -> list[dict]:
        result = self.flwr("ls", CONNECTION, "--format", "json", timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        return json.loads(result.stdout)["runs"]

    def logs(self) -> str:
        return "\n".join(
            f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}"
            for path in sorted(self.root.glob("*.log"))
        )

    def stop(self, grace: float = 10.0) -> list[str]:
        """SIGTERM every process group, then SIGKILL leftovers; returns what needed SIGKILL."""
        tree = []
        for proc in self.procs:
            try:
                parent = psutil.Process(proc.pid)
                tree += [parent, *parent.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        _, alive = psutil.wait_procs(tree, timeout=grace)
        killed = []
        for proc in alive:
            try:
                killed.append(" ".join(proc.cmdline()[:2]))
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        return killed
