"""A Flower deployment on 127.0.0.1: one SuperLink, N SuperNodes, `flwr` CLI calls.

Every process starts in its own session (process group) so that teardown reaches the
superexec / flwr-serverapp / flwr-clientapp processes they spawn; teardown sends SIGTERM to
each group, waits, then SIGKILLs whatever is left. Environment as in /work/notes/flower142.md §4.
With ``tls`` (see helpers/certs.py) the SuperLink serves HTTPS with that certificate and
requires SuperNode authentication: only SuperNodes whose public key was registered
(`register`) and that sign with the private key may join (§5).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from helpers.certs import Tls
from helpers.runs import ROOT, TINY

VENV_BIN = Path(sys.executable).parent
CONNECTION = "raflora-loopback"


def two_node_overrides(model_dir: Path, rounds: int, name: str) -> str:
    """The ServerApp's ``overrides`` run-config value for a tiny 2-SuperNode run (ranks 2, 8)."""
    return "; ".join(
        [
            "clients.num_clients=2",
            "clients.ranks=[2, 8]",
            f"federation.rounds={rounds}",
            "federation.evaluate_clients=false",
            f"model.path={model_dir}",
            "data.train_size=80",
            "data.test_size=20",
            "model.max_length=24",
            "train.local_steps=2",
            "train.batch_size=8",
            f"run.name={name}",
        ]
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Loopback:
    """Start with `start_superlink` / `start_supernode`, always `stop()` (e.g. in a fixture)."""

    def __init__(self, root: Path, tls: Tls | None = None) -> None:
        self.root = root
        self.tls = tls
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
        security = f'root-certificates = "{tls.ca}"' if tls else "insecure = true"
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\n{security}\n'
        )

    def superlink_command(self) -> list[str]:
        command = ["flower-superlink", "--host", "127.0.0.1", "--port", str(self.port)]
        if self.tls is None:
            command.append("--insecure")
        else:
            command += [
                "--ssl-ca-certfile", str(self.tls.ca),
                "--ssl-certfile", str(self.tls.cert),
                "--ssl-keyfile", str(self.tls.key),
                "--enable-supernode-auth",
            ]  # fmt: skip
        return [*command, "--disable-runtime-dependency-installation"]

    def supernode_command(
        self, node_config: str, port: int, key: Path | None = None, max_retries: int | None = None
    ) -> list[str]:
        """`key`: the SuperNode's private key (authentication); `max_retries`: give up after
        that many failed connection attempts (a refused SuperNode otherwise retries forever)."""
        security = ["--insecure"] if self.tls is None else ["--root-certificates", str(self.tls.ca)]
        command = ["flower-supernode", *security, "--superlink", f"127.0.0.1:{self.port}"]
        command += ["--host", "127.0.0.1", "--port", str(port), "--node-config", node_config]
        if key is not None:
            command += ["--auth-supernode-private-key", str(key)]
        if max_retries is not None:
            command += ["--max-retries", str(max_retries), "--max-wait-time", "30"]
        return command

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
        self._start("superlink", *self.superlink_command())
        if self.tls is None:
            scheme, verify = "http", False
        else:
            scheme, verify = "https", ssl.create_default_context(cafile=str(self.tls.ca))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                url = f"{scheme}://127.0.0.1:{self.port}/health"
                if httpx.get(url, timeout=1, verify=verify).is_success:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"superlink on port {self.port} not healthy after {timeout}s")

    def start_supernode(
        self, node_config: str, key: Path | None = None, max_retries: int | None = None
    ) -> subprocess.Popen:
        index = len(self.procs) - 1  # the superlink is procs[0]
        command = self.supernode_command(node_config, free_port(), key, max_retries)
        return self._start(f"supernode{index}", *command)

    def register(self, public_key: Path) -> dict:
        """Register a SuperNode's public key with the SuperLink (authentication on)."""
        result = self.flwr(
            "supernode", "register", str(public_key), CONNECTION, "--format", "json", timeout=60
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return json.loads(result.stdout)

    def flwr(self, *args: str, timeout: float = 300.0) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(VENV_BIN / "flwr"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.root,
        )

    def run_app(
        self, out_dir: Path, overrides: str, timeout: float
    ) -> tuple[subprocess.CompletedProcess, str]:
        """`flwr run deploy/ --stream` on examples/tiny.toml with these overrides and out-dir;
        returns the result and the context for assertion messages (its output, every log)."""
        run_config = f'config-file="{TINY}" out-dir="{out_dir}" overrides="{overrides}"'
        result = self.flwr(
            "run", str(ROOT / "deploy"), CONNECTION, "--stream", "--run-config", run_config,
            timeout=timeout,
        )  # fmt: skip
        return result, f"{result.stdout[-4000:]}\n{result.stderr[-2000:]}\n{self.logs()}"

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
