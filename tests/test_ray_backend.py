"""Flower's simulation engine (Ray) through `flwr run`: small, bounded, and every process stopped."""

import json
import os
import sys
import time

import pytest

from pollen.config import load_config
from pollen.simulations.federation import PARTICIPANTS
from pollen.simulations.ray_backend import ProcessTree, federation_config, run_on_ray, write_flower_app
from pollen.simulations.run import simulate

TINY = "simulations/configs/tiny.yaml"
SMALL = ["federation.rounds=2", "federation.num_clients=6", "federation.clients_per_round=3",
         "train.local_epochs=1", "simulation.devices=simulations/configs/devices-phones.yaml"]


def participants(folder):
    """Who was sampled, dropped and late each round (the clock can differ by a few encoded bytes)."""
    return [{key: value for key, value in json.loads(line).items() if key != "seconds"}
            for line in (folder / PARTICIPANTS).read_text().splitlines()]


def test_the_process_tree_stops_children_and_grandchildren(tmp_path):
    tree = ProcessTree()
    with (tmp_path / "log").open("w") as log:
        tree.start([sys.executable, "-c", "import subprocess, time; "
                    "subprocess.Popen(['sleep', '300']); time.sleep(300)"], dict(os.environ), tmp_path, log)
    deadline = time.monotonic() + 30
    while len(tree.known) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
        tree.remember_children()
    assert len(tree.known) == 2 and len(tree.alive()) == 2
    tree.stop(grace=5)
    assert tree.alive() == []


def test_the_generated_flower_app_carries_the_whole_config(tmp_path):
    import tomllib

    from flwr.cli.config_utils import load_and_validate
    from flwr.common.config import flatten_dict

    config = load_config(TINY, ["simulation.client_cpus=2", "simulation.client_gpus=0.5"])
    app = write_flower_app(tmp_path / "app", config, tmp_path / "run")
    project, errors = load_and_validate(app / "pyproject.toml")
    assert project is not None and errors == []
    run_config = flatten_dict(tomllib.loads((app / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    assert run_config["federation.num_clients"] == 10 and run_config["output_dir"] == str(tmp_path / "run")
    assert federation_config(config) == [
        "--federation-config", "num-supernodes=10", "--federation-config", "backend='ray'",
        "--federation-config", "client-resources-num-cpus=2",
        "--federation-config", "client-resources-num-gpus=0.5"]


def test_ray_runs_the_same_partitions_sampling_and_devices_and_stops_everything(tmp_path):
    config = load_config(TINY, SMALL + ["simulation.backend=ray"])
    processes = ProcessTree()
    try:
        records = run_on_ray(config, tmp_path / "ray", timeout=400, processes=processes)
    except RuntimeError as error:
        log = (tmp_path / "ray" / "flwr-run.log")
        pytest.fail(f"{error}\n{log.read_text()[-4000:] if log.exists() else ''}")
    assert processes.alive() == []
    assert len(processes.known) >= 3  # the SuperLink, `flwr run` and what they started
    _, in_process = simulate(load_config(TINY, SMALL), tmp_path / "inprocess")
    assert participants(tmp_path / "ray") == participants(tmp_path / "inprocess")
    assert [r.simulated_seconds for r in records] == pytest.approx([r.simulated_seconds for r in in_process], rel=0.02)
    assert [r.clients for r in records] == [r.clients for r in in_process]
    assert [r.accuracy for r in records] == pytest.approx([r.accuracy for r in in_process], abs=0.02)
