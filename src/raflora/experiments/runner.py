"""Run a suite's grid as resumable runs under ``<out>/<suite>/``, then write its report.

Layout: ``suite.json`` (the suite, every cell and its run, each run's status),
``runs/<run id>/`` (ordinary run folders, see `raflora run`), ``pretrained/`` (the centrally
pretrained base model, when the suite has a [pretrain] section), ``report.md`` + ``plots/``.

A run is *finished* when its ``run.json`` exists with the same config: it is skipped. A run
with checkpoints but no ``run.json`` was interrupted: it continues with the engine's resume.
A finished run whose config differs only by more ``federation.rounds`` is resumed to the new
length; any other difference is an error (choose another --out).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from raflora.config import Config
from raflora.experiments.suite import Plan, Suite, SuiteError, expand

log = logging.getLogger("raflora")
MANIFEST = "suite.json"
RESUMABLE = {("federation", "rounds")}


def _without_location(config: dict[str, Any]) -> dict[str, Any]:
    data = json.loads(json.dumps(config))
    data.get("run", {}).pop("out_dir", None)
    return data


def _differences(saved: dict[str, Any], wanted: dict[str, Any]) -> set[tuple[str, str]]:
    saved, wanted = _without_location(saved), _without_location(wanted)
    keys = set()
    for section in set(saved) | set(wanted):
        old, new = saved.get(section, {}), wanted.get(section, {})
        keys |= {(section, k) for k in set(old) | set(new) if old.get(k) != new.get(k)}
    return keys


def run_status(run_dir: Path, config: Config) -> str:
    """``finished``, ``partial`` (checkpoints, or fewer rounds than asked) or ``new``."""
    from raflora.federation.checkpoint import latest_checkpoint

    summary = run_dir / "run.json"
    if summary.is_file():
        saved = json.loads(summary.read_text()).get("config", {})
        # through today's Config: fields added since then compare at their defaults (a config
        # that is no longer valid is compared as saved, so it differs)
        with contextlib.suppress(ValueError):
            saved = Config.model_validate(saved).to_dict()
        diffs = _differences(saved, config.to_dict())
        if not diffs:
            return "finished"
        longer = saved.get("federation", {}).get("rounds", 0) < config.federation.rounds
        if diffs <= RESUMABLE and longer:
            return "partial"
        listed = ", ".join(".".join(d) for d in sorted(diffs))
        raise SuiteError(
            f"{run_dir}: finished with a different config ({listed}); use another --out"
        )
    return "partial" if latest_checkpoint(run_dir) is not None else "new"


# --------------------------------------------------------------------------- one run


def _quiet_worker(log_file: Path) -> None:
    """Log the run to ``log_file``; silence third-party progress bars and warnings."""
    import warnings

    from raflora.federation.simulation import quiet_flower

    quiet_flower()
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger("raflora")
    root.handlers = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False


def execute_run(config_json: str, run_dir: str, executor: str, resume: bool) -> dict[str, Any]:
    """Run (or continue) one federated job; returns its summary. Runs in a worker process."""
    import torch

    from raflora.federation import client, task
    from raflora.federation.progress import LogReporter

    config = Config.model_validate_json(config_json)
    path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    try:
        if executor == "ray":
            from raflora.federation.simulation import run_federated

            return run_federated(config, path, resume=resume, reporter=LogReporter())
        from raflora.experiments.inprocess import run_inprocess

        return run_inprocess(config, path, resume=resume, reporter=LogReporter())
    finally:
        torch.set_num_threads(threads)  # clients set their own thread count in-process
        for cached in (client.client_context, task.load_data, task.load_base):
            cached.cache_clear()  # the next run has another config: free models and data
        gc.collect()


def exit_with_parent(parent: int, every: float = 1.0) -> None:
    """Worker initializer: end this process when ``parent`` is gone.

    A spawned pool worker outlives a parent killed by a signal (SIGTERM, SIGKILL): it would
    go on writing a run folder nobody waits for. A daemon thread polls the parent's pid and
    exits the worker when the process has been re-parented; the run resumes from its last
    checkpoint next time (``--resume``)."""
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _worker(config_json: str, run_dir: str, executor: str, resume: bool) -> dict[str, Any]:
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    _quiet_worker(Path(run_dir) / "run.log")
    return execute_run(config_json, run_dir, executor, resume)


# --------------------------------------------------------------------------- the suite


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
    }


@dataclasses.dataclass
class SuiteRun:
    """A suite being executed: its plan, folders and the status of every run."""

    plan: Plan
    suite_dir: Path
    executor: str
    workers: int
    status: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    @property
    def runs_dir(self) -> Path:
        return self.suite_dir / "runs"

    def write_manifest(self) -> None:
        from raflora.federation.outputs import write_atomic

        data = {
            "suite": self.plan.suite.model_dump(mode="json"),
            "executor": self.executor,
            "workers": self.workers,
            "machine": machine(),
            "cells": [dataclasses.asdict(cell) for cell in self.plan.cells],
            "runs": self.status,
        }
        write_atomic(self.suite_dir / MANIFEST, json.dumps(data, indent=1))


def prepare(suite: Suite, out: Path, *, resume: bool) -> tuple[Plan, Path]:
    """Check the folder, pretrain if asked, expand the grid into validated run configs."""
    suite_dir = Path(out) / suite.suite.name
    if (suite_dir / MANIFEST).is_file() and not resume:
        raise SuiteError(
            f"{suite_dir} already holds this suite; pass --resume to continue it "
            f"(finished runs are skipped) or choose another --out"
        )
    if suite.pretrain is not None:
        from raflora.experiments.pretrain import pretrain

        seeds = sorted({s for g in suite.grid for s in (g.seeds or suite.suite.seeds)})
        folder = pretrain(suite.pretrain, suite_dir / "pretrained", exclude_test_of=seeds)
        base = json.loads(json.dumps(suite.base))
        base.setdefault("model", {})["path"] = str(folder)
        suite = suite.model_copy(update={"base": base})
    return expand(suite, suite_dir / "runs"), suite_dir


def prepare_report(suite: Suite, out: Path) -> tuple[Plan, Path]:
    """The plan of a suite whose runs are already under ``out`` (for ``--report-only``).

    Raises `SuiteError` when none of its runs has finished there (wrong --out, or not run yet).
    """
    plan, suite_dir = prepare(suite, out, resume=True)
    runs_dir = suite_dir / "runs"
    if not any(
        run_status(runs_dir / run_id, cfg) == "finished" for run_id, cfg in plan.configs.items()
    ):
        raise SuiteError(
            f"--report-only: no finished run of suite {suite.suite.name!r} under {runs_dir}; "
            "pass the --out it ran with, or run it first (without --report-only)"
        )
    return plan, suite_dir


def run_suite(
    suite: Suite,
    out: Path,
    *,
    resume: bool = False,
    workers: int | None = None,
    executor: str | None = None,
    echo: Callable[[str], None] = print,
) -> SuiteRun:
    """Execute every unfinished run of the suite (``workers`` at once), then return.

    Failures of single runs are recorded in ``suite.json`` and reported; the others go on.
    """
    executor = executor or suite.suite.executor
    workers = workers or suite.suite.workers
    if executor == "ray" and workers > 1:
        raise SuiteError("suite.workers: the ray executor runs one job at a time (workers = 1)")
    plan, suite_dir = prepare(suite, out, resume=resume)
    state = SuiteRun(plan, suite_dir, executor, workers)
    todo = []
    for run_id, config in plan.configs.items():
        status = run_status(state.runs_dir / run_id, config)
        state.status[run_id] = {"status": status}
        if status != "finished":
            todo.append((run_id, status == "partial"))
    seeds = {run_id: config.run.seed for run_id, config in plan.configs.items()}
    todo.sort(key=lambda job: seeds[job[0]])  # seed by seed: early stops leave whole seeds
    suite_dir.mkdir(parents=True, exist_ok=True)
    state.write_manifest()
    done = len(plan.configs) - len(todo)
    echo(
        f"suite {suite.suite.name}: {len(plan.cells)} cells, {len(plan.configs)} runs "
        f"({done} finished, {len(todo)} to run; executor {executor}, {workers} at once)"
    )
    _execute(state, todo, echo)
    return state


def _final_note(result: dict[str, Any]) -> str:
    """``final acc 0.812, loss 0.431``: what a finished run reports (either may be missing)."""
    acc, loss = result.get("final_accuracy"), result.get("final_loss")
    parts = [f"acc {acc:.3f}"] if isinstance(acc, float) else []
    parts += [f"loss {loss:.3g}"] if isinstance(loss, float) else []
    return "final " + ", ".join(parts) if parts else "no accuracy or loss"


def _execute(state: SuiteRun, todo: list[tuple[str, bool]], echo: Callable[[str], None]) -> None:
    start, finished = time.perf_counter(), 0

    def record(run_id: str, result: dict[str, Any] | None, error: BaseException | None) -> None:
        nonlocal finished
        finished += 1
        if error is None and result is not None:
            entry = {"status": "finished", "wall_seconds": result.get("wall_seconds")}
            note = _final_note(result)
        else:
            entry = {"status": "failed", "error": f"{type(error).__name__}: {error}"[:2000]}
            note = f"FAILED: {entry['error'].splitlines()[0][:200]}"
        state.status[run_id] = entry
        state.write_manifest()
        elapsed = time.perf_counter() - start
        eta = elapsed / finished * (len(todo) - finished)
        echo(
            f"[{finished}/{len(todo)}] {run_id}: {note}  "
            f"({elapsed / 60:.1f} min, ~{eta / 60:.0f} min left)"
        )

    jobs = [
        (run_id, state.plan.configs[run_id].to_json(), str(state.runs_dir / run_id), partial)
        for run_id, partial in todo
    ]
    if state.workers == 1:
        for run_id, config_json, run_dir, partial in jobs:
            echo(f"running {run_id}")
            try:
                result = execute_run(config_json, run_dir, state.executor, partial)
            except Exception as error:  # one failed run must not stop the suite
                record(run_id, None, error)
                log.exception("run %s failed", run_id)
            else:
                record(run_id, result, None)
        return
    with ProcessPoolExecutor(
        state.workers,
        mp_context=get_context("spawn"),
        initializer=exit_with_parent,
        initargs=(os.getpid(),),
    ) as pool:
        pending = {
            pool.submit(_worker, config_json, run_dir, state.executor, partial): run_id
            for run_id, config_json, run_dir, partial in jobs
        }
        while pending:
            complete, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in complete:
                run_id = pending.pop(future)
                error = future.exception()
                record(run_id, None if error else future.result(), error)
