"""Broadcast: the server side of the downlink (wire format in ``pollen/downlink.py``).

The global trainable arrays move by one compressed step per round: the arrays
proposed by the strategy (and the server's optimizer step) minus the current ones,
plus what earlier steps left out (server-side error feedback), encoded with the
downlink codec. The global model is the sum of the decoded steps, so every client
that holds version v rebuilds version t from steps v+1..t, and nothing the
strategy asked for is lost, only delayed. The server's momentum velocity never
travels: with ``downlink.density`` < 1 a step is the top share of (velocity-driven)
change, whatever the velocity's own support.

Each node is sent the cheapest of: the chain of steps since the version it holds,
their sum as one payload (the union of the steps' supports), or the change since the
initial arrays (version 0, which every client can rebuild; also what a node of unknown
version gets, whose last message got no good reply). Steps are kept while they add up
to less than the whole arrays at 8 bits, so memory stays bounded however many rounds
run; a node further behind gets the change since version 0.

With a ``budget`` < 1 each step heads for the initial arrays plus the largest
``budget`` share (model-wide) of everything asked for so far: its values move the
entries of that share, and entries that dropped out of it are reset to their initial
values (positions only, exact on both sides). What is left out waits on the server as
above. The global model then differs from the initial arrays in at most that share of
entries, so a first contact, most messages when a tenth of the clients take part each
round, costs no more; otherwise it carries the change on the union of every step's
support. Sums start from version 0 only, as resets do not add up.

Without a step codec (``downlink.name: identity``) every message carries the dense
fp32 arrays and the global arrays are the proposed ones.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from pollen.codec import TopK, decode, decode_sparse, encode, flatten, largest, layout_of, unflatten, wire_bytes
from pollen.downlink import RESET, arrays_crc, chain_message, sum_codec, sum_message

Payload = tuple[ArrayRecord, dict, int]  # record, config entries, bytes on the wire


class Broadcast:
    """``Broadcast(TopK(density=1.0), initial_arrays, budget=1.0)``: versioned global arrays, sent compactly."""

    SUM_SAVES = 0.1  # a sum, which is not exact, must save this share of the cheapest chain
    KEEP_WHOLES = 4  # steps kept for sums from older versions, in whole arrays' worth of bytes
    budget = 1.0  # what a broadcast from a checkpoint written before budgets had (no cap)

    def __init__(self, codec: TopK | None, initial: dict[str, np.ndarray], budget: float = 1.0) -> None:
        if not 0.0 < budget <= 1.0:
            raise ValueError(f"budget must be in (0, 1], got {budget}")
        self.codec = codec
        self.budget = budget  # most entries the global arrays may differ from the initial ones in, as a share
        self.version = 0
        self.steps: dict[int, ArrayRecord] = {}  # version -> encoded step that produced it
        self._step_bytes: dict[int, int] = {}  # version -> that step's bytes on the wire
        self._payloads: dict[tuple[str, int], Payload] = {}  # (kind, base) -> payload to self.version
        self.node_versions: dict[int, int | None] = {}  # absent: version 0; None: unknown
        self._pending: dict[int, int] = {}  # node -> version sent, until it replies
        self._initial = {name: np.array(value, dtype=np.float32) for name, value in initial.items()}
        self._residual = {name: np.zeros_like(value) for name, value in self._initial.items()}
        self._base_crc = arrays_crc(initial)
        # Steps kept: while they add up to less than a few times the whole arrays at 8 bits.
        whole = wire_bytes(encode({n: np.ones_like(v) for n, v in self._initial.items()}, sum_codec(codec or TopK())))
        self._keep_bytes = self.KEEP_WHOLES * whole

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
        """What ``node`` lacks to hold ``arrays`` (the current global arrays).

        A chain is exact and a sum is not, so a sum is sent only when it saves a real
        share (``SUM_SAVES``) of the cheapest chain's bytes.
        """
        base = self.node_versions.get(node, 0)
        bases = [base] if base and base in self._kept_bases() else []  # the node's own first: kept on a tie
        chains = [self._payload("chain", b, arrays) for b in bases + [0] if b in self._kept_bases()]
        sum_bases = bases + [0] if self.budget == 1.0 else [0]  # version 0: always rebuildable
        sums = [self._payload("sum", b, arrays) for b in sum_bases]
        best = min(sums, key=lambda payload: payload[2])
        if chains:
            chain = min(chains, key=lambda payload: payload[2])
            best = best if best[2] < (1 - self.SUM_SAVES) * chain[2] else chain
        return best[0], best[1]

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

        Each node is then sent the change since the initial arrays instead of steps on
        top of a copy it no longer has.
        """
        self.node_versions.clear()
        self._pending.clear()

    def advance(self, current: ArrayRecord, proposed: ArrayRecord) -> ArrayRecord:
        """The next global arrays: current + the encoded step towards ``proposed``."""
        if self.codec is None:
            return proposed
        now = {name: array.numpy() for name, array in current.items()}
        if self.budget < 1.0:
            new, step = self._step_within_budget(now, proposed)
        else:
            change = {name: proposed[name].numpy().astype(np.float32) - now[name] + self._residual[name]
                      for name in now}
            step = encode(change, self.codec)
            sent = decode(step, layout_of(now), self.codec)
            self._residual = {name: change[name] - sent[name] for name in now}
            new = {name: now[name] + sent[name] for name in now}
        self.version += 1
        self.steps[self.version] = step
        self._step_bytes[self.version] = wire_bytes(step)
        self._payloads.clear()  # every payload now ends one step later
        self._forget_old_steps()
        return ArrayRecord({name: Array(np.ascontiguousarray(new[name], dtype=np.float32)) for name in now})

    def _step_within_budget(self, now: dict[str, np.ndarray],
                            proposed: ArrayRecord) -> tuple[dict[str, np.ndarray], ArrayRecord]:
        """The new arrays and their step: towards the initial arrays plus the largest ``budget`` share
        (model-wide) of everything asked for so far, resetting the entries that dropped out of it."""
        wanted = {name: proposed[name].numpy().astype(np.float32) + self._residual[name] for name in now}
        change = flatten({name: wanted[name] - start for name, start in self._initial.items()})
        keep = np.zeros(change.size, bool)
        keep[largest(change, round(self.budget * change.size))] = True
        kept = unflatten(keep, layout_of(self._initial))
        # Moved, and now outside the budget: goes back.
        resets = {name: ~kept[name] & (now[name] != start) for name, start in self._initial.items()}
        step = encode({name: np.where(kept[name], wanted[name] - now[name], 0) for name in now}, self.codec)
        sent = decode(step, layout_of(now), self.codec)
        new = {name: np.where(resets[name], self._initial[name], now[name] + sent[name]) for name in now}
        self._residual = {name: wanted[name] - new[name] for name in now}  # what waits, in the budget or not
        if any(mask.any() for mask in resets.values()):
            reset = encode({name: mask.astype(np.float32) for name, mask in resets.items()}, RESET)
            step = ArrayRecord({"update": step["update"], "reset": reset["update"]})
        return new, step

    def _kept_bases(self) -> range:
        """Versions a chain or a sum can start from: 0 and those whose later steps are all kept."""
        oldest = min(self.steps, default=self.version + 1) - 1
        return range(oldest, self.version + 1)

    def _payload(self, kind: str, base: int, arrays: ArrayRecord) -> Payload:
        """The chain or the sum from ``base`` to ``self.version``, built once per version."""
        if (kind, base) not in self._payloads:
            crc = self._base_crc if base == 0 else None
            if kind == "chain":
                record, entries = chain_message(self.steps, base, self.version, crc)
            else:
                record, entries = sum_message(self._change_since(base, arrays), base, self.version, self.codec, crc)
            self._payloads[kind, base] = (record, entries, wire_bytes(record))
        return self._payloads[kind, base]

    def _change_since(self, base: int, arrays: ArrayRecord) -> dict[str, np.ndarray]:
        """Version ``self.version``'s arrays minus version ``base``'s (zero where no step touched)."""
        if base == 0:
            return {name: arrays[name].numpy() - start for name, start in self._initial.items()}
        layout = layout_of(self._initial)
        flat = np.zeros(sum(value.size for value in self._initial.values()), np.float32)
        for version in range(base + 1, self.version + 1):
            indices, values = decode_sparse(self.steps[version], layout, self.codec)
            flat[indices] += values  # a step's indices are distinct
        return unflatten(flat, layout)

    def _forget_old_steps(self) -> None:
        """Drop the oldest steps once the kept ones add up to more than ``KEEP_WHOLES`` whole arrays."""
        total = 0
        for version in sorted(self.steps, reverse=True):
            total += self._step_bytes[version]
            if total > self._keep_bytes:
                self.steps = {v: s for v, s in self.steps.items() if v > version}
                self._step_bytes = {v: n for v, n in self._step_bytes.items() if v > version}
                return
