"""Run configuration: YAML in, frozen dataclasses out, every key checked.

The same configuration travels to clients as Flower's flat ``run_config``
(``{"federation.rounds": 20, ...}``), so one set of names serves YAML files,
``--set`` overrides and ``flwr run --run-config``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from pollen.augment import POLICIES as AUGMENT_POLICIES
from pollen.codec import SCOPES, SELECTIONS, Codec, Identity, TopK
from pollen.data import DATASETS, check_data
from pollen.models import model_factory
from pollen.partitions import SCHEMES
from pollen.schedules import SCHEDULES


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names the key."""


class UnknownKeyError(ConfigError):
    """A key no config has: ``key`` (dotted), the ``nearest`` known keys, the ``known`` names of its
    section (said when none is near), and ``where`` it was written (a file, --set; "": not known)."""

    def __init__(self, key: str, nearest: list[str], known: list[str], where: str = "") -> None:
        self.key, self.nearest, self.known, self.where = key, nearest, known, where
        section = key.rpartition(".")[0]
        hint = (f"did you mean {' or '.join(nearest)}?" if nearest
                else f"known{f' in {section}' if section else ''}: {', '.join(known)}")
        super().__init__(f"{key}: unknown key{f' in {where}' if where else ''}; {hint}")

    def written_in(self, where: str) -> UnknownKeyError:
        return UnknownKeyError(self.key, self.nearest, self.known, where)


def nearest_keys(prefix: str, name: str, siblings: Iterable[str]) -> list[str]:
    """What a misspelt ``prefix + name`` most likely meant, best first, at most three: a key of its own
    section spelt alike, else a key elsewhere of (almost) the same name (``rounds``: ``federation.rounds``)."""
    import difflib

    if alike := difflib.get_close_matches(name, list(siblings), n=3, cutoff=0.6):
        return [prefix + key for key in alike]
    everywhere = list(run_config_of(Config()))
    names = difflib.get_close_matches(name, {key.rsplit(".", 1)[-1] for key in everywhere}, n=3, cutoff=0.8)
    return [key for key in everywhere if key.rsplit(".", 1)[-1] in names][:3]


@dataclass(frozen=True)
class LoraSettings:
    """The ``model.lora`` section: peft's ``LoraConfig`` under its own names."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # "auto": peft's default for a Hugging Face model's family, every linear map of the
    # base for a torch model; "all-linear"; or module names, comma-separated ("query,value").
    target_modules: str = "auto"
    # false: A stays at its seeded initial value and only B trains (FFA-LoRA, Sun et al. 2024), so that
    # averaging the clients' B is exactly averaging their products B·A; it also halves what travels.
    train_a: bool = True

    def check(self) -> None:
        _at_least("model.lora.r", self.r, 1)
        _positive("model.lora.alpha", self.alpha)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.lora.dropout: must be in [0, 1), got {self.dropout}")
        if not self.target_modules.strip(" ,"):
            raise ConfigError("model.lora.target_modules: name modules, or auto / all-linear")

    @property
    def modules(self) -> str | list[str]:
        """``target_modules`` as peft takes it."""
        if self.target_modules in ("auto", "all-linear"):
            return self.target_modules
        return [name.strip() for name in self.target_modules.split(",") if name.strip()]


@dataclass(frozen=True)
class ModelConfig:
    name: str = "efficientnet-lite0"  # a name in pollen.models.MODELS
    trainable: str = "lora"  # head | lora | full
    lora: LoraSettings = field(default_factory=LoraSettings)
    quantize: str = "int8"  # int8 | int4 | none: storage of the frozen base (see pollen.quantize)
    image_size: int = 64

    def check(self) -> None:
        try:
            model_factory(self.name)
        except ValueError as error:
            raise ConfigError(f"model.name: {error}") from None
        _one_of("model.trainable", self.trainable, ("head", "lora", "full"))
        _one_of("model.quantize", self.quantize, ("int8", "int4", "none"))
        self.lora.check()
        _at_least("model.image_size", self.image_size, 8)
        if self.trainable == "full" and self.quantize != "none":
            raise ConfigError(
                f"model.quantize: an {self.quantize} base cannot be fine-tuned in full; "
                "use model.trainable=head|lora or model.quantize=none"
            )


@dataclass(frozen=True)
class DataConfig:
    # A name in pollen.data.DATASETS, or a path: a folder of class folders, .npz or images .csv.
    dataset: str = "mnist5k"
    test_path: str = ""  # central evaluation data (same formats); "" = hold out test_size examples of dataset
    test_size: int = 1000  # held out by the seed for central evaluation (without test_path)
    num_classes: int = 0  # 0 = counted from dataset; set it for devices that do not hold dataset
    # How clients share the training data (see pollen.partitions): iid | dirichlet |
    # pathological | shard | natural | sampled (min_partition_size each, drawn from all, may overlap).
    partition: str = "dirichlet"
    alpha: float = 0.5  # Dirichlet concentration (dirichlet, sampled): smaller = more label skew
    min_partition_size: int = 10  # dirichlet: redrawn until every client holds this many
    classes_per_partition: int = 2  # pathological: classes each client holds
    shards_per_partition: int = 2  # shard: label-sorted shards each client holds
    partition_by: str = ""  # natural: the per-example column (.npz array, .csv column), one client per value
    max_length: int = 128  # text: tokens per example (padded, truncated) with the model's tokenizer
    augment: str = "none"  # images, local training only: none | affine | photo (pollen.augment)

    def check(self) -> None:
        if not self.dataset.strip():
            raise ConfigError(f"data.dataset: name a built-in ({', '.join(DATASETS)}) or a path")
        _at_least("data.test_size", self.test_size, 1)
        _at_least("data.num_classes", self.num_classes, 0)
        _one_of("data.partition", self.partition, SCHEMES)
        _positive("data.alpha", self.alpha)
        _at_least("data.min_partition_size", self.min_partition_size, 1)
        _at_least("data.classes_per_partition", self.classes_per_partition, 1)
        _at_least("data.shards_per_partition", self.shards_per_partition, 1)
        _at_least("data.max_length", self.max_length, 2)
        _one_of("data.augment", self.augment, AUGMENT_POLICIES)
        if self.partition == "natural" and not self.partition_by.strip():
            raise ConfigError("data.partition_by: name the column a natural partition follows, e.g. user_id")


@dataclass(frozen=True)
class TrainConfig:
    """Local training on each client, sent with every round's train message."""

    local_epochs: int = 2
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 0.0
    # AdamW's epsilon, far above torch's 1e-8 on purpose: a coordinate whose gradients
    # are much smaller than it steps in proportion to them, as with SGD, instead of a
    # full lr step wherever its noise points (README, Results, measures both).
    adam_eps: float = 3e-3
    # The learning rate by round, sent by the server (pollen/schedules.py): constant |
    # cosine (down to lr_min) | step (times lr_gamma every lr_step_rounds) | linear-warmup.
    lr_schedule: str = "constant"
    lr_min: float = 0.0
    lr_step_rounds: int = 10
    lr_gamma: float = 0.5
    warmup_rounds: int = 3

    def check(self) -> None:
        _one_of("train.lr_schedule", self.lr_schedule, SCHEDULES)
        if not 0.0 <= self.lr_min <= self.lr:
            raise ConfigError(f"train.lr_min: must be between 0 and train.lr ({self.lr}), got {self.lr_min}")
        _at_least("train.lr_step_rounds", self.lr_step_rounds, 1)
        if not 0.0 < self.lr_gamma <= 1.0:
            raise ConfigError(f"train.lr_gamma: must be in (0, 1], got {self.lr_gamma}")
        _at_least("train.warmup_rounds", self.warmup_rounds, 1)
        _at_least("train.local_epochs", self.local_epochs, 1)
        _at_least("train.batch_size", self.batch_size, 1)
        _positive("train.lr", self.lr)
        _at_least("train.weight_decay", self.weight_decay, 0.0)
        _positive("train.adam_eps", self.adam_eps)


@dataclass(frozen=True)
class EarlyStopping:
    """``federation.early_stopping``: stop when the central accuracy stops improving."""

    patience: int = 0  # rounds without an improvement before the run stops; 0 = run every round
    min_delta: float = 0.0  # an improvement is a gain in accuracy of more than this

    def check(self) -> None:
        _at_least("federation.early_stopping.patience", self.patience, 0)
        _at_least("federation.early_stopping.min_delta", self.min_delta, 0.0)


@dataclass(frozen=True)
class FederationConfig:
    num_clients: int = 100
    clients_per_round: int = 10
    rounds: int = 20
    strategy: str = "sparse-fedavg"  # a registry name, entry point or dotted path; see strategies/
    fraction_evaluate: float = 0.0  # share of clients asked for federated evaluate
    server_learning_rate: float = 1.0  # the server moves the model by this times its velocity
    server_momentum: float = 0.6  # velocity = momentum * velocity + the strategy's step (FedAvgM)
    server_decay: float = 0.5  # the last share of rounds over which the server rate falls to a tenth
    # What the server accepts (pollen/server/update_checks.py); 0 turns a bound off.
    max_norm_ratio: float = 10.0  # reject an update whose L2 norm is above this times the round's median
    max_update_norm: float = 0.0  # reject an update whose L2 norm is above this
    # reject an update against the round's majority direction: its cosine with it below this; -1 = off
    min_cosine: float = 0.0
    max_examples: int = 1_000_000  # reject a num-examples claim above this (a simulation knows the true sizes)
    max_weight_ratio: float = 10.0  # clip a claim of unknown size to this times the round's median claim
    max_step_ratio: float = 10.0  # refuse a round whose global step is longer than this times the model's norm
    # sample up to this times clients_per_round, as many more as the rounds so far lost; 1 = off
    over_select: float = 1.0
    early_stopping: EarlyStopping = field(default_factory=EarlyStopping)

    @property
    def most_sampled(self) -> int:
        """The most clients a round samples: clients_per_round, or more with over_select."""
        return min(self.num_clients, max(self.clients_per_round,
                                         math.floor(self.clients_per_round * self.over_select + 1e-9)))

    def check(self) -> None:
        self.early_stopping.check()
        _bound("federation.max_norm_ratio", self.max_norm_ratio, 1.0)
        _bound("federation.max_update_norm", self.max_update_norm, 0.0)
        if not -1.0 <= self.min_cosine <= 1.0:
            raise ConfigError(f"federation.min_cosine: must be in [-1, 1] (-1 turns the check off), "
                              f"got {self.min_cosine}")
        _at_least("federation.max_examples", self.max_examples, 1)
        _bound("federation.max_weight_ratio", self.max_weight_ratio, 1.0)
        _bound("federation.max_step_ratio", self.max_step_ratio, 0.0)
        _at_least("federation.over_select", self.over_select, 1.0)
        _at_least("federation.num_clients", self.num_clients, 1)
        _at_least("federation.clients_per_round", self.clients_per_round, 1)
        _at_least("federation.rounds", self.rounds, 1)
        if not self.strategy.strip():
            raise ConfigError("federation.strategy: must name a strategy, e.g. fedavg")
        if not 0.0 <= self.fraction_evaluate <= 1.0:
            raise ConfigError(
                f"federation.fraction_evaluate: must be in [0, 1], got {self.fraction_evaluate}"
            )
        if not self.server_learning_rate > 0:
            raise ConfigError(f"federation.server_learning_rate: must be positive, got {self.server_learning_rate}")
        if not 0.0 <= self.server_momentum < 1.0:
            raise ConfigError(f"federation.server_momentum: must be in [0, 1), got {self.server_momentum}")
        if not 0.0 <= self.server_decay <= 1.0:
            raise ConfigError(f"federation.server_decay: must be in [0, 1], got {self.server_decay}")
        if self.clients_per_round > self.num_clients:
            raise ConfigError(
                f"federation.clients_per_round: {self.clients_per_round} is more than "
                f"federation.num_clients ({self.num_clients})"
            )


@dataclass(frozen=True)
class CodecConfig:
    """Uplink compression of client updates (see pollen.codec.TopK)."""

    name: str = "topk"  # topk | identity (dense fp32)
    density: float = 0.01  # share of each tensor's coordinates sent
    bits: int = 8  # bits per kept value; 1 = signs and a mean magnitude
    block: int = 0  # kept values per scale; 0 = one scale per tensor
    scope: str = "tensor"  # top-k per tensor, or over the whole update (model)
    stochastic: bool = False  # unbiased stochastic rounding of values
    feedback_max_age: int = 2  # rounds an unsent residual may wait before it is dropped; 0 = forever
    select: str = "magnitude"  # what top-k ranks by: magnitude | salience (magnitude x gradient RMS)
    # Each client lowers its density (to min_density at most) so its reply makes the round's
    # deadline on its own uplink (simulation.devices and simulation.deadline_seconds; client/deadline.py).
    fit_deadline: bool = False
    min_density: float = 0.001

    def check(self) -> None:
        _one_of("codec.name", self.name, ("topk", "identity"))
        if not 0.0 < self.min_density <= 1.0:
            raise ConfigError(f"codec.min_density: must be in (0, 1], got {self.min_density}")
        if self.fit_deadline and self.name != "topk":
            raise ConfigError("codec.fit_deadline: needs codec.name=topk (a dense update has one size)")
        if not 0.0 < self.density <= 1.0:
            raise ConfigError(f"codec.density: must be in (0, 1], got {self.density}")
        if not 1 <= self.bits <= 8:
            raise ConfigError(f"codec.bits: must be between 1 and 8, got {self.bits}")
        _at_least("codec.block", self.block, 0)
        _one_of("codec.scope", self.scope, SCOPES)
        _at_least("codec.feedback_max_age", self.feedback_max_age, 0)
        _one_of("codec.select", self.select, SELECTIONS)
        if self.stochastic and self.bits == 1:
            raise ConfigError("codec.stochastic: needs codec.bits >= 2 (1-bit values are signs)")

    def build(self) -> Codec:
        """The uplink codec these settings describe."""
        if self.name == "identity":
            return Identity()
        return TopK(density=self.density, bits=self.bits, block=self.block, scope=self.scope,
                    stochastic=self.stochastic, select=self.select)


@dataclass(frozen=True)
class DownlinkConfig:
    """Server to client: how the global trainable arrays travel (see pollen.downlink)."""

    name: str = "delta"  # delta: the steps, or their sum, since the client's version | identity: dense fp32
    density: float = 1.0  # share of each tensor's global change per step; the rest waits on the server
    bits: int = 4  # bits per value of a step
    # Most entries the global model may differ from the initial one in, as a share: what a
    # first contact costs. 0.2 at 4 bits halves the round trip of 1.0 at 8 bits for 0.3
    # points on the default task (README: the downlink budget).
    budget: float = 0.2

    def check(self) -> None:
        _one_of("downlink.name", self.name, ("delta", "identity"))
        if not 0.0 < self.budget <= 1.0:
            raise ConfigError(f"downlink.budget: must be in (0, 1], got {self.budget}")
        if not 0.0 < self.density <= 1.0:
            raise ConfigError(f"downlink.density: must be in (0, 1], got {self.density}")
        if not 2 <= self.bits <= 8:
            raise ConfigError(f"downlink.bits: must be between 2 and 8, got {self.bits}")

    def build(self) -> TopK | None:
        """The codec of the server's steps, or None for dense fp32 arrays in every message."""
        return None if self.name == "identity" else TopK(density=self.density, bits=self.bits)


@dataclass(frozen=True)
class StrategyParams:
    """The ``strategy:`` section: keyword arguments of ``federation.strategy``.

    Open-ended, because a strategy can come from a plug-in: here only the shape is
    checked (scalar values); the registry checks names and types against the chosen
    strategy's constructor. Kept as sorted pairs so a Config stays hashable.
    """

    items: tuple[tuple[str, str | int | float | bool], ...] = ()

    @classmethod
    def from_mapping(cls, values: Any) -> "StrategyParams":
        if not isinstance(values, dict):
            raise ConfigError(f"strategy: expected a mapping of parameters, got {values!r}")
        for key, value in values.items():
            if not isinstance(key, str) or not key.isidentifier():
                raise ConfigError(f"strategy.{key}: not a parameter name")
            if not isinstance(value, (str, int, float, bool)):
                raise ConfigError(f"strategy.{key}: expected a number, string or boolean, got {value!r}")
        return cls(tuple(sorted(values.items())))

    @property
    def settings(self) -> dict[str, str | int | float | bool]:
        return dict(self.items)

    def check(self) -> None:
        pass  # shape checked in from_mapping; names and types by the strategy registry


@dataclass(frozen=True)
class PrivacyConfig:
    """Client-level differential privacy (pollen/privacy.py): clipping and Gaussian noise on each update."""

    noise_multiplier: float = 0.0  # sigma: noise std / clip_norm; 0 = no noise, no clipping
    clip_norm: float = 1.0  # C: each update's L2 norm is clipped to this
    delta: float = 1e-5  # the delta the epsilon in the record is given at

    def check(self) -> None:
        _at_least("privacy.noise_multiplier", self.noise_multiplier, 0.0)
        _positive("privacy.clip_norm", self.clip_norm)
        if not 0.0 < self.delta < 1.0:
            raise ConfigError(f"privacy.delta: must be in (0, 1), got {self.delta}")


@dataclass(frozen=True)
class AttackConfig:
    """``simulation.attack``: a share of the simulated clients turned hostile (pollen/client/attacks.py)."""

    fraction: float = 0.0  # share of the clients that attack, the same ones all run; 0 = none
    kind: str = "sign-flip"  # sign-flip | scale | noise | label-flip | weight
    scale: float = 1000.0  # scale: the factor an attacker multiplies its update by

    def check(self) -> None:
        if not 0.0 <= self.fraction <= 1.0:
            raise ConfigError(f"simulation.attack.fraction: must be between 0 and 1, got {self.fraction}")
        _one_of("simulation.attack.kind", self.kind, ATTACKS)
        _positive("simulation.attack.scale", self.scale)


@dataclass(frozen=True)
class SimulationConfig:
    """How a simulated federation runs: backend, device population, client state."""

    backend: str = "inprocess"  # inprocess | ray (Flower's simulation engine)
    devices: str = ""  # device profiles YAML; "" = ideal devices (always on, no clock)
    deadline_seconds: float = 0.0  # simulated round deadline; 0 = wait for every reply
    client_state: str = "memory"  # memory | disk: where idle clients' Context.state lives (inprocess)
    # Wall-clock seconds a client may take for one message before its reply counts as a
    # straggler's (inprocess); 0 = no limit. Host-dependent, unlike deadline_seconds.
    client_timeout_seconds: float = 0.0
    ray_address: str = ""  # an existing Ray cluster; "" = start one on this machine
    client_cpus: int = 1  # Ray resources per virtual client
    client_gpus: float = 0.0
    attack: AttackConfig = field(default_factory=AttackConfig)

    def check(self) -> None:
        self.attack.check()
        _one_of("simulation.backend", self.backend, ("inprocess", "ray"))
        _one_of("simulation.client_state", self.client_state, ("memory", "disk"))
        _at_least("simulation.deadline_seconds", self.deadline_seconds, 0.0)
        _at_least("simulation.client_timeout_seconds", self.client_timeout_seconds, 0.0)
        _at_least("simulation.client_cpus", self.client_cpus, 1)
        _at_least("simulation.client_gpus", self.client_gpus, 0.0)


@dataclass(frozen=True)
class Config:
    seed: int = 0
    output_dir: str = "runs"
    # Also write each round's scalars as TensorBoard events into the run folder (the server
    # only: pollen/tensorboard_log.py; needs the tensorboard extra).
    tensorboard: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    downlink: DownlinkConfig = field(default_factory=DownlinkConfig)
    strategy: StrategyParams = field(default_factory=StrategyParams)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    def check(self) -> None:
        # NaN and infinity slip through every range check (nan < 0 and nan > 0 are both
        # false): refuse them in every number here, once, before any section's check.
        for key, value in _flat(to_dict(self)).items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{key}: must be a finite number, got {value}")
        for f in fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                value.check()
        if self.codec.fit_deadline and not (self.simulation.devices and self.simulation.deadline_seconds > 0):
            raise ConfigError("codec.fit_deadline: needs simulation.devices and simulation.deadline_seconds > 0 "
                              "(a client fits its reply to the deadline on its own link)")
        try:
            check_data(self)  # reads a path now: bad data stops the run before it starts
        except ValueError as error:
            raise ConfigError(str(error)) from None


def _one_of(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, allowed))}")


def _at_least(key: str, value: float, low: float) -> None:
    if value < low:
        raise ConfigError(f"{key}: must be at least {low}, got {value}")


def _positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{key}: must be positive, got {value}")


def _bound(key: str, value: float, low: float) -> None:
    """A finite bound of at least ``low``, or 0 for none."""
    if value != 0 and not low <= value < float("inf"):
        raise ConfigError(f"{key}: must be 0 (no bound) or a finite number of at least {low}, got {value}")


def _coerce(key: str, value: Any, kind: type) -> Any:
    """Accept a value of the field's type; ints widen to floats, nothing else converts."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{key}: expected {kind.__name__}, got {type(value).__name__} {value!r}")


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise UnknownKeyError(prefix + str(key), nearest_keys(prefix, str(key), known), sorted(known))
        kind = known[key].type
        if kind == "StrategyParams":
            kwargs[key] = StrategyParams.from_mapping(value)
        elif kind in _SECTIONS:
            kwargs[key] = _build(_SECTIONS[kind], value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(prefix + key, value, _TYPES[kind])
    return cls(**kwargs)


_TYPES = {"str": str, "int": int, "float": float, "bool": bool}
_SECTIONS = {cls.__name__: cls for cls in (ModelConfig, LoraSettings, DataConfig, TrainConfig, FederationConfig,
                                             EarlyStopping, CodecConfig, DownlinkConfig, SimulationConfig,
                                             AttackConfig, PrivacyConfig)}


def from_dict(values: dict[str, Any]) -> Config:
    """Build and check a Config from nested mappings (as read from YAML)."""
    config = _build(Config, values or {}, "")
    config.check()
    return config


def to_dict(config: Config) -> dict[str, Any]:
    """Nested mappings, the shape of a YAML config file: ``from_dict(to_dict(c)) == c``."""
    values = dataclasses.asdict(config)
    values["strategy"] = config.strategy.settings
    return values


def parse_override(text: str) -> tuple[str, Any]:
    """``federation.rounds=3`` -> ("federation.rounds", 3), values parsed as YAML scalars."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. federation.rounds=3")
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as error:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({yaml_problem(error)})") from None


def with_overrides(values: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Nested ``values`` with dotted ``{"federation.rounds": 3}`` overrides written in.

    Unknown keys are left for ``from_dict`` to name.
    """
    nested = copy.deepcopy(values)
    for key, value in overrides.items():
        *sections, name = key.split(".")
        table = nested
        for depth, section in enumerate(sections):
            if not isinstance(table.setdefault(section, {}), dict):
                raise ConfigError(f"{'.'.join(sections[:depth + 1])}: expected a mapping, got {table[section]!r}")
            table = table[section]
        table[name] = value
    return nested


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Read a YAML file (no file: the defaults above) and apply ``key=value`` overrides."""
    values = read_mapping(Path(path), "config file") if path is not None else {}
    given = dict(parse_override(text) for text in overrides)
    try:
        return from_dict(with_overrides(values, given))
    except UnknownKeyError as error:
        from_set = any(f"{key}.".startswith(f"{error.key}.") or error.key.startswith(f"{key}.") for key in given)
        if from_set or path is not None:
            raise error.written_in("--set" if from_set else str(path)) from None
        raise


def read_mapping(path: Path, what: str) -> dict[str, Any]:
    """The YAML mapping in the file ``path`` (a run, compare or tune config, ``what`` it is); else a ConfigError."""
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    values = read_yaml(path) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return values


def read_yaml(path: Path) -> Any:
    """The YAML document in ``path``; unreadable, non-UTF-8 or invalid YAML is a ConfigError naming the file."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text (byte {error.start} is {error.object[error.start]:#04x}); "
                          "save it as UTF-8") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot be read ({error.strerror})") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({yaml_problem(error)})") from None


def yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's many-line report in one line: where, and what."""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    if "'\\t'" in problem:
        problem = "a tab character; YAML indents with spaces only"
    mark = getattr(error, "problem_mark", None)
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else problem


def save_config(config: Config, path: Path) -> None:
    """Write ``config`` as a YAML file that ``load_config`` reads back to the same Config."""
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def differences(a: Config, b: Config) -> list[str]:
    """The dotted keys whose values differ between two configs."""
    flat_a, flat_b = run_config_of(a), run_config_of(b)
    return sorted(key for key in flat_a.keys() | flat_b.keys() if flat_a.get(key) != flat_b.get(key))


# What a hostile simulated client does (pollen/client/attacks.py).
ATTACKS = ("sign-flip", "scale", "noise", "label-flip", "weight")


# Flower's run config is flat and scalar: ``{"federation.rounds": 20, ...}``. The open-ended
# strategy section travels as one key holding a YAML mapping, e.g. ``strategy = "{eta: 0.01}"``.
STRATEGY_KEY = "strategy"


def run_config_of(config: Config) -> dict[str, str | int | float | bool]:
    """The flat run config Flower carries to the ServerApp and every ClientApp."""
    values = to_dict(config)
    strategy = yaml.safe_dump(values.pop(STRATEGY_KEY), default_flow_style=True).strip()
    return {**_flat(values), STRATEGY_KEY: strategy}


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def config_from_run_config(run_config: Mapping[str, Any]) -> Config:
    """The Config of a Flower run config (keys missing keep their defaults), parsed once per process."""
    return _from_run_config(tuple(sorted(run_config.items())))


@functools.lru_cache(maxsize=8)
def _from_run_config(items: tuple[tuple[str, Any], ...]) -> Config:
    flat = dict(items)
    strategy = flat.pop(STRATEGY_KEY, "{}")
    try:
        settings = yaml.safe_load(strategy) if isinstance(strategy, str) else strategy
    except yaml.YAMLError as error:
        raise ConfigError(f"strategy: not a YAML mapping: {strategy!r} ({error})") from None
    return from_dict(with_overrides({STRATEGY_KEY: settings or {}}, flat))
