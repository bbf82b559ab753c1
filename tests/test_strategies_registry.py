"""The strategy registry: names, plug-ins by dotted path and entry point, checked parameters."""

import sys
import textwrap
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
from flwr.serverapp.strategy import FedAdam, FedAvg

import pollen.strategies
from pollen.cli import main
from pollen.codec import Identity, TopK
from pollen.config import ConfigError, load_config
from pollen.strategies import (CompressedUpdates, StrategyError, check_params, check_strategy, make_strategy,
                        resolve_strategy, strategy_parameters)

TINY = "simulations/configs/tiny.yaml"


def test_unknown_name_is_rejected_with_the_known_names():
    with pytest.raises(StrategyError, match="unknown strategy 'fedsomething'.*fedadam"):
        make_strategy("fedsomething", Identity())


def test_parameters_reach_the_flower_strategy():
    strategy = make_strategy("fedadam", TopK(0.1), {"eta": 0.02, "tau": 1}, fraction_train=0.5)
    assert isinstance(strategy, CompressedUpdates) and isinstance(strategy.inner, FedAdam)
    assert (strategy.inner.eta, strategy.inner.tau, strategy.inner.fraction_train) == (0.02, 1.0, 0.5)
    assert isinstance(strategy.inner.tau, float)  # ints widen to floats


@pytest.mark.parametrize("name, params, named", [
    ("fedadam", {"etaa": 0.1}, "strategy.etaa: fedadam has no parameter 'etaa'"),
    ("fedadam", {"eta": "fast"}, "strategy.eta: expected float, got str"),
    ("krum", {"num_malicious_nodes": 1.5}, "strategy.num_malicious_nodes: expected int"),
    ("fedavg", {"fraction_train": 0.5}, "strategy.fraction_train: set by federation"),
    ("fedavg", {"weighted_by_key": "x"}, "strategy.weighted_by_key: fixed"),
    ("fedavg", {"train_metrics_aggr_fn": "x"}, "strategy.train_metrics_aggr_fn: fedavg has no parameter"),
    ("fedtrimmedavg", {"beta": 0.7}, "fedtrimmedavg rejected .*beta"),
    ("sparse-median", {"min_senders": 0}, "min_senders must be at least 1"),
])
def test_bad_parameters_are_rejected_and_named(name, params, named):
    with pytest.raises(StrategyError, match=named):
        make_strategy(name, Identity(), params)


def test_parameters_follow_kwargs_up_to_flower():
    params = strategy_parameters(resolve_strategy("sparse-median"))
    assert {"min_senders", "fraction_train", "weighted_by_key"} <= set(params)
    assert check_params("sparse-trimmed-mean", {"beta": 0}) == {"beta": 0.0}


@pytest.fixture
def plugin_module(tmp_path, monkeypatch):
    (tmp_path / "my_strategies.py").write_text(textwrap.dedent('''
        from flwr.serverapp.strategy import FedAvg

        class HalfStep(FedAvg):
            """FedAvg that moves half way."""

            def __init__(self, *, share: float = 0.5, **settings):
                super().__init__(**settings)
                self.share = share

        not_a_strategy = 3
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_strategies"
    sys.modules.pop("my_strategies", None)


def test_a_strategy_loads_by_dotted_path(plugin_module):
    for path in ("my_strategies:HalfStep", "my_strategies.HalfStep"):
        strategy = make_strategy(path, Identity(), {"share": 0.25})
        assert type(strategy.inner).__name__ == "HalfStep" and strategy.inner.share == 0.25
    with pytest.raises(StrategyError, match="my_strategies:HalfStep has no parameter 'sharee'"):
        make_strategy("my_strategies:HalfStep", Identity(), {"sharee": 1.0})
    with pytest.raises(StrategyError, match="not a flwr.serverapp.strategy.Strategy class"):
        resolve_strategy("my_strategies:not_a_strategy")
    with pytest.raises(StrategyError, match="cannot import 'no_such_module.Thing'"):
        resolve_strategy("no_such_module.Thing")


def test_a_strategy_loads_from_an_entry_point(plugin_module, monkeypatch):
    entry = EntryPoint("half-step", "my_strategies:HalfStep", pollen.strategies.ENTRY_POINT_GROUP)
    monkeypatch.setattr(pollen.strategies, "entry_points",
                        lambda group: [entry] if group == pollen.strategies.ENTRY_POINT_GROUP else [])
    assert resolve_strategy("half-step").__name__ == "HalfStep"
    with pytest.raises(StrategyError, match="known: .*half-step"):
        resolve_strategy("half-stepp")


def test_yaml_strategy_section_is_checked_against_the_chosen_strategy(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("federation:\n  strategy: fedyogi\nstrategy:\n  eta: 0.01\n  beta_1: 0.8\n")
    config = load_config(path, ["strategy.tau=0.01"])
    assert config.strategy.settings == {"beta_1": 0.8, "eta": 0.01, "tau": 0.01}
    check_strategy(config)
    with pytest.raises(StrategyError, match="strategy.etta"):
        check_strategy(load_config(path, ["strategy.etta=1"]))
    with pytest.raises(ConfigError, match="strategy.eta: expected a number"):
        load_config(overrides=["strategy.eta=[1, 2]"])
    path.write_text("strategy:\n  1: 0.5\n  eta: 0.1\n")
    with pytest.raises(ConfigError, match="strategy.1: not a parameter name"):
        load_config(path)


def test_cli_names_a_bad_strategy_parameter_before_running(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["simulate", TINY, "--set", "federation.strategy=fedadam", "--set", "strategy.eta=fast"])
    assert exit_info.value.code == 2
    assert "strategy.eta: expected float" in capsys.readouterr().err


def test_fedavg_class_is_flowers():
    assert resolve_strategy("fedavg") is FedAvg


def test_the_readme_strategy_example_runs(tmp_path, monkeypatch, task_identity):
    """The SignVote plug-in in README.md loads by dotted path and aggregates a round."""
    import re

    import numpy as np

    readme = Path(__file__).resolve().parents[1] / "README.md"
    code = re.search(r"```python\n# my_package/sign_vote.py\n(.*?)```", readme.read_text(), re.S).group(1)
    (tmp_path / "sign_vote.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    from strategy_replies import run_round, sampling

    strategy = make_strategy("sign_vote:SignVote", Identity(), {"vote_step": 0.25}, **sampling(2))
    start = {"w": np.zeros(4, np.float32)}
    deltas = [{"w": np.array([1.0, 0.0, -3.0, 2.0], np.float32)},
              {"w": np.array([1.0, 0.0, -1.0, -2.0], np.float32)}]
    new = run_round(strategy, start, deltas, [1, 1])
    np.testing.assert_array_equal(new["w"], [0.25, 0.0, -0.25, 0.0])
