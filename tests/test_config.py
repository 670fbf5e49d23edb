"""The run configuration: defaults, one-line errors naming the field, overrides, TOML round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from raflora.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    load_config,
    parse_override,
)
from raflora.math import available_methods

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def error_of(data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    return str(info.value)


def test_defaults_are_valid() -> None:
    config = load_config()
    assert config == Config()
    assert config.federation.method in available_methods()
    assert config.federation.carry_over_enabled  # raflora: on by default


def test_shipped_examples_are_valid_and_round_trip(tmp_path: Path) -> None:
    paths = [p for p in sorted(EXAMPLES.glob("*.toml")) if not p.name.startswith("suite")]
    assert {p.name for p in paths} >= {"tiny.toml"}  # suite_*.toml are experiment grids
    for path in paths:
        config = load_config(path)
        (tmp_path / path.name).write_text(config.to_toml())
        assert load_config(tmp_path / path.name) == config


@pytest.mark.parametrize(
    ("data", "field", "says"),
    [
        ({"federation": {"methd": "raflora"}}, "federation.methd", "`raflora config` lists"),
        ({"trian": {}}, "trian", "unknown key"),
        ({"federation": {"rounds": "three"}}, "federation.rounds", "valid integer"),
        ({"federation": {"rounds": 0}}, "federation.rounds", "greater than 0"),
        ({"clients": {"ranks": [2, 0, 8]}}, "clients.ranks", "rank must be >= 1 (got 0)"),
        ({"clients": {"ranks": [-4]}}, "clients.ranks", "rank must be >= 1"),
        ({"clients": {"ranks": []}}, "clients.ranks", "at least one rank"),
        ({"clients": {"ranks": [2.5]}}, "clients.ranks.0", "valid integer"),
        ({"clients": {"num_clients": 0}}, "clients.num_clients", "greater than 0"),
        ({"clients": {"rank_tiers": {"4": 0.5, "8": 0.3}}}, "clients.rank_tiers", "sum to 1"),
        ({"clients": {"rank_tiers": {"0": 1.0}}}, "clients.rank_tiers", ">= 1"),
        ({"data": {"dirichlet_alpha": 0}}, "data.dirichlet_alpha", "greater than 0"),
        ({"data": {"dirichlet_alpha": -1.0}}, "data.dirichlet_alpha", "greater than 0"),
        ({"data": {"partition": "random"}}, "data.partition", "'iid' or 'dirichlet'"),
        ({"model": {"path": "/no/such/model"}}, "model.path", "'/no/such/model': not a shipped"),
        ({"model": {"lora_dropout": 1.0}}, "model.lora_dropout", "less than 1"),
        ({"federation": {"method": "fedsvd"}}, "federation.method", "unknown method 'fedsvd'"),
        ({"federation": {"fraction_train": 1.5}}, "federation.fraction_train", "less than or"),
        ({"federation": {"apply": "both"}}, "federation.apply", "'adapter' or 'merge'"),
        ({"train": {"local_steps": 0}}, "train", "exactly one of local_steps"),
        ({"train": {"lr": -1e-3}}, "train.lr", "greater than 0"),
    ],
)
def test_bad_values_give_one_line_naming_the_field(data: dict, field: str, says: str) -> None:
    message = error_of(data)
    assert "\n" not in message
    assert message.startswith(f"{field}: "), message
    assert says in message


def test_unknown_method_lists_the_known_ones() -> None:
    message = error_of({"federation": {"method": "fedsvd"}})
    assert all(name in message for name in available_methods())


def test_more_min_clients_than_clients() -> None:
    message = error_of({"clients": {"num_clients": 3}, "federation": {"min_clients": 4}})
    assert "\n" not in message and "federation.min_clients=4" in message
    assert "clients.num_clients=3" in message


def test_more_min_clients_than_sampled_clients() -> None:
    data = {"clients": {"num_clients": 8}, "federation": {"fraction_train": 0.25, "min_clients": 3}}
    message = error_of(data)
    assert "\n" not in message and "federation.min_clients=3" in message
    assert "2 clients sampled per round" in message
    data["federation"]["min_clients"] = 2
    config_from_dict(data)


def test_more_ranks_than_clients() -> None:
    message = error_of({"clients": {"num_clients": 2, "ranks": [2, 4, 8]}})
    assert "\n" not in message and message.startswith("clients")
    assert "3 ranks" in message and "2 clients" in message


def test_fedit_needs_equal_ranks() -> None:
    message = error_of({"clients": {"ranks": [2, 4]}, "federation": {"method": "fedit"}})
    assert "federation.method: fedit needs all clients to have the same rank" in message


def test_raflora_partitions_below_the_largest_rank_are_refused_with_the_config() -> None:
    """Before, this passed validation and failed at aggregation, possibly mid-run."""
    message = error_of(
        {"clients": {"ranks": [2, 8]}, "federation": {"options": {"partitions": [2, 4]}}}
    )
    assert "federation.method" in message and "below the largest client rank 8" in message
    for method in ("raflora", "flexlora_nm"):  # flexlora_nm takes raflora's options
        message = error_of(
            {
                "clients": {"ranks": [2, 8]},
                "federation": {"method": method, "options": {"partitions": [2, 4]}},
            }
        )
        assert "below the largest client rank 8" in message
    config_from_dict({"clients": {"ranks": [4]}, "federation": {"method": "fedit"}})


@pytest.mark.parametrize(
    ("federation", "says"),
    [
        ({"method": "raflora", "options": {"weighting": "loud"}}, "weighting 'loud'"),
        ({"method": "flexlora", "options": {"weighting": "energy"}}, "unknown option 'weighting'"),
        ({"method": "zeropad", "options": {"x": 1}}, "unknown option 'x'"),
        ({"method": "flexlora", "options": {"norm_target": -1.0}}, "norm_target"),
    ],
)
def test_method_options_are_checked_with_the_config(federation: dict, says: str) -> None:
    message = error_of({"federation": federation})
    assert "\n" not in message and message.startswith("federation"), message
    assert says in message


def test_valid_method_options_pass() -> None:
    config = config_from_dict({"federation": {"options": {"weighting": "energy"}}})
    assert config.federation.options == {"weighting": "energy"}


def test_several_problems_give_one_line_each() -> None:
    message = error_of({"federation": {"rounds": 0}, "data": {"dirichlet_alpha": 0}})
    lines = message.splitlines()
    assert len(lines) == 2
    assert {line.split(":")[0] for line in lines} == {"federation.rounds", "data.dirichlet_alpha"}


def test_carry_over_default_is_on_for_raflora_only() -> None:
    assert not config_from_dict(
        {"federation": {"method": "flexlora"}}
    ).federation.carry_over_enabled
    assert config_from_dict(
        {"federation": {"method": "flexlora", "carry_over": True}}
    ).federation.carry_over_enabled
    assert not config_from_dict({"federation": {"carry_over": False}}).federation.carry_over_enabled


# --------------------------------------------------------------------------- overrides


@pytest.mark.parametrize(
    ("assignment", "path", "value"),
    [
        ("federation.rounds=3", ["federation", "rounds"], 3),
        ("train.lr=1e-3", ["train", "lr"], 1e-3),
        ("clients.ranks=[2, 4, 8]", ["clients", "ranks"], [2, 4, 8]),
        ("federation.evaluate_clients=false", ["federation", "evaluate_clients"], False),
        ('run.name="a b"', ["run", "name"], "a b"),
        ("model.path=/tmp/some model", ["model", "path"], "/tmp/some model"),
        (
            "federation.options={weighting='energy'}",
            ["federation", "options"],
            {"weighting": "energy"},
        ),
        (" data.name = rotten_tomatoes ", ["data", "name"], "rotten_tomatoes"),
        ("clients.rank_tiers={4=0.5, 8=0.5}", ["clients", "rank_tiers"], {"4": 0.5, "8": 0.5}),
    ],
)
def test_overrides_parse_toml_values(assignment: str, path: list[str], value) -> None:
    assert parse_override(assignment) == (path, value)


@pytest.mark.parametrize("bad", ["federation.rounds", "rounds=3", ".rounds=3", "federation.=3"])
def test_malformed_overrides_are_refused(bad: str) -> None:
    with pytest.raises(ConfigError, match="--set"):
        parse_override(bad)


def test_overrides_apply_on_top_of_the_file_without_touching_it(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('[federation]\nmethod = "flexlora"\nrounds = 5\n')
    config = load_config(path, ["federation.rounds=2", "clients.ranks=[4, 8]", "run.seed=7"])
    assert config.federation.method == "flexlora" and config.federation.rounds == 2
    assert config.clients.ranks == [4, 8] and config.run.seed == 7
    data = {"federation": {"rounds": 5}}
    assert apply_overrides(data, ["federation.rounds=1"]) == {"federation": {"rounds": 1}}
    assert data == {"federation": {"rounds": 5}}


def test_override_into_a_value_is_refused() -> None:
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"run": {"name": "x"}}, ["run.name.first=1"])


def test_an_override_with_a_bad_value_names_the_field() -> None:
    with pytest.raises(ConfigError, match=r"^federation\.rounds: .*valid integer"):
        load_config(None, ["federation.rounds=many"])


def test_missing_or_broken_files_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[federation\nrounds = 2\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken)


# --------------------------------------------------------------------------- serialisation


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["clients.rank_tiers={4=0.5, 8=0.3, 16=0.2}", "clients.num_clients=10"],
        ["federation.options={weighting='energy'}", "federation.max_update_norm=3.5"],
        ["federation.method=flora", "federation.apply=merge", "federation.carry_over=true"],
        ["clients.memory_budgets_mb=[300.0, 500.0]", "clients.num_clients=2"],
    ],
)
def test_to_toml_round_trips(tmp_path: Path, overrides: list[str]) -> None:
    config = load_config(None, overrides)
    path = tmp_path / "config.toml"
    path.write_text(config.to_toml())
    again = load_config(path)
    assert again == config
    assert again.to_toml() == config.to_toml()
    assert Config.model_validate_json(config.to_json()) == config


def test_config_validation_does_not_build_cached_models(raflora_cache: Path) -> None:
    """Checking that an alias exists must not convert or build the model (clients validate the
    config in every process)."""
    config = config_from_dict({"model": {"path": "vit-tiny", "task": "image-classification"}})
    assert config.model.path == "vit-tiny"
    assert not raflora_cache.exists() or not any(raflora_cache.iterdir())
