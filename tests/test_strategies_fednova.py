"""FedNova against FedAvg where clients take very different numbers of local steps."""

import numpy as np
import pytest

from pollen.strategies import FedNova, StrategyError, check_params
from strategy_replies import numpy_of, pollen_round, pollen_state, sampling, strategy_of

BATCH, LR = 16, 0.01


pytestmark = pytest.mark.usefixtures("task_identity")  # see conftest.py


def local_sgd(w: np.ndarray, optimum: np.ndarray, steps: int) -> np.ndarray:
    """``steps`` SGD steps on 1/2 ||w - optimum||^2, in closed form."""
    return optimum + (1 - LR) ** steps * (w - optimum)


def federate(name: str, optima: np.ndarray, sizes: list[int], rounds: int) -> np.ndarray:
    """Clients with quadratic losses; one local epoch = ceil(size / BATCH) steps."""
    strategy = strategy_of(name, len(sizes), overrides=["train.local_epochs=1", f"train.batch_size={BATCH}"])
    state = pollen_state(strategy, {"w": np.zeros(optima.shape[1], np.float32)})
    for server_round in range(1, rounds + 1):
        w = numpy_of(state.arrays)["w"]
        deltas = [{"w": (local_sgd(w, optimum, -(-size // BATCH)) - w).astype(np.float32)}
                  for optimum, size in zip(optima, sizes)]  # node k is client k - 1
        pollen_round(state, deltas, sizes, server_round=server_round)
    return numpy_of(state.arrays)["w"]


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


def test_fednova_takes_the_local_step_settings_from_the_train_config():
    strategy = strategy_of("fednova", overrides=["train.local_epochs=3", "train.batch_size=7"])
    assert (strategy.local_epochs, strategy.batch_size) == (3, 7)
    assert strategy.local_steps(15) == 3 * 3  # ceil(15 / 7) batches per epoch


def test_fednova_needs_the_local_step_settings():
    with pytest.raises(TypeError, match="'local_epochs' and 'batch_size'"):
        FedNova(**sampling(3))
    with pytest.raises(StrategyError, match="strategy.local_epochs: set by train.local_epochs"):
        check_params("fednova", {"local_epochs": 3})
