"""FedNova: normalized averaging against objective inconsistency.

Wang et al., 2020, "Tackling the Objective Inconsistency Problem in Heterogeneous
Federated Optimization". With a fixed number of local epochs, a client with more
data takes more local steps and pulls the global model further towards its own
optimum: FedAvg then converges to a mixture weighted by steps, not by data. FedNova
divides each client's update by its number of local steps tau_i, averages these
per-step updates with data weights p_i, and rescales by tau_eff = sum_i p_i tau_i:

    w <- w + tau_eff * sum_i p_i (w_i - w) / tau_i

tau_i is derived from what the server asked for (``local-epochs`` x
ceil(``num-examples`` / ``batch-size``)), so clients need no extra reporting. With
equal step counts it is FedAvg.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from logging import INFO

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.exception import AggregationError

from pollen.strategies.step_aggregation import StepAggregation, flatten


class FedNova(StepAggregation):
    """FedAvg with each client's update normalized by its local step count."""

    def __init__(self, **settings) -> None:
        super().__init__(**settings)
        self.local_epochs = 0
        self.batch_size = 0

    def summary(self) -> None:
        log(INFO, "\t├──> FedNova: updates normalized by local-epochs x ceil(num-examples / batch-size)")
        super().summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        missing = [key for key in ("local-epochs", "batch-size") if key not in config]
        if missing:
            raise AggregationError(f"FedNova needs {', '.join(missing)} in the train config "
                                   "to count each client's local steps")
        self.local_epochs = int(config["local-epochs"])
        self.batch_size = int(config["batch-size"])
        return super().configure_train(server_round, arrays, config, grid)

    def local_steps(self, num_examples: float) -> int:
        return self.local_epochs * math.ceil(num_examples / self.batch_size)

    def step(self, contents: list[RecordDict], weights: np.ndarray, current: np.ndarray) -> np.ndarray:
        shares = weights / weights.sum()
        steps = np.array([self.local_steps(n) for n in weights], dtype=np.float64)
        direction = np.zeros_like(current)
        for content, share, tau in zip(contents, shares, steps):
            direction += share * (flatten(content[self.arrayrecord_key]) - current) / tau
        return float(shares @ steps) * direction
