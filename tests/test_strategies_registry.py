"""The strategy registry: names, plug-ins by dotted path and entry point, checked parameters."""

import sys
import textwrap
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
from flwr.serverapp.strategy import FedAdam, FedAvg

import pollen.strategies
from pollen.cli import main
from pollen.config import ConfigError, load_config
from pollen.strategies import (STRATEGIES, StrategyError, check_params, check_strategy, has_server_optimizer,
                               make_strategy, resolve_strategy, strategy_parameters, takes_sparse_deltas)
from strategy_replies import TINY, config_of, strategy_of

SERVER_OPTIMIZERS = ["fedavgm", "fedadam", "fedyogi", "fedadagrad"]
SPARSE = ["sparse-fedavg", "sparse-median", "sparse-trimmed-mean"]


def test_unknown_name_is_rejected_with_the_known_names():
    with pytest.raises(StrategyError, match="unknown strategy 'fedsomething'.*fedadam"):
        make_strategy(config_of("fedsomething"))


def test_parameters_reach_the_flower_strategy():
    strategy = make_strategy(load_config(TINY, ["federation.strategy=fedadam", "strategy.eta=0.02", "strategy.tau=1"]))
    assert type(strategy) is FedAdam  # Flower's own class, not a wrapper
    assert (strategy.eta, strategy.tau, strategy.fraction_train) == (0.02, 1.0, 0.5)  # tiny: 5 of 10 clients
    assert isinstance(strategy.tau, float)  # ints widen to floats


def test_sampling_comes_from_the_federation_section():
    config = load_config(TINY, ["federation.num_clients=20", "federation.clients_per_round=4",
                                "federation.fraction_evaluate=0.25"])
    strategy = make_strategy(config)
    assert strategy.fraction_train == 4 / 20
    assert strategy.min_train_nodes == strategy.min_available_nodes == 4
    assert (strategy.fraction_evaluate, strategy.min_evaluate_nodes) == (0.25, 5)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_only_fedavgm_and_the_fedopt_family_have_a_server_optimizer(name):
    assert has_server_optimizer(strategy_of(name, 7)) == (name in SERVER_OPTIMIZERS)


def test_a_subclass_of_a_server_optimizer_has_one_too():
    class SlowAdam(FedAdam):
        pass

    assert has_server_optimizer(SlowAdam()) and not has_server_optimizer(FedAvg())


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_only_pollens_sparse_strategies_take_sparse_deltas(name):
    assert takes_sparse_deltas(strategy_of(name, 7)) == (name in SPARSE)


@pytest.mark.parametrize("name, params, named", [
    ("fedadam", {"etaa": 0.1}, "strategy.etaa: fedadam has no parameter 'etaa'"),
    ("fedadam", {"eta": "fast"}, "strategy.eta: expected float, got str"),
    ("krum", {"num_malicious_nodes": 1.5}, "strategy.num_malicious_nodes: expected int"),
    ("fedavg", {"fraction_train": 0.5}, "strategy.fraction_train: set by federation"),
    ("fedavg", {"weighted_by_key": "x"}, "strategy.weighted_by_key: fixed"),
    ("fedavg", {"train_metrics_aggr_fn": "x"}, "strategy.train_metrics_aggr_fn: fedavg has no parameter"),
    ("fedtrimmedavg", {"beta": 0.7}, "fedtrimmedavg rejected .*beta"),
    ("sparse-median", {"min_senders": 0}, "min_senders must be at least 1"),
    ("fednova", {"batch_size": 8}, "strategy.batch_size: set by train.batch_size"),
])
def test_bad_parameters_are_rejected_and_named(name, params, named):
    with pytest.raises(StrategyError, match=named):
        strategy_of(name, settings=params)


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
        strategy = strategy_of(path, settings={"share": 0.25})
        assert type(strategy).__name__ == "HalfStep" and strategy.share == 0.25
    with pytest.raises(StrategyError, match="my_strategies:HalfStep has no parameter 'sharee'"):
        strategy_of("my_strategies:HalfStep", settings={"sharee": 1.0})
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
        main(["simulate", str(TINY), "--set", "federation.strategy=fedadam", "--set", "strategy.eta=fast"])
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
    from strategy_replies import run_round_of

    strategy = strategy_of("sign_vote:SignVote", 2, {"vote_step": 0.25})
    assert takes_sparse_deltas(strategy) and strategy.vote_step == 0.25
    start = {"w": np.zeros(4, np.float32)}
    deltas = [{"w": np.array([1.0, 0.0, -3.0, 2.0], np.float32)},
              {"w": np.array([1.0, 0.0, -1.0, -2.0], np.float32)}]
    new = run_round_of(strategy, start, deltas, [1, 1])
    np.testing.assert_array_equal(new["w"], [0.25, 0.0, -0.25, 0.0])


def test_pollens_default_of_no_federated_evaluation_draws_no_flower_warning(caplog):
    import logging

    from pollen.config import load_config
    from pollen.strategies import make_strategy

    with caplog.at_level(logging.WARNING, logger="flwr"):
        make_strategy(load_config(None))
        make_strategy(load_config(None, ["federation.strategy=fedavg"]))
    assert not [r for r in caplog.records if "fraction_evaluate" in r.getMessage()]
