"""Where a virtual client's ``Context.state`` waits between the rounds it takes part in.

A population of 10,000 clients that each keep an error-feedback residual (and, with
downlink compression, their copy of the global arrays) as dense fp32 ArrayRecords
would need gigabytes of RAM, yet only the clients of the current round use theirs.
``SpilledStates`` keeps every idle client's state on disk, written with Flower's own
serializer: lossless, so whatever a ClientApp keeps there (a residual, a copy of the
global model, a version number) comes back bit-exact when the client is addressed
again. Resident memory then depends on the clients per round, not the population.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Protocol

from flwr.app import RecordDict

from pollen.flower_internals import recorddict_from_bytes, recorddict_to_bytes


class ClientStates(Protocol):
    def load(self, node_id: int) -> RecordDict: ...

    def save(self, node_id: int, state: RecordDict) -> None: ...

    def __contains__(self, node_id: int) -> bool: ...

    def close(self) -> None: ...


class InMemoryStates:
    """Every client's state stays a live RecordDict: fastest, for populations that fit in RAM."""

    def __init__(self) -> None:
        self._states: dict[int, RecordDict] = {}

    def load(self, node_id: int) -> RecordDict:
        return self._states.get(node_id, RecordDict())

    def save(self, node_id: int, state: RecordDict) -> None:
        if len(state):
            self._states[node_id] = state
        else:
            self._states.pop(node_id, None)

    def __contains__(self, node_id: int) -> bool:
        return node_id in self._states

    def close(self) -> None:
        self._states.clear()


class SpilledStates:
    """Idle clients' state as one file per client under a private temporary folder."""

    def __init__(self, parent: str | Path | None = None) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="pollen-client-state-", dir=parent))

    def _path(self, node_id: int) -> Path:
        return self.folder / f"{node_id}.pb"

    def load(self, node_id: int) -> RecordDict:
        path = self._path(node_id)
        if not path.exists():
            return RecordDict()
        return recorddict_from_bytes(path.read_bytes())

    def save(self, node_id: int, state: RecordDict) -> None:
        path = self._path(node_id)
        if len(state):
            path.write_bytes(recorddict_to_bytes(state))
        else:
            path.unlink(missing_ok=True)

    def __contains__(self, node_id: int) -> bool:
        return self._path(node_id).exists()

    def bytes_on_disk(self) -> int:
        return sum(path.stat().st_size for path in self.folder.iterdir())

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def client_states(kind: str) -> ClientStates:
    """``memory`` or ``disk`` (the ``simulation.client_state`` setting)."""
    if kind == "memory":
        return InMemoryStates()
    if kind == "disk":
        return SpilledStates()
    raise ValueError(f"unknown client state store {kind!r} (known: memory, disk)")
