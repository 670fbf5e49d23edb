"""One validated configuration for a federated run, loaded from TOML plus `--set` overrides.

Every field has a default, so an empty file is a valid (tiny) run. Sections mirror the three
layers: what to fine-tune (`model`, `data`, `clients`, `train`), how to federate
(`federation`, `eval`), where to write (`run`), how to execute (`simulation`).

Errors are one line per problem, naming the dotted field and what is allowed, e.g.
``clients.ranks: rank must be >= 1 (got 0)``.
"""

from __future__ import annotations

import copy
import json
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import tomli_w
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)


def _not_bool(value: Any) -> Any:
    """A boolean is no number here: ``rounds = true`` is a mistake, not 1 (pydantic's lax mode
    would take it as 1; strict mode would also refuse TOML's ``lr = 1`` for a float)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got the boolean {str(value).lower()}")
    return value


Int = Annotated[int, BeforeValidator(_not_bool)]
Float = Annotated[float, BeforeValidator(_not_bool)]
PositiveInt = Annotated[Int, Field(gt=0)]
PositiveFloat = Annotated[Float, Field(gt=0)]


def _label_text(value: Any) -> Any:
    """A class label as text: strings as given, integers (not booleans) as decimal text."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise ValueError(f"labels are strings or integers (got {value!r})")
    return value


LabelValue = Annotated[str, BeforeValidator(_label_text)]
SEED_LIMIT = 2**32  # numpy's legacy seeding (transformers' set_seed) takes 0 ≤ seed < 2**32
DEFAULT_RANKS = (2, 4, 8)  # client ranks when the config names none (cycled over the clients)


class ConfigError(ValueError):
    """A configuration problem, already formatted as ``field: what is wrong`` lines."""


class _Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        validate_default=True,
        use_attribute_docstrings=True,
        allow_inf_nan=False,  # TOML has nan and inf; no field means them
    )


class RunSection(_Section):
    name: str = "run"
    """run folder name: outputs go to <out_dir>/<name>/"""
    out_dir: str = "runs"
    """parent folder of run folders"""
    seed: Int = 0
    """one seed for data split, partitions, ranks, LoRA init, client sampling (0 ≤ seed < 2**32)"""
    trackers: list[Literal["tensorboard", "mlflow", "wandb"]] = []
    """experiment trackers fed each round's metrics.csv row and energy plot, written offline
    under the run folder (needs `pip install 'raflora[track]'`)"""

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        if not name.strip() or name in (".", "..") or any(c in name for c in "/\\\0"):
            raise ValueError(
                f"{name!r} is not a plain folder name (no '/', '\\', '..' or empty name): "
                "outputs go to <out_dir>/<name>/; choose the parent with run.out_dir or --out"
            )
        return name

    @field_validator("seed")
    @classmethod
    def _seed_in_range(cls, seed: int) -> int:
        if not 0 <= seed < SEED_LIMIT:
            raise ValueError(
                f"must be an integer from 0 to {SEED_LIMIT - 1} = 2**32 - 1, the range every "
                f"seeded library accepts (got {seed})"
            )
        return seed


class ModelSection(_Section):
    path: str = "minilm"
    """shipped alias (minilm, smollm2-135m, vit-tiny), a local folder, or a cached hub id"""
    task: Literal["classification", "causal-lm", "image-classification"] = "classification"
    """what the model is fine-tuned for (sequence/image classification, or a causal LM)"""
    target_modules: list[str] = []
    """LoRA targets; empty = defaults for the architecture"""
    lora_alpha: PositiveFloat = 16.0
    """LoRA alpha; scaling alpha/r (or alpha/sqrt(r) with rslora)"""
    rslora: bool = False
    """rank-stabilised scaling alpha/sqrt(r)"""
    lora_dropout: Annotated[Float, Field(ge=0, lt=1)] = 0.0
    """dropout on the LoRA input"""
    max_length: PositiveInt = 64
    """tokens per example (text tasks)"""
    train_head: bool = True
    """train and federate a new classification head (`classifier`/`score`) as a dense
    parameter; false: it stays at its seeded initialisation (the same on every node), so only
    the LoRA factors learn"""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """storage dtype of the frozen base; LoRA factors stay float32 and training autocasts to this
    dtype (float16: CUDA only, with loss scaling)"""
    quantization: Literal["none", "4bit", "8bit"] = "none"
    """QLoRA-style frozen base through bitsandbytes (NF4 / LLM.int8, computing in model.dtype);
    needs CUDA for clients and server and `pip install 'raflora[quant]'`"""

    @field_validator("path")
    @classmethod
    def _model_exists(cls, path: str) -> str:
        from raflora.training.models import resolve_model

        # raises ValueError naming what was tried and the aliases; materialize=False: checking
        # an alias must not convert or build the model (every client validates the config)
        try:
            resolve_model(path, materialize=False)
        except (OSError, RuntimeError) as error:  # name too long, unknown ~user, ...
            raise ValueError(f"{path!r} is not a usable path ({error})") from None
        except ValueError as error:  # its message starts "model.path ...": the field says it
            raise ValueError(str(error).removeprefix("model.path ")) from None
        return path


class DataSection(_Section):
    name: str = "rotten_tomatoes"
    """shipped dataset name(s), comma-separated, or a file/folder path"""
    train_size: Annotated[Int, Field(ge=0)] = 0
    """examples kept for training (0 = all)"""
    test_size: Annotated[Int, Field(ge=0)] = 0
    """held-out examples for server evaluation (0 = all)"""
    text_field: str | None = None
    """column holding the text (general loader)"""
    label_field: str | None = None
    """column holding the label (general loader)"""
    labels: list[LabelValue] | None = None
    """the classes of a data file, in order (class i = labels[i]), as its label field holds them,
    e.g. ["neg", "pos"] or [0, 1, 50]; a row with another label is refused. Needed when integer
    labels are not 0..K-1; unset: integer labels are class indices 0..K-1, text labels sorted"""

    @field_validator("labels")
    @classmethod
    def _labels_distinct(cls, labels: list[str] | None) -> list[str] | None:
        if labels is not None:
            if len(labels) < 2:
                raise ValueError(f"classification needs at least 2 classes (got {labels})")
            repeated = sorted({label for label in labels if labels.count(label) > 1})
            if repeated:
                raise ValueError(f"each class once (repeated: {repeated})")
        return labels

    partition: Literal["iid", "dirichlet"] = "dirichlet"
    """how training data is split"""
    dirichlet_alpha: PositiveFloat = 0.5
    """label skew: small = very non-IID"""
    min_client_size: PositiveInt = 8
    """every client gets at least this many examples (IID: equal shares, refused below)"""
    local_val_fraction: Annotated[Float, Field(ge=0, lt=1)] = 0.1
    """client-side eval split"""


class ClientsSection(_Section):
    num_clients: PositiveInt = 3
    """number of clients (Flower SuperNodes)"""
    ranks: list[Int] | None = None
    """explicit rank per client (cycled if shorter)"""
    rank_tiers: dict[Int, Float] | None = None
    """{rank: fraction}, fractions sum to 1"""
    memory_budgets_mb: list[PositiveFloat] | None = None
    """per client: largest candidate rank that fits"""
    candidate_ranks: list[Int] = [2, 4, 8, 16, 32, 64]
    """ranks considered for memory budgets"""

    @field_validator("ranks", "candidate_ranks")
    @classmethod
    def _ranks_positive(cls, ranks: list[int] | None) -> list[int] | None:
        if ranks is not None:
            if not ranks:
                raise ValueError("needs at least one rank")
            for rank in ranks:
                if rank < 1:
                    raise ValueError(f"rank must be >= 1 (got {rank})")
        return ranks

    @field_validator("rank_tiers")
    @classmethod
    def _tiers_valid(cls, tiers: dict[int, float] | None) -> dict[int, float] | None:
        if tiers is not None:
            if any(rank < 1 for rank in tiers):
                raise ValueError(f"tier ranks must be >= 1 (got {sorted(tiers)})")
            if any(share < 0 for share in tiers.values()):
                raise ValueError("tier fractions must be >= 0")
            if abs(sum(tiers.values()) - 1.0) > 1e-6:
                raise ValueError(f"tier fractions must sum to 1 (got {sum(tiers.values()):g})")
        return tiers

    def known_ranks(self) -> list[int] | None:
        """The distinct ranks the clients can have, as far as the config alone tells (None:
        from the memory budgets, decided with the model). A rank list is cycled over the
        clients, so its first num_clients entries are the ranks in use."""
        if self.rank_tiers is not None:
            return sorted(rank for rank, share in self.rank_tiers.items() if share > 0)
        if self.memory_budgets_mb is not None:
            return None
        return sorted(set(list(self.ranks or DEFAULT_RANKS)[: self.num_clients]))

    @model_validator(mode="after")
    def _one_rank_source(self) -> ClientsSection:
        given = [
            name
            for name in ("ranks", "rank_tiers", "memory_budgets_mb")
            if getattr(self, name) is not None
        ]
        if len(given) > 1:
            raise ValueError(f"give only one of ranks, rank_tiers, memory_budgets_mb (got {given})")
        if self.ranks is not None and len(self.ranks) > self.num_clients:
            raise ValueError(
                f"ranks lists {len(self.ranks)} ranks for only {self.num_clients} clients "
                "(num_clients); a shorter list repeats"
            )
        budgets = self.memory_budgets_mb
        if budgets is not None and len(budgets) not in (1, self.num_clients):
            raise ValueError(
                f"memory_budgets_mb needs 1 or num_clients={self.num_clients} values "
                f"(got {len(budgets)})"
            )
        return self


class FederationSection(_Section):
    method: str = "raflora"
    """aggregation method from the registry (`raflora methods`)"""
    rounds: PositiveInt = 2
    """federated rounds"""
    fraction_train: Annotated[Float, Field(gt=0, le=1)] = 1.0
    """share of clients sampled per round"""
    min_clients: PositiveInt = 1
    """fewest successful replies for a round to count"""
    apply: Literal["adapter", "merge"] | None = None
    """keep the global update as the LoRA (adapter) or merge it into the base (merge); default:
    the method's own (merge for flora, as in its paper; `raflora methods`)"""
    carry_over: bool | None = None
    """keep the directions no sampled client trained (partial participation); default: the
    method's own (on for raflora, this project's addition; off for the baselines)"""
    split: Literal["us", "sqrt"] = "us"
    """how allocation splits singular values between B and A"""
    merged_wire: Literal["rounds", "total"] = "rounds"
    """what a client gets of the update merged into its base (flora, fedex, merge mode):
    the factors of each round it has not merged yet, kept in its node state (rounds, the
    papers' protocol), or the whole merged sum as a thin SVD every round (total, stateless)"""
    wire_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """dtype of every array on the wire, both ways (float16/bfloat16 halve the bytes; decoded
    to float32 before any math; a value beyond float16's ±65504 is an error, never an inf)"""
    options: dict[str, Any] = {}
    """method options, e.g. {weighting = "energy"} for raflora, {reg_lambda = 0} for hetlora
    (`raflora methods --options`)"""
    round_timeout_s: PositiveFloat = 3600.0
    """a round waits at most this long for replies"""
    evaluate_clients: bool = True
    """clients also report accuracy on their local validation split"""
    max_update_norm: PositiveFloat | None = None
    """bound on a client's contribution in a round, per tensor: ‖B_k A_k − G‖_F per LoRA module
    (G: the product of the factors the server sent it; 0 for a fresh LoRA) and ‖x_k − x_sent‖_F
    per dense tensor (classifier head)"""
    max_total_update_norm: PositiveFloat | None = None
    """bound on a client's whole contribution in a round: √(Σ of the squared per-tensor norms)"""
    norm_policy: Literal["reject", "clip"] = "reject"
    """a reply above a bound is rejected, or its step shrunk to the bound (clip)"""
    max_num_examples: PositiveInt | None = None
    """cap on a reply's num-examples (it must also be ≤ the size the client reported in the
    query round)"""
    server_threads: Annotated[Int, Field(ge=0)] = 0
    """torch threads for the server's aggregation and SVDs (0 = every core it may use); fixed so
    a run's numbers do not depend on the process the server runs in"""
    server_device: str = "cpu"
    """where the server aggregates, decomposes (float64) and evaluates: cpu, auto, cuda or cuda:N
    (not mps: it has no float64)"""
    spool_dir: str = ""
    """where the server spools each accepted reply (safetensors, deleted after the round) so the
    round step reads one module at a time: "" keeps replies in memory, "auto" the temporary
    folder, else a directory"""
    server_keep: Literal["all", "leading"] = "all"
    """what the server keeps of an SVD-allocated round update: all (the stacked factors; the
    global model is their whole product) or leading (only the first r_max singular triplets:
    what clients get, bounded memory; server evaluation and export see that truncation)"""

    @field_validator("server_device")
    @classmethod
    def _server_device_spec(cls, device: str) -> str:
        from raflora.training.device import check_device_spec

        check_device_spec(device)
        if device == "mps":
            raise ValueError("mps has no float64, which the server's SVDs use; use cpu or cuda")
        return device

    @field_validator("spool_dir")
    @classmethod
    def _spool_dir_usable(cls, value: str) -> str:
        if value in ("", "auto"):
            return value
        try:  # the nearest folder that exists must be a writable directory
            path = Path(os.path.expanduser(value))
            existing = next(p for p in (path, *path.parents) if p.exists())
            usable = existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)
        except (OSError, ValueError):  # e.g. a NUL byte, a name too long
            usable = False
        if not usable:
            raise ValueError(
                f"{value!r} is not a writable directory (nor can one be made there); give a "
                'writable directory, "auto" (the temporary folder) or "" (in memory)'
            )
        return value

    @field_validator("method")
    @classmethod
    def _method_known(cls, method: str) -> str:
        from raflora.math import available_methods

        known = available_methods()
        if method not in known:
            raise ValueError(f"unknown method {method!r}; known: {', '.join(known)}")
        return method

    @field_validator("options")
    @classmethod
    def _options_known(cls, options: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        from raflora.math import method_options

        method = info.data.get("method")
        if method is not None:  # else the method's own error is reported
            method_options(method, **options)  # raises ValueError naming the bad option
        return options

    @property
    def apply_mode(self) -> str:
        """The apply mode: as set, else the method's own (`Method.apply`)."""
        from raflora.math import get_method

        return get_method(self.method).apply if self.apply is None else self.apply

    @property
    def carry_over_enabled(self) -> bool:
        """Carry-over: as set, else the method's own default (`Method.carry_over`)."""
        from raflora.math import get_method

        return get_method(self.method).carry_over if self.carry_over is None else self.carry_over


class TrainSection(_Section):
    local_steps: Annotated[Int, Field(ge=0)] = 10
    """optimiser steps per round (0: use epochs)"""
    local_epochs: Annotated[Int, Field(ge=0)] = 0
    """passes over local data per round"""
    batch_size: PositiveInt = 16
    """examples per step"""
    lr: PositiveFloat = 5e-4
    """AdamW learning rate"""
    weight_decay: Annotated[Float, Field(ge=0)] = 0.0
    """AdamW weight decay"""
    grad_clip: Annotated[Float, Field(ge=0)] = 1.0
    """max grad norm (0 = off)"""
    threads: Annotated[Int, Field(ge=0)] = 1
    """torch threads per client (0 = torch default)"""
    device: str = "auto"
    """where clients train: auto (the GPU the process may use: in simulation the one Ray assigned,
    see simulation.num_gpus_per_client; else CPU), cpu, cuda, cuda:N or mps"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass (less memory, about a third more time)"""

    @field_validator("device")
    @classmethod
    def _device_spec(cls, device: str) -> str:
        from raflora.training.device import check_device_spec

        return check_device_spec(device)

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> TrainSection:
        if (self.local_steps > 0) == (self.local_epochs > 0):
            raise ValueError("set exactly one of local_steps and local_epochs to a positive value")
        return self


class EvalSection(_Section):
    batch_size: PositiveInt = 64
    """evaluation batch size"""
    every: PositiveInt = 1
    """server-side evaluation every this many rounds (and the last)"""


class SimulationSection(_Section):
    num_cpus_per_client: PositiveFloat = 1.0
    """Ray resources per client"""
    num_gpus_per_client: Annotated[Float, Field(ge=0)] = 0.0
    """Ray GPU share per client"""


class FaultsSection(_Section):
    """Fault injection for robustness tests: which clients misbehave, seeded per round."""

    fraction: Annotated[Float, Field(ge=0, le=1)] = 0.0
    """share of clients failing each round"""
    clients: list[Annotated[Int, Field(ge=0)]] | None = None
    """partition ids that fail every round (instead of a seeded fraction)"""
    mode: Literal["raise", "stall", "vanish", "scale", "signflip", "inflate"] = "raise"
    """exception / too slow / process exits; hostile replies (tests of the defences): the update
    B A and head step ×strength (scale) or ×−strength (signflip), num-examples ×strength
    (inflate)"""
    stall_s: Annotated[Float, Field(ge=0)] = 30.0
    """how long a stalling client sleeps"""
    strength: PositiveFloat = 100.0
    """factor of the hostile modes"""


class Config(_Section):
    run: RunSection = RunSection()
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    clients: ClientsSection = ClientsSection()
    federation: FederationSection = FederationSection()
    train: TrainSection = TrainSection()
    eval: EvalSection = EvalSection()
    simulation: SimulationSection = SimulationSection()
    faults: FaultsSection = FaultsSection()

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        ranks = self.clients.known_ranks()
        if ranks is not None:
            from raflora.math import get_method, method_options

            fed = self.federation
            try:
                get_method(fed.method).check_ranks(method_options(fed.method, **fed.options), ranks)
            except ValueError as error:
                raise ValueError(f"federation.method: {error}") from None
        if self.model.quantization != "none" and self.federation.apply_mode == "merge":
            raise ValueError(
                f"model.quantization = {self.model.quantization!r} cannot merge updates into "
                "quantised base weights (federation.apply = merge); use apply = adapter"
            )
        if self.federation.min_clients > self.clients.num_clients:
            raise ValueError(
                f"federation.min_clients={self.federation.min_clients} exceeds "
                f"clients.num_clients={self.clients.num_clients}"
            )
        faulty = [pid for pid in self.faults.clients or [] if pid >= self.clients.num_clients]
        if faulty:
            raise ValueError(
                f"faults.clients: partition ids {faulty} do not exist "
                f"(clients.num_clients={self.clients.num_clients})"
            )
        sampled = max(1, round(self.federation.fraction_train * self.clients.num_clients))
        if self.federation.min_clients > sampled:
            raise ValueError(
                f"federation.min_clients={self.federation.min_clients} exceeds the "
                f"{sampled} clients sampled per round (fraction_train="
                f"{self.federation.fraction_train} of {self.clients.num_clients})"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)

    def to_toml(self) -> str:
        data = self.to_dict()
        if "rank_tiers" in data["clients"]:  # TOML keys are strings
            data["clients"]["rank_tiers"] = {
                str(k): v for k, v in data["clients"]["rank_tiers"].items()
            }
        return tomli_w.dumps(data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def parse_override(assignment: str) -> tuple[list[str], Any]:
    """Split ``section.key=value``; the value is read as TOML (``2``, ``[2,4]``, ``true``) or,
    failing that, taken as a plain string."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected section.key=value")
    key, raw = assignment.split("=", 1)
    path = [part.strip() for part in key.strip().split(".")]
    if len(path) < 2 or not all(re.fullmatch(r"[A-Za-z0-9_-]+", part) for part in path):
        raise ConfigError(f"--set {assignment!r}: key must look like section.key")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `data` with each ``section.key=value`` applied."""
    merged = copy.deepcopy(data)  # not a JSON round trip: TOML dates would raise TypeError
    for assignment in overrides:
        path, value = parse_override(assignment)
        node = merged
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {assignment!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return merged


def _format_errors(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "config"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden" and field.startswith("train.hetlora_"):
            message = (
                "HetLoRA's settings are method options now: federation.options = "
                "{reg_lambda, gamma, prune_threshold} (`raflora methods --details`)"
            )
        elif item["type"] == "extra_forbidden":
            message = "unknown key (check the spelling; `raflora config` lists the fields)"
        elif "input" in item and item["type"] not in ("value_error", "missing"):
            message = f"{message} (got {item['input']!r})"
        lines.append(f"{field}: {message}")
    return "\n".join(lines)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Validate a plain dict into a `Config`, raising `ConfigError` with one line per problem."""
    try:
        return Config.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_errors(error)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a TOML file (or nothing, for the defaults), apply overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as error:
            raise ConfigError(
                f"{path}: not UTF-8 text ({error.reason} at byte {error.start}); TOML files "
                "must be UTF-8: save it as UTF-8"
            ) from None
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{path}: not valid TOML: {error}") from None
    return config_from_dict(apply_overrides(data, overrides or []))
