"""CompressedUpdates: any Flower strategy, fed with compressed client updates.

Clients reply with an encoded *delta* of the trainable arrays. This wrapper
checks and decodes every reply against the global arrays it sent, turns it back
into dense local arrays (global + delta) and hands those to the inner Flower
strategy, which then aggregates exactly as it would dense models. A reply that
fails any check is dropped and logged; the round goes on with the rest.

With a ``Broadcast`` (strategies/broadcast.py) the way down is compressed too:
each node gets only the change of the global arrays since the version it holds,
and the global arrays move by the encoded step of what the inner strategy proposed.
With a ``ServerMomentum`` (strategies/server_momentum.py) the server applies what the
inner strategy proposed as FedAvgM does, with a velocity over rounds.

It also counts the bytes that cross the wire each round, in both directions.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from logging import INFO, WARNING

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from pollen.codec import (Codec, CodecError, codec_to_config, decode, decode_sparse, dense_wire_bytes, layout_of,
                          wire_bytes)
from pollen.server.broadcast import Broadcast
from pollen.server.momentum import ServerMomentum
from pollen.strategies.sparse_deltas import sparse_delta_record

# What a train reply's MetricRecord must carry; only these reach the inner strategy.
TRAIN_METRICS = ("num-examples", "train-loss", "train-seconds")


@dataclass
class RoundTraffic:
    """Bytes on the wire in one round (serialized Flower records)."""

    uplink: int = 0  # replies received, accepted or not
    downlink: int = 0  # train and evaluate instructions sent
    dense_uplink: int = 0  # what the same replies would cost as dense fp32 arrays
    accepted: int = 0
    rejected: int = 0
    failed: int = 0  # replies that carried an error instead of content

    @property
    def compression(self) -> float:
        return self.dense_uplink / self.uplink if self.uplink else float("nan")


class CompressedUpdates(Strategy):
    """Decode, validate and delegate: ``CompressedUpdates(FedAvg(...), TopK(0.01))``."""

    def __init__(self, inner: Strategy, codec: Codec, downlink: Broadcast | None = None,
                 server: ServerMomentum | None = None) -> None:
        self.inner = inner
        self.codec = codec
        self.downlink = downlink  # None: dense fp32 global arrays in every message
        self.server = server or ServerMomentum()  # how the proposed arrays are applied
        self.traffic: dict[int, RoundTraffic] = {}
        self.train_metrics: dict[int, MetricRecord] = {}  # the inner strategy's aggregate
        self._global: ArrayRecord | None = None

    def summary(self) -> None:
        log(INFO, "\t> CompressedUpdates with codec %s, downlink %s, server lr %s momentum %s decay %s, around:",
            self.codec, self.downlink.codec if self.downlink else "dense fp32",
            self.server.learning_rate, self.server.momentum, self.server.decay)
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._global = arrays
        config = ConfigRecord({**config, **codec_to_config(self.codec)})
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        return self._send(server_round, messages, arrays)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        traffic = self.traffic.setdefault(server_round, RoundTraffic())
        if self._global is None:
            raise RuntimeError("aggregate_train called before configure_train")
        layout = layout_of(self._global)
        global_arrays = {name: array.numpy() for name, array in self._global.items()}
        dense_bytes = dense_wire_bytes(layout)
        accepted = []
        replies = list(replies)
        if self.downlink:
            self.downlink.replied(replies)
        for reply in replies:
            if reply.has_error():
                traffic.failed += 1
                accepted.append(reply)  # the inner strategy logs and skips it
                continue
            node = reply.metadata.src_node_id
            try:
                record = _single(reply.content.array_records, "ArrayRecord")
                traffic.uplink += wire_bytes(record)
                traffic.dense_uplink += dense_bytes
                metrics = _train_metrics(_single(reply.content.metric_records, "MetricRecord"))
                # Sparse-aware strategies (strategies/sparse_deltas.py) take only what was sent.
                if getattr(self.inner, "takes_sparse_deltas", False):
                    local = sparse_delta_record(*decode_sparse(record, layout, self.codec))
                else:
                    delta = decode(record, layout, self.codec)
                    local = ArrayRecord({name: Array(global_arrays[name] + delta[name]) for name in layout})
            except CodecError as error:
                traffic.rejected += 1
                log(WARNING, "round %d: rejected update from node %s: %s", server_round, node, error)
                continue
            reply.content = RecordDict({"arrays": local, "metrics": metrics})
            traffic.accepted += 1
            accepted.append(reply)
        arrays, metrics = self.inner.aggregate_train(server_round, accepted)
        if arrays is not None:  # keep the model's dtypes: FedAdam & co. return float64 under NumPy 2
            arrays = ArrayRecord({name: Array(array.numpy().astype(global_arrays[name].dtype, copy=False))
                                  for name, array in arrays.items()})
            arrays = self.server.apply(self._global, arrays, server_round)
            if self.downlink:
                arrays = self.downlink.advance(self._global, arrays)
        if metrics is not None:
            self.train_metrics[server_round] = metrics
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        messages = list(self.inner.configure_evaluate(server_round, arrays, config, grid))
        return self._send(server_round, messages, arrays)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        if self.downlink:
            self.downlink.replied(replies)
        return self.inner.aggregate_evaluate(server_round, replies)

    def _send(self, server_round: int, messages: list[Message], arrays: ArrayRecord) -> list[Message]:
        """Address each message's arrays (downlink compression) and count the bytes."""
        if self.downlink:
            messages = self.downlink.address(messages, arrays)
        traffic = self.traffic.setdefault(server_round, RoundTraffic())
        for message in messages:
            traffic.downlink += sum(wire_bytes(r) for r in message.content.array_records.values())
        return messages


def _single(records: dict, kind: str):
    if len(records) != 1:
        raise CodecError(f"expected exactly one {kind}, got {len(records)}")
    return next(iter(records.values()))


def _train_metrics(metrics: MetricRecord) -> MetricRecord:
    """The metrics the inner strategy averages, checked: present, finite, num-examples > 0."""
    values = {}
    for key in TRAIN_METRICS:
        value = metrics.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise CodecError(f"metric {key!r} missing or not a finite number: {value!r}")
        values[key] = value
    if values["num-examples"] <= 0:
        raise CodecError(f"num-examples must be positive, got {values['num-examples']}")
    return MetricRecord(values)

