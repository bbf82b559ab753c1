"""Checkpoint and resume: a run stopped after round 2 and resumed ends where an uninterrupted run does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from pollen.client.app import app as client_app
from pollen.config import load_config, to_flat
from pollen.server.app import CHECKPOINT, run_federation
from pollen.server.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from pollen.server.records import read_records
from pollen.simulations.inprocess import InProcessGrid
from pollen.strategies import make_strategy

TINY = Path(__file__).resolve().parents[1] / "simulations" / "configs" / "tiny.yaml"


class Stop(Exception):
    """The server dies after a round."""


def tiny(strategy: str, **extra: str):
    overrides = {"federation.rounds": "3", "federation.num_clients": "4", "federation.clients_per_round": "2",
                 "federation.strategy": strategy, "train.local_epochs": "1", **extra}
    return load_config(TINY, [f"{k}={v}" for k, v in overrides.items()])


def final_arrays(folder: Path) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in torch.load(folder / CHECKPOINT, weights_only=False)["arrays"].items()}


def stop_after(round_: int):
    def on_round(entry) -> None:
        if entry.round == round_:
            raise Stop

    return on_round


@pytest.mark.parametrize("strategy, extra", [
    ("sparse-fedavg", {"federation.server_momentum": "0.6", "federation.server_decay": "0.5"}),  # velocity
    ("fedadam", {}),
])
def test_resumed_run_ends_with_the_uninterrupted_model(tmp_path, strategy, extra):
    """Sampling, the adaptive optimizer's moments and the downlink's server state all come back."""
    config = tiny(strategy, **extra)
    whole = tmp_path / "whole"
    grid = InProcessGrid(client_app, config.federation.num_clients, to_flat(config))
    run_federation(grid, config, whole)

    # Clients keep their Contexts (residuals, global copies) while the server restarts.
    broken = tmp_path / "broken"
    grid = InProcessGrid(client_app, config.federation.num_clients, to_flat(config))
    with pytest.raises(Stop):
        run_federation(grid, config, broken, on_round=stop_after(2))
    assert load_checkpoint(broken / CHECKPOINT).round == 2
    history = run_federation(grid, config, broken, resume=True)

    assert [r.round for r in history] == [0, 1, 2, 3]
    assert [r.round for r in read_records(broken)] == [0, 1, 2, 3]
    expected, got = final_arrays(whole), final_arrays(broken)
    assert expected.keys() == got.keys()
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    assert [r.accuracy for r in read_records(broken)] == [r.accuracy for r in read_records(whole)]


def test_resume_after_clients_lost_their_state_still_reaches_every_client(tmp_path):
    """A deployed restart is a new Flower run: the downlink must not send steps on top of a lost copy."""
    config = tiny("sparse-fedavg", **{"federation.clients_per_round": "4"})
    folder = tmp_path / "run"
    grid = InProcessGrid(client_app, config.federation.num_clients, to_flat(config))
    with pytest.raises(Stop):
        run_federation(grid, config, folder, on_round=stop_after(2))
    fresh = InProcessGrid(client_app, config.federation.num_clients, to_flat(config))
    history = run_federation(grid=fresh, config=config, folder=folder, resume=True, clients_kept_state=False)
    assert history[-1].round == 3
    assert history[-1].failed == 0 and history[-1].clients == 4


def test_resume_refuses_a_differently_configured_run(tmp_path):
    config = tiny("sparse-fedavg")
    folder = tmp_path / "run"
    grid = InProcessGrid(client_app, config.federation.num_clients, to_flat(config))
    with pytest.raises(Stop):
        run_federation(grid, config, folder, on_round=stop_after(1))
    other = tiny("sparse-fedavg", **{"train.lr": "0.5"})
    with pytest.raises(CheckpointError, match="train.lr"):
        run_federation(grid, other, folder, resume=True)


def test_missing_or_old_checkpoints_are_refused_with_the_reason(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / CHECKPOINT)
    torch.save({"round": 1, "arrays": {}, "config": {}}, tmp_path / CHECKPOINT)
    with pytest.raises(CheckpointError, match="older version"):
        load_checkpoint(tmp_path / CHECKPOINT)
    (tmp_path / CHECKPOINT).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(tmp_path / CHECKPOINT)


def test_save_checkpoint_round_trips_arrays_strategy_and_random_state(tmp_path):
    config = tiny("fedavg")
    strategy = make_strategy("fedavg", __import__("server.app").app.codec_of(config))
    arrays = ArrayRecord({"w": Array(np.arange(6, dtype=np.float32).reshape(2, 3))})
    save_checkpoint(tmp_path / CHECKPOINT, 5, arrays, strategy, to_flat(config))
    assert not list(tmp_path.glob("*.partial"))
    back = load_checkpoint(tmp_path / CHECKPOINT, to_flat(config))
    assert back.round == 5 and type(back.strategy) is type(strategy)
    np.testing.assert_array_equal(back.arrays["w"].numpy(), arrays["w"].numpy())
    assert back.rng["numpy"][1].tolist() == np.random.get_state()[1].tolist()
