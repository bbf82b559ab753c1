"""A run's rounds as TensorBoard scalars: ``tensorboard --logdir runs/`` shows every run folder as a run.

``TensorBoardLog(path)`` writes one event file into the run folder through torch's
``SummaryWriter``, one point per tag per round (step = round), flushed as each round is
recorded (``RunFolder.append``), so a TensorBoard watching the folder follows the run
live. The values are those of ``rounds.jsonl``; a round without one (no training loss
in round 0, no round trip when nothing came back) has no point.

A resumed run begins its events afresh with the rounds it keeps, as it begins
``rounds.jsonl`` afresh: the event files of the earlier process are replaced, so no
round appears twice however often the run was stopped.

TensorBoard is an optional extra (``pip install 'pollen[tensorboard]'``); only the
server writes events, so devices never need it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from pollen.config import Config, ConfigError
from pollen.run_folder import RoundRecord, round_trip_ratio

EXTRA = "pip install 'pollen[tensorboard]'"
EVENT_FILES = "events.out.tfevents.*"  # SummaryWriter's file names


# Tag -> the record's value; the part before "/" is TensorBoard's panel.
SCALARS: dict[str, Callable[[RoundRecord], float | None]] = {
    "eval/accuracy": lambda record: record.accuracy,
    "eval/loss": lambda record: record.loss,
    "eval/macro_f1": lambda record: record.f1,
    "train/loss": lambda record: record.train_loss,
    "traffic/uplink_bytes": lambda record: record.uplink_bytes,
    "traffic/downlink_bytes": lambda record: record.downlink_bytes,
    "traffic/round_trip_ratio": lambda record: round_trip_ratio([record]),
}


class TensorBoardMissing(ConfigError):
    """``tensorboard: true`` without the tensorboard package installed."""


def require_tensorboard(config: Config) -> None:
    """Refuse, before anything runs, a run that asks for TensorBoard where the package is not installed."""
    if config.tensorboard:
        _summary_writer()


def _summary_writer() -> type:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch raises it when the tensorboard package is absent
        raise TensorBoardMissing(f"tensorboard: needs the tensorboard package: {EXTRA}") from None
    return SummaryWriter


class TensorBoardLog:
    """``TensorBoardLog(path, kept)``: the event file of the run folder ``path``, holding the rounds ``kept``."""

    def __init__(self, path: str | Path, kept: Iterable[RoundRecord] = ()) -> None:
        writer = _summary_writer()
        self.path = Path(path)
        for old in self.path.glob(EVENT_FILES):
            old.unlink()  # the earlier process's points: ``kept`` holds the ones that still stand
        self.writer = writer(log_dir=str(self.path))
        for record in kept:
            self._add(record)
        self.writer.flush()

    def append(self, record: RoundRecord) -> None:
        self._add(record)
        self.writer.flush()  # on disk as the round is recorded, for a TensorBoard watching the run

    def close(self) -> None:
        self.writer.close()

    def _add(self, record: RoundRecord) -> None:
        for tag, value_of in SCALARS.items():
            value = value_of(record)
            if value is not None:
                self.writer.add_scalar(tag, value, global_step=record.round)
