"""SparseTrimmedMean: coordinate-wise trimmed mean over the clients that sent each coordinate.

Yin et al., 2018 (Flower's FedTrimmedAvg): drop the ``beta`` share of the lowest
and of the highest values of each coordinate, average the rest. Over dense decoded
top-k updates the trimmed values are mostly the zeros of clients that did not send
the coordinate; here only sent values are ranked and trimmed, and a coordinate with
a single sender keeps that sender's value.
"""

from __future__ import annotations

from logging import INFO

import numpy as np
from flwr.common import log

from pollen.strategies.sparse_deltas import SparseDeltaAggregation, grouped_by_coordinate


class SparseTrimmedMean(SparseDeltaAggregation):
    """Unweighted trimmed mean of the sent values, ``beta`` cut from each tail."""

    def __init__(self, *, beta: float = 0.2, **settings) -> None:
        if not 0.0 <= beta < 0.5:
            raise ValueError(f"beta must be in [0, 0.5), got {beta}")
        super().__init__(**settings)
        self.beta = beta

    def summary(self) -> None:
        log(INFO, "\t├──> SparseTrimmedMean: trimmed mean over the clients that sent each coordinate")
        log(INFO, "\t│\t└── beta: %s", self.beta)
        super().summary()

    def combine(self, deltas: list[tuple[np.ndarray, np.ndarray]], weights: np.ndarray,
                size: int) -> np.ndarray:
        coordinates, starts, counts, values = grouped_by_coordinate(deltas)
        cut = np.floor(self.beta * counts).astype(np.int64)  # as Flower's trim_mean: int(beta * n)
        cumulative = np.concatenate([[0.0], np.cumsum(values)])
        kept = cumulative[starts + counts - cut] - cumulative[starts + cut]
        step = np.zeros(size)
        step[coordinates] = kept / (counts - 2 * cut)
        return step
