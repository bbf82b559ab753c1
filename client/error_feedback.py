"""Error feedback: what the codec did not send is added to the next round's update."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict


class ErrorFeedback:
    """The residual of past rounds, kept in a client's ``Context.state``.

    Invariant: over rounds no more than ``max_age`` apart, sum(sent) + residual ==
    sum(updates). A residual older than that is dropped: it was computed against a
    global model that has since moved on, and with a small share of clients sampled
    a round, a client returns after many rounds and its stale residual pulls the
    model back (``max_age`` 0 keeps it forever).
    """

    KEY = "error-feedback"
    ROUND = "error-feedback-round"

    def __init__(self, state: RecordDict, max_age: int = 0) -> None:
        self.state = state
        self.max_age = max_age

    def residual(self, server_round: int | None = None) -> dict[str, np.ndarray]:
        """The residual held; with ``server_round``, only if it is young enough to use then."""
        record = self.state.array_records.get(self.KEY)
        if record is None:
            return {}
        if server_round is not None and self.max_age and self.ROUND in self.state.config_records:
            if server_round - int(self.state[self.ROUND]["round"]) > self.max_age:
                return {}
        return {name: array.numpy() for name, array in record.items()}

    def add_residual(self, update: Mapping[str, np.ndarray],
                     server_round: int | None = None) -> dict[str, np.ndarray]:
        """The update plus what earlier rounds left unsent (dropped if stale or the layout changed)."""
        residual = self.residual(server_round)
        if {k: v.shape for k, v in residual.items()} != {k: v.shape for k, v in update.items()}:
            residual = {}
        return {name: value + residual[name] if residual else value.copy()
                for name, value in update.items()}

    def keep(self, update: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray],
             server_round: int = 0) -> None:
        """Remember update - sent (made in ``server_round``) for a later round."""
        self.state[self.KEY] = ArrayRecord(
            {name: Array(np.asarray(update[name] - sent[name], dtype=np.float32, order="C"))
             for name in update}
        )
        self.state[self.ROUND] = ConfigRecord({"round": server_round})

    def clear(self) -> None:
        """Nothing is left unsent (a lossless round)."""
        for key in (self.KEY, self.ROUND):
            if key in self.state:
                del self.state[key]
