"""Every Flower strategy in the registry, fed identity-coded (dense) updates through
Pollen's round, produces exactly what the same Flower strategy produces on its own."""

import numpy as np
import pytest

from pollen.config import TrainConfig
from pollen.strategies import STRATEGIES
from strategy_replies import (ReplyGrid, flower_round, grid_round, numpy_of, pollen_round, pollen_state,
                              record_of, run_round_of, sampling, strategy_of)

FLOWER = ["fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedmedian",
          "fedtrimmedavg", "krum", "multikrum", "bulyan"]
PARAMS = {  # settings that make each strategy do more than its defaults
    "fedavgm": {"server_learning_rate": 0.7, "server_momentum": 0.9},
    "fedprox": {"proximal_mu": 0.1},
    "fedadam": {"eta": 0.05}, "fedyogi": {"eta": 0.05}, "fedadagrad": {"eta": 0.05},
    "fedtrimmedavg": {"beta": 0.2},
    "krum": {"num_malicious_nodes": 1},
    "multikrum": {"num_malicious_nodes": 1, "num_nodes_to_select": 3},
    "bulyan": {"num_malicious_nodes": 1},  # needs 4 * 1 + 3 = 7 replies
}
CLIENTS = 7
rng = np.random.default_rng(1)
GLOBAL = {"w": rng.normal(size=(6, 5)).astype(np.float32), "b": rng.normal(size=5).astype(np.float32)}


pytestmark = pytest.mark.usefixtures("task_identity")  # see conftest.py


def test_all_flower_strategies_are_registered_as_flower_classes():
    for name in FLOWER:
        assert STRATEGIES[name].__module__.startswith("flwr.serverapp.strategy")


@pytest.mark.parametrize("name", FLOWER)
def test_pollen_round_equals_the_flower_strategy_alone_on_dense_updates(name):
    ours = strategy_of(name, CLIENTS, PARAMS.get(name, {}))
    assert type(ours) is STRATEGIES[name]  # the registry builds Flower's class itself, not a wrapper
    plain = STRATEGIES[name](**sampling(CLIENTS), **PARAMS.get(name, {}))
    state = pollen_state(ours, GLOBAL)
    current = dict(GLOBAL)
    for server_round in (1, 2):  # two rounds: momentum and adaptive state carry over
        deltas = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in GLOBAL.items()}
                  for _ in range(CLIENTS)]
        sizes = [10 + 7 * i for i in range(CLIENTS)]
        pollen_round(state, deltas, sizes, server_round=server_round)
        new = numpy_of(state.arrays)
        theirs = flower_round(plain, current, deltas, sizes, server_round=server_round)
        for key in GLOBAL:  # Flower's result, in the model's dtype (see the dtype test below)
            np.testing.assert_array_equal(new[key], theirs[key].astype(GLOBAL[key].dtype))
            assert not np.array_equal(new[key], current[key])
        current = new


def test_fedprox_sends_proximal_mu_to_clients():
    state = pollen_state(strategy_of("fedprox", 3, {"proximal_mu": 0.25}), GLOBAL)
    grid = ReplyGrid([record_of({k: np.zeros_like(v) for k, v in GLOBAL.items()})] * 3, [10] * 3)
    grid_round(state, grid)
    assert [message.content["config"]["proximal-mu"] for message in grid.sent] == [0.25] * 3


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad"])
def test_the_global_model_keeps_its_dtype_through_adaptive_strategies(name):
    # Flower's FedOpt family computes in float64 under NumPy 2; a float64 global would
    # double every downlink message.
    deltas = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in GLOBAL.items()} for _ in range(3)]
    new = run_round_of(strategy_of(name, 3, PARAMS.get(name, {})), GLOBAL, deltas, [1, 2, 3])
    assert all(new[k].dtype == np.float32 for k in GLOBAL)


def test_clients_add_the_proximal_term_fedprox_asks_for():
    import torch
    from torch import nn

    from pollen.client.training import train_locally
    from pollen.data import Split

    generator = torch.Generator().manual_seed(0)
    data = Split(torch.randn(64, 3, 2, 2, generator=generator), torch.randint(0, 3, (64,), generator=generator))

    def drift(mu: float) -> float:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
        start = [p.detach().clone() for p in model.parameters()]
        # AdamW with torch's own epsilon, so that the proximal gradient sets the step's size.
        train_locally(model, data, TrainConfig(local_epochs=5, batch_size=8, lr=0.05, adam_eps=1e-8),
                      proximal_mu=mu)
        return sum(float((p.detach() - p0).norm()) for p, p0 in zip(model.parameters(), start))

    assert drift(10.0) < 0.5 * drift(0.0)


def test_bulyan_expecting_an_attacker_leaves_out_entries_only_one_client_changed():
    # Why bulyan collapses on top-k updates once num_malicious_nodes >= 1 (README, Results):
    # an entry one client changed has the global value as its median, and Bulyan averages
    # only the values closest to that median.
    clients = 7
    start = {"w": np.random.default_rng(2).normal(size=700).astype(np.float32)}
    deltas = []
    for i in range(clients):
        delta = np.zeros(700, np.float32)
        delta[i * 100:(i + 1) * 100] = 1.0  # each client changes its own 100 entries
        deltas.append({"w": delta})
    moved = {}
    for f in (0, 1):
        new = flower_round(strategy_of("bulyan", clients, {"num_malicious_nodes": f}), start, deltas, [1.0] * clients)
        moved[f] = int(np.count_nonzero(np.abs(new["w"] - start["w"]) > 1e-3))
    assert moved == {0: 700, 1: 0}
