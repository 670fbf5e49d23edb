"""Server crashes: SIGKILL mid-run, then ``--resume``; damaged checkpoints refused in one line.

The kill test runs ``raflora run`` as a subprocess in its own session (process group) with its
own ``RAY_TMPDIR``, so everything it started — Ray's gcs_server, raylet, agents and the client
actors — is found by process tree and by that environment variable, and nothing of another
session is touched. Ray starts those processes as children of the driver, in its process group,
with the parent-death signal set; the test checks that none outlives the kill.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from typer.testing import CliRunner

from helpers.runs import check_run_outputs, run_in_process, tiny_config, without_timing
from raflora.cli import app
from raflora.config import Config
from raflora.federation import checkpoint as ckpt
from raflora.federation.checkpoint import checkpoint_dir

pytestmark = pytest.mark.usefixtures("single_torch_thread")
RAFLORA = Path(sys.executable).parent / "raflora"


def write_config(config: Config, tmp_path: Path) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(config.to_toml())
    return path


def run_dir_of(config: Config) -> Path:
    return Path(config.run.out_dir) / config.run.name


# --------------------------------------------------------------------------- damaged checkpoints


@pytest.fixture(scope="module")
def finished(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, Path]:
    """A finished 2-round run (in-process) to damage copies of."""
    root = tmp_path_factory.mktemp("finished")
    config = tiny_config(tiny_bert_dir, f"run.out_dir={str(root)!r}", "run.name=done")
    run_in_process(config, run_dir_of(config), finish=False)
    return config, run_dir_of(config)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def edit_history(path: Path) -> None:  # a plausible edit: the metadata stays valid JSON
    meta = json.loads(path.read_text())
    meta["history"][1]["server_accuracy"] = 0.99
    path.write_text(json.dumps(meta))


DAMAGE = {
    "truncated arrays": (ckpt.ARRAYS, truncate, "truncated or modified"),
    "tampered arrays": (ckpt.ARRAYS, flip_last_byte, "truncated or modified"),
    "truncated metadata": (ckpt.META, truncate, "not valid JSON"),
    "edited metadata": (ckpt.META, edit_history, "does not match its content"),
    "missing arrays": (ckpt.ARRAYS, Path.unlink, "incomplete checkpoint"),
}


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_checkpoint_stops_resume_with_one_line(finished, tmp_path, case) -> None:
    config, original = finished
    run_dir = tmp_path / "damaged" / config.run.name
    shutil.copytree(original, run_dir)
    name, damage, says = DAMAGE[case]
    damage(checkpoint_dir(run_dir, 2) / name)
    before = snapshot(run_dir)
    args = ["run", str(write_config(config, tmp_path)), "--out", str(run_dir.parent)]
    result = CliRunner().invoke(app, [*args, "--resume", "--no-progress"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "round_002" in lines[0] and says in lines[0], lines[0]
    assert snapshot(run_dir) == before  # nothing loaded, nothing rewritten


# --------------------------------------------------------------------------- SIGKILL mid-run


def ours(ray_tmpdir: str) -> list[psutil.Process]:
    """Live processes started with our RAY_TMPDIR (inherited by everything the run started)."""
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.environ().get("RAY_TMPDIR") == ray_tmpdir and proc.status() != "zombie":
                found.append(proc)
    return found


def kill_all(procs: list[psutil.Process], grace: float = 20.0) -> list[str]:
    """Wait for `procs` to exit; SIGKILL what is left after `grace` s; returns their names."""
    _, alive = psutil.wait_procs(procs, timeout=grace)
    names = []
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            names.append(proc.name())
            proc.kill()
    psutil.wait_procs(alive, timeout=5)
    return names


def start_run(config_path: Path, env: dict, log: Path, *extra: str) -> subprocess.Popen:
    command = [str(RAFLORA), "run", str(config_path), "--no-progress", *extra]
    with log.open("ab") as handle:
        return subprocess.Popen(
            command, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_sigkill_mid_run_then_resume_matches_an_uninterrupted_run(tiny_bert_dir, tmp_path):
    config = tiny_config(
        tiny_bert_dir, "federation.rounds=3", f"run.out_dir={str(tmp_path / 'runs')!r}"
    )
    config_path, run_dir = write_config(config, tmp_path), run_dir_of(config)
    reference = run_in_process(config, tmp_path / "uninterrupted", finish=False)["history"]
    ray_tmpdir = tempfile.mkdtemp(prefix="rfl-", dir="/tmp")  # short: Ray's socket paths
    env = {**os.environ, "RAY_TMPDIR": ray_tmpdir}
    log = tmp_path / "raflora.log"
    try:
        server = start_run(config_path, env, log)
        deadline = time.monotonic() + 900
        while not checkpoint_dir(run_dir, 1).is_dir():
            assert server.poll() is None, log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "no round-1 checkpoint"
            time.sleep(0.02)
        tree = [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]
        names = {proc.name() for proc in tree}
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
        assert server.returncode == -signal.SIGKILL
        assert {"gcs_server", "raylet"} <= names, names  # Ray's own processes were running
        assert not checkpoint_dir(run_dir, 3).exists() and not (run_dir / "run.json").exists()
        # everything the killed run started is gone: its process tree and its RAY_TMPDIR
        leftovers = kill_all(tree) + kill_all(ours(ray_tmpdir))
        assert leftovers == [], f"outlived SIGKILL of the server's process group: {leftovers}"

        resumed = start_run(config_path, env, log, "--resume")
        assert resumed.wait(timeout=900) == 0, log.read_text(errors="replace")[-3000:]
        history = check_run_outputs(run_dir, 3)
        assert without_timing(history) == without_timing(reference)
        assert "resuming from" in log.read_text(errors="replace")
        assert kill_all(ours(ray_tmpdir), grace=30) == []  # a finished run leaves nothing either
    finally:
        for proc in ours(ray_tmpdir):  # whatever a failed assertion left behind
            with contextlib.suppress(psutil.Error):
                proc.kill()
        shutil.rmtree(ray_tmpdir, ignore_errors=True)
