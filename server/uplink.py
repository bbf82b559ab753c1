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
from dataclasses import dataclass, field
from logging import WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common import log

from pollen.codec import Codec, CodecError, decode, decode_sparse, dense_wire_bytes, layout_of, wire_bytes
from pollen.server.update_checks import Update, UpdateChecks, check_claim, screen_updates, update_norm
from pollen.strategies.sparse_deltas import sparse_delta_record

# What a train (evaluate) reply's MetricRecord must carry; only these reach the strategy.
TRAIN_METRICS = ("num-examples", "train-loss", "train-seconds")
EVALUATE_METRICS = ("num-examples", "accuracy", "loss")


@dataclass
class RoundTraffic:
    """Bytes on the wire in one round (serialized Flower records) and what became of the replies."""

    uplink: int = 0  # replies received, accepted or not
    downlink: int = 0  # train and evaluate instructions sent
    dense_uplink: int = 0  # what the same replies would cost as dense fp32 arrays
    accepted: int = 0
    rejected: int = 0
    failed: int = 0  # replies that carried an error instead of content
    rejections: list[dict] = field(default_factory=list)  # {"client", "reason"} per rejected reply
    clipped: list[dict] = field(default_factory=list)  # {"client", "reason"} per clipped weight

    @property
    def compression(self) -> float | None:
        return self.dense_uplink / self.uplink if self.uplink else None

    def count_sent(self, messages: Iterable[Message]) -> None:
        self.downlink += sum(wire_bytes(record) for message in messages
                             for record in message.content.array_records.values())

    def reject(self, client: str, reason: str, server_round: int) -> None:
        self.rejected += 1
        self.rejections.append({"client": client, "reason": reason})
        log(WARNING, "round %d: rejected update from %s: %s", server_round, client, reason)

    def clip(self, client: str, reason: str, server_round: int) -> None:
        self.clipped.append({"client": client, "reason": reason})
        log(WARNING, "round %d: %s: %s", server_round, client, reason)


def accept_replies(replies: Iterable[Message], global_arrays: ArrayRecord, codec: Codec, checks: UpdateChecks, *,
                   sparse: bool, traffic: RoundTraffic, server_round: int) -> list[Message]:
    """The replies a strategy may aggregate, their contents decoded; counts go to ``traffic``.

    Error replies pass through (Flower's strategies log and skip them); a reply whose
    payload or metrics fail a check, or that ``screen_updates`` rejects, is left out
    with its reason; one whose weight is clipped goes on with the clipped weight.
    """
    layout = layout_of(global_arrays)
    current = {name: array.numpy() for name, array in global_arrays.items()}
    dense_bytes = dense_wire_bytes(layout)
    accepted, decoded = [], []  # decoded: (reply, arrays, metrics, Update) of the replies that decode
    for reply in replies:
        if reply.has_error():
            traffic.failed += 1
            accepted.append(reply)
            continue
        node = reply.metadata.src_node_id
        try:
            record = _single(reply.content.array_records, "ArrayRecord")
            traffic.uplink += wire_bytes(record)
            traffic.dense_uplink += dense_bytes
            metrics = _train_metrics(_single(reply.content.metric_records, "MetricRecord"))
            if sparse:
                indices, values = decode_sparse(record, layout, codec)
                arrays, direction = sparse_delta_record(indices, values), (indices, values)
            else:
                delta = decode(record, layout, codec)
                flat = _flat(delta)
                arrays, direction = _local_arrays(current, delta), (np.arange(flat.size), flat)
            norm = update_norm(direction[1])
        except CodecError as error:
            traffic.reject(checks.clients.name(node), str(error), server_round)
            continue
        decoded.append((reply, arrays, metrics, Update(node, metrics["num-examples"], norm, direction)))
    verdicts = screen_updates([update for *_, update in decoded], checks)
    for (reply, arrays, metrics, update), verdict in zip(decoded, verdicts):
        name = checks.clients.name(update.node_id)
        if verdict.weight is None:
            traffic.reject(name, verdict.reason, server_round)
            continue
        if verdict.clipped:
            traffic.clip(name, verdict.reason, server_round)
            metrics["num-examples"] = verdict.weight
        reply.content = RecordDict({"arrays": arrays, "metrics": metrics})
        traffic.accepted += 1
        accepted.append(reply)
    return accepted


def accept_evaluations(replies: Iterable[Message], checks: UpdateChecks, *, traffic: RoundTraffic,
                       server_round: int) -> list[Message]:
    """Federated evaluation replies whose metrics a strategy can average without overflowing."""
    accepted = []
    for reply in replies:
        if not reply.has_error():
            node = reply.metadata.src_node_id
            try:
                metrics = _checked_metrics(_single(reply.content.metric_records, "MetricRecord"), EVALUATE_METRICS)
                verdict = check_claim(node, metrics["num-examples"], checks)
            except CodecError as error:
                traffic.reject(checks.clients.name(node), f"evaluation: {error}", server_round)
                continue
            if verdict.weight is None:
                traffic.reject(checks.clients.name(node), f"evaluation: {verdict.reason}", server_round)
                continue
            reply.content = RecordDict({"metrics": metrics})
        accepted.append(reply)
    return accepted


def _local_arrays(current: dict[str, np.ndarray], delta: dict[str, np.ndarray]) -> ArrayRecord:
    """global + delta, as a dense strategy expects a client's model; refused if it leaves float32."""
    with np.errstate(over="ignore", invalid="ignore"):
        local = {name: current[name] + delta[name] for name in current}
    for name, value in local.items():
        if not np.isfinite(value).all():
            raise CodecError(f"{name}: global + update overflows float32")
    return ArrayRecord({name: Array(value) for name, value in local.items()})


def _flat(arrays: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([value.reshape(-1) for value in arrays.values()]) if arrays else np.zeros(0)


def _single(records: dict, kind: str):
    if len(records) != 1:
        raise CodecError(f"expected exactly one {kind}, got {len(records)}")
    return next(iter(records.values()))


def _train_metrics(metrics: MetricRecord) -> MetricRecord:
    return _checked_metrics(metrics, TRAIN_METRICS)


def _checked_metrics(metrics: MetricRecord, keys: tuple[str, ...]) -> MetricRecord:
    """The metrics a strategy averages, checked: present, finite as floats, num-examples a positive integer."""
    values = {}
    for key in keys:
        value = metrics.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
            raise CodecError(f"metric {key!r} missing or not a finite number: {_short(value)}")
        values[key] = value
    examples = values["num-examples"]
    if examples <= 0 or (isinstance(examples, float) and not examples.is_integer()):
        raise CodecError(f"num-examples must be a positive integer, got {_short(examples)}")
    return MetricRecord(values)


def _finite(value: int | float) -> bool:
    """Finite as a float: an int beyond float's range would overflow whoever averages it."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"
