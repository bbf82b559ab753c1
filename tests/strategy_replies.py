"""Driving a round by hand: replies built from given deltas, through Pollen's round or Flower's strategy alone.

Node k (1-based) answers with ``deltas[k - 1]`` and ``sizes[k - 1]`` examples, in Pollen's
round and in Flower's alike, so a test knows which node sent what.
"""

import random
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from pollen.codec import Identity, encode
from pollen.config import Config, load_config
from pollen.server.app import RoundOutcome, run_round
from pollen.server.broadcast import Broadcast
from pollen.server.checkpoint import ServerState
from pollen.server.over_selection import OverSelection
from pollen.server.update_checks import UpdateChecks
from pollen.strategies import make_strategy

TINY = Path(__file__).resolve().parents[1] / "simulations" / "configs" / "tiny.yaml"
# No bounds but the model's finiteness: the strategies' own rules, on deltas as large as the model.
UNBOUNDED = UpdateChecks(max_norm_ratio=0.0, max_update_norm=0.0, min_cosine=-1.0, max_examples=2**1023, max_weight_ratio=0.0,
                         max_step_ratio=0.0)


class FixedGrid:
    """Just enough of a Grid for configure_train: a fixed set of node ids."""

    def __init__(self, num_nodes: int = 3) -> None:
        self.num_nodes = num_nodes

    def get_node_ids(self):
        return list(range(1, self.num_nodes + 1))


class ReplyGrid(FixedGrid):
    """A Grid whose node k answers a train message with ``payloads[k - 1]``.

    A payload is an ArrayRecord (sent with ``metric_values[k - 1]``, or the metrics of
    ``sizes[k - 1]`` examples) or an ``Error`` (an error reply). ``sent`` holds the
    messages of the last call.
    """

    def __init__(self, payloads: list, sizes: list[float], metric_values: list[dict] | None = None) -> None:
        super().__init__(len(payloads))
        self.payloads, self.sizes, self.metric_values = payloads, sizes, metric_values
        self.sent: list[Message] = []

    def send_and_receive(self, messages, *, timeout=None):
        self.sent = list(messages)
        replies = []
        for message in self.sent:
            i = message.metadata.dst_node_id - 1
            if isinstance(self.payloads[i], Error):
                replies.append(Message(self.payloads[i], reply_to=message))
            else:
                values = self.metric_values[i] if self.metric_values else metrics(self.sizes[i])
                replies.append(reply_to(message, self.payloads[i], values))
        return replies


def record_of(arrays: dict) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def numpy_of(record: ArrayRecord) -> dict:
    return {k: v.numpy() for k, v in record.items()}


def metrics(n: float) -> dict:
    return {"num-examples": n, "train-loss": 1.0, "train-seconds": 0.1}


def reply_to(instruction: Message, arrays: ArrayRecord, metric_values: dict) -> Message:
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metric_values)}),
                   reply_to=instruction)


def sampling(num_nodes: int) -> dict:
    return {"fraction_train": 1.0, "min_train_nodes": num_nodes, "min_available_nodes": num_nodes,
            "fraction_evaluate": 0.0}


def config_of(name: str = "fedavg", clients: int = 3, settings: dict | None = None,
              overrides: list[str] = ()) -> Config:
    """The tiny config with strategy ``name`` (its ``settings``), sampling all ``clients`` every round."""
    return load_config(TINY, [f"federation.strategy={name}", f"federation.num_clients={clients}",
                              f"federation.clients_per_round={clients}",
                              *(f"strategy.{key}={value}" for key, value in (settings or {}).items()),
                              *overrides])


def strategy_of(name: str = "fedavg", clients: int = 3, settings: dict | None = None, overrides: list[str] = ()):
    """The registry's strategy for ``config_of(...)``."""
    return make_strategy(config_of(name, clients, settings, overrides))


def configure(strategy, arrays: dict, server_round: int = 1, config: dict | None = None,
              num_nodes: int = 3) -> list[Message]:
    random.seed(server_round)  # Flower samples nodes with `random`: same seed, same order
    return list(strategy.configure_train(server_round, record_of(arrays), ConfigRecord(config or {}),
                                         FixedGrid(num_nodes)))


def pollen_state(strategy, arrays: dict, momentum=None, downlink=None) -> ServerState:
    """A server at round 0 holding ``arrays``; ``downlink`` a step codec (None: dense fp32)."""
    start = {k: np.asarray(v) for k, v in arrays.items()}
    return ServerState(round=0, arrays=record_of(start), strategy=strategy, momentum=momentum,
                       broadcast=Broadcast(downlink, start), selection=OverSelection(1, 1, 1))  # off


def pollen_round(state: ServerState, deltas: list[dict], sizes: list[float], codec=None,
                 server_round: int = 1, payloads: list | None = None,
                 metric_values: list[dict] | None = None, checks: UpdateChecks = UNBOUNDED) -> RoundOutcome:
    """One round of Pollen's server on replies carrying ``deltas`` encoded with ``codec``
    (or the given ``payloads``); ``state.arrays`` ends as the new global arrays."""
    codec = codec or Identity()
    payloads = payloads or [encode(delta, codec) for delta in deltas]
    return grid_round(state, ReplyGrid(payloads, sizes, metric_values), codec, server_round, checks)


def grid_round(state: ServerState, grid: ReplyGrid, codec=None, server_round: int = 1,
               checks: UpdateChecks = UNBOUNDED) -> RoundOutcome:
    """One round of Pollen's server on ``grid`` (``grid.sent`` then holds the train messages)."""
    random.seed(server_round)  # as in `configure`: the same nodes in the same order
    return run_round(server_round, state, grid, codec or Identity(), checks)


def flower_round(strategy, arrays: dict, deltas: list[dict], sizes: list[float], server_round: int = 1) -> dict:
    """The same round given to a Flower strategy alone: clients send dense local models."""
    messages = configure(strategy, arrays, server_round, num_nodes=len(deltas))
    replies = []
    for message in messages:
        i = message.metadata.dst_node_id - 1
        replies.append(reply_to(message, record_of({k: arrays[k] + deltas[i][k] for k in arrays}), metrics(sizes[i])))
    new, _ = strategy.aggregate_train(server_round, replies)
    return None if new is None else numpy_of(new)


def run_round_of(strategy, arrays: dict, deltas: list[dict], sizes: list[float], codec=None,
                 server_round: int = 1, momentum=None) -> dict:
    """New global arrays after one Pollen round from ``arrays`` (a fresh server state)."""
    state = pollen_state(strategy, arrays, momentum)
    pollen_round(state, deltas, sizes, codec, server_round)
    return numpy_of(state.arrays)
