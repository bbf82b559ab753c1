"""ServerMomentum: FedAvgM's server update around any strategy."""

import numpy as np
import pytest
from flwr.serverapp.strategy import FedAvg, FedAvgM
from strategy_replies import record_of, run_round, sampling

from pollen.codec import Identity, TopK
from pollen.config import ConfigError, load_config
from pollen.strategies import CompressedUpdates, ServerMomentum, make_strategy

rng = np.random.default_rng(3)
START = {"w": rng.normal(size=(6, 5)).astype(np.float32), "b": rng.normal(size=5).astype(np.float32)}


pytestmark = pytest.mark.usefixtures("task_identity")  # see conftest.py


def test_velocity_accumulates_steps_over_rounds():
    server = ServerMomentum(learning_rate=0.5, momentum=0.5)
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
    assert ServerMomentum().apply(record_of(START), proposed) is proposed


def test_around_fedavg_it_is_flowers_fedavgm():
    ours = CompressedUpdates(FedAvg(**sampling(3)), Identity(), server=ServerMomentum(0.7, 0.9))
    theirs = CompressedUpdates(FedAvgM(server_learning_rate=0.7, server_momentum=0.9, **sampling(3)), Identity())
    a = b = dict(START)
    for server_round in (1, 2, 3):
        deltas = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in START.items()} for _ in range(3)]
        a = run_round(ours, a, deltas, [5, 10, 20], server_round=server_round)
        b = run_round(theirs, b, deltas, [5, 10, 20], server_round=server_round)
        for k in START:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-5)


def test_it_applies_around_a_sparse_strategy():
    strategy = make_strategy("sparse-fedavg", TopK(density=1 / 30), server=ServerMomentum(1.0, 0.5), **sampling(2))
    delta = {k: np.zeros_like(v) for k, v in START.items()}
    delta["w"][0, 0] = 1.0
    first = run_round(strategy, START, [delta, delta], [1, 1], codec=TopK(density=1 / 30), server_round=1)
    second = run_round(strategy, first, [delta, delta], [1, 1], codec=TopK(density=1 / 30), server_round=2)
    assert first["w"][0, 0] - START["w"][0, 0] == pytest.approx(1.0, rel=1e-2)
    assert second["w"][0, 0] - first["w"][0, 0] == pytest.approx(1.5, rel=1e-2)  # 0.5 * 1 + 1


def test_rate_is_constant_then_falls_linearly_to_a_tenth():
    server = ServerMomentum(learning_rate=2.0, decay=0.5, rounds=20)
    rates = [server.rate(r) for r in range(1, 21)]
    assert rates[:10] == [2.0] * 10
    np.testing.assert_allclose(rates[10:], [2.0 * (1 - 0.9 * k / 10) for k in range(1, 11)])
    assert ServerMomentum(learning_rate=2.0, rounds=20).rate(20) == 2.0  # no decay
    with pytest.raises(ValueError, match="needs the number of rounds"):
        ServerMomentum(decay=0.5)


def test_the_decayed_rate_moves_the_model_by_less():
    server = ServerMomentum(decay=1.0, rounds=2)  # round 1 at 0.55, round 2 at a tenth
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
