"""StepAggregation: a strategy that turns the round's replies into one flat step.

Flower's FedAvg does the sampling, configuration and metric averaging; a subclass
writes only ``step``: the replies' contents and weights and the current global
arrays (as one flat float64 vector) in, the change of that vector out.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg


def flatten(arrays: ArrayRecord) -> np.ndarray:
    """All arrays of a record as one float64 vector, in record order."""
    if not len(arrays):
        return np.zeros(0)
    return np.concatenate([array.numpy().reshape(-1).astype(np.float64) for array in arrays.values()])


def unflatten(flat: np.ndarray, like: ArrayRecord) -> ArrayRecord:
    """Cut a flat vector back into arrays with the names, shapes and dtypes of ``like``."""
    out, start = {}, 0
    for name, array in like.items():
        template = array.numpy()
        out[name] = Array(flat[start:start + template.size].reshape(template.shape).astype(template.dtype))
        start += template.size
    return ArrayRecord(out)


class StepAggregation(FedAvg):
    """Flower's FedAvg with the array aggregation replaced by ``step``."""

    def __init__(self, **settings) -> None:
        super().__init__(**settings)
        self.current: ArrayRecord | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.current = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(list(replies), is_train=True)
        if not valid or self.current is None:
            return None, None
        contents = [reply.content for reply in valid]
        weights = np.array([float(next(iter(content.metric_records.values()))[self.weighted_by_key])
                            for content in contents])
        current = flatten(self.current)
        arrays = unflatten(current + self.step(contents, weights, current), self.current)
        return arrays, self.train_metrics_aggr_fn(contents, self.weighted_by_key)

    def step(self, contents: list[RecordDict], weights: np.ndarray, current: np.ndarray) -> np.ndarray:
        """The change of the flat global vector ``current`` from this round's replies."""
        raise NotImplementedError
