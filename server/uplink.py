"""Uplink acceptance: check, decode and count every client reply before a strategy sees it.

Clients reply with an encoded *delta* of the trainable arrays. Each reply is checked
and decoded against the global arrays it was computed from: a dense strategy (any of
Flower's) gets the local arrays global + delta, exactly as if the client had sent its
whole model; a sparse-aware one (``takes_sparse_deltas``, strategies/sparse_deltas.py)
gets only the (indices, values) that were sent. A reply that fails any check is
dropped with a logged reason, and the round goes on with the rest.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from logging import WARNING

from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common import log

from pollen.codec import Codec, CodecError, decode, decode_sparse, dense_wire_bytes, layout_of, wire_bytes
from pollen.strategies.sparse_deltas import sparse_delta_record

# What a train reply's MetricRecord must carry; only these reach the strategy.
TRAIN_METRICS = ("num-examples", "train-loss", "train-seconds")


@dataclass
class RoundTraffic:
    """Bytes on the wire in one round (serialized Flower records) and what became of the replies."""

    uplink: int = 0  # replies received, accepted or not
    downlink: int = 0  # train and evaluate instructions sent
    dense_uplink: int = 0  # what the same replies would cost as dense fp32 arrays
    accepted: int = 0
    rejected: int = 0
    failed: int = 0  # replies that carried an error instead of content

    @property
    def compression(self) -> float | None:
        return self.dense_uplink / self.uplink if self.uplink else None

    def count_sent(self, messages: Iterable[Message]) -> None:
        self.downlink += sum(wire_bytes(record) for message in messages
                             for record in message.content.array_records.values())


def accept_replies(replies: Iterable[Message], global_arrays: ArrayRecord, codec: Codec, *,
                   sparse: bool, traffic: RoundTraffic, server_round: int) -> list[Message]:
    """The replies a strategy may aggregate, their contents decoded; counts go to ``traffic``.

    Error replies pass through (Flower's strategies log and skip them); a reply whose
    payload or metrics fail a check is left out and logged.
    """
    layout = layout_of(global_arrays)
    current = {name: array.numpy() for name, array in global_arrays.items()}
    dense_bytes = dense_wire_bytes(layout)
    accepted = []
    for reply in replies:
        if reply.has_error():
            traffic.failed += 1
            accepted.append(reply)
            continue
        try:
            record = _single(reply.content.array_records, "ArrayRecord")
            traffic.uplink += wire_bytes(record)
            traffic.dense_uplink += dense_bytes
            metrics = _train_metrics(_single(reply.content.metric_records, "MetricRecord"))
            if sparse:
                arrays = sparse_delta_record(*decode_sparse(record, layout, codec))
            else:
                delta = decode(record, layout, codec)
                arrays = ArrayRecord({name: Array(current[name] + delta[name]) for name in layout})
        except CodecError as error:
            traffic.rejected += 1
            log(WARNING, "round %d: rejected update from node %s: %s", server_round,
                reply.metadata.src_node_id, error)
            continue
        reply.content = RecordDict({"arrays": arrays, "metrics": metrics})
        traffic.accepted += 1
        accepted.append(reply)
    return accepted


def _single(records: dict, kind: str):
    if len(records) != 1:
        raise CodecError(f"expected exactly one {kind}, got {len(records)}")
    return next(iter(records.values()))


def _train_metrics(metrics: MetricRecord) -> MetricRecord:
    """The metrics a strategy averages, checked: present, finite, num-examples > 0."""
    values = {}
    for key in TRAIN_METRICS:
        value = metrics.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise CodecError(f"metric {key!r} missing or not a finite number: {value!r}")
        values[key] = value
    if values["num-examples"] <= 0:
        raise CodecError(f"num-examples must be positive, got {values['num-examples']}")
    return MetricRecord(values)
