"""ServerMomentum: FedAvgM's server update, applied to what a strategy proposes.

The strategy proposes new global arrays; their change from the current ones is a
step. The server keeps a velocity v = momentum * v + step and moves the global
arrays by learning_rate * v (Hsu et al., 2019, "Measuring the Effects of
Non-Identical Data Distribution"). With top-k updates from a tenth of the clients,
most coordinates of a round's step come from one client: the velocity averages
steps over rounds, keeping what successive rounds agree on, and carries a
coordinate forward in the rounds nobody sends it.

With ``decay`` > 0 the learning rate stays constant for the first rounds and falls
linearly to a tenth of itself over the last ``decay`` share of ``rounds`` (a
constant-then-decay schedule): once the model is near its plateau, smaller moves
average out the noise of rounds in which each coordinate has a single sender.
``benchmarks/default_run.py`` measures the default setting.

Strategies that have a server optimizer of their own (FedAvgM, FedAdam, FedYogi,
FedAdagrad: ``pollen.strategies.has_server_optimizer``) never get this one on top.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord


class ServerMomentum:
    """``ServerMomentum(1.0, 0.6, decay=0.5, rounds=20).apply(current, proposed, round)`` -> new arrays."""

    FINAL = 0.1  # the decayed learning rate at the last round, as a share of the first

    def __init__(self, learning_rate: float, momentum: float, decay: float, rounds: int) -> None:
        if not 0 < learning_rate < float("inf"):
            raise ValueError(f"server learning rate must be positive and finite, got {learning_rate}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"server momentum must be in [0, 1), got {momentum}")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"server decay must be in [0, 1], got {decay}")
        if decay and rounds < 1:
            raise ValueError("server decay needs the number of rounds")
        self.learning_rate = learning_rate
        self.momentum = momentum
        self.decay = decay
        self.rounds = rounds
        self.velocity: dict[str, np.ndarray] = {}

    def rate(self, server_round: int) -> float:
        """The learning rate of ``server_round`` (1-based) under the decay schedule."""
        decaying = self.decay * self.rounds
        start = self.rounds - decaying
        if not decaying or server_round <= start:
            return self.learning_rate
        done = min(1.0, (server_round - start) / decaying)
        return self.learning_rate * (1.0 - (1.0 - self.FINAL) * done)

    @property
    def is_plain(self) -> bool:
        """True when the proposed arrays are taken as they are."""
        return self.learning_rate == 1.0 and self.momentum == 0.0 and self.decay == 0.0

    def apply(self, current: ArrayRecord, proposed: ArrayRecord, server_round: int = 1) -> ArrayRecord:
        """The new global arrays: current moved by rate * velocity (dtypes of current)."""
        if self.is_plain:
            return proposed
        rate = self.rate(server_round)
        out = {}
        for name, array in current.items():
            now = array.numpy()
            step = proposed[name].numpy().astype(np.float64) - now
            velocity = self.velocity.get(name)
            if velocity is not None and velocity.shape == step.shape:
                step = self.momentum * velocity + step
            self.velocity[name] = step
            out[name] = Array(np.asarray(now + rate * step, dtype=now.dtype))
        return ArrayRecord(out)
