"""Hostile clients, for simulations that test the server's defences: ``simulation.attack``.

``attack.fraction`` of the simulated clients, drawn once from the run's seed, attack in
every round they are sampled; the others stay honest. What an attacker does
(``attack.kind``):

    sign-flip    sends the negation of its honest update
    scale        sends its honest update times ``attack.scale``
    noise        sends Gaussian noise with the norm of its honest update
    label-flip   trains honestly on its data with every label c turned into K-1-c
    weight       sends its honest update but claims 1e9 examples

Only simulated clients (those holding a partition) can attack: a device that reads its
own files (``pollen client --data``) is always honest, whatever the run config says.
"""

from __future__ import annotations

import numpy as np

from pollen.config import Config
from pollen.privacy import l2_norm

CLAIMED_EXAMPLES = 10 ** 9  # the "weight" attacker's claim


def attackers(config: Config) -> frozenset[int]:
    """The partition ids that attack in this run: ``attack.fraction`` of them, by the seed."""
    attack, clients = config.simulation.attack, config.federation.num_clients
    count = int(round(attack.fraction * clients))
    chosen = np.random.default_rng([config.seed, 0xA77AC]).choice(clients, size=count, replace=False)
    return frozenset(int(i) for i in chosen)


def attack_of(config: Config, node_config: dict) -> str | None:
    """What this simulated node does, or None for an honest one."""
    if config.simulation.attack.fraction == 0:
        return None
    return config.simulation.attack.kind if int(node_config["partition-id"]) in attackers(config) else None


def flipped_labels(labels, num_classes: int):
    """Class c becomes K-1-c (label-flip)."""
    return num_classes - 1 - labels


def poisoned(update: dict[str, np.ndarray], kind: str, scale: float, seed: int) -> dict[str, np.ndarray]:
    """The update an attacker sends instead of its honest ``update`` (sign-flip, scale, noise)."""
    if kind == "sign-flip":
        return {name: -value for name, value in update.items()}
    if kind == "scale":
        return {name: (value * scale).astype(value.dtype) for name, value in update.items()}
    if kind == "noise":
        rng = np.random.default_rng(seed)
        noise = {name: rng.standard_normal(value.shape) for name, value in update.items()}
        norm, noise_norm = l2_norm(update), l2_norm(noise) or 1.0
        return {name: (noise[name] * norm / noise_norm).astype(value.dtype) for name, value in update.items()}
    return update  # label-flip and weight send what they trained
