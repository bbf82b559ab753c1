"""Bandwidth-aware compression: a client sends as much of its update as reaches the server by the deadline.

With ``codec.fit_deadline``, a client that knows the round's deadline and its own link
(in simulation the device model writes them into each training message: ``DEADLINE``
and the other keys below) works out the bytes its uplink can carry in the time left
after the downlink and its training, and encodes at the largest density, up to
``codec.density``, whose payload fits. What it leaves out stays in its error-feedback
residual, as with any top-k. Slow devices send fewer entries instead of missing the
round; the server's decoder takes any density up to ``codec.density``, and the
sparse-aware strategies average each entry over the clients that sent it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord

from pollen.codec import TopK, encode, wire_bytes

# Message config keys: facts a device knows about this round and its own link.
DEADLINE = "deadline-seconds"  # the round's deadline, from the message leaving the server
DOWNLINK_SECONDS = "downlink-seconds"  # how long this message took to arrive
UPLINK_RATE = "uplink-bytes-per-second"
TRAINING_RATE = "examples-per-second"  # this device's local training throughput
SEARCH_STEPS = 10  # bisections over log(density): from 0.1% to dense, within 1% of the best density


def uplink_budget(round_config: ConfigRecord | Mapping, examples: float) -> float | None:
    """Bytes this device can send after training on ``examples`` (examples x epochs) and still make the deadline.

    None when the message does not say the deadline and the link (no deadline, or no
    device model); 0 when training alone runs past the deadline.
    """
    if not all(key in round_config for key in (DEADLINE, DOWNLINK_SECONDS, UPLINK_RATE, TRAINING_RATE)):
        return None
    left = (float(round_config[DEADLINE]) - float(round_config[DOWNLINK_SECONDS])
            - examples / float(round_config[TRAINING_RATE]))
    return max(0.0, left) * float(round_config[UPLINK_RATE])


def fitted_payload(update: Mapping[str, np.ndarray], codec: TopK, budget: float | None, min_density: float, *,
                   seed: int = 0, gradient_rms: Mapping[str, np.ndarray] | None = None) -> tuple[TopK, ArrayRecord]:
    """The codec at the largest density in [min_density, codec.density] whose payload fits ``budget`` bytes, and
    that payload. Without a budget, or if even ``min_density`` does not fit, the bounds are used as they are."""
    def payload_at(density: float) -> tuple[TopK, ArrayRecord]:
        at = dataclasses.replace(codec, density=density)
        return at, encode(update, at, seed=seed, gradient_rms=gradient_rms)

    best = payload_at(codec.density)
    if budget is None or wire_bytes(best[1]) <= budget:
        return best
    best = payload_at(min(min_density, codec.density))
    if wire_bytes(best[1]) > budget:
        return best  # it will be late; nothing smaller is worth sending
    low, high = math.log(best[0].density), math.log(codec.density)  # fits at low, not at high
    for _ in range(SEARCH_STEPS):
        middle = (low + high) / 2
        candidate = payload_at(math.exp(middle))
        if wire_bytes(candidate[1]) <= budget:
            best, low = candidate, middle
        else:
            high = middle
    return best
