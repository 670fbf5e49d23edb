"""Issue 22, "clear errors instead of tracebacks or hangs": each bad input is refused with one
line naming the config field and the fix (exit code 2 from `raflora run`), before Ray starts.

Each item's test failed on main b310f98 (a traceback, a hang, a silently wrong run, or an exit
code of 0 for a run whose every round was skipped); a few companions check that what is still
valid stays valid (the largest seed, TOML integers in float fields, the largest fitting rank).
Runs that would start Ray fail at once instead (`no_simulation`).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from helpers.runs import TINY
from raflora.cli import app
from raflora.config import Config, ConfigError, load_config

runner = CliRunner()


@pytest.fixture(autouse=True)
def no_simulation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every refusal here comes before Ray: a simulation that starts fails the test at once
    (on main several of these started Ray, then hung or failed every round)."""
    import flwr.simulation

    def started(*args: object, **kwargs: object) -> None:
        raise AssertionError("the simulation started")

    monkeypatch.setattr(flwr.simulation, "run_simulation", started)


def cli(*args: str) -> tuple[int, str]:
    """``raflora run …`` in this process: (exit code, stderr); a traceback fails the test."""
    result = runner.invoke(app, ["run", *args, "--no-progress"])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    return result.exit_code, result.stderr


def one_error_line(stderr: str) -> str:
    """The only non-empty stderr line, which starts with ``error: ``."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def refused(*args: str) -> str:
    """``raflora run`` refuses with exit code 2 and one line; that line."""
    code, stderr = cli(*args)
    assert code == 2, stderr
    return one_error_line(stderr)


# ----------------------------------------------------------------------------- config values


def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(b'[run]\nname = "\xff"\n')
    line = refused(str(path), "--out", str(tmp_path / "runs"))
    assert "bad.toml: not UTF-8 text" in line and "save it as UTF-8" in line, line


@pytest.mark.parametrize("seed", ["99999999999999999999999", "-1", str(2**32)])
def test_a_seed_outside_what_the_rngs_take_names_run_seed(tmp_path: Path, seed: str) -> None:
    line = refused(str(TINY), "--set", f"run.seed={seed}", "--out", str(tmp_path))
    assert line.startswith("error: run.seed: must be an integer from 0 to 4294967295"), line
    assert f"(got {seed})" in line


def test_the_largest_seed_seeds_every_library() -> None:
    import numpy as np
    import torch

    from raflora.federation.task import derived_seed

    seed = load_config(TINY, [f"run.seed={2**32 - 1}"]).run.seed
    np.random.seed(seed)  # the narrowest: numpy's legacy seeding (transformers' set_seed)
    np.random.default_rng(seed)
    torch.Generator().manual_seed(seed)
    assert 0 <= derived_seed(seed, "x") < 2**31


@pytest.mark.parametrize(
    "setting",
    ["federation.rounds=true", "train.lr=false", "clients.ranks=[2, true]", "run.seed=true"],
)
def test_booleans_are_not_numbers(setting: str) -> None:
    field = setting.split("=")[0]
    with pytest.raises(ConfigError) as caught:
        load_config(TINY, [setting])
    message = str(caught.value)
    assert message.startswith(field) and "expected a number, got the boolean" in message
    assert "\n" not in message


def test_toml_integers_still_fill_float_fields(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[train]\nlr = 1\n[clients]\nmemory_budgets_mb = [500]\n")
    config = load_config(path)
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)
    assert config.clients.memory_budgets_mb == [500.0]


@pytest.mark.parametrize("name", ["../../x", "a/b", "..", ".", "", "a\\b", "/abs"])
def test_a_run_name_cannot_leave_the_out_folder(tmp_path: Path, name: str) -> None:
    line = refused(str(TINY), "--set", f"run.name={name!r}", "--out", str(tmp_path / "o"))
    assert line.startswith("error: run.name: ") and "not a plain folder name" in line, line
    assert not (tmp_path / "o").exists() and not (tmp_path / "x").exists()


def test_negative_memory_budgets_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"^clients\.memory_budgets_mb\.0: .*greater than 0"):
        load_config(None, ["clients.memory_budgets_mb=[-5]"])


# ----------------------------------------------------------------------------- resume


def test_resume_follows_the_run_folder_not_the_out_string(
    tiny_bert_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run started with a relative --out resumes from an absolute one, after its folder was
    moved and renamed: the folder is the run, not the string it was first named by."""
    import shutil

    from helpers.runs import run_in_process, tiny_config

    monkeypatch.chdir(tmp_path)
    first = tiny_config(tiny_bert_dir, "run.out_dir='runs'", "run.name='a'", "federation.rounds=1")
    run_in_process(first, Path("runs") / "a", finish=False)
    moved = tmp_path / "elsewhere" / "b"
    shutil.move(tmp_path / "runs" / "a", moved)
    again = tiny_config(
        tiny_bert_dir, f"run.out_dir={str(moved.parent)!r}", "run.name='b'", "federation.rounds=2"
    )
    resumed = run_in_process(again, moved, resume=True, finish=False)
    assert [record["round"] for record in resumed["history"]] == [0, 1, 2]
    assert load_config(moved / "config.toml").run.out_dir == str(moved.parent)


# ----------------------------------------------------------------------------- preflight


def tiny_run(tiny_bert_dir: Path, tmp_path: Path, *settings: str) -> list[str]:
    """`raflora run` arguments for examples/tiny.toml on the tiny BERT (hidden 32, 128
    positions) with a few examples, writing under tmp_path/runs."""
    args = [str(TINY), "--out", str(tmp_path / "runs")]
    for setting in (
        f"model.path={str(tiny_bert_dir)!r}",
        "data.train_size=120",
        "data.test_size=40",
        *settings,
    ):
        args += ["--set", setting]
    return args


def test_memory_budgets_that_fit_no_rank_name_the_smallest_that_works(
    tiny_bert_dir: Path, tmp_path: Path
) -> None:
    from raflora.federation import task
    from raflora.training.ranks import base_memory_mb, lora_params_per_rank, training_memory_mb

    config = load_config(None, [f"model.path={str(tiny_bert_dir)!r}"])
    base, _ = task.load_base(config.to_json(), 2)
    per_rank = lora_params_per_rank(base, task.target_modules(config, base))
    need = training_memory_mb(2, per_rank, base_memory_mb(base))  # the smallest candidate
    path = tmp_path / "budgets.toml"
    path.write_text(TINY.read_text().replace("ranks = [2, 4, 8]", "memory_budgets_mb = [1]"))
    args = tiny_run(tiny_bert_dir, tmp_path)
    args[0] = str(path)
    line = refused(*args)
    assert line.startswith("error: clients.memory_budgets_mb: client 0: memory budget 1 MB"), line
    smallest = float(line.split("smallest budget that works is ")[1].split(" MB")[0])
    assert need <= smallest < need + 0.1
    assert not (tmp_path / "runs").exists()
    # and that budget does work, while one just below what rank 2 needs does not
    model = f"model.path={str(tiny_bert_dir)!r}"
    fits = load_config(path, [model, f"clients.memory_budgets_mb=[{smallest}]"])
    assert min(task.client_ranks(fits, base)) >= 2
    short = load_config(path, [model, f"clients.memory_budgets_mb=[{need * 0.9999}]"])
    with pytest.raises(ValueError, match="fits no candidate rank"):
        task.client_ranks(short, base)


def test_a_max_length_beyond_the_models_positions_is_refused(
    tiny_bert_dir: Path, tmp_path: Path
) -> None:
    line = refused(*tiny_run(tiny_bert_dir, tmp_path, "model.max_length=129"))
    assert line.startswith("error: model.max_length=129 exceeds the 128 positions"), line
    assert "use model.max_length ≤ 128" in line
    assert not (tmp_path / "runs").exists()


def test_a_rank_above_a_layers_width_is_refused_before_ray(
    tiny_bert_dir: Path, tmp_path: Path
) -> None:
    line = refused(*tiny_run(tiny_bert_dir, tmp_path, "clients.ranks=[2, 4, 33]"))
    assert line.startswith("error: clients.ranks: rank above 32 = min(out, in)"), line
    assert "(client 2: 33); use ranks ≤ 32" in line


def test_the_largest_fitting_rank_passes_preflight(tiny_bert_dir: Path) -> None:
    from raflora.federation.preflight import check_data, check_model

    config = load_config(TINY, [f"model.path={str(tiny_bert_dir)!r}", "clients.ranks=[32]"])
    check_model(config, check_data(config))  # raises nothing


def test_resources_the_machine_lacks_are_refused_before_ray(tmp_path: Path) -> None:
    import os

    import torch

    from raflora.federation.preflight import usable_cpus

    cpus, gpus, cores = os.cpu_count() or 1, torch.cuda.device_count(), usable_cpus()
    out = ["--out", str(tmp_path)]
    line = refused(str(TINY), "--set", f"simulation.num_cpus_per_client={cpus + 1}", *out)
    assert line.startswith(f"error: simulation.num_cpus_per_client={cpus + 1} exceeds the "), line
    assert f"use at most {cpus}" in line
    line = refused(str(TINY), "--set", f"simulation.num_gpus_per_client={gpus + 0.5}", *out)
    assert line.startswith("error: simulation.num_gpus_per_client="), line
    assert ("set it to 0" if gpus == 0 else f"at most {gpus}") in line
    line = refused(str(TINY), "--set", "simulation.num_cpus_per_client=1e-9", *out)
    assert line.startswith("error: simulation.num_cpus_per_client=1e-09: Ray counts"), line
    for field in ("train.threads", "federation.server_threads"):
        line = refused(str(TINY), "--set", f"{field}={cores + 1}", *out)
        assert line.startswith(f"error: {field}={cores + 1} exceeds the {cores} CPU cores"), line
    assert not any(tmp_path.iterdir())


def test_memory_budgets_that_pick_a_rank_above_a_layer_name_the_candidates(
    tiny_bert_dir: Path, tmp_path: Path
) -> None:
    path = tmp_path / "budgets.toml"
    path.write_text(TINY.read_text().replace("ranks = [2, 4, 8]", "memory_budgets_mb = [1000]"))
    args = tiny_run(tiny_bert_dir, tmp_path)
    args[0] = str(path)
    line = refused(*args)  # 1000 MB fits rank 64 on a model whose layers are 32 wide
    assert line.startswith("error: clients.candidate_ranks: rank above 32"), line
    assert "(client 0: 64, client 1: 64, client 2: 64)" in line


# ----------------------------------------------------------------------------- failed runs


def test_a_run_whose_rounds_were_skipped_exits_non_zero_and_says_why(
    tiny_bert_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """faults.fraction=0.34 makes partition 0 raise in rounds 1 and 2; with min_clients=3 both
    rounds are skipped. The run finishes (outputs written) but `raflora run` exits 1."""
    from helpers.runs import run_in_process
    from raflora.federation import simulation

    def in_process(config, run_dir=None, *, resume=False, reporter=None):  # no Ray
        run_dir = Path(config.run.out_dir) / config.run.name
        return run_in_process(config, run_dir, resume=resume)["summary"]

    monkeypatch.setattr(simulation, "run_federated", in_process)
    args = tiny_run(tiny_bert_dir, tmp_path, "faults.fraction=0.34", "federation.min_clients=3")
    code, stderr = cli(*args, "--set", "model.max_length=24", "--set", "train.local_steps=2")
    assert code == 1, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert errors[0].startswith("error: 2 of 2 round(s) skipped (rounds 1, 2): fewer than ")
    assert "federation.min_clients=3" in errors[0]
    assert errors[1].startswith("error: client 0 failed in every round it was sampled in (2): ")
    assert "InjectedFault" in errors[1] and len(errors) == 2
    run_json = tmp_path / "runs" / "tiny" / "run.json"
    assert json.loads(run_json.read_text())["problems"] == [e[len("error: ") :] for e in errors]


def test_run_problems_count_rejections_and_spare_clients_that_contributed_once() -> None:
    from raflora.federation.finish import run_problems

    history = [
        {"round": 0},
        {"round": 1, "clients": [1], "failures": {"0": "boom"}, "rejections": {"2": "norm"}},
        {"round": 2, "clients": [0], "failures": {}, "rejections": {"2": "norm"}},
        {"round": 3, "clients": [0, 1], "failures": {}, "rejections": {}},  # 2 not sampled
    ]
    assert run_problems(history, 1) == [
        "client 2 failed in every round it was sampled in (2): norm"
    ]
    assert run_problems(history[:2], 1) == [
        "client 0 failed in every round it was sampled in (1): boom",
        "client 2 failed in every round it was sampled in (1): norm",
    ]
    skipped = [*history[:2], {**history[2], "skipped": True}]
    assert run_problems(skipped, 2)[0].startswith("1 of 2 round(s) skipped (rounds 2): fewer")


# ----------------------------------------------------------------------------- labels


def labelled(path: Path, labels: list) -> Path:
    """A JSONL file, one row per label (written as JSON: NaN as the bare token NaN)."""
    path.write_text("".join(json.dumps({"text": f"row {i}", "label": v}) + "\n"
                            for i, v in enumerate(labels)))  # fmt: skip
    return path


ROWS = [0, 1] * 20


@pytest.mark.parametrize(
    ("label", "says"),
    [
        (float("nan"), "label nan is a missing or non-finite value, not a class"),
        ("NaN", "label 'NaN' is a missing or non-finite value"),
        (float("inf"), "label inf is a missing or non-finite value"),
        ([1], "label [1] is a list; labels are strings or integers"),
    ],
)
def test_a_nan_label_is_refused_with_its_line(tmp_path: Path, label, says: str) -> None:
    path = labelled(tmp_path / "d.jsonl", [*ROWS[:6], label, *ROWS[6:]])
    line = refused(str(TINY), "--set", f"data.name={str(path)!r}", "--out", str(tmp_path / "r"))
    assert line.startswith(f"error: {path} line 7: field 'label': {says}"), line


def test_one_stray_integer_label_is_refused_and_points_to_data_labels(tmp_path: Path) -> None:
    path = labelled(tmp_path / "d.jsonl", [*ROWS[:9], 50, *ROWS[9:]])
    line = refused(str(TINY), "--set", f"data.name={str(path)!r}", "--out", str(tmp_path / "r"))
    assert line.startswith(f"error: {path} line 10: field 'label': label 50 out of range"), line
    assert "must be the classes 0..2 (3 distinct values: 0, 1, 50)" in line
    assert "list the classes in data.labels (e.g. labels = [0, 1, 50])" in line


def test_data_labels_declares_the_classes_in_order(tmp_path: Path) -> None:
    from raflora.federation.task import load_data

    path = labelled(tmp_path / "d.jsonl", [*ROWS[:9], 50, 50, 50, *ROWS[9:]])
    config = load_config(TINY, [f"data.name={str(path)!r}", "data.labels=[0, 1, 50]"])
    assert config.data.labels == ["0", "1", "50"]
    data = load_data(config.to_json())
    assert data.num_labels == 3 and data.label_names == ("0", "1", "50")
    everything = sorted([*data.labels("train"), *data.labels("test")])
    assert everything == sorted([*ROWS, 2, 2, 2])  # 50 is class 2
    words = labelled(tmp_path / "w.jsonl", ["pos", "neg", "meh"] * 10)
    config = load_config(TINY, [f"data.name={str(words)!r}", "data.labels=['pos', 'neg', 'meh']"])
    assert load_data(config.to_json()).label_names == ("pos", "neg", "meh")  # not sorted


def test_a_label_outside_data_labels_is_refused(tmp_path: Path) -> None:
    path = labelled(tmp_path / "d.jsonl", [*ROWS[:4], 7, *ROWS[4:]])
    line = refused(
        str(TINY), "--set", f"data.name={str(path)!r}", "--set", "data.labels=[0, 1]",
        "--out", str(tmp_path / "r"),
    )  # fmt: skip
    assert line.startswith(f"error: {path} line 5: field 'label': label 7 is not one of "), line
    assert "data.labels [0, 1]" in line


@pytest.mark.parametrize(
    ("labels", "says"),
    [
        ("[1]", "data.labels: classification needs at least 2 classes"),
        ("[0, '0']", "data.labels: each class once (repeated: ['0'])"),
        ("[0, true]", "data.labels.1: labels are strings or integers (got True)"),
    ],
)
def test_bad_data_labels_name_the_field(labels: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(TINY, [f"data.labels={labels}"])
    assert str(caught.value).startswith(says), caught.value


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_hashes_catch_accidents_not_forgery(tmp_path: Path) -> None:
    """What the README says of the hashes, shown: a changed array with stale hashes is refused,
    the same change with its hashes recomputed (no key needed) loads."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    from helpers.runs import ROOT
    from raflora.federation import checkpoint as ckpt
    from raflora.math.round import GlobalState

    state = GlobalState(1, {}, {}, {"head": np.ones((2, 3), np.float32)}, {0: 2})
    path = ckpt.save_checkpoint(tmp_path, state, {"history": []})
    arrays = load_file(str(path / ckpt.ARRAYS))
    arrays["dense/head"] = arrays["dense/head"] * 1000  # a forged head
    save_file(arrays, str(path / ckpt.ARRAYS))
    with pytest.raises(ckpt.CheckpointError, match="SHA-256 does not match"):
        ckpt.load_checkpoint(path)
    meta = json.loads((path / ckpt.META).read_text())
    meta["sha256"] = ckpt._sha256(path / ckpt.ARRAYS)
    meta["meta_sha256"] = ckpt._meta_digest(meta)
    (path / ckpt.META).write_text(json.dumps(meta))
    forged, _ = ckpt.load_checkpoint(path)
    assert forged.dense["head"][0, 0] == 1000.0
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "SHA-256 hashes have no key, so they catch accidents" in readme
    assert "not forgery" in readme


def test_data_labels_on_a_shipped_dataset_is_refused(tmp_path: Path) -> None:
    line = refused(str(TINY), "--set", "data.labels=['a', 'b']", "--out", str(tmp_path))
    assert line.startswith("error: data.labels: 'rotten_tomatoes' is a shipped dataset"), line


# ----------------------------------------------------------------------------- fuzzing the CLI

SECTIONS = {name: sorted(f.annotation.model_fields) for name, f in Config.model_fields.items()}
FIELD_NAMES = [f"{section}.{name}" for section, names in SECTIONS.items() for name in names]
WORD = st.from_regex(r"[a-z_][a-z0-9_]{0,6}", fullmatch=True)
TEXT = ["minilm", "raflora", "flexlora", "hetlora", "fedit", "flora", "iid", "dirichlet",
        "merge", "adapter", "clip", "reject", "sqrt", "classification", "causal-lm",
        "image-classification", "sst2", "mnist5k", "commonsense", "raise", "stall", "..", "/",
        "", "nan", "-inf", "1e999", "NaN"]  # fmt: skip


def _toml_float(value: float) -> str:
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return repr(value)  # 1.0, 1e+300: both TOML floats


SCALAR = st.one_of(
    st.integers(-(2**70), 2**70).map(str),  # beyond int64: TOML reads it, the fields must not
    st.sampled_from([0, 1, 2, 3, 8, 33, 64, 129, -1, 2**32, 10**6]).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(_toml_float),
    st.sampled_from(["0.5", "1e-9", "0.0", "1.5", "1e300"]),
    st.booleans().map(lambda b: str(b).lower()),
    st.sampled_from(TEXT).map(json.dumps),  # a TOML string
    st.sampled_from(TEXT),  # bare: not TOML, so `--set` takes it as a string
    st.text(max_size=12),  # anything at all
)
VALUE = st.recursive(
    SCALAR,
    lambda inner: (
        st.lists(inner, max_size=3).map(lambda items: "[" + ", ".join(items) + "]")
        | st.dictionaries(WORD, inner, max_size=2).map(
            lambda table: "{" + ", ".join(f"{k} = {v}" for k, v in table.items()) + "}"
        )
    ),
    max_leaves=5,
)
KEY = st.one_of(
    st.sampled_from(FIELD_NAMES),
    st.sampled_from(FIELD_NAMES).map(lambda name: name + ".x"),  # into a value
    st.tuples(st.sampled_from(sorted(SECTIONS)), WORD).map(".".join),  # unknown key
    st.tuples(WORD, WORD).map(".".join),  # unknown section
    st.sampled_from(["federation.options.weighting", "clients.rank_tiers.2"]),
)


def plausible(field: str) -> st.SearchStrategy[str]:
    """A value of the field's own type and about its size (these reach the checks before Ray
    more often than arbitrary values, which mostly fail validation)."""
    section, name = field.split(".")
    default = getattr(getattr(Config(), section), name)
    if isinstance(default, bool):
        return st.booleans().map(lambda b: str(b).lower())
    if isinstance(default, int):
        return st.integers(0, 70).map(str)
    if isinstance(default, float):
        return st.floats(0, 2).map(repr)
    if isinstance(default, list):
        return st.lists(st.integers(1, 40).map(str), min_size=1, max_size=3).map(
            lambda items: "[" + ", ".join(items) + "]"
        )
    if isinstance(default, str):
        return st.sampled_from(TEXT).map(json.dumps)
    return SCALAR


ARBITRARY = st.tuples(KEY, VALUE).map("=".join)
TYPED = st.sampled_from(FIELD_NAMES).flatmap(lambda f: plausible(f).map(lambda v: f"{f}={v}"))
OVERRIDES = st.lists(ARBITRARY | TYPED | TYPED, min_size=1, max_size=3)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(overrides=OVERRIDES)
@example(overrides=["run.out_dir={}"])  # invalid alone; --out replaces it, so the run is valid
def test_fuzzed_overrides_are_valid_or_one_line_and_exit_2(
    tiny_bert_dir: Path, tmp_path: Path, overrides: list[str]
) -> None:
    """`raflora run --dry-run` (config, then every check before Ray) on random overrides: exit 0
    for a config that is valid and passes preflight, else exit 2 with a single stderr line;
    never a traceback (the CLI runner returns any exception)."""
    out = tmp_path / "fuzz"
    settings_ = [f"model.path={str(tiny_bert_dir)!r}", "data.train_size=120", *overrides]
    args = [str(TINY), "--out", str(out), "--dry-run"]
    code, stderr = cli(*args, *(part for s in settings_ for part in ("--set", s)))
    event(f"exit {code}")
    if code == 2:
        assert "Traceback" not in one_error_line(stderr)
    else:
        assert code == 0, stderr
        assert "error:" not in stderr
        # valid as the CLI built it, --out last (raises ConfigError otherwise)
        load_config(TINY, [*settings_, f"run.out_dir={str(out)!r}"])
    assert not out.exists()  # --dry-run writes nothing


def test_a_bad_config_in_a_subprocess_is_one_stderr_line_and_exit_2(tmp_path: Path) -> None:
    """The installed CLI as a user runs it: a non-UTF-8 file and a bad override, one line each."""
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b'[run]\nname = "\xff"\n')
    for args in (
        [str(bad)],
        [str(TINY), "--set", "federation.rounds=true", "--set", "run.name=../x"],
    ):
        done = subprocess.run(
            [sys.executable, "-m", "raflora.cli", "run", *args, "--out", str(tmp_path / "o")],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 2, done.stderr
        lines = done.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert lines[0].startswith("error: run.name: '../x' is not a plain folder name"), lines
    assert "; federation.rounds: expected a number, got the boolean true" in lines[0]
    assert not (tmp_path / "o").exists()
