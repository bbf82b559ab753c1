"""ServerMomentum: FedAvgM's server update, applied by Pollen's round unless the strategy has its own."""

import numpy as np
import pytest
from flwr.serverapp.strategy import FedAvg, FedAvgM

from pollen.codec import TopK
from pollen.config import ConfigError, FederationConfig, load_config
from pollen.server.app import new_state
from pollen.server.momentum import ServerMomentum
from pollen.strategies import make_strategy
from strategy_replies import (config_of, flower_round, numpy_of, pollen_round, pollen_state, record_of, sampling,
                              strategy_of)

rng = np.random.default_rng(3)
START = {"w": rng.normal(size=(6, 5)).astype(np.float32), "b": rng.normal(size=5).astype(np.float32)}
OWN_OPTIMIZER = ["fedavgm", "fedadam", "fedyogi", "fedadagrad"]
DEFAULT = FederationConfig()  # server_learning_rate 1.0, server_momentum 0.6, server_decay 0.5


pytestmark = pytest.mark.usefixtures("task_identity")  # see conftest.py


def random_deltas(count: int) -> list[dict]:
    return [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in START.items()} for _ in range(count)]


def test_velocity_accumulates_steps_over_rounds():
    server = ServerMomentum(learning_rate=0.5, momentum=0.5, decay=0.0, rounds=3)
    current, velocity = dict(START), {k: np.zeros_like(v, dtype=np.float64) for k, v in START.items()}
    for _ in range(3):
        step = {k: rng.normal(size=v.shape) for k, v in START.items()}
        new = server.apply(record_of(current), record_of({k: current[k] + step[k] for k in START}))
        for k in START:
            velocity[k] = 0.5 * velocity[k] + step[k]
            expected = current[k] + 0.5 * velocity[k]
            np.testing.assert_allclose(new[k].numpy(), expected, rtol=1e-5, atol=1e-5)
            assert new[k].numpy().dtype == np.float32
        current = {k: new[k].numpy() for k in START}


def test_plain_settings_take_the_proposal_as_it_is():
    proposed = record_of({k: v + 1 for k, v in START.items()})
    assert ServerMomentum(1.0, 0.0, 0.0, 0).apply(record_of(START), proposed) is proposed


@pytest.mark.parametrize("rate", [float("inf"), float("nan"), 0.0, -1.0])
def test_the_learning_rate_must_be_positive_and_finite(rate):
    with pytest.raises(ValueError, match="positive and finite"):
        ServerMomentum(rate, 0.6, 0.0, 10)


def test_every_setting_must_be_given():
    with pytest.raises(TypeError, match="'decay' and 'rounds'"):
        ServerMomentum(1.0, 0.6)


def test_around_fedavg_it_is_flowers_fedavgm():
    ours = pollen_state(FedAvg(**sampling(3)), START, momentum=ServerMomentum(0.7, 0.9, 0.0, 3))
    theirs = FedAvgM(server_learning_rate=0.7, server_momentum=0.9, **sampling(3))
    b = dict(START)
    for server_round in (1, 2, 3):
        deltas = random_deltas(3)
        pollen_round(ours, deltas, [5, 10, 20], server_round=server_round)
        b = flower_round(theirs, b, deltas, [5, 10, 20], server_round=server_round)
        a = numpy_of(ours.arrays)
        for k in START:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-5)


def test_it_applies_around_a_sparse_strategy():
    codec = TopK(density=1 / 30)
    state = pollen_state(strategy_of("sparse-fedavg", 2), START, momentum=ServerMomentum(1.0, 0.5, 0.0, 2))
    delta = {k: np.zeros_like(v) for k, v in START.items()}
    delta["w"][0, 0] = 1.0
    pollen_round(state, [delta, delta], [1, 1], codec, server_round=1)
    first = numpy_of(state.arrays)
    pollen_round(state, [delta, delta], [1, 1], codec, server_round=2)
    second = numpy_of(state.arrays)
    assert first["w"][0, 0] - START["w"][0, 0] == pytest.approx(1.0, rel=1e-2)
    assert second["w"][0, 0] - first["w"][0, 0] == pytest.approx(1.5, rel=1e-2)  # 0.5 * 1 + 1


def test_rate_is_constant_then_falls_linearly_to_a_tenth():
    server = ServerMomentum(learning_rate=2.0, momentum=0.0, decay=0.5, rounds=20)
    rates = [server.rate(r) for r in range(1, 21)]
    assert rates[:10] == [2.0] * 10
    np.testing.assert_allclose(rates[10:], [2.0 * (1 - 0.9 * k / 10) for k in range(1, 11)])
    assert ServerMomentum(learning_rate=2.0, momentum=0.0, decay=0.0, rounds=20).rate(20) == 2.0  # no decay
    with pytest.raises(ValueError, match="needs the number of rounds"):
        ServerMomentum(1.0, 0.0, decay=0.5, rounds=0)


def test_the_decayed_rate_moves_the_model_by_less():
    server = ServerMomentum(1.0, 0.0, decay=1.0, rounds=2)  # round 1 at 0.55, round 2 at a tenth
    step = {k: np.ones_like(v) for k, v in START.items()}
    proposed = record_of({k: START[k] + step[k] for k in START})
    moved = server.apply(record_of(START), proposed, server_round=2)
    np.testing.assert_allclose(moved["w"].numpy() - START["w"], 0.1, rtol=1e-5)


@pytest.mark.parametrize("key, value, named", [
    ("federation.server_decay", "1.5", "federation.server_decay: must be in"),
    ("federation.server_momentum", "1.0", "federation.server_momentum: must be in"),
    ("federation.server_learning_rate", "0", "federation.server_learning_rate: must be positive"),
])
def test_config_names_bad_server_settings(key, value, named):
    with pytest.raises(ConfigError, match=named):
        load_config(None, [f"{key}={value}"])


def default_momentum_config(name: str, settings: dict | None = None):
    """The tiny config with strategy ``name`` on 3 clients, the default server momentum and
    identity codecs both ways (tiny.yaml itself turns the momentum off)."""
    return config_of(name, 3, settings, [
        f"federation.server_learning_rate={DEFAULT.server_learning_rate}",
        f"federation.server_momentum={DEFAULT.server_momentum}",
        f"federation.server_decay={DEFAULT.server_decay}",
        "codec.name=identity", "downlink.name=identity",
    ])


def test_the_default_server_momentum_is_on():
    assert (DEFAULT.server_learning_rate, DEFAULT.server_momentum, DEFAULT.server_decay) == (1.0, 0.6, 0.5)


@pytest.mark.parametrize("name", OWN_OPTIMIZER)
def test_a_strategy_with_its_own_server_optimizer_gets_no_server_momentum(name):
    assert new_state(default_momentum_config(name)).momentum is None


@pytest.mark.parametrize("name", ["fedavg", "sparse-fedavg"])
def test_other_strategies_get_the_configured_server_momentum(name):
    config = default_momentum_config(name)
    momentum = new_state(config).momentum
    assert momentum is not None
    settings = (momentum.learning_rate, momentum.momentum, momentum.decay, momentum.rounds)
    assert settings == (1.0, 0.6, 0.5, config.federation.rounds)


@pytest.mark.parametrize("name", OWN_OPTIMIZER)
def test_a_server_optimizer_through_pollens_round_equals_the_flower_strategy_alone(name):
    config = default_momentum_config(name, {"server_momentum": 0.9} if name == "fedavgm" else {})
    server = new_state(config)
    ours = pollen_state(server.strategy, START, momentum=server.momentum)
    alone = make_strategy(config)
    # What the server would do if it stacked its momentum on the strategy's optimizer.
    stacked = pollen_state(make_strategy(config), START, momentum=ServerMomentum(
        DEFAULT.server_learning_rate, DEFAULT.server_momentum, DEFAULT.server_decay, config.federation.rounds))
    theirs = dict(START)
    for server_round in (1, 2, 3):
        deltas, sizes = random_deltas(3), [5, 10, 20]
        pollen_round(ours, deltas, sizes, server_round=server_round)
        pollen_round(stacked, deltas, sizes, server_round=server_round)
        theirs = flower_round(alone, theirs, deltas, sizes, server_round=server_round)
    for k in START:
        np.testing.assert_allclose(ours.arrays[k].numpy(), theirs[k], rtol=1e-6)
    # The comparison can tell: stacked momentum ends somewhere else.
    assert not all(np.allclose(stacked.arrays[k].numpy(), theirs[k], rtol=1e-3) for k in START)
