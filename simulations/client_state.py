"""Where a virtual client's ``Context.state`` waits between the rounds it takes part in.

A population of 10,000 clients that each keep an error-feedback residual (and, with
downlink compression, their copy of the global arrays) as dense fp32 ArrayRecords
would need gigabytes of RAM, yet only the clients of the current round use theirs.
``SpilledStates`` keeps every idle client's state on disk, written with Flower's own
serializer: lossless, so whatever a ClientApp keeps there (a residual, a copy of the
global model, a version number) comes back bit-exact when the client is addressed
again. Resident memory then depends on the clients per round, not the population.

In a run folder the same files make a simulation resumable: the server checkpoints
the last finished round, and the clients' states are kept as they were after it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Protocol

from flwr.app import RecordDict

from pollen.flower_internals import recorddict_from_bytes, recorddict_to_bytes

RUN_SUBFOLDER = "client-state"  # in a run folder: the clients' states, for `pollen simulate --resume`


class ClientStates(Protocol):
    def load(self, node_id: int) -> RecordDict: ...

    def save(self, node_id: int, state: RecordDict, server_round: int = 0) -> None: ...

    def __contains__(self, node_id: int) -> bool: ...

    def close(self) -> None: ...


class InMemoryStates:
    """Every client's state stays a live RecordDict: fastest, for populations that fit in RAM."""

    def __init__(self) -> None:
        self._states: dict[int, RecordDict] = {}

    def load(self, node_id: int) -> RecordDict:
        return self._states.get(node_id, RecordDict())

    def save(self, node_id: int, state: RecordDict, server_round: int = 0) -> None:
        if len(state):
            self._states[node_id] = state
        else:
            self._states.pop(node_id, None)

    def __contains__(self, node_id: int) -> bool:
        return node_id in self._states

    def close(self) -> None:
        self._states.clear()


class SpilledStates:
    """Clients' states as files ``<node>.<round>.pb``, named by the round that wrote them.

    Without ``folder``: a private temporary folder, removed on close. With one (a run's
    ``client-state/``, kept on close) a run killed mid-round can resume exactly: its
    checkpoint is of the last finished round k, yet clients of round k + 1 may already
    have written new states. So a new file does not delete the one it replaces until the
    next round begins (by then round k + 1's checkpoint is written), and
    ``resume_after=k`` drops what later rounds wrote: every client is back to its state
    after round k. Only the clients of the latest round have two files at a time.

    ``keep_in_memory``: reads come from live copies (RAM grows with the population) and
    the files only serve a resumed run.
    """

    def __init__(self, folder: str | Path | None = None, *, keep_in_memory: bool = False,
                 resume_after: int | None = None) -> None:
        self.private = folder is None
        self.folder = Path(tempfile.mkdtemp(prefix="pollen-client-state-") if folder is None else folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._memory: dict[int, RecordDict] | None = {} if keep_in_memory else None
        self._round_of: dict[int, int] = {}  # node -> the round its current file is named by
        self._replaced: list[Path] = []  # files replaced in the current round: needed until it is checkpointed
        self._round = resume_after or 0
        self._reopen(resume_after)

    def _path(self, node_id: int, server_round: int) -> Path:
        return self.folder / f"{node_id}.{server_round}.pb"

    def _reopen(self, resume_after: int | None) -> None:
        """Keep each node's latest file from a round <= ``resume_after``; without it, none."""
        for path in self.folder.iterdir():
            name = path.name.split(".")
            if path.suffix == ".partial":  # a write that never finished
                path.unlink()
            elif len(name) == 3 and name[2] == "pb" and name[0].isdigit() and name[1].isdigit():
                node_id, written = int(name[0]), int(name[1])
                kept = self._round_of.get(node_id, -1)
                if resume_after is None or written > resume_after or written < kept:
                    path.unlink()
                    continue
                if kept >= 0:
                    self._path(node_id, kept).unlink()
                self._round_of[node_id] = written

    def load(self, node_id: int) -> RecordDict:
        if self._memory is not None and node_id in self._memory:
            return self._memory[node_id]
        if node_id not in self._round_of:
            return RecordDict()
        return recorddict_from_bytes(self._path(node_id, self._round_of[node_id]).read_bytes())

    def save(self, node_id: int, state: RecordDict, server_round: int = 0) -> None:
        """Write ``state`` as ``node_id``'s after ``server_round`` (a message with no round: the current one)."""
        server_round = max(server_round, self._round)
        if server_round > self._round:  # a new round: the last one is checkpointed, what it replaced can go
            for path in self._replaced:
                path.unlink(missing_ok=True)
            self._replaced, self._round = [], server_round
        before = self._round_of.get(node_id)
        if before is None and not len(state):
            return  # nothing kept before, nothing to keep now
        path = self._path(node_id, server_round)
        partial = path.with_suffix(".partial")
        partial.write_bytes(recorddict_to_bytes(state))  # an empty state is an empty file: "nothing kept since"
        os.replace(partial, path)  # a crash mid-write leaves the previous file whole
        if before is not None and before != server_round:
            self._replaced.append(self._path(node_id, before))
        self._round_of[node_id] = server_round
        if self._memory is not None:
            self._memory[node_id] = state

    def __contains__(self, node_id: int) -> bool:
        if node_id not in self._round_of:
            return False
        return self._path(node_id, self._round_of[node_id]).stat().st_size > 0

    def bytes_on_disk(self) -> int:
        return sum(path.stat().st_size for path in self.folder.iterdir())

    def close(self) -> None:
        if self._memory is not None:
            self._memory.clear()
        if self.private:
            shutil.rmtree(self.folder, ignore_errors=True)


def client_states(kind: str, folder: str | Path | None = None, resume_after: int | None = None) -> ClientStates:
    """``memory`` or ``disk`` (the ``simulation.client_state`` setting).

    With a ``folder`` both write every state there too, so the run can be resumed
    (``resume_after``: the round its checkpoint finished; see ``SpilledStates``).
    """
    if kind == "memory":
        if folder is None:
            return InMemoryStates()
        return SpilledStates(folder, keep_in_memory=True, resume_after=resume_after)
    if kind == "disk":
        return SpilledStates(folder, resume_after=resume_after)
    raise ValueError(f"unknown client state store {kind!r} (known: memory, disk)")
