"""The run folder: every file a run writes, named once.

``RunFolder.new(output_dir)`` makes a fresh timestamped folder; every entry point
(``pollen simulate``, ``compare``, ``server``, ``export``, the Ray backend and a plain
``flwr run``) reads and writes a run through this class, so the files are the same
whichever started it:

    config.yaml         the run's whole config, readable by ``load_config``
    rounds.jsonl        one RoundRecord per round, appended and flushed as the run goes
    events.out.tfevents.*  the same rounds as TensorBoard scalars (``tensorboard: true``)
    checkpoint.pt       everything needed to go on after the last finished round
    accuracy.png        accuracy by round, by MB on the wire (and by simulated time)
    classes.json        the final model's per-class precision, recall, F1, support, confusion matrix
    confusion.png       that confusion matrix
    participants.jsonl  per round: sampled, dropped and late clients (simulations)
    devices.json        a deployment's registered device keys: {Flower node id: key name}
    logs/               the Flower processes' logs (deployment, Ray)

A ServerApp started by Flower learns its folder from the environment of the
SuperLink that started it (``FOLDER_ENV``, ``RESUME_ENV``); without them it makes a
new folder under the config's ``output_dir``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from pollen.config import Config, load_config, save_config

FOLDER_ENV = "POLLEN_RUN_FOLDER"  # set for the ServerApp by whoever starts its SuperLink
RESUME_ENV = "POLLEN_RESUME"  # "1": go on from that folder's checkpoint


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
    # device model since the start, this round's share of it, the clock of the same rounds'
    # training alone (each round's slowest reply in time without its bytes), and the sampled
    # clients that dropped out or missed the round deadline.
    simulated_seconds: float | None = None
    simulated_round_seconds: float | None = None
    simulated_compute_seconds: float | None = None
    dropouts: int = 0
    stragglers: int = 0
    federated_accuracy: float | None = None  # clients' evaluation on their own data (fraction_evaluate > 0)
    # What the server's checks did (pollen/server/update_checks.py): {"client", "reason"} per
    # rejected reply and per clipped weight; why the round's new global model was refused.
    rejected_updates: list[dict] = field(default_factory=list)
    clipped_weights: list[dict] = field(default_factory=list)
    step_refused: str | None = None
    lr: float | None = None  # the clients' learning rate this round (train.lr_schedule)
    early_stop: str | None = None  # why the run stopped here, and which round's model it kept
    kept_round: int | None = None  # with early_stop: the round whose model the run ends with
    # Federated evaluation's spread over the clients asked: worst, 10th percentile, mean accuracy.
    federated_spread: dict | None = None
    epsilon: float | None = None  # privacy spent by each client so far, at privacy.delta (privacy.* set)


def final_record(records: list[RoundRecord]) -> RoundRecord:
    """The record of the model the run ends with: the last round's, or under early stopping
    the kept round's (the checkpoint and ``pollen export`` hold that model, not the last)."""
    kept = records[-1].kept_round
    return next((r for r in records if r.round == kept), records[-1]) if kept is not None else records[-1]


def round_trip_ratio(records: list[RoundRecord]) -> float | None:
    """Dense fp32 both ways over the bytes sent both ways (None: nothing came back).

    The dense reference is each accepted update's dense fp32 arrays, once up and once
    down; downlink bytes sent to clients whose replies did not count are still charged.
    """
    dense = 2 * sum(entry.dense_uplink_bytes for entry in records)
    sent = sum(entry.uplink_bytes + entry.downlink_bytes for entry in records)
    return dense / sent if dense and sent else None


class RunFolder:
    """``RunFolder(path)``: the files of one run (see the module docstring)."""

    CONFIG = "config.yaml"
    RECORDS = "rounds.jsonl"
    CHECKPOINT = "checkpoint.pt"
    PLOT = "accuracy.png"
    CLASSES = "classes.json"
    CONFUSION = "confusion.png"
    PARTICIPANTS = "participants.jsonl"
    DEVICES = "devices.json"
    LOGS = "logs"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._tensorboard = None  # the TensorBoardLog that start_records opened, if asked

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    @classmethod
    def new(cls, output_dir: str | Path, name: str = "") -> RunFolder:
        """A folder that does not exist yet: OUTPUT_DIR/<timestamp>[-name][-n]."""
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        path = Path(output_dir) / (f"{stamp}-{name}" if name else stamp)
        suffix = 1
        while path.exists():
            path = path.with_name(f"{path.name}-{suffix}")
            suffix += 1
        return cls(path)

    @classmethod
    def from_environment(cls, config: Config) -> tuple[RunFolder, bool]:
        """(folder, resume) for a ServerApp started by Flower: as its SuperLink was told, or new."""
        path = os.environ.get(FOLDER_ENV)
        folder = cls(path) if path else cls.new(config.output_dir)
        return folder, bool(path) and os.environ.get(RESUME_ENV) == "1"

    @staticmethod
    def environment(path: Path, resume: bool = False) -> dict[str, str]:
        """The variables that send a SuperLink's ServerApp to ``path`` (see ``from_environment``)."""
        return {FOLDER_ENV: str(Path(path).resolve()), RESUME_ENV: "1" if resume else "0"}

    @property
    def config_path(self) -> Path:
        return self.path / self.CONFIG

    @property
    def records_path(self) -> Path:
        return self.path / self.RECORDS

    @property
    def checkpoint(self) -> Path:
        return self.path / self.CHECKPOINT

    @property
    def plot(self) -> Path:
        return self.path / self.PLOT

    @property
    def classes(self) -> Path:
        return self.path / self.CLASSES

    @property
    def confusion(self) -> Path:
        return self.path / self.CONFUSION

    @property
    def participants(self) -> Path:
        return self.path / self.PARTICIPANTS

    @property
    def devices(self) -> Path:
        return self.path / self.DEVICES

    @property
    def logs(self) -> Path:
        return self.path / self.LOGS

    def write_config(self, config: Config) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        save_config(config, self.config_path)

    def read_config(self, overrides: list[str] = ()) -> Config:
        """The run's own config (with ``key=value`` overrides), as it was written."""
        return load_config(self.config_path, overrides)

    def start_records(self, kept: list[RoundRecord] = (), tensorboard: bool = False) -> None:
        """Begin ``rounds.jsonl`` afresh, holding only ``kept`` (the rounds a resumed run keeps);
        with ``tensorboard``, the TensorBoard events too, until ``end_records``."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.records_path.write_text("".join(_line(record) for record in kept))
        if tensorboard:
            from pollen.tensorboard_log import TensorBoardLog  # an optional extra, and it imports this module

            self._tensorboard = TensorBoardLog(self.path, kept)

    def append(self, record: RoundRecord) -> None:
        with self.records_path.open("a") as handle:
            handle.write(_line(record))
        if self._tensorboard is not None:
            self._tensorboard.append(record)

    def end_records(self) -> None:
        """Close what ``start_records`` opened (the TensorBoard event file)."""
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None

    def records(self) -> list[RoundRecord]:
        """Every round recorded so far; none if the run has not recorded one."""
        if not self.records_path.exists():
            return []
        return [RoundRecord(**json.loads(line)) for line in self.records_path.read_text().splitlines() if line]


def _line(record: RoundRecord) -> str:
    return json.dumps(dataclasses.asdict(record)) + "\n"
