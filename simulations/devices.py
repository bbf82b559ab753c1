"""Device heterogeneity: profiles from YAML, a seeded population, and a simulated clock.

A profile file describes a fleet::

    examples_per_second: 200     # local training throughput of a compute_speed 1.0 device
    profiles:
      - name: phone-4g
        share: 0.7               # part of the population with this profile
        compute_speed: 1.0       # relative to the reference device above
        uplink_mbps: 1.0
        downlink_mbps: 10.0
        availability: 0.8        # probability of being online when a round samples
        dropout: 0.05            # probability of dropping out mid-round once sampled

``DeviceGrid`` wraps any backend's Grid (in-process or Flower's engine) so its nodes
behave like that fleet: only online nodes are offered to the strategy's sampling,
sampled nodes may drop out (they reply with Flower's NODE_UNAVAILABLE error, as the
SuperLink reports a node that went away), and every reply is timed on a simulated
clock: downlink bytes / bandwidth + training time / speed + uplink bytes / bandwidth.
Replies later than the round deadline are cut (REPLY_MESSAGE_UNAVAILABLE) and the
round aggregates what came back in time. With a deadline, each training message also
tells its device the deadline, how long the message took and its own link and throughput,
which a client with ``codec.fit_deadline`` sizes its reply by (client/deadline.py).
Training time comes from examples x epochs and the profile's throughput, not from this
host's wall clock, so the clock and which replies make the deadline are the same on
every machine and backend.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from uuid import uuid4

import numpy as np
from flwr.app import ConfigRecord, Error, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from pollen.client.deadline import DEADLINE, DOWNLINK_SECONDS, TRAINING_RATE, UPLINK_RATE
from pollen.codec import wire_bytes
from pollen.config import ConfigError, read_yaml
from pollen.flower_internals import ErrorCode
from pollen.server.checkpoint import CheckpointError
from pollen.simulations.grid_wrapper import GridWrapper

BITS_PER_BYTE = 8


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    share: float
    compute_speed: float
    uplink_mbps: float
    downlink_mbps: float
    availability: float = 1.0
    dropout: float = 0.0

    def check(self, where: str) -> None:
        for key in ("share", "compute_speed", "uplink_mbps", "downlink_mbps", "availability", "dropout"):
            if not _is_number(getattr(self, key)):
                raise ConfigError(f"{where}.{key}: must be a finite number, got {getattr(self, key)!r}")
        for key in ("share", "compute_speed", "uplink_mbps", "downlink_mbps"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{where}.{key}: must be a positive number, got {getattr(self, key)!r}")
        if not 0 < self.availability <= 1:
            raise ConfigError(f"{where}.availability: must be in (0, 1], got {self.availability!r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"{where}.dropout: must be in [0, 1), got {self.dropout!r}")


@dataclass(frozen=True)
class DeviceProfiles:
    examples_per_second: float
    profiles: tuple[DeviceProfile, ...]


def load_profiles(path: str | Path) -> DeviceProfiles:
    """Read and check a device profile file; errors name the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"simulation.devices: file not found: {path}")
    values = read_yaml(path)
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping with examples_per_second and profiles")
    unknown = set(values) - {"examples_per_second", "profiles"}
    if unknown:
        raise ConfigError(f"{path}: unknown key {sorted(unknown)[0]!r} (known: examples_per_second, profiles)")
    speed = values.get("examples_per_second")
    if not (_is_number(speed) and speed > 0):
        raise ConfigError(f"{path}: examples_per_second must be a positive finite number, got {speed!r}")
    entries = values.get("profiles")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: profiles must be a non-empty list")
    known = {f.name for f in fields(DeviceProfile)}
    profiles = []
    for number, entry in enumerate(entries):
        where = f"{path}: profiles[{number}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected a mapping, got {entry!r}")
        if set(entry) - known:
            raise ConfigError(f"{where}: unknown key {sorted(set(entry) - known)[0]!r} "
                              f"(known: {', '.join(sorted(known))})")
        try:
            profile = DeviceProfile(**entry)
        except TypeError as error:
            raise ConfigError(f"{where}: {error}") from None
        profile.check(where)
        profiles.append(profile)
    return DeviceProfiles(float(speed), tuple(profiles))


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class DevicePopulation:
    """One profile per node (ids 1..N), drawn by share with a seed; kept as flat arrays."""

    def __init__(self, fleet: DeviceProfiles, num_nodes: int, seed: int) -> None:
        self.fleet = fleet
        shares = np.array([p.share for p in fleet.profiles], dtype=float)
        self.profile_of = np.random.default_rng([seed, 0]).choice(
            len(shares), size=num_nodes, p=shares / shares.sum())
        column = lambda key: np.array([getattr(p, key) for p in fleet.profiles])[self.profile_of]  # noqa: E731
        self.availability = column("availability")
        self.dropout = column("dropout")
        self.compute_speed = column("compute_speed")
        self.uplink_bytes_per_second = column("uplink_mbps") * 1e6 / BITS_PER_BYTE
        self.downlink_bytes_per_second = column("downlink_mbps") * 1e6 / BITS_PER_BYTE

    def __len__(self) -> int:
        return len(self.profile_of)

    def profile(self, node_id: int) -> DeviceProfile:
        return self.fleet.profiles[self.profile_of[node_id - 1]]

    def expected_online(self) -> float:
        return float(self.availability.sum())

    def seconds(self, node_id: int, downlink_bytes: int, examples: float, uplink_bytes: int) -> float:
        """Simulated time from the message leaving the server to the reply arriving."""
        return (self.downlink_seconds(node_id, downlink_bytes) + self.compute_seconds(node_id, examples)
                + uplink_bytes / self.uplink_bytes_per_second[node_id - 1])

    def downlink_seconds(self, node_id: int, downlink_bytes: int) -> float:
        """The message's part of a reply's time."""
        return downlink_bytes / self.downlink_bytes_per_second[node_id - 1]

    def compute_seconds(self, node_id: int, examples: float) -> float:
        """The training part of a reply's time."""
        return examples / self.training_rate(node_id)

    def training_rate(self, node_id: int) -> float:
        """Examples a second this device trains on."""
        return self.fleet.examples_per_second * self.compute_speed[node_id - 1]


@dataclass
class RoundTiming:
    """What the device model did in one training round."""

    seconds: float = 0.0  # simulated duration: slowest reply in time, or the deadline
    compute_seconds: float = 0.0  # the slowest of those replies' training alone: no round is shorter
    sampled: list[int] = field(default_factory=list)
    dropouts: list[int] = field(default_factory=list)
    stragglers: list[int] = field(default_factory=list)  # replied after the deadline (or the client timeout)


class DeviceGrid(GridWrapper):
    """A Grid whose nodes (ids 1..N on ``inner``) behave like a fleet of devices.

    Without a population every node is always online, never drops out and the clock
    stays unset; the participants of every round are still written to ``log_path``.
    A reply the backend itself reports as missing (REPLY_MESSAGE_UNAVAILABLE: e.g. the
    in-process backend's wall-clock client timeout) counts as a straggler's too.
    """

    def __init__(self, inner: Grid, population: DevicePopulation | None, seed: int, local_epochs: int,
                 deadline_seconds: float = 0.0, log_path: Path | None = None) -> None:
        super().__init__(inner)
        self.population = population
        self.seed = seed
        self.local_epochs = local_epochs  # each reply's training time: examples x epochs / throughput
        self.deadline = deadline_seconds
        self.log_path = log_path
        self.rounds: dict[int, RoundTiming] = {}
        self.clock = 0.0  # simulated seconds since the start of the run
        self.compute_clock = 0.0  # the same rounds' training alone: what no codec can make shorter
        self._draws = 0

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("DeviceGrid times whole rounds: use send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("DeviceGrid times whole rounds: use send_and_receive")

    def get_node_ids(self) -> list[int]:
        """The nodes online now: a fresh availability draw per call.

        Flower's sampling asks again (after a pause) while fewer nodes than
        ``min_available_nodes`` are online, so each call is a new moment in time.
        """
        node_ids = list(self.inner.get_node_ids())
        self._draws += 1
        # Flower's strategies sample with the global `random` right after this call.
        # Seeding it here makes the sample depend on the seed and the call alone, not on
        # what else drew from `random` meanwhile (on Ray, Flower's engine and the
        # partition discovery share this process).
        random.seed(self.seed * 1_000_003 + self._draws)
        if self.population is None:
            return node_ids
        online = np.random.default_rng([self.seed, 1, self._draws]).random(len(self.population))
        online = online < self.population.availability
        return [node for node in node_ids if online[node - 1]]

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        train = [m for m in messages if m.metadata.message_type.split(".")[0] == MessageType.TRAIN]
        if not train:
            return self.inner.send_and_receive(messages, timeout=timeout)
        server_round = int(train[0].content["config"].get("server-round", 0))
        timing = self.rounds.setdefault(server_round, RoundTiming())
        timing.sampled = sorted(m.metadata.dst_node_id for m in train)

        dropped = [m for m in train if self._drops_out(server_round, m.metadata.dst_node_id)]
        timing.dropouts = sorted(m.metadata.dst_node_id for m in dropped)
        sent = [m for m in messages if id(m) not in {id(d) for d in dropped}]
        node_of = {id(m): m.metadata.dst_node_id for m in sent}  # before a backend rewrites it
        downlink = {id(m): sum(wire_bytes(r) for r in m.content.array_records.values())
                    for m in sent} if self.population is not None else {}  # counting bytes serializes
        if self.population is not None and self.deadline:
            for message in sent:
                self._tell_link(message, node_of[id(message)], downlink[id(message)])
        replies = list(self.inner.send_and_receive(sent, timeout=timeout))
        request_of = {m.metadata.message_id: m for m in sent}

        out = [_error_reply(m, ErrorCode.NODE_UNAVAILABLE, "dropped out mid-round (simulated device)")
               for m in dropped]
        finished = []
        for reply in replies:
            request = request_of.get(reply.metadata.reply_to_message_id)
            missing = reply.has_error() and reply.error.code == ErrorCode.REPLY_MESSAGE_UNAVAILABLE
            if request is not None and missing:  # the backend gave up on it: late, as after a deadline
                timing.stragglers.append(node_of[id(request)])
            if self.population is None or request is None or reply.has_error():
                out.append(reply)
                continue
            seconds, compute = self._reply_seconds(reply, node_of[id(request)], downlink[id(request)])
            if self.deadline and seconds > self.deadline:
                timing.stragglers.append(node_of[id(request)])
                out.append(_error_reply(request, ErrorCode.REPLY_MESSAGE_UNAVAILABLE,
                                        f"missed the round deadline: {seconds:.1f} s > "
                                        f"{self.deadline:g} s (simulated device)"))
                continue
            finished.append(seconds)
            timing.compute_seconds = max(timing.compute_seconds, compute)
            out.append(reply)
        timing.stragglers.sort()
        if self.population is not None:
            timing.seconds = self.deadline if self.deadline and timing.stragglers else max(finished, default=0.0)
            self.clock += timing.seconds
            self.compute_clock += timing.compute_seconds
        return out

    def finish_round(self, server_round: int) -> dict:
        """The round is over (the server is recording it): log its participants; its record fields.

        The log line also holds what a resumed run needs to go on exactly as this one
        does: the clock and how many availability draws were made so far (``resume``).
        """
        if server_round in self.rounds and self.log_path is not None:
            line = {"round": server_round, **self.rounds[server_round].__dict__, "clock": self.clock,
                    "compute_clock": self.compute_clock, "draws": self._draws}
            with self.log_path.open("a") as handle:
                handle.write(json.dumps(line) + "\n")
        return self.record_fields(server_round)

    def resume(self, server_round: int) -> None:
        """Go on after ``server_round`` of an earlier run logged to ``log_path``; later lines are dropped."""
        text = self.log_path.read_text() if self.log_path.exists() else ""
        lines = [json.loads(line) for line in text.splitlines() if line]
        kept = [line for line in lines if line["round"] <= server_round]
        self.log_path.write_text("".join(json.dumps(line) + "\n" for line in kept))
        if server_round == 0:
            return
        last = kept[-1] if kept else {}
        if last.get("round") != server_round or "draws" not in last:
            raise CheckpointError(f"{self.log_path}: no entry for round {server_round}; "
                                  "the run cannot be resumed exactly")
        self.clock, self._draws = float(last["clock"]), int(last["draws"])
        self.compute_clock = float(last.get("compute_clock", 0.0))  # absent in logs from before it

    def record_fields(self, server_round: int) -> dict:
        """Simulated-time fields of the run record for ``server_round`` (after its training)."""
        timing = self.rounds.get(server_round, RoundTiming())
        simulated = self.population is not None
        return {
            "simulated_seconds": self.clock if simulated else None,
            "simulated_round_seconds": timing.seconds if simulated else None,
            "simulated_compute_seconds": self.compute_clock if simulated else None,
            "dropouts": len(timing.dropouts),
            "stragglers": len(timing.stragglers),
        }

    def _tell_link(self, message: Message, node_id: int, downlink: int) -> None:
        """Write into a training message what the device knows of this round: the deadline and its own link.

        A client with ``codec.fit_deadline`` sizes its reply by them (client/deadline.py).
        """
        # The same terms as the clock's (DevicePopulation.seconds), so the client's estimate is exact.
        config = next(iter(message.content.config_records.values()), ConfigRecord())
        facts = {DEADLINE: self.deadline, DOWNLINK_SECONDS: self.population.downlink_seconds(node_id, downlink),
                 UPLINK_RATE: self.population.uplink_bytes_per_second[node_id - 1],
                 TRAINING_RATE: self.population.training_rate(node_id)}
        message.content = RecordDict({**message.content.array_records,
                                      "config": ConfigRecord({**config, **{k: float(v) for k, v in facts.items()}})})

    def _drops_out(self, server_round: int, node_id: int) -> bool:
        if self.population is None:
            return False
        draw = np.random.default_rng([self.seed, 2, server_round, node_id]).random()
        return bool(draw < self.population.dropout[node_id - 1])

    def _reply_seconds(self, reply: Message, node_id: int, downlink: int) -> tuple[float, float]:
        """The reply's simulated time, and its training part."""
        metrics = next(iter(reply.content.metric_records.values()), {})
        examples = float(metrics.get("num-examples", 0)) * self.local_epochs
        uplink = sum(wire_bytes(r) for r in reply.content.array_records.values())
        return (self.population.seconds(node_id, downlink, examples, uplink),
                self.population.compute_seconds(node_id, examples))


def _error_reply(message: Message, code: int, reason: str) -> Message:
    if not message.metadata.message_id:  # never handed to a backend, which assigns ids
        message.metadata.__dict__["_message_id"] = uuid4().hex
    return Message(Error(code=code, reason=reason), reply_to=message)


def device_grid(inner: Grid, num_nodes: int, seed: int, devices: str, deadline_seconds: float,
                min_online: int, local_epochs: int, log_path: Path | None = None) -> DeviceGrid:
    """A DeviceGrid from the ``simulation`` settings; checks the fleet can fill a round."""
    population = None
    if devices:
        population = DevicePopulation(load_profiles(devices), num_nodes, seed)
        if population.expected_online() < min_online:
            raise ConfigError(
                f"simulation.devices: on average {population.expected_online():.1f} of {num_nodes} "
                f"clients are online, fewer than the {min_online} a round needs "
                f"(federation.clients_per_round)")
    return DeviceGrid(inner, population, seed, local_epochs, deadline_seconds, log_path)
