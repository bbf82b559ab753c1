"""Sparse-aware aggregation: scatter-add FedAvg, median and trimmed mean over the senders."""

import numpy as np
import pytest

from pollen.codec import Identity, TopK
from pollen.strategies import STRATEGIES, SparseFedAvg, takes_sparse_deltas
from pollen.strategies.sparse_deltas import grouped_by_coordinate
from strategy_replies import run_round_of, strategy_of

rng = np.random.default_rng(2)
GLOBAL = {"w": rng.normal(size=(20, 30)).astype(np.float32), "b": rng.normal(size=30).astype(np.float32)}


pytestmark = pytest.mark.usefixtures("task_identity")  # see conftest.py


def step(name, deltas, codec, params=None, sizes=None):
    new = run_round_of(strategy_of(name, len(deltas), params), GLOBAL, deltas, sizes or [10] * len(deltas), codec)
    return {k: new[k] - GLOBAL[k] for k in GLOBAL}


def random_deltas(count):
    return [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in GLOBAL.items()} for _ in range(count)]


def one_hot(values: dict[tuple[int, int], float]) -> dict:
    delta = {k: np.zeros_like(v) for k, v in GLOBAL.items()}
    for position, value in values.items():
        delta["w"][position] = value
    return delta


def test_plain_median_of_topk_updates_collapses_to_zero_and_sparse_median_does_not():
    deltas = random_deltas(10)
    codec = TopK(density=0.05)  # each client sends 5%: most coordinates come from one client
    plain = step("fedmedian", deltas, codec)
    sparse = step("sparse-median", deltas, codec)
    assert all(np.abs(plain[k]).max() < 1e-6 for k in GLOBAL)  # the model does not move
    moved = sum(np.count_nonzero(sparse[k]) for k in GLOBAL)
    assert moved > 0.3 * sum(v.size for v in GLOBAL.values())


def test_sparse_median_takes_the_median_of_the_senders_only():
    deltas = [one_hot({(0, 0): 1.0, (0, 1): 1.0, (0, 2): 7.0}), one_hot({(0, 0): 5.0, (0, 1): 3.0}),
              one_hot({(0, 0): 2.0, (1, 1): -4.0})]
    codec = TopK(density=3 / 600, bits=8)
    result = step("sparse-median", deltas, codec)["w"]
    assert result[0, 0] == pytest.approx(2.0, rel=1e-2)  # median of 1, 5, 2
    assert result[0, 1] == pytest.approx(2.0, rel=1e-2)  # median of 1, 3
    assert result[0, 2] == pytest.approx(7.0, rel=1e-2) and result[1, 1] == pytest.approx(-4.0, rel=1e-2)
    strict = step("sparse-median", deltas, codec, {"min_senders": 2})["w"]
    assert strict[0, 2] == 0 and strict[1, 1] == 0 and strict[0, 0] == pytest.approx(2.0, rel=1e-2)


def test_sparse_trimmed_mean_trims_only_the_sent_values():
    values = [-100.0, 1.0, 2.0, 3.0, 50.0]
    deltas = [one_hot({(2, 2): v}) for v in values] + [one_hot({(3, 3): 1.0}) for _ in range(5)]
    codec = TopK(density=1 / 600, bits=8)
    result = step("sparse-trimmed-mean", deltas, codec, {"beta": 0.2})["w"]
    assert result[2, 2] == pytest.approx(2.0, abs=0.5)  # mean of 1, 2, 3 (8-bit levels of a +-100 scale)
    assert result[3, 3] == pytest.approx(1.0, rel=1e-2)
    plain = step("fedtrimmedavg", deltas, codec, {"beta": 0.2})["w"]
    # Over dense decoded updates, the five clients that did not send a coordinate count as zeros.
    assert plain[2, 2] == pytest.approx(0.5, abs=0.1) and plain[3, 3] == pytest.approx(0.5, rel=1e-2)


@pytest.mark.parametrize("sparse, flower, params", [
    ("sparse-median", "fedmedian", {}),
    ("sparse-trimmed-mean", "fedtrimmedavg", {"beta": 0.2}),
    ("sparse-fedavg", "fedavg", {}),
])
def test_sparse_strategies_match_flower_on_dense_updates(sparse, flower, params):
    deltas = random_deltas(5)
    sizes = [5, 10, 20, 40, 80]
    ours = step(sparse, deltas, Identity(), params, sizes)
    theirs = step(flower, deltas, Identity(), params, sizes)
    for k in GLOBAL:
        np.testing.assert_allclose(ours[k], theirs[k], rtol=1e-4, atol=1e-5)


class RecordingSparseFedAvg(SparseFedAvg):
    def combine(self, deltas, weights, size):
        self.seen = [(indices.size, values.size) for indices, values in deltas]
        return super().combine(deltas, weights, size)


def test_sparse_strategies_never_receive_a_dense_array_per_client(monkeypatch):
    monkeypatch.setitem(STRATEGIES, "recording", RecordingSparseFedAvg)
    strategy = strategy_of("recording", 4)
    assert takes_sparse_deltas(strategy)
    run_round_of(strategy, GLOBAL, random_deltas(4), [10] * 4, TopK(density=0.05))
    size = sum(v.size for v in GLOBAL.values())
    assert len(strategy.seen) == 4
    assert all(indices == values <= 0.06 * size for indices, values in strategy.seen)


def test_grouping_sorts_each_coordinates_values():
    deltas = [(np.array([1, 4]), np.array([3.0, -1.0])), (np.array([4]), np.array([-5.0]))]
    coordinates, starts, counts, values = grouped_by_coordinate(deltas)
    assert coordinates.tolist() == [1, 4] and counts.tolist() == [1, 2]
    assert values[starts[1]:starts[1] + 2].tolist() == [-5.0, -1.0]


@pytest.mark.parametrize("codec", [TopK(density=0.05), TopK(density=0.05, scope="model"), Identity()])
def test_decode_sparse_holds_exactly_what_decode_scatters(codec):
    from pollen.codec import decode, decode_sparse, encode, layout_of

    delta = random_deltas(1)[0]
    payload = encode(delta, codec)
    indices, values = decode_sparse(payload, layout_of(delta), codec)
    dense = np.concatenate([v.reshape(-1) for v in decode(payload, layout_of(delta), codec).values()])
    assert np.all(np.diff(indices) > 0) and indices.dtype == np.int64 and values.dtype == np.float32
    expected = np.zeros_like(dense)
    expected[indices] = values
    np.testing.assert_array_equal(expected, dense)
    if isinstance(codec, TopK):
        assert indices.size <= 0.06 * dense.size
