"""SparseFedAvg: FedAvg that averages each coordinate over the clients that moved it.

With top-k updates, clients send different coordinates. Plain FedAvg treats every
coordinate a client did not send as a zero change and so shrinks each sent value by
the share of clients that sent it: at 1% density and 10 clients a round, most
coordinates arrive from one client and are divided by ten. Averaging each coordinate
only over the clients whose update changed it keeps the step size of dense FedAvg
(Aji & Heafield, 2017, "Sparse Communication for Distributed Gradient Descent", use
the same per-coordinate normalisation). On dense updates it equals FedAvg except for
coordinates some client left exactly unchanged.

Everything but the array aggregation (sampling, configuration, metric averaging) is
Flower's FedAvg.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import validate_message_reply_consistency


class SparseFedAvg(FedAvg):
    """Flower's FedAvg with a per-coordinate weighted mean over the clients that sent it."""

    def __init__(self, **settings) -> None:
        super().__init__(**settings)
        self._current: ArrayRecord | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._current = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid = [reply.content for reply in replies if not reply.has_error()]
        if not valid or self._current is None:
            return None, None
        validate_message_reply_consistency(valid, self.weighted_by_key, check_arrayrecord=True)
        current = {name: array.numpy() for name, array in self._current.items()}
        total = {name: np.zeros(value.shape, np.float64) for name, value in current.items()}
        weight = {name: np.zeros(value.shape, np.float64) for name, value in current.items()}
        for content in valid:
            arrays = content[self.arrayrecord_key]
            examples = float(next(iter(content.metric_records.values()))[self.weighted_by_key])
            for name, value in current.items():
                delta = arrays[name].numpy().astype(np.float64) - value
                total[name] += examples * delta
                weight[name] += examples * (delta != 0)
        new = {name: (value + np.divide(total[name], weight[name], out=np.zeros_like(total[name]),
                                        where=weight[name] > 0)).astype(value.dtype)
               for name, value in current.items()}
        metrics = self.train_metrics_aggr_fn(valid, self.weighted_by_key)
        return ArrayRecord({name: Array(value) for name, value in new.items()}), metrics
