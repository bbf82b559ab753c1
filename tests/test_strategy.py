"""One round of Pollen's server (``run_round``): replies checked, decoded, counted, then aggregated."""

import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Error
from flwr.serverapp.strategy import FedAvg

from pollen.codec import Identity, TopK, decode, dense_wire_bytes, encode, layout_of, wire_bytes
from pollen.strategies import STRATEGIES, make_strategy
from strategy_replies import (ReplyGrid, config_of, flower_round, grid_round, metrics, numpy_of, pollen_round,
                              pollen_state, sampling, strategy_of)

rng = np.random.default_rng(0)
GLOBAL = {"w": rng.normal(size=(20, 30)).astype(np.float32), "b": rng.normal(size=(30,)).astype(np.float32)}


pytestmark = pytest.mark.usefixtures("task_identity")  # see conftest.py


def random_delta() -> dict:
    return {k: rng.normal(size=v.shape).astype(np.float32) for k, v in GLOBAL.items()}


def assert_moved_by(state, delta: dict) -> None:
    """The server's global arrays are GLOBAL + ``delta``, to float32 rounding."""
    for name in GLOBAL:
        np.testing.assert_allclose(state.arrays[name].numpy(), GLOBAL[name] + delta[name], rtol=1e-6, atol=1e-6)


def test_registry_rejects_unknown_names():
    assert "fedavg" in STRATEGIES
    with pytest.raises(ValueError, match="unknown strategy 'fedsomething'"):
        make_strategy(config_of("fedsomething"))


@pytest.mark.parametrize("name, settings, expected", [
    ("fedavg", {}, {"server-round": 1}),
    ("fednova", {}, {"server-round": 1}),
    ("fedprox", {"proximal_mu": 0.25}, {"server-round": 1, "proximal-mu": 0.25}),
])
def test_the_train_config_carries_only_the_round_settings(name, settings, expected):
    state = pollen_state(strategy_of(name, settings=settings), GLOBAL)
    codec = TopK(0.05, 4)
    grid = ReplyGrid([encode(random_delta(), codec) for _ in range(3)], [10, 10, 10])
    outcome = grid_round(state, grid, codec)
    # No codec, learning rate, epochs or batch size: both sides read those from the run config.
    assert [dict(message.content["config"]) for message in grid.sent] == [expected] * 3
    assert outcome.traffic.downlink == 3 * wire_bytes(grid.sent[0].content["arrays"])


def test_with_a_compressed_downlink_the_train_config_adds_only_downlink_entries():
    state = pollen_state(strategy_of("fedavg"), GLOBAL, downlink=TopK(density=1.0))
    grid = ReplyGrid([encode(random_delta(), Identity()) for _ in range(3)], [10, 10, 10])
    grid_round(state, grid)
    for message in grid.sent:
        config = dict(message.content["config"])
        assert config.pop("server-round") == 1
        assert config and all(key.startswith("downlink.") for key in config)


def test_one_clients_identity_update_moves_the_model_by_exactly_its_delta():
    state = pollen_state(strategy_of("fedavg", clients=1), GLOBAL)
    delta = random_delta()
    outcome = pollen_round(state, [delta], [10])
    assert_moved_by(state, delta)
    assert (outcome.traffic.accepted, outcome.traffic.rejected, outcome.traffic.failed) == (1, 0, 0)


def test_identity_updates_aggregate_exactly_like_flower_fedavg():
    state = pollen_state(strategy_of("fedavg"), GLOBAL)
    deltas, sizes = [random_delta() for _ in range(3)], [10, 30, 60]
    pollen_round(state, deltas, sizes)
    expected = flower_round(FedAvg(**sampling(3)), GLOBAL, deltas, sizes)
    for name in GLOBAL:
        np.testing.assert_allclose(state.arrays[name].numpy(), expected[name], rtol=1e-6, atol=1e-6)


def bad_identity_replies(delta: dict) -> tuple[list, list[dict], list[str]]:
    """Node 1's reply is good; each other node's fails one check. (payloads, metrics, logged reasons)."""
    good = encode(delta, Identity())
    wrong_shape = ArrayRecord({"w": Array(np.zeros((30, 20), np.float32)), "b": Array(delta["b"])})
    not_finite = encode({"w": np.full_like(delta["w"], np.nan), "b": delta["b"]}, Identity())
    cases = [  # (payload, metrics, what the log says)
        (good, {**metrics(10), "train-loss": 0.25}, None),
        (wrong_shape, metrics(10), "w: expected float32 (20, 30)"),
        (not_finite, metrics(10), "w: contains NaN or infinity"),
        (good, {"num-examples": 10, "train-seconds": 0.1}, "metric 'train-loss' missing"),
        (good, {**metrics(10), "train-loss": float("nan")}, "metric 'train-loss' missing or not a finite number"),
        (good, metrics(0), "num-examples must be a positive integer, got 0"),
        (good, metrics(-5), "num-examples must be a positive integer, got -5"),
        (good, metrics(2.5), "num-examples must be a positive integer, got 2.5"),
        (good, metrics(10**309), "metric 'num-examples' missing or not a finite number: 10000000000000000000...(310 characters)"),
        (good, {**metrics(10), "train-seconds": -(10**400)}, "metric 'train-seconds' missing or not a finite number"),
    ]
    return [c[0] for c in cases], [c[1] for c in cases], [c[2] for c in cases]


def test_bad_replies_are_dropped_and_logged_with_their_node_and_the_round_goes_on(caplog):
    delta = random_delta()
    payloads, metric_values, reasons = bad_identity_replies(delta)
    state = pollen_state(strategy_of("fedavg", clients=len(payloads)), GLOBAL)
    with caplog.at_level(logging.WARNING, logger="flwr"):  # the CLI may have quietened Flower
        outcome = pollen_round(state, [], [10] * len(payloads), payloads=payloads, metric_values=metric_values)
    for node, reason in enumerate(reasons[1:], start=2):
        assert f"round 1: rejected update from node {node}: {reason}" in caplog.text
    assert "from node 1:" not in caplog.text
    # Only node 1's update counted: the new global is the old one plus its delta.
    assert_moved_by(state, delta)
    assert outcome.train_metrics["train-loss"] == pytest.approx(0.25)  # node 1's alone


def test_round_traffic_counts_every_reply_and_its_bytes():
    payloads, metric_values, _ = bad_identity_replies(random_delta())
    payloads.append(Error(code=0, reason="boom"))
    metric_values.append(metrics(10))
    state = pollen_state(strategy_of("fedavg", clients=len(payloads)), GLOBAL)
    traffic = pollen_round(state, [], [10] * len(payloads), payloads=payloads, metric_values=metric_values).traffic
    assert (traffic.accepted, traffic.rejected, traffic.failed) == (1, 9, 1)
    received = payloads[:-1]  # the error reply carries no payload
    assert traffic.uplink == sum(wire_bytes(payload) for payload in received)
    assert traffic.dense_uplink == len(received) * dense_wire_bytes(layout_of(GLOBAL))
    assert traffic.compression == pytest.approx(traffic.dense_uplink / traffic.uplink)


def test_a_corrupt_topk_payload_is_rejected_and_the_good_update_applied(caplog):
    codec = TopK(0.1)
    delta = {k: np.ones_like(v) for k, v in GLOBAL.items()}
    good = encode(delta, codec)
    blob = good["update"]
    corrupt = ArrayRecord({"update": Array(dtype=blob.dtype, shape=blob.shape, stype=blob.stype,
                                           data=b"XXXX" + blob.data[4:])})
    state = pollen_state(strategy_of("fedavg"), GLOBAL)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        outcome = pollen_round(state, [], [10] * 3, codec, payloads=[good, corrupt, good],
                               metric_values=[metrics(10), metrics(10), metrics(0)])
    assert (outcome.traffic.accepted, outcome.traffic.rejected) == (1, 2)
    assert "magic" in caplog.text and "num-examples" in caplog.text
    assert not np.allclose(state.arrays["w"].numpy(), GLOBAL["w"])
    assert_moved_by(state, decode(good, layout_of(GLOBAL), codec))


def test_error_replies_are_counted_as_failed_and_skipped():
    delta = random_delta()
    state = pollen_state(strategy_of("fedavg", clients=2), GLOBAL)
    outcome = pollen_round(state, [], [10, 10], payloads=[Error(code=0, reason="boom"), encode(delta, Identity())])
    assert (outcome.traffic.failed, outcome.traffic.accepted) == (1, 1)
    assert_moved_by(state, delta)


def test_when_every_reply_failed_the_global_model_stays():
    state = pollen_state(strategy_of("fedavg", clients=1), GLOBAL)
    outcome = pollen_round(state, [], [10], payloads=[Error(code=0, reason="boom")])
    assert outcome.traffic.failed == 1 and outcome.train_metrics is None
    for name in GLOBAL:
        np.testing.assert_array_equal(state.arrays[name].numpy(), GLOBAL[name])


def test_run_round_takes_any_flower_strategy_instance():
    strategy = FedAvg(fraction_train=0.5, min_train_nodes=2, min_available_nodes=4, fraction_evaluate=0.0)
    state = pollen_state(strategy, GLOBAL)
    delta = random_delta()  # every node sends the same: whoever is sampled, the model moves by it
    outcome = pollen_round(state, [delta] * 4, [10, 20, 30, 40])
    assert state.strategy is strategy and strategy.fraction_train == 0.5
    assert outcome.traffic.accepted == 2  # half of the four nodes
    assert_moved_by(state, delta)


def sparse_round(codec, deltas, sizes, name="sparse-fedavg"):
    """The change of the global arrays after one round of strategy ``name``, and its train metrics."""
    state = pollen_state(strategy_of(name, clients=len(deltas)), GLOBAL)
    outcome = pollen_round(state, deltas, sizes, codec)
    new = numpy_of(state.arrays)
    return {k: new[k] - GLOBAL[k] for k in GLOBAL}, outcome.train_metrics


def test_sparse_fedavg_keeps_the_step_of_a_coordinate_sent_by_one_client():
    # Three clients, each moving a different single coordinate of "w".
    deltas = []
    for i in range(3):
        delta = {k: np.zeros_like(v) for k, v in GLOBAL.items()}
        delta["w"][i, i] = 1.0 + i
        deltas.append(delta)
    codec = TopK(density=1 / 600)  # one value per tensor
    sparse, aggregated = sparse_round(codec, deltas, [10, 20, 30])
    plain, _ = sparse_round(codec, deltas, [10, 20, 30], name="fedavg")
    for i in range(3):
        assert sparse["w"][i, i] == pytest.approx(1.0 + i, rel=1e-2)  # not divided by the others
        assert plain["w"][i, i] == pytest.approx((1.0 + i) * (10 + 10 * i) / 60, rel=1e-2)
    assert np.count_nonzero(sparse["w"]) == 3 and not sparse["b"].any()
    assert aggregated["train-loss"] == pytest.approx(1.0)


def test_sparse_fedavg_weights_a_shared_coordinate_by_examples():
    deltas = [{"w": np.zeros((20, 30), np.float32), "b": np.zeros(30, np.float32)} for _ in range(3)]
    deltas[0]["w"][0, 0], deltas[1]["w"][0, 0] = 1.0, 4.0  # client 2 sends another coordinate
    deltas[2]["w"][1, 1] = 2.0
    step, _ = sparse_round(TopK(density=1 / 600), deltas, [10, 30, 60])
    assert step["w"][0, 0] == pytest.approx((10 * 1.0 + 30 * 4.0) / 40, rel=1e-2)
    assert step["w"][1, 1] == pytest.approx(2.0, rel=1e-2)


def test_sparse_fedavg_counts_a_sent_zero_on_dense_updates():
    deltas = [{"w": np.zeros((20, 30), np.float32), "b": np.zeros(30, np.float32)} for _ in range(3)]
    deltas[0]["w"][0, 0], deltas[1]["w"][0, 0] = 1.0, 4.0  # client 2 sends a dense zero
    step, _ = sparse_round(Identity(), deltas, [10, 30, 60])
    assert step["w"][0, 0] == pytest.approx((10 * 1.0 + 30 * 4.0) / 100, rel=1e-5)


def test_sparse_fedavg_equals_fedavg_on_dense_updates():
    deltas = [random_delta() for _ in range(3)]
    sparse, _ = sparse_round(Identity(), deltas, [5, 10, 20])
    plain, _ = sparse_round(Identity(), deltas, [5, 10, 20], name="fedavg")
    for name in GLOBAL:
        np.testing.assert_allclose(sparse[name], plain[name], rtol=1e-4, atol=1e-5)
