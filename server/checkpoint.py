"""Checkpoint and resume: a run stopped after round r goes on from round r + 1.

Every round the server writes ``checkpoint.pt`` with everything the rest of the run
depends on: the global trainable arrays, the whole strategy object (an adaptive
optimizer's moments, the downlink's versions, steps and server-side residual, the
byte counts), the round number and the state of every random generator the server
draws from (client sampling). It is written to a temporary file and renamed, so a
crash mid-write leaves the previous round's checkpoint intact.

Resuming restores all of it and runs the remaining rounds with their original
numbers (clients seed their training by round), so with deterministic clients the
final model is the one an uninterrupted run ends with.

The strategy is stored with pickle: load checkpoints you wrote, as with any
``torch.load(weights_only=False)``.
"""

from __future__ import annotations

import copyreg
import io
import os
import pickle
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

CHECKPOINT = "checkpoint.pt"
FORMAT = 2  # 1: arrays and config only (not resumable)


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or from a different run configuration."""


@dataclass
class Checkpoint:
    round: int
    arrays: ArrayRecord  # the global trainable arrays after ``round``
    strategy: Strategy
    rng: dict[str, Any]
    config: dict[str, Any]  # the run's flat config


def save_checkpoint(path: Path, server_round: int, arrays: ArrayRecord, strategy: Strategy,
                    config: dict[str, Any]) -> None:
    state = {
        "format": FORMAT,
        "round": server_round,
        "arrays": arrays.to_torch_state_dict(),
        "config": config,
        "strategy": _pickled(strategy),
        "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                "torch": torch.get_rng_state()},
    }
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    os.replace(partial, path)


def load_checkpoint(path: Path, config: dict[str, Any] | None = None) -> Checkpoint:
    """Read a checkpoint; with ``config``, refuse one written by a differently configured run."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint to resume from")
    try:
        state = torch.load(path, weights_only=False)
    except Exception as error:  # torch raises many kinds on a damaged file
        raise CheckpointError(f"{path}: unreadable checkpoint ({error})") from None
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: written by an older version that kept no strategy state; "
                              "it cannot be resumed")
    if config is not None:
        changed = sorted(k for k in set(config) | set(state["config"])
                         if k != "federation.rounds" and config.get(k) != state["config"].get(k))
        if changed:
            raise CheckpointError(f"{path}: the run was configured differently "
                                  f"({', '.join(changed[:5])}); resume it with its own config.yaml")
    arrays = ArrayRecord({name: Array(value.numpy()) for name, value in state["arrays"].items()})
    return Checkpoint(state["round"], arrays, pickle.loads(state["strategy"]), state["rng"], state["config"])


def _pickled(strategy: Strategy) -> bytes:
    """Pickle, storing the memoryviews Flower's received Arrays hold as the bytes they view."""
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL)
    pickler.dispatch_table = {**copyreg.dispatch_table, memoryview: lambda view: (bytes, (view.tobytes(),))}
    pickler.dump(strategy)
    return buffer.getvalue()


def restore_rng(rng: dict[str, Any]) -> None:
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])


def forget_client_versions(strategy: Strategy) -> None:
    """After a restart in which the clients lost their state (a new Flower run): all hold version 0.

    The downlink then sends each node the chain from the initial arrays, or the full
    arrays, instead of steps on top of a copy the node no longer has.
    """
    broadcast = getattr(strategy, "downlink", None)
    if broadcast is not None:
        broadcast.node_versions.clear()
        broadcast._pending.clear()


class ResumedRounds(Strategy):
    """Run ``inner`` for the rounds after ``done``, numbered as in the original run.

    Flower's ``Strategy.start`` counts rounds from 1; this shifts every round number by
    ``done`` on the way to ``inner`` and to the central evaluation, and skips the
    evaluation of the starting arrays, already recorded as round ``done``.
    """

    def __init__(self, inner: Strategy, done: int) -> None:
        self.inner = inner
        self.done = done

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None) -> Result:
        def shifted(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            return None if server_round == 0 else evaluate_fn(server_round + self.done, arrays)

        return super().start(grid, initial_arrays, num_rounds - self.done, timeout, train_config,
                             evaluate_config, shifted if evaluate_fn else None)

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        return self.inner.configure_train(server_round + self.done, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies):
        return self.inner.aggregate_train(server_round + self.done, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> list[Message]:
        return self.inner.configure_evaluate(server_round + self.done, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies):
        return self.inner.aggregate_evaluate(server_round + self.done, replies)
