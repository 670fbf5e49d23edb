"""A suite: one base config, named rank configurations and method variants, and grids
(methods × rank configurations × Dirichlet α × fraction per round × seeds) expanded into runs.

A suite file is TOML::

    [suite]
    name = "language"
    seeds = [0, 1]
    executor = "inprocess"        # or "ray" (Flower's simulation engine, one run at a time)
    workers = 2                   # runs at once (inprocess)

    [base.model]                  # any `raflora run` config sections: what every run shares
    path = "minilm"

    [rank_configs]                # clients.ranks per configuration (cycled over the clients)
    uniform = [2, 4, 8, 16]

    [methods.flexlora_rs]         # optional variants; built in: fedit@r_max, fedit@r_min, flora
    method = "flexlora"
    set = ["federation.split=sqrt"]

    [[grid]]
    name = "main"
    methods = ["fedit@r_max", "flexlora", "raflora"]
    rank_configs = ["uniform"]
    alphas = [0.1, 1.0]           # Dirichlet α (empty: the base config's data partition)
    fractions = [1.0, 0.5]        # federation.fraction_train

Every cell becomes a validated engine `Config`; cells whose configs are equal (e.g. the
homogeneous reference fedit@r_max under two rank configurations with the same largest rank)
share one run. Errors are one line each, naming the suite field (or the cell) and the problem.
"""

from __future__ import annotations

import itertools
import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from raflora.config import (
    Config,
    ConfigError,
    PositiveFloat,
    apply_overrides,
    config_from_dict,
    parse_override,
)

if TYPE_CHECKING:
    from raflora.math.methods.registry import Method


class SuiteError(ValueError):
    """A suite problem, already formatted as one line per problem."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class MethodVariant(_Model):
    method: str
    """registered aggregation method (`raflora methods`)"""
    ranks: Literal["config", "max", "min"] = "config"
    """client ranks: the rank configuration's, or all equal to its largest / smallest rank"""
    set: list[str] = []
    """config overrides, ``section.key=value`` as in ``raflora run --set``"""

    @field_validator("method")
    @classmethod
    def _known(cls, method: str) -> str:
        from raflora.math import available_methods

        if method not in available_methods():
            raise ValueError(f"unknown method {method!r}; known: {', '.join(available_methods())}")
        return method

    @field_validator("set")
    @classmethod
    def _overrides(cls, overrides: list[str]) -> list[str]:
        for assignment in overrides:
            parse_override(assignment)  # ConfigError (a ValueError) names the bad assignment
        return overrides


# Variants every suite knows; a suite's [methods] table adds to (or replaces) them.
BUILTIN_VARIANTS = {
    "fedit@r_max": MethodVariant(method="fedit", ranks="max"),
    "fedit@r_min": MethodVariant(method="fedit", ranks="min"),
    "flora": MethodVariant(method="flora", set=["federation.apply=merge"]),
}


class GridSpec(_Model):
    name: str = "grid"
    """names the grid's section of the report"""
    methods: list[str] = Field(min_length=1)
    """method labels: a registered method, a built-in or a [methods] variant"""
    rank_configs: list[str] = Field(min_length=1)
    """names from [rank_configs]"""
    alphas: list[PositiveFloat] = []
    """Dirichlet α values (empty: the base config's data partition)"""
    fractions: list[Annotated[float, Field(gt=0, le=1)]] = [1.0]
    """shares of clients sampled per round (federation.fraction_train)"""
    seeds: list[int] | None = None
    """default: suite.seeds"""
    set: list[str] = []
    """extra config overrides for every run of this grid"""


class SuiteSection(_Model):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    """suite folder name: runs go to <out>/<name>/runs/"""
    description: str = ""
    """one paragraph for the report"""
    seeds: list[int] = Field(default=[0], min_length=1)
    """run.seed values (data split, partitions, LoRA init, client sampling)"""
    executor: Literal["inprocess", "ray"] = "inprocess"
    """inprocess: the engine's server + ClientApp in one process; ray: Flower simulation"""
    workers: int = Field(default=1, ge=1)
    """runs at once (separate processes; inprocess only)"""
    metric: Literal["accuracy", "loss"] = "accuracy"
    """what the statistics and the verdict compare: final test accuracy, or final test loss
    (lower is better, compared as its negative: e.g. the planted task's distillation error)"""


class PretrainSection(_Model):
    """Central pretraining of the base model before the federated runs (vision suite)."""

    model: str = "vit-tiny"
    """model alias or folder to start from"""
    data: str = "mnist5k"
    """shipped image dataset"""
    labels: list[int] = []
    """keep only these classes (empty: all)"""
    train_size: int = Field(default=0, ge=0)
    """examples of the training split used (0: all)"""
    steps: int = Field(default=300, ge=1)
    """AdamW steps, full fine-tuning"""
    batch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    seed: int = 0


class Suite(_Model):
    suite: SuiteSection
    base: dict[str, Any] = {}
    """engine config sections shared by every run"""
    rank_configs: dict[str, list[int]] = Field(min_length=1)
    methods: dict[str, MethodVariant] = {}
    grid: list[GridSpec] = Field(min_length=1)
    pretrain: PretrainSection | None = None

    @field_validator("rank_configs")
    @classmethod
    def _ranks(cls, configs: dict[str, list[int]]) -> dict[str, list[int]]:
        for name, ranks in configs.items():
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
                raise ValueError(f"{name!r}: names may use letters, digits, _ . - only")
            if not ranks or any(r < 1 for r in ranks):
                raise ValueError(f"{name}: needs at least one rank, all >= 1 (got {ranks})")
        return configs

    def variants(self) -> dict[str, MethodVariant]:
        return {**BUILTIN_VARIANTS, **self.methods}

    def variant(self, label: str) -> MethodVariant:
        known = self.variants()
        if label in known:
            return known[label]
        return MethodVariant(method=label)  # a registered method name, or a ValueError

    def labels(self) -> list[str]:
        """Every method label of the grids, once each, in the order the grids list them."""
        return list(dict.fromkeys(label for grid in self.grid for label in grid.methods))

    def method_of(self, label: str) -> Method:
        """The registered `Method` a label runs (``fedit@r_max`` → fedit)."""
        from raflora.math import get_method

        return get_method(self.variant(label).method)


# --------------------------------------------------------------------------- loading


def _field(loc: tuple[int | str, ...]) -> str:
    """pydantic's location ("grid", 0, "fractions", 1) as the suite file names it:
    ``grid[0].fractions[1]``."""
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")


def _format(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        field = _field(item["loc"]) or "suite"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key (check the spelling)"
        elif item["type"] == "missing":
            message = "required"
        elif "input" in item and item["type"] != "value_error":
            message = f"{message} (got {item['input']!r})"
        lines.append(f"{field}: {message}")
    return "\n".join(lines)


def suite_from_dict(data: dict[str, Any]) -> Suite:
    """Validate a plain dict into a `Suite`, raising `SuiteError` with one line per problem."""
    try:
        return Suite.model_validate(data)
    except ValidationError as error:
        raise SuiteError(_format(error)) from None


def load_suite(path: str | Path) -> Suite:
    path = Path(path)
    if not path.is_file():
        raise SuiteError(f"suite file {str(path)!r} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise SuiteError(f"{path}: not valid TOML: {error}") from None
    return suite_from_dict(data)


# --------------------------------------------------------------------------- expansion


@dataclass(frozen=True)
class Cell:
    """One point of a grid; several cells may share a run (`run_id`)."""

    grid: str
    method: str  # the variant's label, e.g. "fedit@r_max"
    rank_config: str
    alpha: float | None
    fraction: float
    seed: int
    run_id: str

    @property
    def setting(self) -> tuple[str, float | None, float]:
        """What a report table compares methods under: (rank configuration, α, fraction)."""
        return (self.rank_config, self.alpha, self.fraction)


@dataclass
class Plan:
    suite: Suite
    cells: list[Cell]
    configs: dict[str, Config]  # run id → its validated config (run.name = run id)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text.replace("@", "-")).strip("-")


def run_key(config: Config) -> str:
    """What makes two runs the same run: the config without its name and output folder."""
    data = config.to_dict()
    data["run"] = {k: v for k, v in data["run"].items() if k not in ("name", "out_dir")}
    return json.dumps(data, sort_keys=True)


def _cell_config(
    suite: Suite, grid: GridSpec, label: str, ranks: list[int], cell: dict, runs_dir: Path
) -> Config:
    variant = suite.variant(label)
    data = apply_overrides(suite.base, list(grid.set) + list(variant.set))
    for section in ("run", "clients", "federation", "data"):
        data.setdefault(section, {})
    data["clients"]["ranks"] = ranks
    data["federation"]["method"] = variant.method
    data["federation"]["fraction_train"] = cell["fraction"]
    if cell["alpha"] is not None:
        data["data"]["partition"] = "dirichlet"
        data["data"]["dirichlet_alpha"] = cell["alpha"]
    data["run"].update(seed=cell["seed"], name=cell["run_id"], out_dir=str(runs_dir))
    return config_from_dict(data)


def expand(suite: Suite, runs_dir: Path) -> Plan:
    """Every cell of every grid, each with a validated config; equal configs share a run."""
    cells: list[Cell] = []
    configs: dict[str, Config] = {}
    by_key: dict[str, str] = {}
    for g, grid in enumerate(suite.grid):
        for label in grid.methods:
            try:
                suite.variant(label)
            except ValidationError as error:
                raise SuiteError(f"grid[{g}].methods: {label!r}: {_format(error)}") from None
        for name in grid.rank_configs:
            if name not in suite.rank_configs:
                known = ", ".join(suite.rank_configs)
                raise SuiteError(f"grid[{g}].rank_configs: unknown {name!r}; known: {known}")
        seeds = grid.seeds if grid.seeds is not None else suite.suite.seeds
        alphas: list[float | None] = list(grid.alphas) or [None]
        for label, rc, alpha, fraction, seed in itertools.product(
            grid.methods, grid.rank_configs, alphas, grid.fractions, seeds
        ):
            variant = suite.variant(label)
            ranks = list(suite.rank_configs[rc])
            tag = rc
            if variant.ranks != "config":
                rank = max(ranks) if variant.ranks == "max" else min(ranks)
                ranks, tag = [rank], f"r{rank}"
            alpha_tag = "base" if alpha is None else f"a{alpha:g}"
            run_id = f"{slug(label)}_{tag}_{alpha_tag}_f{fraction:g}_s{seed}"
            cell = {"alpha": alpha, "fraction": fraction, "seed": seed, "run_id": run_id}
            where = f"grid {grid.name!r}, {label} / {rc} / {alpha_tag} / f{fraction:g} / s{seed}"
            try:
                config = _cell_config(suite, grid, label, ranks, cell, runs_dir)
            except ConfigError as error:
                lines = str(error).splitlines()
                raise SuiteError("\n".join(f"{where}: {line}" for line in lines)) from None
            key = run_key(config)
            if key in by_key:
                run_id = by_key[key]
            else:
                base_id, n = run_id, 1
                while run_id in configs:  # same name, different config (e.g. grid.set)
                    n += 1
                    run_id = f"{base_id}_{slug(grid.name)}" + (f"{n}" if n > 2 else "")
                if run_id != base_id:
                    config = config.model_copy(
                        update={"run": config.run.model_copy(update={"name": run_id})}
                    )
                by_key[key], configs[run_id] = run_id, config
            cells.append(Cell(grid.name, label, rc, alpha, fraction, seed, run_id))
    return Plan(suite, cells, configs)
