"""Pollen is a valid Flower App: `flwr run .` finds its components and `--run-config` sets any key.

Flower's own functions read the config here (the ones `flwr run`, the SuperLink and the
SuperNodes use), so what passes here passes there.
"""

import importlib
import io
import json
import zipfile
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk
from flwr.cli.config_utils import load_and_validate
from flwr.clientapp import ClientApp
from flwr.common.config import flatten_dict, fuse_dicts, parse_config_args
from flwr.serverapp import ServerApp

from pollen.config import Config, config_from_run_config, run_config_of

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"


def load(reference: str):
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module), attribute)


def flower_app() -> dict:
    config, _ = load_and_validate(PYPROJECT)
    return config["tool"]["flwr"]


def app_config() -> dict:
    """``[tool.flwr.app.config]`` as Flower flattens it into a run config."""
    return flatten_dict(flower_app()["app"]["config"])


def run_config(*overrides: str) -> dict:
    """The run config of ``flwr run . --run-config OVERRIDE ...``; the SuperLink rejects unknown keys."""
    return fuse_dicts(app_config(), parse_config_args(list(overrides)), check_keys=True)


def test_pyproject_is_a_valid_flower_app_with_pollen_components():
    _, warnings = load_and_validate(PYPROJECT)
    assert warnings == []
    components = flower_app()["app"]["components"]
    assert isinstance(load(components["serverapp"]), ServerApp)
    assert isinstance(load(components["clientapp"]), ClientApp)


def test_pyproject_has_no_legacy_federations_that_flwr_run_would_rewrite():
    # Flower >= 1.42 moves [tool.flwr.federations] to FLWR_HOME/config.toml and comments it out here.
    assert "federations" not in flower_app()


def test_the_fab_carries_the_config_not_code():
    # The SuperLink and SuperNodes put the FAB first on sys.path: a pollen/ folder in it
    # would shadow the installed package, whose server/ and client/ it lacks.
    with zipfile.ZipFile(io.BytesIO(build_fab_from_disk(ROOT))) as fab:
        assert "pyproject.toml" in fab.namelist()
        assert not [name for name in fab.namelist() if name.endswith(".py")]


def typed(flat: dict) -> dict:
    return {key: (type(value), value) for key, value in flat.items()}  # 1 != 1.0 != True here


def test_app_config_holds_every_pollen_key_with_its_default():
    expected, actual = typed(run_config_of(Config())), typed(app_config())
    wrong = [f"{key} = {json.dumps(expected[key][1])}" if key in expected else f"{key}: not a Pollen key"
             for key in sorted(expected.keys() | actual.keys()) if expected.get(key) != actual.get(key)]
    assert not wrong, "pyproject.toml [tool.flwr.app.config] differs from pollen.config; set:\n" + "\n".join(wrong)


@pytest.mark.parametrize(("overrides", "expected"), [
    (["data.dataset='digits'"], lambda c: c.data.dataset == "digits"),
    (["codec.density=0.05 codec.stochastic=true"], lambda c: c.codec.density == 0.05 and c.codec.stochastic),
    (["federation.rounds=1", "model.name='tiny-cnn'"], lambda c: c.federation.rounds == 1 and c.model.name == "tiny-cnn"),
    (["federation.strategy='fedadam' strategy='{eta: 0.05}'"], lambda c: c.strategy.settings == {"eta": 0.05}),
    (["seed=7 simulation.client_gpus=0.5"], lambda c: c.seed == 7 and c.simulation.client_gpus == 0.5),
])
def test_flower_accepts_run_config_overrides_of_every_section(overrides, expected):
    assert expected(config_from_run_config(run_config(*overrides)))


def test_flower_rejects_keys_pollen_does_not_have():
    with pytest.raises(ValueError, match="data.nonexistent"):
        run_config("data.nonexistent=1")
