"""SparseDeltaAggregation: strategies that read clients' updates as sparse deltas.

Dense Flower strategies get one full local model per client from
``CompressedUpdates``. A strategy that sets ``takes_sparse_deltas = True`` gets
instead, in each reply's ArrayRecord, only what the client sent: the decoded delta
as two flat arrays over the model's tensors in layout order,

    "indices"  int64, strictly increasing positions in the flattened trainable arrays
    "values"   float32, the decoded change at each position

so the server never holds one dense array per client, and the strategy can tell a
coordinate a client did not send from one it sent as zero.

Subclasses write one method, ``combine``: per-client sparse deltas in, one flat step
out. Sampling, configuration and metric averaging stay Flower's FedAvg.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

from pollen.strategies.step_aggregation import StepAggregation


def sparse_delta_record(indices: np.ndarray, values: np.ndarray) -> ArrayRecord:
    """The ArrayRecord a sparse-aware strategy receives for one client."""
    return ArrayRecord({"indices": Array(np.asarray(indices, dtype=np.int64)),
                        "values": Array(np.asarray(values, dtype=np.float32))})


class SparseDeltaAggregation(StepAggregation):
    """A StepAggregation whose replies carry sparse deltas; subclasses write ``combine``."""

    takes_sparse_deltas = True

    def step(self, contents: list[RecordDict], weights: np.ndarray, current: np.ndarray) -> np.ndarray:
        deltas = [(content[self.arrayrecord_key]["indices"].numpy(),
                   content[self.arrayrecord_key]["values"].numpy()) for content in contents]
        return self.combine(deltas, weights, current.size)

    def combine(self, deltas: list[tuple[np.ndarray, np.ndarray]], weights: np.ndarray,
                size: int) -> np.ndarray:
        """One flat step of length ``size`` from per-client (indices, values) and weights."""
        raise NotImplementedError


def grouped_by_coordinate(deltas: list[tuple[np.ndarray, np.ndarray]]
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every sent value, sorted by coordinate then value.

    Returns (coordinates, starts, counts, values): ``values[starts[j]:starts[j] + counts[j]]``
    are, in ascending order, the values the clients sent for ``coordinates[j]``.
    """
    if not deltas:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty, np.zeros(0)
    indices = np.concatenate([i for i, _ in deltas])
    values = np.concatenate([v for _, v in deltas]).astype(np.float64)
    order = np.lexsort((values, indices))
    indices, values = indices[order], values[order]
    coordinates, starts, counts = np.unique(indices, return_index=True, return_counts=True)
    return coordinates, starts, counts, values
