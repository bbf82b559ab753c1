"""Broadcast: the server side of the downlink (wire format in ``pollen/downlink.py``).

The global trainable arrays move by one compressed step per round: the arrays
proposed by the strategy (and the server's optimizer step) minus the current ones, plus what earlier steps left out
(server-side error feedback), encoded with the downlink codec. The global model
is the sum of the decoded steps, so every client that holds version v rebuilds
version t exactly from steps v+1..t, and nothing the strategy asked for is lost,
only delayed.

Each node is sent what it lacks: the chain of steps since the version it holds,
or the whole arrays at 8 bits when that is cheaper or its version is unknown (its
last message got no good reply). Steps too old to be worth chaining are dropped,
so memory stays bounded however many rounds run.

Without a step codec (``downlink.name: identity``) every message carries the dense
fp32 arrays and the global arrays are the proposed ones.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from pollen.codec import TopK, decode, encode, layout_of, wire_bytes
from pollen.downlink import arrays_crc, chain_message, full_message


class Broadcast:
    """``Broadcast(TopK(density=1.0), initial_arrays)``: versioned global arrays, sent compactly."""

    def __init__(self, codec: TopK | None, initial: dict[str, np.ndarray]) -> None:
        self.codec = codec
        self.version = 0
        self.steps: dict[int, ArrayRecord] = {}  # version -> encoded step that produced it
        self._step_bytes: dict[int, int] = {}  # version -> that step's bytes on the wire
        self._chains: dict[int, tuple[ArrayRecord, dict, int]] = {}  # base -> chain to self.version
        self.node_versions: dict[int, int | None] = {}  # absent: version 0; None: unknown
        self._pending: dict[int, int] = {}  # node -> version sent, until it replies
        self._residual = {name: np.zeros_like(value) for name, value in initial.items()}
        self._base_crc = arrays_crc(initial)
        self._full: tuple[int, ArrayRecord, dict, int] | None = None

    def address(self, messages: Iterable[Message], arrays: ArrayRecord) -> list[Message]:
        """Replace the dense arrays in each outgoing message by what its node lacks."""
        if self.codec is None:
            return list(messages)
        out = []
        for message in messages:
            node = message.metadata.dst_node_id
            record, entries = self.payload_for(node, arrays)
            content = message.content
            config = next(iter(content.config_records.values()), ConfigRecord())
            message.content = RecordDict({"arrays": record, "config": ConfigRecord({**config, **entries})})
            self._pending[node] = self.version
            out.append(message)
        return out

    def payload_for(self, node: int, arrays: ArrayRecord) -> tuple[ArrayRecord, dict]:
        base = self.node_versions.get(node, 0)
        full = self._full_payload(arrays)
        if base is not None and base in self._chainable():
            record, entries, size = self._chain_from(base)
            if size <= full[2]:
                return record, entries
        return full[0], full[1]

    def replied(self, replies: Iterable[Message]) -> None:
        """Nodes that answered well now hold what they were sent; the others, who knows."""
        if self.codec is None:
            return
        answered = {reply.metadata.src_node_id: not reply.has_error() for reply in replies}
        for node, version in self._pending.items():
            self.node_versions[node] = version if answered.get(node) else None
        self._pending.clear()

    def forget_nodes(self) -> None:
        """After a restart in which every client lost its state (a new Flower run): all hold version 0.

        Each node is then sent the chain from the initial arrays, or the whole arrays,
        instead of steps on top of a copy it no longer has.
        """
        self.node_versions.clear()
        self._pending.clear()

    def advance(self, current: ArrayRecord, proposed: ArrayRecord) -> ArrayRecord:
        """The next global arrays: current + the encoded step towards ``proposed``."""
        if self.codec is None:
            return proposed
        now = {name: array.numpy() for name, array in current.items()}
        step = {name: proposed[name].numpy().astype(np.float32) - now[name] + self._residual[name]
                for name in now}
        payload = encode(step, self.codec)
        sent = decode(payload, layout_of(now), self.codec)
        self._residual = {name: step[name] - sent[name] for name in now}
        self.version += 1
        self.steps[self.version] = payload
        self._step_bytes[self.version] = wire_bytes(payload)
        self._chains.clear()  # every chain now ends one step later
        self._forget_old_steps()
        return ArrayRecord({name: Array(np.ascontiguousarray(now[name] + sent[name], dtype=np.float32)) for name in now})

    def _chainable(self) -> range:
        """Versions a chain can start from: those whose later steps are all kept."""
        oldest = min(self.steps, default=self.version + 1) - 1
        return range(oldest, self.version + 1)

    def _chain_from(self, base: int) -> tuple[ArrayRecord, dict, int]:
        """The chain base+1..version and its bytes, built once per base and version."""
        if base not in self._chains:
            record, entries = chain_message(self.steps, base, self.version,
                                            self._base_crc if base == 0 else None)
            self._chains[base] = (record, entries, wire_bytes(record))
        return self._chains[base]

    def _full_payload(self, arrays: ArrayRecord) -> tuple[ArrayRecord, dict, int]:
        if self._full is None or self._full[0] != self.version:
            record, entries = full_message({k: v.numpy() for k, v in arrays.items()}, self.version)
            self._full = (self.version, record, entries, wire_bytes(record))
        return self._full[1:]

    def _forget_old_steps(self) -> None:
        """A chain longer than a full transfer is never sent: drop the steps only it would use."""
        if self._full is None:
            return
        total = 0
        for version in sorted(self.steps, reverse=True):
            total += self._step_bytes[version]
            if total > self._full[3]:
                self.steps = {v: s for v, s in self.steps.items() if v > version}
                self._step_bytes = {v: n for v, n in self._step_bytes.items() if v > version}
                return
