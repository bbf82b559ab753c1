import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from pollen.codec import Identity, TopK, encode, wire_bytes
from pollen.strategies import STRATEGIES, CompressedUpdates, make_strategy

rng = np.random.default_rng(0)
GLOBAL = {"w": rng.normal(size=(20, 30)).astype(np.float32), "b": rng.normal(size=(30,)).astype(np.float32)}


class FixedGrid:
    """Just enough of a Grid for configure_train: a fixed set of node ids."""

    def get_node_ids(self):
        return [1, 2, 3]


def make_reply(instruction: Message, arrays: ArrayRecord, metrics: dict) -> Message:
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=instruction)


def metrics(n):
    return {"num-examples": n, "train-loss": 1.0, "train-seconds": 0.1}


pytestmark = pytest.mark.usefixtures("task_identity")  # see conftest.py


def configure(strategy):
    record = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    return record, list(strategy.configure_train(1, record, ConfigRecord({"lr": 0.1}), FixedGrid()))


def test_registry_rejects_unknown_names():
    assert "fedavg" in STRATEGIES
    with pytest.raises(ValueError, match="unknown strategy 'fedsomething'"):
        make_strategy("fedsomething", Identity())


def test_codec_settings_travel_with_the_train_config():
    strategy = make_strategy("fedavg", TopK(0.05, 4), min_available_nodes=3, min_train_nodes=3)
    _, messages = configure(strategy)
    config = messages[0].content["config"]
    assert (config["codec.name"], config["codec.density"], config["codec.bits"]) == ("topk", 0.05, 4)
    assert config["lr"] == 0.1
    assert strategy.traffic[1].downlink == 3 * wire_bytes(messages[0].content["arrays"])


def test_identity_updates_aggregate_exactly_like_flower_fedavg():
    strategy = make_strategy("fedavg", Identity(), min_available_nodes=3, min_train_nodes=3)
    record, messages = configure(strategy)
    deltas = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in GLOBAL.items()} for _ in messages]
    sizes = [10, 30, 60]
    replies = [make_reply(m, encode(d, Identity()), metrics(n)) for m, d, n in zip(messages, deltas, sizes)]
    arrays, _ = strategy.aggregate_train(1, replies)

    plain = FedAvg(min_available_nodes=3, min_train_nodes=3)
    dense = [make_reply(m, ArrayRecord({k: Array(GLOBAL[k] + d[k]) for k in GLOBAL}), metrics(n))
             for m, d, n in zip(messages, deltas, sizes)]
    expected, _ = plain.aggregate_train(1, dense)
    for name in GLOBAL:
        np.testing.assert_allclose(arrays[name].numpy(), expected[name].numpy(), rtol=1e-6, atol=1e-6)


def test_bad_replies_are_dropped_and_logged_and_the_round_goes_on(caplog):
    strategy = make_strategy("fedavg", TopK(0.1), min_available_nodes=3, min_train_nodes=3)
    record, messages = configure(strategy)
    delta = {k: np.ones_like(v) for k, v in GLOBAL.items()}
    good = make_reply(messages[0], encode(delta, TopK(0.1)), metrics(10))
    corrupt = encode(delta, TopK(0.1))
    blob = corrupt["update"]
    corrupt = ArrayRecord({"update": Array(dtype=blob.dtype, shape=blob.shape, stype=blob.stype,
                                           data=b"XXXX" + blob.data[4:])})
    bad_payload = make_reply(messages[1], corrupt, metrics(10))
    bad_metrics = make_reply(messages[2], encode(delta, TopK(0.1)), {"num-examples": 0, "train-loss": 1.0,
                                                                      "train-seconds": 0.1})
    with caplog.at_level(logging.WARNING, logger="flwr"):  # the CLI may have quietened Flower
        arrays, _ = strategy.aggregate_train(1, [good, bad_payload, bad_metrics])
    traffic = strategy.traffic[1]
    assert (traffic.accepted, traffic.rejected) == (1, 2)
    assert "magic" in caplog.text and "num-examples" in caplog.text
    # Only the good update counted: the new global is global + its decoded delta.
    assert arrays is not None
    assert not np.allclose(arrays["w"].numpy(), GLOBAL["w"])


def test_error_replies_are_counted_and_skipped():
    strategy = make_strategy("fedavg", Identity(), min_available_nodes=3, min_train_nodes=3)
    _, messages = configure(strategy)
    failed = Message(Error(code=0, reason="boom"), reply_to=messages[0])
    arrays, _ = strategy.aggregate_train(1, [failed])
    assert arrays is None and strategy.traffic[1].failed == 1


def test_wrapper_accepts_any_flower_strategy_instance():
    wrapped = CompressedUpdates(FedAvg(fraction_train=0.5), TopK())
    assert wrapped.inner.fraction_train == 0.5


def sparse_round(codec, deltas, sizes, name="sparse-fedavg"):
    strategy = make_strategy(name, codec, min_available_nodes=3, min_train_nodes=3)
    _, messages = configure(strategy)
    replies = [make_reply(m, encode(d, codec), metrics(n)) for m, d, n in zip(messages, deltas, sizes)]
    arrays, aggregated = strategy.aggregate_train(1, replies)
    return {k: arrays[k].numpy() - GLOBAL[k] for k in GLOBAL}, aggregated


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
    deltas = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in GLOBAL.items()} for _ in range(3)]
    sparse, _ = sparse_round(Identity(), deltas, [5, 10, 20])
    plain, _ = sparse_round(Identity(), deltas, [5, 10, 20], name="fedavg")
    for name in GLOBAL:
        np.testing.assert_allclose(sparse[name], plain[name], rtol=1e-4, atol=1e-5)
