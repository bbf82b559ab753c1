"""Over-selection: sample more clients than a round needs when some of them fail it.

A device that goes away, runs past the deadline or sends an update the server rejects
costs its round one update. With a share p of the sampled clients lost, a round of
``clients_per_round`` counts only (1 - p) of them, and each round's average is noisier
and sees less data. Production federations sample about 30% more devices than they need
for this reason. Here the server learns p from the rounds so far (every sampled client
whose update was not counted, over all sampled) and samples ``clients_per_round / (1 - p)``
clients, at most ``federation.over_select`` times ``clients_per_round``, and in proportion
when not all are online. ``over_select`` 1 turns it off: the strategy samples as configured.

The counts are kept in the ``ServerState`` (and so in the checkpoint): a resumed run
samples as the uninterrupted one would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from flwr.serverapp.strategy import Strategy

from pollen.config import FederationConfig


@dataclass
class OverSelection:
    per_round: int  # federation.clients_per_round: the updates a round should count
    most: int  # federation.most_sampled: the cap (per_round: off)
    num_clients: int  # federation.num_clients: all online, a round samples sample_size() of them
    sampled: int = 0  # clients sampled in the rounds so far
    counted: int = 0  # of them, those whose update was aggregated

    @classmethod
    def of(cls, federation: FederationConfig) -> OverSelection:
        return cls(federation.clients_per_round, federation.most_sampled, federation.num_clients)

    def sample_size(self) -> int:
        """How many clients the next round samples when all are online."""
        if self.sampled == 0:
            return self.per_round
        if self.counted == 0:  # nothing counted yet: as many as it may
            return self.most
        wanted = math.ceil(self.per_round * self.sampled / self.counted - 1e-9)
        return max(self.per_round, min(self.most, wanted))

    def configure(self, strategy: Strategy) -> None:
        """Set ``strategy``'s share to sample (Flower's ``fraction_train``, of the nodes online) for the
        next round. Off, or for a strategy without that setting, its own sampling stays."""
        if self.most <= self.per_round or not hasattr(strategy, "fraction_train"):
            return
        # Flower samples int(online * fraction_train), at least min_train_nodes (clients_per_round);
        # the half keeps int() from rounding a whole number down.
        strategy.fraction_train = min(1.0, (self.sample_size() + 0.5) / self.num_clients)

    def count(self, sampled: int, counted: int) -> None:
        """A round sampled ``sampled`` clients and aggregated ``counted`` of their updates."""
        self.sampled += sampled
        self.counted += counted
