"""Pollen is a valid Flower App: `flwr run .` finds its components and config."""

import importlib
from pathlib import Path

from flwr.cli.config_utils import load_and_validate
from flwr.clientapp import ClientApp
from flwr.common.config import flatten_dict
from flwr.serverapp import ServerApp

from pollen.config import from_flat

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def load(reference: str):
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module), attribute)


def test_pyproject_is_a_valid_flower_app_with_pollen_components():
    config, errors = load_and_validate(PYPROJECT)
    assert config is not None and errors == []
    components = config["tool"]["flwr"]["app"]["components"]
    assert isinstance(load(components["serverapp"]), ServerApp)
    assert isinstance(load(components["clientapp"]), ClientApp)


def test_flower_run_config_maps_onto_pollen_config():
    config, _ = load_and_validate(PYPROJECT)
    run_config = flatten_dict(config["tool"]["flwr"]["app"]["config"])
    pollen_config = from_flat(run_config)
    assert pollen_config.federation.rounds == run_config["federation.rounds"]
    assert pollen_config.federation.num_clients == run_config["federation.num_clients"]
