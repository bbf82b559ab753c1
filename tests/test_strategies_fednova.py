"""FedNova against FedAvg where clients take very different numbers of local steps."""

import numpy as np
import pytest
from flwr.serverapp.exception import AggregationError

from pollen.codec import Identity
from pollen.strategies import make_strategy
from strategy_replies import configure, run_round, sampling

BATCH, LR = 16, 0.01


pytestmark = pytest.mark.usefixtures("task_identity")  # see conftest.py


def local_sgd(w: np.ndarray, optimum: np.ndarray, steps: int) -> np.ndarray:
    """``steps`` SGD steps on 1/2 ||w - optimum||^2, in closed form."""
    return optimum + (1 - LR) ** steps * (w - optimum)


def federate(name: str, optima: np.ndarray, sizes: list[int], rounds: int) -> np.ndarray:
    """Clients with quadratic losses; one local epoch = ceil(size / BATCH) steps."""
    strategy = make_strategy(name, Identity(), **sampling(len(sizes)))
    w = {"w": np.zeros(optima.shape[1], np.float32)}
    config = {"local-epochs": 1, "batch-size": BATCH}
    for server_round in range(1, rounds + 1):
        node_ids = [m.metadata.dst_node_id for m in configure(strategy, w, server_round, config, len(sizes))]
        deltas = [{"w": (local_sgd(w["w"], optima[node - 1], -(-sizes[node - 1] // BATCH)) - w["w"])
                   .astype(np.float32)} for node in node_ids]
        w = run_round(strategy, w, deltas, [sizes[node - 1] for node in node_ids], Identity(),
                      server_round=server_round, config=config)
    return w["w"]


def test_fednova_reaches_the_global_optimum_that_fedavg_misses():
    # Strongly non-IID: every client's optimum is far from the others', and the client
    # with the most data takes twenty local steps to the others' one or two.
    rng = np.random.default_rng(0)
    optima = rng.normal(scale=5.0, size=(4, 8))
    sizes = [16, 16, 32, 320]
    optimum = np.average(optima, axis=0, weights=sizes)  # minimiser of the data-weighted loss
    fedavg = np.linalg.norm(federate("fedavg", optima, sizes, 40) - optimum)
    fednova = np.linalg.norm(federate("fednova", optima, sizes, 40) - optimum)
    assert fednova < 0.25 * fedavg
    assert fednova < 0.05 * np.linalg.norm(optimum)


def test_fednova_is_fedavg_when_step_counts_are_equal():
    rng = np.random.default_rng(1)
    optima = rng.normal(size=(3, 5))
    fedavg = federate("fedavg", optima, [48, 40, 33], 3)  # all take three steps
    fednova = federate("fednova", optima, [48, 40, 33], 3)
    np.testing.assert_allclose(fednova, fedavg, rtol=1e-5, atol=1e-6)


def test_fednova_needs_the_local_step_settings():
    strategy = make_strategy("fednova", Identity(), **sampling(3))
    with pytest.raises(AggregationError, match="local-epochs, batch-size"):
        configure(strategy, {"w": np.zeros(3, np.float32)})
