"""Whole federated runs in-process: the real server loop, strategy and ClientApp handlers, with
an in-process Grid instead of Ray (see helpers/fakegrid.py), on a tiny BERT.

Every method of the registry runs 2 rounds with 3 clients of ranks 2, 4, 8; then outputs,
determinism, resume, export + reload, partial participation with carry-over, merge mode and
failing clients. The Ray simulation itself is covered in test_federation_simulation.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import MessageType

from helpers.fakegrid import FakeGrid
from helpers.runs import check_run_outputs, run_in_process, tiny_config, without_timing
from raflora.config import ConfigError, load_config
from raflora.federation import messages as msg
from raflora.federation import task
from raflora.federation.checkpoint import load_checkpoint
from raflora.federation.export import export_run
from raflora.federation.finish import finish_run
from raflora.math import available_methods, get_method
from raflora.training import evaluate, load_base_model, take

pytestmark = pytest.mark.usefixtures("single_torch_thread")

RANKS = {0: 2, 1: 4, 2: 8}
SETTINGS = {  # per method: what it needs besides the tiny config
    "fedit": ["clients.ranks=[4]"],  # equal ranks only
    "flora": ["federation.apply=merge"],  # FLoRA merges every round
}


@pytest.fixture(scope="module")
def runs(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """Run each configuration once per module: ``runs(key, *overrides)``."""
    cache: dict[str, dict] = {}

    def get(key: str, *overrides: str, **kwargs) -> dict:
        if key in cache:
            assert cache[key]["overrides"] == overrides, f"two runs named {key!r}"
        else:
            config = tiny_config(tiny_bert_dir, *overrides)
            if "drop" in kwargs:
                nodes = [{"partition-id": i} for i in range(config.clients.num_clients)]
                kwargs["grid"] = FakeGrid(nodes, drop=kwargs.pop("drop"))
            run_dir = tmp_path_factory.mktemp(key)
            cache[key] = {
                "overrides": overrides,
                "config": config,
                "run_dir": run_dir,
                **run_in_process(config, run_dir, finish=False, **kwargs),
            }
        return cache[key]

    return get


def method_run(runs, method: str) -> dict:
    return runs(method, f"federation.method={method}", *SETTINGS.get(method, []))


def train_messages(grid, server_round: int) -> list:
    return [
        m
        for m in grid.sent
        if m.metadata.message_type == MessageType.TRAIN and m.metadata.group_id == str(server_round)
    ]


def pid_of(grid, message) -> int:
    return int(grid.contexts[message.metadata.dst_node_id].node_config["partition-id"])


# --------------------------------------------------------------------------- every method


def test_the_registry_is_covered() -> None:
    assert set(available_methods()) >= {"fedit", "zeropad", "hetlora", "rblora", "flexlora"}
    assert {"flora", "raflora"} <= set(available_methods())


@pytest.mark.parametrize("method", available_methods())
def test_every_method_runs_two_rounds_with_heterogeneous_ranks(runs, method: str) -> None:
    run = method_run(runs, method)
    config, grid, state, history = run["config"], run["grid"], run["state"], run["history"]
    ranks = {pid: 4 for pid in RANKS} if method == "fedit" else RANKS
    assert [r["round"] for r in history] == [0, 1, 2]
    for record in history[1:]:
        assert (record["sampled"], record["ok"], record["failed"], record["rejected"]) == (
            3,
            3,
            0,
            0,
        )
        assert not record["skipped"]
        assert math.isfinite(record["train_loss"])
        assert 0 <= record["server_accuracy"] <= 1 and math.isfinite(record["server_loss"])
        assert record["bytes_received"] > 0 and record["bytes_sent"] > 0
        assert 0 < record["top_rmin_energy"] <= 1 + 1e-9
    merge = config.federation.apply_mode == "merge"
    residual = get_method(method).residual is not None  # FedEx-LoRA: adapter + merged residual
    # what round 1 merged into the base, per module: FLoRA's stack Σ r_k, FedEx's residual
    # [p_k B_k …, −B̄] of rank Σ r_k + r_max (FLoRIST: the thresholded stack, fewer)
    merged_rank = sum(ranks.values()) + (max(ranks.values()) if residual else 0)
    # a frozen-A method (FFA-LoRA) sends B alone; A is the shared one, rebuilt from the seed
    rows = task.shared_a_rows(config, lambda name: 32, 8) if get_method(method).frozen_a else None
    for message in train_messages(grid, 2):  # round 2: every client starts from the global model
        pid = pid_of(grid, message)
        config_record = message.content[msg.CONFIG]
        assert config_record[msg.RANK] == ranks[pid]
        payload = msg.unpack_payload(message.content[msg.ARRAYS], frozen_a=rows)
        assert set(payload.dense) == {"classifier.weight", "classifier.bias"}
        assert payload.merged == {}  # the whole merged sum travels only with merged_wire=total
        if merge or residual:  # round 1's merged factors, once
            assert config_record[msg.MERGED_ROUNDS] == [1] and list(payload.rounds) == [1]
            assert len(payload.rounds[1]) == 4
            assert all(
                B.shape[0] == 32 and 0 < B.shape[1] <= merged_rank
                for B, _ in payload.rounds[1].values()
            )
        else:
            assert config_record[msg.MERGED_ROUNDS] == [] and payload.rounds == {}
        if merge:
            assert payload.lora == {}
        else:
            assert len(payload.lora) == 4  # query, value × 2 layers
            assert all(
                B.shape == (32, ranks[pid]) and A.shape == (ranks[pid], 32)
                for B, A in payload.lora.values()
            )
    total = state.total_update()
    assert (state.adapter == {}) == merge and (state.merged == {}) == (not merge and not residual)
    assert sorted(state.merged_rounds) == ([1, 2] if merge or residual else [])
    # D_2 = ΔW_1 + ΔW_2 when merged; FedEx: D_1 + Σ p_k B_k A_k, D_1 in span(B_k of round 1)
    most = min(32, (2 if merge or residual else 1) * sum(ranks.values()))
    assert len(total) == 4 and all(0 < u.rank <= most for u in total.values())
    assert history[2]["global_rank"] == max(u.rank for u in total.values())
    assert state.ranks == ranks


def test_methods_share_round_one_training_and_differ_in_aggregation(runs) -> None:
    """Round 1 starts from the same empty global model for every method with ranks 2, 4, 8:
    identical client training; the aggregate is where they part."""
    first = {m: method_run(runs, m)["history"][1] for m in ("raflora", "flexlora", "flora")}
    assert first["raflora"]["train_loss"] == first["flexlora"]["train_loss"]
    assert first["raflora"]["server_loss"] != first["flexlora"]["server_loss"]
    # FLoRA's merged D_1 is FlexLoRA's Σ p_k B_k A_k: the same global model after round 1 ...
    assert first["flora"]["server_loss"] == pytest.approx(
        first["flexlora"]["server_loss"], abs=1e-6
    )
    # ... but then one restarts from a fresh LoRA and the other from the truncated update
    second = {m: method_run(runs, m)["history"][2] for m in ("flexlora", "flora")}
    assert second["flora"]["train_loss"] != second["flexlora"]["train_loss"]


def test_raflora_and_flexlora_send_and_receive_the_same_bytes(runs) -> None:
    ra, flex = method_run(runs, "raflora")["history"], method_run(runs, "flexlora")["history"]
    for a, b in zip(ra, flex, strict=True):
        assert (a["bytes_sent"], a["bytes_received"]) == (b["bytes_sent"], b["bytes_received"])
    # what was counted is what was sent: rank r_k factors of 4 modules (32×r, r×32) + the head
    grid = method_run(runs, "raflora")["grid"]
    sent = train_messages(grid, 2)
    assert ra[2]["bytes_sent"] == sum(m.content[msg.ARRAYS].count_bytes() for m in sent)
    floats = 0
    for message in sent:
        lora, _, dense = msg.unpack(message.content[msg.ARRAYS])
        floats += sum(B.size + A.size for B, A in lora.values())
        floats += sum(v.size for v in dense.values())
    assert floats == sum(4 * 64 * r for r in RANKS.values()) + 3 * (2 * 32 + 2)


# --------------------------------------------------------------------------- outputs


def test_a_finished_run_has_every_output(runs) -> None:
    run = method_run(runs, "raflora")
    summary = finish_run(run["config"], run["run_dir"])
    history = check_run_outputs(run["run_dir"], 2)
    assert summary["ranks"] == {"0": 2, "1": 4, "2": 8} and summary["bounds"] == [2, 4, 8]
    # the adapter holds the whole update: the stacked factors, Σ r_k = 14 columns per module
    assert summary["adapter_rank"] == 14
    assert all(u.whole()[0].shape[1] == 14 for u in run["state"].adapter.values())
    assert summary["bytes_per_round"] == np.mean(
        [r["bytes_sent"] + r["bytes_received"] for r in history[1:]]
    )
    assert history[0]["server_accuracy"] is not None  # the round-0 baseline
    assert len(history[2]["partition_energy"]) == 4


# --------------------------------------------------------------------------- reproducibility


def test_same_seed_gives_the_same_metrics(runs) -> None:
    a = method_run(runs, "raflora")
    b = runs("raflora-again", "federation.method=raflora")
    assert without_timing(a["history"]) == without_timing(b["history"])
    assert a["history"][1]["seconds"] > 0
    other = runs("raflora-seed-1", "federation.method=raflora", "run.seed=1")
    assert without_timing(other["history"]) != without_timing(a["history"])


RESUMABLE = {  # a run of each kind, stopped after round 1 and resumed
    "raflora": ["federation.method=raflora"],
    "flora": ["federation.method=flora", "federation.apply=merge"],
    "fedex": ["federation.method=fedex"],  # adapter + merged residuals
    "hetlora-pruned": [  # clients shrink their rank every round
        "federation.method=hetlora",
        "federation.options.prune_threshold=1e9",
        "federation.options.gamma=0.5",
    ],
    "partial": ["federation.method=flexlora", "federation.fraction_train=0.67", "run.seed=3"],
}


MERGING = ("flora", "fedex")  # runs whose rounds merge factors into the base


@pytest.mark.parametrize("kind", sorted(RESUMABLE))
def test_resume_reproduces_an_uninterrupted_run_exactly(runs, tiny_bert_dir, tmp_path, kind):
    overrides = RESUMABLE[kind]
    # raflora, flora, fedex: the same configs as the every-method runs, which are reused
    reuse = kind in ("raflora", "flora", "fedex")
    full = method_run(runs, kind) if reuse else runs(f"resume-{kind}", *overrides)
    assert full["config"] == tiny_config(tiny_bert_dir, *overrides)
    run_dir = tmp_path / "resumed"
    stopped = tiny_config(tiny_bert_dir, *overrides, "federation.rounds=1")
    run_in_process(stopped, run_dir, finish=False)
    assert not (run_dir / "checkpoints" / "round_002").exists()
    config = tiny_config(tiny_bert_dir, *overrides)
    resumed = run_in_process(config, run_dir, resume=True, finish=False)
    assert without_timing(resumed["history"]) == without_timing(full["history"])
    # round 1 was not run again: only round 2 went to the clients
    assert train_messages(resumed["grid"], 1) == []
    assert train_messages(resumed["grid"], 2) != []
    a, meta_a = load_checkpoint(full["run_dir"] / "checkpoints" / "round_002")
    b, meta_b = load_checkpoint(run_dir / "checkpoints" / "round_002")
    assert a.ranks == b.ranks and meta_a["bounds"] == meta_b["bounds"]
    for kind_of_update in ("adapter", "merged"):
        x, y = getattr(a, kind_of_update), getattr(b, kind_of_update)
        assert x.keys() == y.keys()
        for name in x:
            for part in ("U", "S", "Vt"):
                assert getattr(x[name], part).tobytes() == getattr(y[name], part).tobytes()
    assert all(a.dense[k].tobytes() == b.dense[k].tobytes() for k in a.dense)
    assert list(a.merged_rounds) == list(b.merged_rounds) == ([1, 2] if kind in MERGING else [])
    for t, factors in a.merged_rounds.items():
        for name, pair in factors.items():
            other = b.merged_rounds[t][name]
            assert all(x.tobytes() == y.tobytes() for x, y in zip(pair, other, strict=True))
    if kind == "hetlora-pruned":
        assert a.ranks != {0: 2, 1: 4, 2: 8}  # the pruning did happen


def test_resume_refuses_a_different_config(runs, tiny_bert_dir) -> None:
    run = method_run(runs, "raflora")
    before = (run["run_dir"] / "config.toml").read_text()
    changed = tiny_config(tiny_bert_dir, "train.lr=0.5")
    with pytest.raises(ConfigError, match=r"train\.lr: 0\.001 → 0\.5"):
        run_in_process(changed, run["run_dir"], resume=True, finish=False)
    assert (run["run_dir"] / "config.toml").read_text() == before  # still the run's config
    assert load_config(run["run_dir"] / "config.toml") == run["config"]


# --------------------------------------------------------------------------- export


@pytest.mark.parametrize("method", ["raflora", "flora", "fedex"])
def test_exported_adapter_reproduces_the_final_server_evaluation(runs, method, tmp_path) -> None:
    from peft import PeftModel

    run = method_run(runs, method)
    config = run["config"]
    path, rank = export_run(run["run_dir"], tmp_path / "adapter")
    assert rank == max(u.whole()[1].shape[0] for u in run["state"].total_update().values())
    adapter_config = json.loads((path / "adapter_config.json").read_text())
    assert adapter_config["r"] == rank
    # a user's own load: another seed for any fresh weights, PEFT's loader
    base, tokenizer = load_base_model(str(config.model.path), "classification", 2, seed=1234)
    model = PeftModel.from_pretrained(base, path)
    data = task.load_data(config.to_json())
    test = task.encode(config, take(data.test, range(len(data.test))), tokenizer, base)
    result = evaluate(model, test, batch_size=16)
    final = run["history"][-1]
    assert result["accuracy"] == final["server_accuracy"]
    assert result["loss"] == pytest.approx(final["server_loss"], rel=1e-5)


def test_export_at_a_lower_rank_and_bad_ranks(runs, tmp_path) -> None:
    run = method_run(runs, "raflora")
    path, rank = export_run(run["run_dir"], tmp_path / "r2", rank=2)
    assert rank == 2 and json.loads((path / "adapter_config.json").read_text())["r"] == 2
    full = max(u.rank for u in run["state"].adapter.values())
    with pytest.raises(ValueError, match="exceeds"):
        export_run(run["run_dir"], tmp_path / "big", rank=full + 1)
    with pytest.raises(ValueError, match=">= 1"):
        export_run(run["run_dir"], tmp_path / "zero", rank=0)
    with pytest.raises(FileNotFoundError):
        export_run(tmp_path / "nothing", tmp_path / "x")


# --------------------------------------------------------------------------- partial participation


def test_partial_participation_carries_uncovered_directions(runs) -> None:
    """4 clients of ranks 2, 4, 8, 4, half sampled per round; seed 7 samples {2, 3} then {0, 1}:
    in round 2 nobody covers directions (4, 8] of the rank-12 global update of round 1."""
    run = runs(
        "partial",
        "clients.num_clients=4",
        "clients.ranks=[2, 4, 8, 4]",
        "federation.fraction_train=0.5",
        "run.seed=7",
    )
    history, grid = run["history"], run["grid"]
    ranks = [2, 4, 8, 4]
    assert [r["clients"] for r in history[1:]] == [[2, 3], [0, 1]]
    for record in history[1:]:
        assert record["sampled"] == record["ok"] == 2
        sampled_max = max(ranks[pid] for pid in record["clients"])
        previous_rank = history[record["round"] - 1]["global_rank"] or 0
        if record["round"] > 1 and sampled_max < 8 and previous_rank > sampled_max:
            assert record["carried_energy_share"] > 0
        else:
            assert record["carried_energy_share"] == 0
    assert history[2]["carried_energy_share"] > 0  # the case above did happen
    # the carried directions are in the global update: rank 4 + 2 sampled + 4 carried
    assert history[2]["global_rank"] == 2 + 4 + 4
    assert {pid_of(grid, m) for m in train_messages(grid, 2)} == {0, 1}
    assert len(train_messages(grid, 1)) == 2


# --------------------------------------------------------------------------- failures


def test_failing_and_silent_clients_are_counted_and_the_rest_aggregated(runs) -> None:
    def silent_in_round_2(message, node_config) -> bool:
        return message.metadata.group_id == "2" and node_config["partition-id"] == 1

    run = runs(
        "faults",
        "faults.fraction=0.34",  # one client per round raises: partition 0 in rounds 1 and 2
        "federation.round_timeout_s=1",
        drop=silent_in_round_2,
    )
    history = run["history"]
    for record in history[1:]:
        assert record["ok"] + record["failed"] == 3 and record["failed"] >= 1
        assert any("InjectedFault" in reason for reason in record["failures"].values())
        assert not record["skipped"] and record["server_accuracy"] is not None
    assert "no reply before the round timeout" in history[2]["failures"].get("1", "")
    assert [r["clients"] for r in history[1:]] == [[1, 2], [2]]
    assert run["state"].ranks == {1: 4, 2: 8}  # only clients whose update was aggregated


def test_rounds_with_too_few_clients_are_skipped_and_nothing_is_exported(runs) -> None:
    run = runs("skipped", "faults.fraction=0.34", "federation.min_clients=3")
    history = run["history"]
    assert all(r["skipped"] and r["ok"] == 2 and r["failed"] == 1 for r in history[1:])
    assert run["state"].adapter == {} and run["state"].round == 2
    summary = finish_run(run["config"], run["run_dir"])
    assert summary["skipped_rounds"] == 2 and summary["adapter_rank"] is None
    assert summary["failed_clients"] == 2
    assert not (run["run_dir"] / "adapter").exists()
    # the server's evaluation is the round-0 model's every round
    assert history[2]["server_loss"] == history[0]["server_loss"]


def test_sparse_server_evaluation_and_clipped_updates(runs) -> None:
    """eval.every=2 of 3 rounds: the server evaluates rounds 0, 2 and the last; a tiny norm
    bound with the clip policy clips every module of every client (named in metrics.json) and
    still aggregates."""
    run = runs(
        "every-2-clip",
        "federation.rounds=3",
        "eval.every=2",
        "federation.max_update_norm=0.01",
        "federation.norm_policy=clip",
    )
    history = run["history"]
    assert [r["server_accuracy"] is not None for r in history] == [True, False, True, True]
    for r in history[1:]:  # every LoRA module (4) of every client, and heads that moved far
        assert r["clipped_modules"] >= 3 * 4 and r["ok"] == 3
        assert set(r["clipped"]) == {"0", "1", "2"}
    summary = finish_run(run["config"], run["run_dir"])
    assert summary["final_accuracy"] == history[3]["server_accuracy"]
    check_run_outputs(run["run_dir"], 3)


def test_a_frozen_head_is_neither_trained_nor_sent(runs) -> None:
    """model.train_head = false: every reply is accepted (no dense tensors expected or sent),
    rounds train, and the server's model keeps the seeded head (no dense state)."""
    run = runs("frozen_head", "model.train_head=false")
    history = run["history"]
    assert all(not r.get("skipped") and r["ok"] == 3 for r in history[1:])
    assert run["state"].dense == {} and run["state"].adapter != {}
    sent = train_messages(run["grid"], 2)
    assert sent and all(
        not any(k.startswith(msg.DENSE) for k in m.content[msg.ARRAYS]) for m in sent
    )
