"""Checkpoint and resume: a run stopped after round 2 and resumed ends where an uninterrupted run does."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from pollen.client.app import app as client_app
from pollen.config import load_config, run_config_of
from pollen.run_folder import RunFolder
from pollen.server.app import new_state, run_federation
from pollen.server.checkpoint import CheckpointError, load_arrays, load_checkpoint, save_checkpoint
from pollen.simulations.inprocess import InProcessGrid

TINY = Path(__file__).resolve().parents[1] / "simulations" / "configs" / "tiny.yaml"


class Stop(Exception):
    """The server dies after a round."""


def tiny(strategy: str, **extra: str):
    overrides = {"federation.rounds": "3", "federation.num_clients": "4", "federation.clients_per_round": "2",
                 "federation.strategy": strategy, "train.local_epochs": "1", **extra}
    return load_config(TINY, [f"{k}={v}" for k, v in overrides.items()])


def final_arrays(folder: RunFolder) -> dict[str, np.ndarray]:
    return load_arrays(folder.checkpoint)


def grid_for(config) -> InProcessGrid:
    return InProcessGrid(client_app, config.federation.num_clients, run_config_of(config))


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
    whole = RunFolder(tmp_path / "whole")
    run_federation(grid_for(config), config, whole)

    # Clients keep their Contexts (residuals, global copies) while the server restarts.
    broken = RunFolder(tmp_path / "broken")
    grid = grid_for(config)
    with pytest.raises(Stop):
        run_federation(grid, config, broken, on_round=stop_after(2))
    assert load_checkpoint(broken.checkpoint).round == 2
    history = run_federation(grid, config, broken, resume=True)

    assert [r.round for r in history] == [0, 1, 2, 3]
    assert [r.round for r in broken.records()] == [0, 1, 2, 3]
    expected, got = final_arrays(whole), final_arrays(broken)
    assert expected.keys() == got.keys()
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    assert [r.accuracy for r in broken.records()] == [r.accuracy for r in whole.records()]


def test_resume_after_clients_lost_their_state_still_reaches_every_client(tmp_path):
    """A deployed restart is a new Flower run: the downlink must not send steps on top of a lost copy."""
    config = tiny("sparse-fedavg", **{"federation.clients_per_round": "4"})
    folder = RunFolder(tmp_path / "run")
    with pytest.raises(Stop):
        run_federation(grid_for(config), config, folder, on_round=stop_after(2))
    fresh = grid_for(config)
    history = run_federation(grid=fresh, config=config, folder=folder, resume=True, clients_kept_state=False)
    assert history[-1].round == 3
    assert history[-1].failed == 0 and history[-1].clients == 4


def test_resume_refuses_a_differently_configured_run(tmp_path):
    config = tiny("sparse-fedavg")
    folder = RunFolder(tmp_path / "run")
    grid = grid_for(config)
    with pytest.raises(Stop):
        run_federation(grid, config, folder, on_round=stop_after(1))
    other = tiny("sparse-fedavg", **{"train.lr": "0.5"})
    with pytest.raises(CheckpointError, match="train.lr"):
        run_federation(grid, other, folder, resume=True)


def test_missing_or_old_checkpoints_are_refused_with_the_reason(tmp_path):
    path = tmp_path / RunFolder.CHECKPOINT
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(path)
    torch.save({"round": 1, "arrays": {}, "config": {}}, path)
    with pytest.raises(CheckpointError, match="older version"):
        load_checkpoint(path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(path)


def test_save_checkpoint_round_trips_the_server_state_and_random_state(tmp_path):
    config = tiny("fedadam")
    state = new_state(config)
    state.round = 5
    state.arrays = ArrayRecord({"w": Array(np.arange(6, dtype=np.float32).reshape(2, 3))})
    path = tmp_path / RunFolder.CHECKPOINT
    np.random.seed(7)
    save_checkpoint(path, state, config)
    saved_numpy_state = np.random.get_state()[1].tolist()
    assert not list(tmp_path.glob("*.partial"))
    np.random.seed(8)
    back = load_checkpoint(path, config)
    assert np.random.get_state()[1].tolist() == saved_numpy_state  # the generators come back too
    assert back.round == 5 and type(back.strategy) is type(state.strategy)
    assert back.momentum is None  # fedadam has its own server optimizer
    np.testing.assert_array_equal(back.arrays["w"].numpy(), state.arrays["w"].numpy())
    np.testing.assert_array_equal(load_arrays(path)["w"], state.arrays["w"].numpy())
    longer = load_config(TINY, ["federation.rounds=9", "federation.strategy=fedadam",
                                "federation.num_clients=4", "federation.clients_per_round=2",
                                "train.local_epochs=1"])
    assert load_checkpoint(path, longer).round == 5  # only the number of rounds may change


def test_a_damaged_or_truncated_checkpoint_is_a_checkpoint_error_naming_the_file(tmp_path):
    config = tiny("fedavg")
    path = tmp_path / RunFolder.CHECKPOINT
    save_checkpoint(path, new_state(config), config)
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) * 2 // 3])  # truncated, as by a full disk or a copy cut short
    for read in (load_checkpoint, load_arrays):
        with pytest.raises(CheckpointError, match=f"^{path}: unreadable checkpoint, damaged or truncated"):
            read(path)
    torch.save([1, 2, 3], path)  # a torch file, not a checkpoint
    for read in (load_checkpoint, load_arrays):
        with pytest.raises(CheckpointError, match=f"^{path}: not a Pollen checkpoint"):
            read(path)
    saved = torch.load(io.BytesIO(whole), weights_only=False)
    saved["state"] = saved["state"][:40]  # the pickled server state cut short
    torch.save(saved, path)
    before = np.random.get_state()[1].tolist()
    with pytest.raises(CheckpointError, match=f"^{path}: damaged checkpoint \\(UnpicklingError"):
        load_checkpoint(path)
    assert np.random.get_state()[1].tolist() == before  # nothing restored from a damaged file
    assert set(load_arrays(path)) == set(saved["arrays"])  # the global arrays alone are intact: export reads them
