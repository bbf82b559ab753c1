"""FedNova: normalized averaging against objective inconsistency.

Wang et al., 2020, "Tackling the Objective Inconsistency Problem in Heterogeneous
Federated Optimization". With a fixed number of local epochs, a client with more
data takes more local steps and pulls the global model further towards its own
optimum: FedAvg then converges to a mixture weighted by steps, not by data. FedNova
divides each client's update by its number of local steps tau_i, averages these
per-step updates with data weights p_i, and rescales by tau_eff = sum_i p_i tau_i:

    w <- w + tau_eff * sum_i p_i (w_i - w) / tau_i

tau_i is derived from the run's training settings (``train.local_epochs`` x
ceil(``num-examples`` / ``train.batch_size``)), so clients need no extra reporting. With
equal step counts it is FedAvg.
"""

from __future__ import annotations

import math
from logging import INFO

import numpy as np
from flwr.app import RecordDict
from flwr.common import log

from pollen.strategies.step_aggregation import StepAggregation, flatten


class FedNova(StepAggregation):
    """FedAvg with each client's update normalized by its local step count."""

    def __init__(self, *, local_epochs: int, batch_size: int, **settings) -> None:
        super().__init__(**settings)
        self.local_epochs = local_epochs
        self.batch_size = batch_size

    def summary(self) -> None:
        log(INFO, "\t├──> FedNova: updates normalized by local-epochs x ceil(num-examples / batch-size)")
        super().summary()

    def local_steps(self, num_examples: float) -> int:
        return self.local_epochs * math.ceil(num_examples / self.batch_size)

    def step(self, contents: list[RecordDict], weights: np.ndarray, current: np.ndarray) -> np.ndarray:
        shares = weights / weights.sum()
        steps = np.array([self.local_steps(n) for n in weights], dtype=np.float64)
        direction = np.zeros_like(current)
        for content, share, tau in zip(contents, shares, steps):
            direction += share * (flatten(content[self.arrayrecord_key]) - current) / tau
        return float(shares @ steps) * direction
