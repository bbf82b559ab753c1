"""Driving a strategy by hand: one train round with replies built from given deltas."""

import random

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from pollen.codec import Identity, encode


class FixedGrid:
    """Just enough of a Grid for configure_train: a fixed set of node ids."""

    def __init__(self, num_nodes: int = 3) -> None:
        self.num_nodes = num_nodes

    def get_node_ids(self):
        return list(range(1, self.num_nodes + 1))


def record_of(arrays: dict) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def metrics(n: float) -> dict:
    return {"num-examples": n, "train-loss": 1.0, "train-seconds": 0.1}


def reply_to(instruction: Message, arrays: ArrayRecord, metric_values: dict) -> Message:
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metric_values)}),
                   reply_to=instruction)


def sampling(num_nodes: int) -> dict:
    return {"fraction_train": 1.0, "min_train_nodes": num_nodes, "min_available_nodes": num_nodes,
            "fraction_evaluate": 0.0}


def configure(strategy, arrays: dict, server_round: int = 1, config: dict | None = None,
              num_nodes: int = 3) -> list[Message]:
    random.seed(server_round)  # Flower samples nodes with `random`: same seed, same order
    config = ConfigRecord({"lr": 0.1, **(config or {})})
    return list(strategy.configure_train(server_round, record_of(arrays), config, FixedGrid(num_nodes)))


def run_round(strategy, arrays: dict, deltas: list[dict], sizes: list[float], codec=None,
              dense: bool = False, server_round: int = 1, config: dict | None = None) -> dict:
    """Configure, reply with ``deltas`` (encoded with ``codec``, or as dense local models
    when ``dense``), aggregate; return the new arrays as numpy."""
    messages = configure(strategy, arrays, server_round, config, num_nodes=len(deltas))
    replies = []
    for message, delta, n in zip(messages, deltas, sizes):
        if dense:
            payload = record_of({k: arrays[k] + delta[k] for k in arrays})
        else:
            payload = encode(delta, codec or Identity())
        replies.append(reply_to(message, payload, metrics(n)))
    new, _ = strategy.aggregate_train(server_round, replies)
    return None if new is None else {k: v.numpy() for k, v in new.items()}
