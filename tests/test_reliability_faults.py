"""Failing clients in a real Ray simulation: they raise, stall past the round timeout, or vanish
(their process exits); the run completes and metrics.json reports each round's failures.

Ray and the in-process FakeGrid give identical metrics (test_federation_simulation.py), and the
clients that fail are a seeded function of the round, not of the mode. So a Ray run with
failures is compared with the in-process run of the same config: identical except for the
wording of the failure reasons. The default suite runs one Ray simulation (``raise``, 3
clients, 2 rounds); stalls, vanishing processes and 10 clients are ``slow``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

from helpers.runs import check_run_outputs, run_in_process, tiny_config, without_timing
from raflora.config import Config
from raflora.federation.faults import failing_clients
from raflora.federation.simulation import backend_config, run_federated
from raflora.federation.strategy import readable_error

pytestmark = pytest.mark.usefixtures("single_torch_thread")

# --------------------------------------------------------------------------- fast


def test_a_seeded_thirty_percent_of_clients_fail_each_round() -> None:
    config = tiny_config_defaults("clients.num_clients=10", "faults.fraction=0.3")
    per_round = [failing_clients(config, r) for r in range(1, 21)]
    assert all(len(f) == 3 and f <= set(range(10)) for f in per_round)
    assert len({frozenset(f) for f in per_round}) > 10  # a different set most rounds
    assert per_round == [failing_clients(config, r) for r in range(1, 21)]  # reproducible
    assert failing_clients(tiny_config_defaults("clients.num_clients=10"), 1) == set()


RAY_RAISED = (
    "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::ClientAppActor.run()"
    '\x1b[39m (pid=1, ip=192.0.2.2, actor_id=c3ff)\n  File "faults.py", line 42, in maybe_fail\n'
    "    raise InjectedFault(...)\nraflora.federation.faults.InjectedFault: injected failure: "
    "client 0, round 1\n\nThe above exception was the direct cause of the following exception:\n"
    "\n\x1b[36mray::ClientAppActor.run()\x1b[39m (pid=1)\nflwr.clientapp.client_app."
    "ClientAppException: \nException ClientAppException occurred. Message: injected failure'>"
)
RAY_DIED = (
    "<class 'ray.exceptions.ActorDiedError'>:<'The actor died unexpectedly before finishing this "
    "task.\n\tclass_name: ClientAppActor\n\tpid: 15786\nThe actor is dead because its worker "
    "process has died.'>"
)


@pytest.mark.parametrize(
    ("reason", "readable"),
    [
        (RAY_RAISED, "InjectedFault: injected failure: client 0, round 1"),
        ("InjectedFault: injected failure: client 0, round 1",  # FakeGrid's wording
         "InjectedFault: injected failure: client 0, round 1"),
        (RAY_DIED, "ActorDiedError: The actor died unexpectedly before finishing this task."),
        ("boom", "boom"),
    ],
)  # fmt: skip
def test_client_errors_are_reduced_to_their_cause(reason: str, readable: str) -> None:
    assert readable_error(reason) == readable
    assert len(readable_error(reason * 50)) <= 300


def test_dead_ray_actors_are_restarted_and_their_message_retried_once() -> None:
    resources = backend_config(tiny_config_defaults())["client_resources"]
    assert resources["max_restarts"] == -1 and resources["max_task_retries"] == 1


def tiny_config_defaults(*overrides: str) -> Config:
    from raflora.config import load_config

    return load_config(None, list(overrides))


# --------------------------------------------------------------------------- Ray


def reasons_replaced(history: list[dict], text: str) -> list[dict]:
    """The history with every failure reason replaced by `text` (only the wording differs)."""
    out = copy.deepcopy(history)
    for record in out:
        record["failures"] = {pid: text for pid in record["failures"]}
    return out


def check_failures(config: Config, history: list[dict], says: str) -> None:
    for record in history[1:]:
        failing = failing_clients(config, record["round"])
        assert {int(pid) for pid in record["failures"]} == failing, record["failures"]
        assert all(says in reason for reason in record["failures"].values()), record["failures"]
        assert record["failed"] == len(failing) and record["rejected"] == 0
        assert record["ok"] == config.clients.num_clients - len(failing)
        assert not record["skipped"] and record["server_accuracy"] is not None
        assert np.isfinite(record["train_loss"])


def run_and_compare(config: Config, tmp_path: Path, says: str, same_as: Config) -> dict:
    """Ray run of `config`; compared with the in-process run of `same_as` (mode raise)."""
    summary = run_federated(config, tmp_path / "ray")
    history = check_run_outputs(tmp_path / "ray", config.federation.rounds)
    check_failures(config, history, says)
    failed = sum(len(failing_clients(config, r)) for r in range(1, config.federation.rounds + 1))
    assert summary["failed_clients"] == failed and summary["skipped_rounds"] == 0
    local = run_in_process(same_as, tmp_path / "local", finish=False)["history"]
    if config == same_as:
        assert without_timing(history) == without_timing(local)
    else:
        assert reasons_replaced(without_timing(history), "?") == reasons_replaced(
            without_timing(local), "?"
        )
    return summary


def test_ray_run_with_30_percent_of_clients_raising_completes(tiny_bert_dir, tmp_path) -> None:
    config = tiny_config(tiny_bert_dir, "faults.fraction=0.3")  # 1 of 3 clients per round
    run_and_compare(config, tmp_path, "InjectedFault: injected failure", same_as=config)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ray_run_with_10_clients_30_percent_raising(tiny_bert_dir, tmp_path) -> None:
    config = tiny_config(
        tiny_bert_dir, "clients.num_clients=10", "faults.fraction=0.3", "federation.rounds=3"
    )
    run_and_compare(config, tmp_path, "InjectedFault: injected failure", same_as=config)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ray_run_with_clients_stalling_past_the_round_timeout(tiny_bert_dir, tmp_path) -> None:
    """A stalled client holds a Ray actor; the round ends at its timeout without it, and its
    late reply never leaks into a later round."""
    timing = ["federation.round_timeout_s=15", "faults.stall_s=18", "faults.fraction=0.3"]
    config = tiny_config(tiny_bert_dir, *timing, "faults.mode=stall")
    summary = run_and_compare(
        config,
        tmp_path,
        "no reply before the round timeout",
        same_as=tiny_config(tiny_bert_dir, *timing),
    )
    assert summary["wall_seconds"] > 2 * 15


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ray_run_survives_client_processes_that_exit(tiny_bert_dir, tmp_path) -> None:
    """``os._exit`` in a client kills its Ray actor. Flower returns the dead actor to its pool,
    so without restarts every later message sent to it failed as well (all 3 clients in round
    2); with ``max_restarts``/``max_task_retries`` only the vanished client is reported."""
    config = tiny_config(tiny_bert_dir, "faults.fraction=0.3", "faults.mode=vanish")
    run_and_compare(
        config, tmp_path, "Actor", same_as=tiny_config(tiny_bert_dir, "faults.fraction=0.3")
    )
