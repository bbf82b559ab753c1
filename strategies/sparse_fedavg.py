"""SparseFedAvg: FedAvg that averages each coordinate over the clients that sent it.

With top-k updates, clients send different coordinates. Plain FedAvg treats every
coordinate a client did not send as a zero change and so shrinks each sent value by
the share of clients that sent it: at 1% density and 10 clients a round, most
coordinates arrive from one client and are divided by ten. Averaging each coordinate
only over the clients that sent it keeps the step size of dense FedAvg (Aji &
Heafield, 2017, "Sparse Communication for Distributed Gradient Descent", use the same
per-coordinate normalisation). On dense updates it is FedAvg.

The sum is a scatter-add of each client's (indices, values) into one accumulator:
memory is two model-sized vectors plus the sparse payloads, never one dense array
per client (``benchmarks/strategies_sparse.py`` measures it against the dense path).
"""

from __future__ import annotations

from logging import INFO

import numpy as np
from flwr.common import log

from pollen.strategies.sparse_deltas import SparseDeltaAggregation


class SparseFedAvg(SparseDeltaAggregation):
    """Weighted mean of each coordinate over the clients that sent it (weights: num-examples)."""

    def summary(self) -> None:
        log(INFO, "\t├──> SparseFedAvg: weighted mean over the clients that sent each coordinate")
        super().summary()

    def combine(self, deltas: list[tuple[np.ndarray, np.ndarray]], weights: np.ndarray,
                size: int) -> np.ndarray:
        total = np.zeros(size)
        weight = np.zeros(size)
        for (indices, values), w in zip(deltas, weights):
            total[indices] += w * values  # indices are unique within one payload
            weight[indices] += w
        return np.divide(total, weight, out=np.zeros(size), where=weight > 0)
