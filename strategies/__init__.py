"""Aggregation strategies, chosen by name: the registry.

``federation.strategy`` names one of:

* a registry name below (Flower's strategies and Pollen's own),
* an entry point in the ``pollen.strategies`` group of an installed package,
* a dotted path to a class, ``package.module:ClassName`` or ``package.module.ClassName``.

Any class that implements Flower's ``flwr.serverapp.strategy.Strategy`` works. Its
keyword arguments come from the config's ``strategy:`` section and are checked
against its constructor before a run starts: an unknown name, a wrong type, or a
setting Pollen itself controls is rejected with the parameter named.

Strategies see dense local arrays, or sparse deltas if they set
``takes_sparse_deltas`` (pollen/server/uplink.py decodes replies before they do).
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any

from flwr.serverapp.strategy import (
    Bulyan, FedAdagrad, FedAdam, FedAvg, FedAvgM, FedMedian, FedProx, FedTrimmedAvg, FedYogi,
    Krum, MultiKrum, Strategy,
)

from pollen.config import Config, ConfigError
from pollen.strategies.fednova import FedNova
from pollen.strategies.sparse_fedavg import SparseFedAvg
from pollen.strategies.sparse_median import SparseMedian
from pollen.strategies.sparse_trimmed_mean import SparseTrimmedMean

ENTRY_POINT_GROUP = "pollen.strategies"

STRATEGIES: dict[str, type[Strategy]] = {
    # Flower's, unchanged: they see dense local arrays decoded by the server's uplink.
    "fedavg": FedAvg,
    "fedavgm": FedAvgM,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
    "multikrum": MultiKrum,
    "bulyan": Bulyan,
    # Pollen's: sparse-aware aggregation and drift correction.
    "sparse-fedavg": SparseFedAvg,
    "sparse-median": SparseMedian,
    "sparse-trimmed-mean": SparseTrimmedMean,
    "fednova": FedNova,
}

# Set by Pollen from federation.* (sampling) or fixed by its message format.
SAMPLING = ("fraction_train", "fraction_evaluate", "min_train_nodes", "min_evaluate_nodes",
            "min_available_nodes")
# Set by Pollen from train.*, for strategies whose constructor takes them (FedNova counts local steps).
TRAINING = ("local_epochs", "batch_size")
# Strategies with a server optimizer of their own: the server's momentum step never stacks on them.
SERVER_OPTIMIZERS = (FedAvgM, FedAdam, FedYogi, FedAdagrad)
FIXED = ("weighted_by_key", "arrayrecord_key", "configrecord_key")
_SCALARS = (bool, int, float, str)


class StrategyError(ConfigError):
    """A strategy name or parameter is wrong; the message names it."""


def resolve_strategy(name: str) -> type[Strategy]:
    """The strategy class for a registry name, an entry point or a dotted path."""
    if name in STRATEGIES:
        return STRATEGIES[name]
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        if entry.name == name:
            return _strategy_class(entry.load(), f"entry point {name!r}")
    if "." in name or ":" in name:
        return _strategy_class(_import_dotted(name), name)
    plugins = sorted(entry.name for entry in entry_points(group=ENTRY_POINT_GROUP))
    raise StrategyError(
        f"federation.strategy: unknown strategy {name!r} (known: {', '.join(sorted(STRATEGIES) + plugins)}; "
        f"or a dotted path such as my_package.my_module:MyStrategy)"
    )


def strategy_parameters(cls: type[Strategy]) -> dict[str, inspect.Parameter]:
    """Keyword parameters of a strategy's constructor, following ``**kwargs`` up the MRO."""
    params: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass is object:
            continue
        signature = inspect.signature(klass.__init__)
        for param in list(signature.parameters.values())[1:]:
            if param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
                params.setdefault(param.name, param)
        if not any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values()):
            break
    return params


def check_params(name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """Check user parameters for strategy ``name``; return them with ints widened to floats."""
    cls = resolve_strategy(name)
    known = strategy_parameters(cls)
    settable = {key: param for key, param in known.items()
                if key not in SAMPLING + TRAINING + FIXED and _kind(param) is not None}
    checked = {}
    for key, value in params.items():
        where = f"strategy.{key}"
        if key in SAMPLING:
            raise StrategyError(f"{where}: set by federation.num_clients / clients_per_round / "
                                f"fraction_evaluate, not by the strategy section")
        if key in TRAINING:
            raise StrategyError(f"{where}: set by train.{key}, not by the strategy section")
        if key in FIXED:
            raise StrategyError(f"{where}: fixed by Pollen's message format")
        if key not in settable:
            raise StrategyError(f"{where}: {name} has no parameter {key!r} "
                                f"(known: {', '.join(sorted(settable)) or 'none'})")
        kind = _kind(settable[key])
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise StrategyError(f"{where}: expected {kind.__name__}, got {type(value).__name__} {value!r}")
        checked[key] = value
    return checked


def make_strategy(config: Config) -> Strategy:
    """The strategy ``config`` names, built with its ``strategy:`` settings and Pollen's sampling."""
    fed = config.federation
    cls = resolve_strategy(fed.strategy)
    settings = check_params(fed.strategy, config.strategy.settings)
    sampling = {
        "fraction_train": fed.clients_per_round / fed.num_clients,
        "min_train_nodes": fed.clients_per_round,
        "min_available_nodes": fed.clients_per_round,
        "fraction_evaluate": fed.fraction_evaluate,
        "min_evaluate_nodes": max(1, round(fed.fraction_evaluate * fed.num_clients)),
    }
    training = {key: getattr(config.train, key) for key in TRAINING if key in strategy_parameters(cls)}
    no_evaluation = logging.getLogger("flwr")
    no_evaluation.addFilter(_no_evaluation_warning)  # Pollen's default, not a mistake to warn of
    try:
        return cls(**sampling, **training, **settings)
    except (TypeError, ValueError) as error:  # a value the strategy itself refuses
        raise StrategyError(f"strategy: {fed.strategy} rejected {settings}: {error}") from error
    finally:
        no_evaluation.removeFilter(_no_evaluation_warning)


def _no_evaluation_warning(record: logging.LogRecord) -> bool:
    """Drop Flower's warning that fraction_evaluate 0 skips federated evaluation: it is off by choice."""
    return not record.getMessage().startswith("fraction_evaluate is set to 0.0")


def has_server_optimizer(strategy: Strategy) -> bool:
    """True for FedAvgM, FedAdam, FedYogi, FedAdagrad (and subclasses, such as a plug-in's)."""
    return isinstance(strategy, SERVER_OPTIMIZERS)


def takes_sparse_deltas(strategy: Strategy) -> bool:
    """True for strategies that read replies as sparse deltas (strategies/sparse_deltas.py)."""
    return bool(getattr(strategy, "takes_sparse_deltas", False))


def check_strategy(config: Config) -> None:
    """Fail before a run starts if ``config`` names a bad strategy or parameter."""
    check_params(config.federation.strategy, config.strategy.settings)


def _kind(param: inspect.Parameter) -> type | None:
    """The scalar type a parameter takes from YAML, or None if it takes a Python object."""
    if param.annotation in _SCALARS:
        return param.annotation
    if isinstance(param.annotation, str) and param.annotation in {k.__name__ for k in _SCALARS}:
        return {k.__name__: k for k in _SCALARS}[param.annotation]
    if param.annotation is inspect.Parameter.empty and type(param.default) in _SCALARS:
        return type(param.default)
    return None


def _import_dotted(path: str) -> Any:
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as error:
        raise StrategyError(f"federation.strategy: cannot import {path!r}: {error}") from None


def _strategy_class(obj: Any, where: str) -> type[Strategy]:
    if not (isinstance(obj, type) and issubclass(obj, Strategy)):
        raise StrategyError(f"federation.strategy: {where} is not a flwr.serverapp.strategy.Strategy class")
    return obj


__all__ = [
    "ENTRY_POINT_GROUP", "FedNova", "STRATEGIES", "SparseFedAvg", "SparseMedian", "SparseTrimmedMean",
    "StrategyError", "check_params", "check_strategy", "has_server_optimizer", "make_strategy",
    "resolve_strategy", "strategy_parameters", "takes_sparse_deltas",
]
