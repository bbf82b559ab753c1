"""Error feedback: what the codec did not send is added to the next round's update."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict


class ErrorFeedback:
    """The residual of past rounds, kept in a client's ``Context.state``.

    Invariant: over any number of rounds, sum(sent) + residual == sum(updates).
    """

    KEY = "error-feedback"

    def __init__(self, state: RecordDict) -> None:
        self.state = state

    def residual(self) -> dict[str, np.ndarray]:
        record = self.state.array_records.get(self.KEY)
        return {} if record is None else {name: array.numpy() for name, array in record.items()}

    def add_residual(self, update: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The update plus what earlier rounds left unsent (dropped if the model's layout changed)."""
        residual = self.residual()
        if {k: v.shape for k, v in residual.items()} != {k: v.shape for k, v in update.items()}:
            residual = {}
        return {name: value + residual[name] if residual else value.copy()
                for name, value in update.items()}

    def keep(self, update: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray]) -> None:
        """Remember update - sent for the next round."""
        self.state[self.KEY] = ArrayRecord(
            {name: Array(np.asarray(update[name] - sent[name], dtype=np.float32, order="C"))
             for name in update}
        )

    def clear(self) -> None:
        """Nothing is left unsent (a lossless round)."""
        if self.KEY in self.state.array_records:
            del self.state[self.KEY]
