"""Checkpoint and resume: a run stopped after round r goes on from round r + 1.

After every round the server writes ``checkpoint.pt`` with everything the rest of the
run depends on: the ``ServerState`` (round, global trainable arrays, the strategy
object with an adaptive optimizer's moments, the server momentum's velocity, the
broadcast's versions, steps and server-side residual), the run's config and the state
of every random generator the server draws from (client sampling). It is written to a
temporary file and renamed, so a crash mid-write leaves the previous round's
checkpoint intact.

Resuming restores all of it, and the round loop simply starts at ``state.round + 1``
(clients seed their training by round), so with deterministic clients the final model
is the one an uninterrupted run ends with.

The state is stored with pickle: load checkpoints you wrote, as with any
``torch.load(weights_only=False)``.
"""

from __future__ import annotations

import copyreg
import io
import os
import pickle
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import Strategy

from pollen.config import Config, ConfigError, differences, from_dict, to_dict
from pollen.server.broadcast import Broadcast
from pollen.server.momentum import ServerMomentum
from pollen.server.over_selection import OverSelection

FORMAT = 4  # 1: arrays and config only; 2: a wrapper strategy object; 3: the broadcast's full-array kind (none resumable)


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, damaged or from a different run configuration; the message names
    the file."""


@dataclass
class ServerState:
    """Everything the rounds change: what a checkpoint holds."""

    round: int  # the last finished round (0: none yet)
    arrays: ArrayRecord  # the global trainable arrays after ``round``
    strategy: Strategy  # with its own state (FedAdam's moments, ...)
    momentum: ServerMomentum | None  # None: the strategy has a server optimizer of its own
    broadcast: Broadcast
    selection: OverSelection  # how many clients a round samples (federation.over_select)


def save_checkpoint(path: Path, state: ServerState, config: Config) -> None:
    saved = {
        "format": FORMAT,
        "round": state.round,
        "arrays": state.arrays.to_torch_state_dict(),  # readable without Pollen's classes
        "config": to_dict(config),
        "state": pickled(state),
        "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
    }
    partial = path.with_name(path.name + ".partial")
    torch.save(saved, partial)
    os.replace(partial, path)


RESUMABLE_CHANGES = ("federation.rounds", "tensorboard")  # keys a resumed run may set anew


def load_checkpoint(path: Path, config: Config | None = None) -> ServerState:
    """Read a checkpoint and restore the random generators it saved.

    With ``config``, refuse one written by a differently configured run. Only what
    leaves the model alone may change: ``federation.rounds`` (a resumed run may go on
    for longer) and ``tensorboard`` (events for the rounds kept and those to come).
    """
    saved = _read(path)
    if saved.get("format") != FORMAT:
        raise CheckpointError(f"{path}: written by an older version of Pollen; it cannot be resumed")
    if config is not None:
        changed = [key for key in differences(config, _saved_config(path, saved)) if key not in RESUMABLE_CHANGES]
        if changed:
            raise CheckpointError(f"{path}: the run was configured differently "
                                  f"({', '.join(changed[:5])}); resume it with its own config.yaml")
    try:
        state = pickle.loads(saved["state"])
        rng = saved["rng"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
    except Exception as error:  # pickle and the generators raise many kinds on damaged data
        raise CheckpointError(f"{path}: damaged checkpoint ({_first_line(error)})") from None
    if not isinstance(state, ServerState):
        raise CheckpointError(f"{path}: damaged checkpoint (holds a {type(state).__name__}, not a server state)")
    return state


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    """Only the global trainable arrays of a checkpoint (for export)."""
    return {name: value.numpy() for name, value in _read(path)["arrays"].items()}


def _read(path: Path) -> dict[str, Any]:
    """The saved dictionary, with its global arrays checked: a damaged file is a CheckpointError naming it."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint to resume from")
    try:
        saved = torch.load(path, weights_only=False)
    except Exception as error:  # torch raises many kinds on a damaged or truncated file
        raise CheckpointError(f"{path}: unreadable checkpoint, damaged or truncated ({_first_line(error)})") from None
    arrays = saved.get("arrays") if isinstance(saved, dict) else None
    if not isinstance(arrays, dict) or not all(isinstance(value, torch.Tensor) for value in arrays.values()):
        raise CheckpointError(f"{path}: not a Pollen checkpoint (no global arrays in it)")
    return saved


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _saved_config(path: Path, saved: dict[str, Any]) -> Config:
    try:
        return from_dict(saved["config"])
    except (ConfigError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path}: its config is not valid any more ({error})") from None


def pickled(value: object) -> bytes:
    """Pickle ``value`` (a ServerState, a strategy), storing the memoryviews Flower's received Arrays hold as the bytes they view."""
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL)
    pickler.dispatch_table = {**copyreg.dispatch_table, memoryview: lambda view: (bytes, (view.tobytes(),))}
    pickler.dump(value)
    return buffer.getvalue()


__all__ = ["CheckpointError", "ServerState", "load_arrays", "load_checkpoint", "pickled",
           "save_checkpoint"]
