"""SparseMedian: coordinate-wise median over the clients that sent each coordinate.

Yin et al., 2018, "Byzantine-Robust Distributed Learning: Towards Optimal
Statistical Rates" (Flower's FedMedian). On top-k updates a plain median is
useless: each coordinate is sent by a few of the clients, so the median of the
decoded dense deltas is the zero the others did not send, and the model stops
moving (``tests/test_strategies_sparse.py`` shows it). Here the median runs over
the values actually sent; coordinates sent by fewer than ``min_senders`` clients
keep their value, since a median of one or two values resists nothing.
"""

from __future__ import annotations

from logging import INFO

import numpy as np
from flwr.common import log

from pollen.strategies.sparse_deltas import SparseDeltaAggregation, grouped_by_coordinate


class SparseMedian(SparseDeltaAggregation):
    """Unweighted coordinate-wise median of the sent values."""

    def __init__(self, *, min_senders: int = 1, **settings) -> None:
        if min_senders < 1:
            raise ValueError(f"min_senders must be at least 1, got {min_senders}")
        super().__init__(**settings)
        self.min_senders = min_senders

    def summary(self) -> None:
        log(INFO, "\t├──> SparseMedian: median over the clients that sent each coordinate")
        log(INFO, "\t│\t└── min_senders: %d", self.min_senders)
        super().summary()

    def combine(self, deltas: list[tuple[np.ndarray, np.ndarray]], weights: np.ndarray,
                size: int) -> np.ndarray:
        coordinates, starts, counts, values = grouped_by_coordinate(deltas)
        low = values[starts + (counts - 1) // 2]
        high = values[starts + counts // 2]
        step = np.zeros(size)
        enough = counts >= self.min_senders
        step[coordinates[enough]] = ((low + high) / 2)[enough]
        return step
