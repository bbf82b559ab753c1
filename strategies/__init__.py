"""Aggregation strategies, chosen by name; each wrapped to accept compressed updates."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg, Strategy

from pollen.codec import Codec
from strategies.compressed import CompressedUpdates, RoundTraffic
from strategies.sparse_fedavg import SparseFedAvg

STRATEGIES: dict[str, type[Strategy]] = {"fedavg": FedAvg, "sparse-fedavg": SparseFedAvg}


def make_strategy(name: str, codec: Codec, **settings) -> CompressedUpdates:
    """``make_strategy("fedavg", TopK(0.01), fraction_train=0.1)`` -> a wrapped Flower strategy."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r} (known: {', '.join(sorted(STRATEGIES))})")
    return CompressedUpdates(STRATEGIES[name](**settings), codec)


__all__ = ["CompressedUpdates", "RoundTraffic", "STRATEGIES", "SparseFedAvg", "make_strategy"]
