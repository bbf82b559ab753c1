"""Run configuration: YAML in, frozen dataclasses out, every key checked.

The same configuration travels to clients as Flower's flat ``run_config``
(``{"federation.rounds": 20, ...}``), so one set of names serves YAML files,
``--set`` overrides and ``flwr run --run-config``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from pollen.codec import SCOPES, SELECTIONS


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names the key."""


@dataclass(frozen=True)
class ModelConfig:
    name: str = "efficientnet-lite0"  # or "tiny-cnn" (random base, for tests)
    trainable: str = "lora"  # head | lora | full
    lora_rank: int = 8
    lora_alpha: float = 16.0
    quantize: str = "int8"  # int8 | none: storage of the frozen base
    image_size: int = 64

    def check(self) -> None:
        _one_of("model.name", self.name, ("efficientnet-lite0", "tiny-cnn"))
        _one_of("model.trainable", self.trainable, ("head", "lora", "full"))
        _one_of("model.quantize", self.quantize, ("int8", "none"))
        _at_least("model.lora_rank", self.lora_rank, 1)
        _positive("model.lora_alpha", self.lora_alpha)
        _at_least("model.image_size", self.image_size, 8)
        if self.trainable == "full" and self.quantize == "int8":
            raise ConfigError(
                "model.quantize: an int8 base cannot be fine-tuned in full; "
                "use model.trainable=head|lora or model.quantize=none"
            )


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "mnist5k"  # or "digits" (sklearn, 8x8)
    test_size: int = 1000  # held out for central evaluation
    partition: str = "dirichlet"  # dirichlet | iid | sampled (min_partition_size each, may overlap)
    alpha: float = 0.5  # Dirichlet concentration: smaller = more label skew
    min_partition_size: int = 10

    def check(self) -> None:
        _one_of("data.dataset", self.dataset, ("mnist5k", "digits"))
        _at_least("data.test_size", self.test_size, 1)
        _one_of("data.partition", self.partition, ("dirichlet", "iid", "sampled"))
        _positive("data.alpha", self.alpha)
        _at_least("data.min_partition_size", self.min_partition_size, 1)


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

    def check(self) -> None:
        _at_least("train.local_epochs", self.local_epochs, 1)
        _at_least("train.batch_size", self.batch_size, 1)
        _positive("train.lr", self.lr)
        _at_least("train.weight_decay", self.weight_decay, 0.0)
        _positive("train.adam_eps", self.adam_eps)


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

    def check(self) -> None:
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

    def check(self) -> None:
        _one_of("codec.name", self.name, ("topk", "identity"))
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


@dataclass(frozen=True)
class DownlinkConfig:
    """Server to client: how the global trainable arrays travel (see pollen.downlink)."""

    name: str = "delta"  # delta: compressed steps since the client's version | identity: dense fp32
    density: float = 1.0  # share of each tensor's global change per step; the rest waits on the server
    bits: int = 8  # bits per value of a step

    def check(self) -> None:
        _one_of("downlink.name", self.name, ("delta", "identity"))
        if not 0.0 < self.density <= 1.0:
            raise ConfigError(f"downlink.density: must be in (0, 1], got {self.density}")
        if not 2 <= self.bits <= 8:
            raise ConfigError(f"downlink.bits: must be between 2 and 8, got {self.bits}")


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
class SimulationConfig:
    """How a simulated federation runs: backend, device population, client state."""

    backend: str = "inprocess"  # inprocess | ray (Flower's simulation engine)
    devices: str = ""  # device profiles YAML; "" = ideal devices (always on, no clock)
    deadline_seconds: float = 0.0  # simulated round deadline; 0 = wait for every reply
    client_state: str = "memory"  # memory | disk: where idle clients' Context.state lives (inprocess)
    ray_address: str = ""  # an existing Ray cluster; "" = start one on this machine
    client_cpus: int = 1  # Ray resources per virtual client
    client_gpus: float = 0.0

    def check(self) -> None:
        _one_of("simulation.backend", self.backend, ("inprocess", "ray"))
        _one_of("simulation.client_state", self.client_state, ("memory", "disk"))
        if self.devices and not Path(self.devices).is_file():
            raise ConfigError(f"simulation.devices: file not found: {self.devices}")
        _at_least("simulation.deadline_seconds", self.deadline_seconds, 0.0)
        _at_least("simulation.client_cpus", self.client_cpus, 1)
        _at_least("simulation.client_gpus", self.client_gpus, 0.0)


@dataclass(frozen=True)
class Config:
    seed: int = 0
    output_dir: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    downlink: DownlinkConfig = field(default_factory=DownlinkConfig)
    strategy: StrategyParams = field(default_factory=StrategyParams)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)

    def check(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                value.check()
        if self.data.test_size >= _DATASET_SIZES[self.data.dataset]:
            raise ConfigError(
                f"data.test_size: {self.data.test_size} leaves no training data in "
                f"{self.data.dataset} ({_DATASET_SIZES[self.data.dataset]} examples)"
            )


_DATASET_SIZES = {"mnist5k": 5000, "digits": 1797}


def _one_of(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, allowed))}")


def _at_least(key: str, value: float, low: float) -> None:
    if value < low:
        raise ConfigError(f"{key}: must be at least {low}, got {value}")


def _positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{key}: must be positive, got {value}")


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
            raise ConfigError(
                f"{prefix}{key}: unknown key (known: {', '.join(sorted(known))})"
            )
        kind = known[key].type
        sub = _SECTIONS.get(key) if cls is Config else None
        if sub is StrategyParams:
            kwargs[key] = StrategyParams.from_mapping(value)
        elif sub is not None:
            kwargs[key] = _build(sub, value, f"{key}.")
        else:
            kwargs[key] = _coerce(prefix + key, value, _TYPES[kind])
    return cls(**kwargs)


_TYPES = {"str": str, "int": int, "float": float, "bool": bool}
_SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "federation": FederationConfig,
    "codec": CodecConfig,
    "downlink": DownlinkConfig,
    "strategy": StrategyParams,
    "simulation": SimulationConfig,
}


def from_dict(values: dict[str, Any]) -> Config:
    """Build and check a Config from nested mappings (as read from YAML)."""
    config = _build(Config, values or {}, "")
    config.check()
    return config


def to_flat(config: Config) -> dict[str, Any]:
    """Flatten to dotted keys, the shape of Flower's run_config."""
    flat: dict[str, Any] = {}
    for key, value in dataclasses.asdict(config).items():
        if key == "strategy":
            flat.update({f"strategy.{k}": v for k, v in config.strategy.items})
        elif isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def from_flat(flat: dict[str, Any]) -> Config:
    """Inverse of to_flat; missing keys keep their defaults."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        section, _, name = key.partition(".")
        if name:
            nested.setdefault(section, {})[name] = value
        else:
            nested[key] = value
    return from_dict(nested)


def parse_override(text: str) -> tuple[str, Any]:
    """``federation.rounds=3`` -> ("federation.rounds", 3), values parsed as YAML scalars."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. federation.rounds=3")
    return key.strip(), yaml.safe_load(raw)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read a YAML file (no file: the defaults above) and apply ``key=value`` overrides."""
    values: Any = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    flat = to_flat(from_dict(values))
    for text in overrides:
        key, value = parse_override(text)
        if key not in flat and not key.startswith("strategy."):  # strategy params are open-ended
            raise ConfigError(f"{key}: unknown key (known: {', '.join(sorted(flat))})")
        flat[key] = value
    return from_flat(flat)

