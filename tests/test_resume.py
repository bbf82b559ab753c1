"""`pollen simulate --resume`: a run killed mid-round goes on to the model an uninterrupted run ends with."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from pollen.cli import main
from pollen.config import load_config
from pollen.data import num_classes
from pollen.models import initial_arrays
from pollen.run_folder import RunFolder
from pollen.server.checkpoint import load_arrays
from pollen.simulations.client_state import RUN_SUBFOLDER, SpilledStates

ROOT = Path(__file__).resolve().parent.parent
TINY = "simulations/configs/tiny.yaml"
ROUNDS, KILLED_IN = 6, 3
# Sampled from an unreliable fleet (availability draws, dropouts, a simulated clock), with
# error-feedback residuals and downlink global copies on every client: all of it must resume.
SETTINGS = [f"federation.rounds={ROUNDS}", "federation.num_clients=20", "train.local_epochs=1",
            "simulation.devices=simulations/configs/devices-phones.yaml"]


def pollen_simulate(*args: str) -> subprocess.Popen:
    overrides = [arg for setting in SETTINGS for arg in ("--set", setting)] if "--resume" not in args else []
    return subprocess.Popen([sys.executable, "-m", "pollen.cli", "simulate", *args, *overrides, "--threads", "1"],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen, timeout: float = 600) -> str:
    try:
        out, _ = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, out
    return out


def started_round(folder: Path, server_round: int) -> bool:
    """Some client of ``server_round`` has written its new state: the round is under way."""
    return any(path.name.endswith(f".{server_round}.pb") for path in (folder / RUN_SUBFOLDER).glob("*.pb"))


def test_a_simulation_killed_mid_round_resumes_to_the_uninterrupted_model(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    uninterrupted = pollen_simulate(TINY, "--output", str(whole))
    victim = pollen_simulate(TINY, "--output", str(killed))
    try:
        deadline = time.monotonic() + 600
        while victim.poll() is None and time.monotonic() < deadline:
            if len(RunFolder(killed).records()) > KILLED_IN - 1 and started_round(killed, KILLED_IN):
                break
            time.sleep(0.05)
        assert victim.poll() is None, "the run ended before it could be killed"
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(timeout=60)
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert len(RunFolder(killed).records()) < ROUNDS + 1
    finish(uninterrupted)

    out = finish(pollen_simulate("--resume", str(killed)))
    assert "resuming" in out

    expected, got = load_arrays(whole / RunFolder.CHECKPOINT), load_arrays(killed / RunFolder.CHECKPOINT)
    config = RunFolder(whole).read_config()
    start = initial_arrays(config.model, num_classes(config.data), config.seed)
    assert any(not np.array_equal(expected[name], start[name]) for name in start), "the model never moved"
    assert expected.keys() == got.keys()
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    same = ("round", "accuracy", "loss", "clients", "uplink_bytes", "downlink_bytes", "simulated_seconds", "dropouts")
    pick = lambda folder: [{key: getattr(r, key) for key in same} for r in RunFolder(folder).records()]  # noqa: E731
    assert pick(killed) == pick(whole)
    participants = lambda folder: (folder / RunFolder.PARTICIPANTS).read_text().splitlines()  # noqa: E731
    assert participants(killed) == participants(whole)
    assert not (killed / RUN_SUBFOLDER).exists()  # a finished run keeps no client state


def test_a_finished_run_goes_on_for_more_rounds_with_fresh_clients(tmp_path, capsys):
    assert main(["simulate", TINY, "--set", "federation.rounds=1", "--output", str(tmp_path)]) == 0
    assert main(["simulate", "--resume", str(tmp_path), "--set", "federation.rounds=2"]) == 0
    assert [r.round for r in RunFolder(tmp_path).records()] == [0, 1, 2]
    assert RunFolder(tmp_path).read_config().federation.rounds == 2
    assert RunFolder(tmp_path).records()[2].clients == 5


def state_of(value: float) -> RecordDict:
    return RecordDict({"residual": ArrayRecord({"w": Array(np.full(3, value, np.float32))}),
                       "feedback": ConfigRecord({"round": int(value)})})


def value_in(states: SpilledStates, node_id: int) -> float | None:
    state = states.load(node_id)
    return float(state["residual"]["w"].numpy()[0]) if len(state) else None


def test_resumed_client_states_are_those_after_the_checkpointed_round(tmp_path):
    states = SpilledStates(tmp_path, keep_in_memory=True)
    states.save(1, state_of(1), server_round=1)
    states.save(2, state_of(1), server_round=1)
    states.save(1, state_of(2), server_round=2)
    states.save(3, state_of(2), server_round=2)
    states.save(1, state_of(3), server_round=3)  # round 3 under way when the run is killed ...
    states.save(2, RecordDict(), server_round=3)  # ... and node 2 had emptied its state
    assert value_in(states, 1) == 3 and 2 not in states

    resumed = SpilledStates(tmp_path, resume_after=2)  # the checkpoint is of round 2
    assert [value_in(resumed, node) for node in (1, 2, 3, 4)] == [2, 1, 2, None]
    assert {path.name for path in tmp_path.iterdir()} == {"1.2.pb", "2.1.pb", "3.2.pb"}
    resumed.save(3, state_of(3), server_round=3)
    resumed.close()
    assert (tmp_path / "3.3.pb").is_file() and (tmp_path / "3.2.pb").is_file()  # a run folder's stay

    again = SpilledStates(tmp_path, resume_after=3)
    again.save(1, state_of(4), server_round=4)  # round 4 begins: round 3 is checkpointed
    assert {path.name for path in tmp_path.iterdir()} == {"1.4.pb", "1.2.pb", "2.1.pb", "3.3.pb"}
    assert [value_in(SpilledStates(tmp_path, resume_after=3), node) for node in (1, 2, 3)] == [2, 1, 3]
    fresh = SpilledStates(tmp_path)  # a new run in the same folder starts with no state
    assert not list(tmp_path.iterdir()) and 1 not in fresh


def test_resume_needs_a_run_folder(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["simulate", "--resume", str(tmp_path)])
    assert exit_info.value.code == 2 and f"--resume {tmp_path}: no config.yaml" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["simulate", TINY, "--resume", str(tmp_path)])
    assert "give no CONFIG" in capsys.readouterr().err


def test_a_run_without_a_checkpoint_cannot_be_resumed(tmp_path, capsys):
    folder = RunFolder(tmp_path)
    folder.write_config(load_config(TINY))
    with pytest.raises(SystemExit) as exit_info:
        main(["simulate", "--resume", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "no checkpoint to resume from" in err and "Traceback" not in err
