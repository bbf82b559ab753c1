"""The run record: one JSON line per round, appended and flushed as the run goes."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RoundRecord:
    round: int
    accuracy: float  # central evaluation on the held-out split
    loss: float
    precision: float  # macro averages
    recall: float
    f1: float
    train_loss: float | None  # clients' mean local training loss (None in round 0)
    clients: int  # updates accepted
    rejected: int  # updates dropped by validation
    failed: int  # replies that carried an error
    uplink_bytes: int  # serialized ArrayRecords received
    downlink_bytes: int  # serialized ArrayRecords sent
    dense_uplink_bytes: int  # the same updates as dense fp32
    compression: float | None  # dense_uplink_bytes / uplink_bytes (None: nothing received)
    round_seconds: float
    wall_seconds: float  # since the run started
    # Simulated devices (None when the run has no device profiles): the clock of the
    # device model since the start, this round's share of it, and the sampled clients
    # that dropped out or missed the round deadline.
    simulated_seconds: float | None = None
    simulated_round_seconds: float | None = None
    dropouts: int = 0
    stragglers: int = 0


class RunRecord:
    """Appends RoundRecords to ``rounds.jsonl``; readable back with ``read_records``."""

    FILENAME = "rounds.jsonl"

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / self.FILENAME
        self.path.write_text("")

    def append(self, record: RoundRecord) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(dataclasses.asdict(record)) + "\n")


def read_records(folder: Path) -> list[RoundRecord]:
    path = Path(folder) / RunRecord.FILENAME
    return [RoundRecord(**json.loads(line)) for line in path.read_text().splitlines() if line]
