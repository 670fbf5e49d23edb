"""Bad configs and bad data files give one-line errors naming the problem, never a traceback.

The config loader is fuzzed with hypothesis (arbitrary nested values under the real section and
field names, TOML files, ``--set`` strings): the result is a valid `Config` or a `ConfigError`
whose every line names a field. Malformed data files, out-of-range labels and impossible client
partitions go through ``raflora run`` itself: exit code 2 and one ``error:`` line on stderr,
found before Ray starts (see `raflora.federation.preflight`).
"""

from __future__ import annotations

import datetime
import json
import math
import re
from pathlib import Path

import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from helpers.runs import TINY
from raflora.cli import app
from raflora.config import Config, ConfigError, config_from_dict, load_config

SECTIONS = {
    name: sorted(field.annotation.model_fields) for name, field in Config.model_fields.items()
}
KEY = st.from_regex(r"[a-z_][a-z0-9_]{0,7}", fullmatch=True)
SPECIAL = [  # values that reach deeper validators or were trouble before
    "minilm", "raflora", "flexlora", "hetlora", "fedit", "flora", "iid", "dirichlet", "merge",
    "stall", "reject", "clip", "us", "sqrt", "classification", "causal-lm", "~", "~nouser_xyz/m",
    "a" * 300, "x/" * 200, "org/model", "", " ", "\x00", "1e999", "nan", "-1", "2",
]  # fmt: skip
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, 2, 3, 4, 8, 16, -1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 0.3, 0.5, 1.0, 1e-9, 1e300]),
    st.text(max_size=40),
    st.sampled_from(SPECIAL),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(KEY | st.just("2"), inner, max_size=3)
    ),
    max_leaves=8,
)


NASTY_VALUES = [*SPECIAL, math.nan, math.inf, -math.inf, 0, -1, 10**30, True, [], {}, [0]]
NASTY = st.sampled_from(NASTY_VALUES)


@st.composite
def config_dicts(draw, values=VALUES) -> dict:
    """Sections and fields mostly by their real names, so the validators are exercised."""
    data: dict = {}
    for _ in range(draw(st.integers(0, 4))):
        section = draw(st.sampled_from(sorted(SECTIONS)) | KEY)
        if draw(st.integers(0, 9)) == 0:
            data[section] = draw(values)  # a section that is not a table
            continue
        fields = st.sampled_from(SECTIONS.get(section, ["x"])) | KEY
        data[section] = draw(st.dictionaries(fields, NASTY | values, max_size=4))
    return data


FIELD = re.compile(r"^(?P<field>[A-Za-z0-9_.\[\]-]+): \S")


def assert_names_fields(error: ConfigError, data: dict, overrides: list[str] = ()) -> None:
    text = str(error)
    assert text.strip(), "empty error"
    known = {"config", *SECTIONS, *data, *(o.split(".")[0].strip() for o in overrides)}
    for line in text.splitlines():
        match = FIELD.match(line)
        assert match, f"line does not start with a field: {line!r}"
        assert match["field"].split(".")[0] in known, line
        assert "Traceback" not in line


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config_dicts())
def test_fuzzed_config_dicts_validate_or_name_the_field(data: dict) -> None:
    try:
        config = config_from_dict(data)
    except ConfigError as error:
        assert_names_fields(error, data)
        return
    assert isinstance(config, Config)
    assert config_from_dict(json.loads(config.to_json())) == config  # what was saved reloads


FIELDS = [(section, field) for section, names in SECTIONS.items() for field in names]


def test_every_field_with_every_nasty_value_validates_or_names_itself() -> None:
    """Exhaustive where hypothesis is unlikely to look: each field × each nasty value."""
    for section, field in FIELDS:
        for value in NASTY_VALUES:
            try:
                config_from_dict({section: {field: value}})
            except ConfigError as error:
                assert_names_fields(error, {})
                assert str(error).startswith((f"{section}.{field}", section, "config")), error


TOML_SCALARS = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(SPECIAL[:-3]),
    st.dates(),
    st.datetimes(),
    st.times(),
)
TOML_VALUES = st.recursive(
    TOML_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEY, inner, max_size=3),
    max_leaves=6,
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=config_dicts(TOML_VALUES), overrides=st.lists(st.text(max_size=30), max_size=3))
def test_fuzzed_toml_files_and_overrides_validate_or_name_the_field(
    tmp_path: Path, data: dict, overrides: list[str]
) -> None:
    path = tmp_path / "fuzz.toml"
    path.write_text(tomli_w.dumps(data))
    for extra in ([], overrides):
        try:
            config = load_config(path, extra)
        except ConfigError as error:
            if not str(error).startswith(("--set ", f"{path}: not valid TOML")):
                assert_names_fields(error, data, extra)
            assert "\n" not in str(error) or all(FIELD.match(x) for x in str(error).splitlines())
            continue
        saved = tmp_path / "saved.toml"
        saved.write_text(config.to_toml())
        assert load_config(saved) == config


@pytest.mark.parametrize(
    ("toml", "says"),
    [
        ("[run]\nname = 1979-05-27\n", "run.name: Input should be a valid string"),
        ("[train]\nlr = nan\n", "train.lr: Input should be a finite number"),
        ("[faults]\nstall_s = inf\n", "faults.stall_s: Input should be a finite number"),
        ("[clients]\nrank_tiers = {2 = nan, 4 = 0.5}\n", "clients.rank_tiers.2"),
        ("[clients]\nmemory_budgets_mb = [-inf]\n", "clients.memory_budgets_mb.0"),
        ("[model]\npath = '~nouser_xyz/model'\n", "model.path: '~nouser_xyz/model'"),
        (f"[model]\npath = '{'a' * 300}'\n", "model.path: 'aaaa"),
    ],
)
def test_values_that_used_to_escape_validation(tmp_path: Path, toml: str, says: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value).startswith(says), str(error.value)
    assert "\n" not in str(error.value)


def test_dates_and_times_in_a_file_are_errors_not_crashes(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(tomli_w.dumps({"run": {"seed": datetime.time(1, 2)}}))
    with pytest.raises(ConfigError, match=r"^run\.seed: Input should be a valid integer"):
        load_config(path)


# --------------------------------------------------------------------------- data through the CLI

runner = CliRunner()


def cli_run(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["run", str(TINY), "--no-progress", *args])
    assert not isinstance(result.exception, Exception) or isinstance(
        result.exception, SystemExit
    ), result.exception
    return result.exit_code, result.stderr


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    assert "Traceback" not in stderr
    return errors[0]


def rows(n: int, labels: int = 2) -> list[dict]:
    return [{"text": f"sentence number {i}", "label": i % labels} for i in range(n)]


def jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


BAD_FILES = {
    "bad JSON line": (
        "d.jsonl",
        '{"text": "a", "label": 0}\n{"text": "b", label: 1}\n',
        r"d\.jsonl line 2: malformed JSON",
    ),
    "missing field": (
        "d.jsonl",
        '{"text": "a", "label": 0}\n{"sentence": "b", "label": 1}\n',
        r"d\.jsonl line 2: missing field 'text'",
    ),
    "empty jsonl": ("d.jsonl", "", r"d\.jsonl: empty file"),
    "blank lines only": ("d.jsonl", "\n\n  \n", r"d\.jsonl: empty file"),
    "not UTF-8": ("d.jsonl", b'{"text": "\xff\xfe", "label": 0}\n', r"d\.jsonl: not UTF-8 text"),
    "negative label": (
        "d.jsonl",
        '{"text": "a", "label": 0}\n{"text": "b", "label": -1}\n',
        r"d\.jsonl line 2: field 'label': label -1 out of range",
    ),
    "absurd label": (
        "d.jsonl",
        '{"text": "a", "label": 0}\n{"text": "b", "label": 100000000}\n',
        r"d\.jsonl line 2: field 'label': label 100000000 out of range",
    ),
    "one class": (
        "d.jsonl",
        '{"text": "a", "label": "pos"}\n{"text": "b", "label": "pos"}\n',
        r"d\.jsonl: only one label value \('pos'\)",
    ),
    "empty csv": ("d.csv", "", r"d\.csv: empty file"),
    "csv header only": ("d.csv", "text,label\n", r"d\.csv: empty file"),
    "ragged csv": ("d.csv", "text,label\na,0\nb,1,extra\n", r"d\.csv: malformed CSV"),
    "csv missing column": ("d.csv", "body,label\na,0\n", r"d\.csv line 2: no text field"),
    "csv empty cell": ("d.csv", "text,label\na,0\n,1\n", r"d\.csv line 3: field 'text' is empty"),
    "broken parquet": ("d.parquet", b"PAR1 not really", r"d\.parquet: unreadable Parquet"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_data_files_stop_the_cli_with_one_line(tmp_path: Path, case: str) -> None:
    name, content, says = BAD_FILES[case]
    path = tmp_path / name
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    code, stderr = cli_run("--set", f"data.name={str(path)!r}", "--out", str(tmp_path / "runs"))
    assert code == 2
    line = one_error_line(stderr)
    assert re.search(says, line), line
    assert not (tmp_path / "runs").exists()  # refused before anything was written


def test_a_missing_data_path_names_data_name(tmp_path: Path) -> None:
    code, stderr = cli_run("--set", f"data.name={str(tmp_path / 'nope.jsonl')!r}")
    assert code == 2
    assert "data.name" in one_error_line(stderr) and "no such file" in stderr


@pytest.mark.parametrize(
    ("settings_", "says"),
    [
        (["clients.num_clients=50", "data.partition=iid", "data.min_client_size=1"],
         r"data\.partition=iid \(clients\.num_clients=50, data\.min_client_size=1\): "
         r"48 examples cannot give 50 clients 1 each"),
        (["clients.num_clients=7", "data.partition=iid"],
         r"data\.min_client_size=8\): 48 examples cannot give 7 clients 8 each"),
        (["clients.num_clients=50"],
         r"data\.min_client_size=8.*: 48 examples cannot give 50 clients 8 each"),
        (["clients.num_clients=6", "data.dirichlet_alpha=0.01", "data.min_client_size=5"],
         r"data\.dirichlet_alpha=0\.01.*no Dirichlet\(alpha=0\.01\) split"),
    ],
)  # fmt: skip
def test_impossible_client_partitions_stop_the_cli(
    tmp_path: Path, settings_: list[str], says: str
) -> None:
    path = jsonl(tmp_path / "d.jsonl", rows(60))
    args = ["--set", f"data.name={str(path)!r}", "--out", str(tmp_path / "runs")]
    for setting in [*settings_, "clients.ranks=[2]"]:
        args += ["--set", setting]
    code, stderr = cli_run(*args)
    assert code == 2
    assert re.search(says, one_error_line(stderr)), stderr


def test_a_data_set_too_small_for_a_test_split_is_refused(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "d.jsonl", rows(3, labels=3))  # one per class: nothing to hold out
    settings_ = ["clients.num_clients=1", "clients.ranks=[2]", "data.min_client_size=1"]
    code, stderr = cli_run("--set", f"data.name={str(path)!r}", *[f"--set={s}" for s in settings_])
    assert code == 2
    assert "no test examples" in one_error_line(stderr)


def test_local_validation_never_takes_a_clients_last_example() -> None:
    import numpy as np

    from raflora.federation.task import local_split

    config = load_config(None, ["data.local_val_fraction=0.9"])
    for size in (1, 2, 3, 10):
        train, val = local_split(config, np.arange(size), client=0)
        assert len(train) >= 1 and len(train) + len(val) == size
    assert math.isclose(len(local_split(config, np.arange(100), 0)[1]), 90)


def test_a_rank_above_a_target_modules_size_is_refused(tiny_bert_dir: Path, tmp_path: Path):
    from helpers.runs import run_in_process, tiny_config
    from raflora.federation.server import check_ranks_fit
    from raflora.federation.strategy import NodeInfo

    modules = {"l.query": (32, 32), "l.up": (64, 32), "l.wide": (64, 128)}
    check_ranks_fit([NodeInfo(0, 0, 32, 10), NodeInfo(1, 1, 2, 10)], modules)  # at the limit
    nodes = [NodeInfo(7, 0, 2, 10), NodeInfo(8, 1, 33, 10), NodeInfo(9, 2, 40, 10)]
    with pytest.raises(ConfigError) as caught:
        check_ranks_fit(nodes, modules)
    message = str(caught.value)
    assert message.startswith("clients.ranks: rank above 32 = min(out, in) of target module")
    assert "(client 1: 33, client 2: 40); use ranks ≤ 32" in message and "\n" not in message

    config = tiny_config(tiny_bert_dir, "clients.ranks=[2, 4, 40]")  # hidden size 32
    with pytest.raises(ConfigError, match=r"rank above 32 .*\(client 2: 40\)"):
        run_in_process(config, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any round
